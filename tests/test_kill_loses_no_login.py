"""SIGKILL the daemon at random moments of a login loop: no told-success login is lost.

A client thread logs in again and again through relayproxy to the real
Dovecot, each time from a new loopback address, and notes every address
whose client *read* the ``+OK`` to its ``PASS``. The test kills the daemon
with SIGKILL right after a random number of further ``PASS`` commands went
out (so most kills land with a login between the backend and the client),
restarts it, and after the last restart every noted address must be in
relayers.db. Without the spool (or with the record made after the answer
is sent) a kill loses the logins of the recorder's batch window.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

from demo.dovecot import Dovecot
from tests.daemon import Daemon, told_pop3_login

KILLS = 200


class LoginLoop(threading.Thread):
    """Logs in from 127.10.x.y, one address per attempt, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.told_success: list[str] = []
        self.pass_sent = threading.Semaphore(0)
        self.stopping = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.attempts += 1
            source = f"127.10.{self.attempts // 250 % 250 + 1}.{self.attempts % 250 + 1}"
            try:
                if told_pop3_login(self.port, source, timeout=5, pass_sent=self.pass_sent.release):
                    self.told_success.append(source)
            except OSError:
                pass  # the daemon is down or was killed mid-dialogue: next address


def test_no_login_told_success_is_lost_across_sigkills(tmp_path: Path, dovecot: Dovecot) -> None:
    daemon = Daemon(tmp_path)
    port = daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")
    daemon.start()
    loop = LoginLoop(port)
    loop.start()
    chance = random.Random(20261125)
    kills_mid_login = 0
    try:
        for _ in range(KILLS):
            for _ in range(chance.randint(1, 3)):
                assert loop.pass_sent.acquire(timeout=30), daemon.log()[-2000:]
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            kills_mid_login += 1
            daemon.start()
    finally:
        loop.stopping.set()
        loop.join(timeout=30)
    assert daemon.stop() == 0
    recorded = set(daemon.entries())
    lost = [source for source in loop.told_success if source not in recorded]
    assert kills_mid_login == KILLS
    assert len(loop.told_success) >= KILLS, loop.attempts
    assert lost == [], f"{len(lost)} of {len(loop.told_success)} lost: {lost[:20]}"
    # The kills did land inside the recorder's window: restarts replayed the spool.
    assert " spool.replay " in daemon.log()
