"""``[daemon] workers = N``: the real daemon, a parent and N workers, before the real Dovecot.

What an operator observes: every worker serves clients on the one port,
logins are recorded, a killed worker comes back without losing a login its
client was told of, SIGHUP reaches every worker, SIGTERM drains them all
and the parent's exit status says so, and a killed parent takes no worker
with it into a half-life.
"""

from __future__ import annotations

import os
import poplib
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from demo.certs import make_ca, make_server_cert
from demo.dovecot import Dovecot
from relayproxy.spool import Spool, apply_leftovers, spool_line, spool_paths
from relayproxy.store import RelayStore
from relayproxy.workers import Backoff
from tests.daemon import Daemon, free_port, wait_for
from tests.test_daemon_lifecycle import login, sighup_and_wait
from tests.test_kill_loses_no_login import LoginLoop
from tests.test_pop3_proxy import curl

WORKERS = {"allow_root": "yes", "workers": "2"}
PER_IP = "80"


def start_workers(daemon: Daemon, dovecot: Dovecot, **settings: str) -> int:
    daemon.daemon_settings = {**WORKERS, **settings}
    # Up to 40 clients from one address, however unevenly the workers take
    # them: each worker's share of the limit (limit / N) must hold them all.
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        max_connections_per_ip=PER_IP,
    )
    daemon.start()
    daemon.wait_for_log("daemon.workers.ready")
    return port


def worker_pids(daemon: Daemon) -> list[int]:
    assert daemon.process is not None
    pid = daemon.process.pid
    try:
        return [int(word) for word in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def holders(port: int, pids: list[int]) -> Counter[int]:
    """How many established connections to ``port`` each of ``pids`` holds (from /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED, the proxy's side
            inodes.add(fields[9])
    held: Counter[int] = Counter()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held[pid] += 1
    return held


def held_by_every_worker(daemon: Daemon, port: int, connections: int = 40) -> Counter[int]:
    """Open ``connections`` clients at once, each reading its greeting; who holds them."""
    pids = worker_pids(daemon)
    with ExitStack() as stack:
        clients = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(connections)
        ]
        for client in clients:
            assert client.recv(512).startswith(b"+OK"), "no greeting"
        return wait_for(
            "the workers to hold every connection",
            lambda: (held := holders(port, pids)).total() == connections and held,
        )


class SourcedPOP3(poplib.POP3):
    """poplib's client, connecting from a loopback address of the test's choosing."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


def test_two_workers_serve_the_one_port_and_record_every_login(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = start_workers(daemon, dovecot)
    pids = worker_pids(daemon)
    assert len(pids) == 2
    assert len(daemon.log_lines("daemon.worker.started")) == 2
    held = held_by_every_worker(daemon, port)
    assert sorted(held) == sorted(pids), f"a worker accepted nothing: {held}"
    sources = [f"127.0.41.{n}" for n in range(1, 21)]
    for source in sources[:10]:
        assert curl(source, "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/").returncode == 0
    for source in sources[10:]:
        client = SourcedPOP3(source, port)
        client.user("bob")
        client.pass_("bob-secret")
        client.quit()
    assert daemon.stop() == 0
    assert set(sources) <= set(daemon.entries())
    exited = daemon.log_lines("daemon.worker.exited")
    assert len(exited) == 2 and all("status=0" in line for line in exited), exited
    # Each worker kept its own spool, and emptied it once its logins were stored.
    for number in (1, 2):
        assert all(os.path.getsize(path) == 0 for path in spool_paths(str(daemon.db), number))


def test_a_killed_worker_is_restarted_and_no_login_told_success_is_lost(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = start_workers(daemon, dovecot)
    loop = LoginLoop(port)
    loop.start()
    chance = random.Random(20261125)
    kills = 12
    try:
        for kill in range(kills):
            for _ in range(chance.randint(1, 3)):
                assert loop.pass_sent.acquire(timeout=30), daemon.log()[-2000:]
            pids = worker_pids(daemon)
            # The worker holding the login in flight, when there is one.
            victim = next(iter(holders(port, pids)), pids[kill % 2])
            os.kill(victim, signal.SIGKILL)
            wait_for(
                "the worker's restart",
                lambda n=kill: len(daemon.log_lines("daemon.worker.started")) >= 3 + n,
            )
            wait_for("two workers", lambda: len(worker_pids(daemon)) == 2)
    finally:
        loop.stopping.set()
        loop.join(timeout=30)
    assert daemon.stop() == 0, daemon.log()[-2000:]
    recorded = set(daemon.entries())
    lost = [source for source in loop.told_success if source not in recorded]
    assert len(loop.told_success) >= kills
    assert lost == [], f"{len(lost)} of {len(loop.told_success)} lost: {lost[:20]}"
    killed = [line for line in daemon.log_lines("daemon.worker.exited") if "status=SIGKILL" in line]
    assert len(killed) == kills
    assert len(daemon.log_lines("daemon.worker.restart")) == kills
    # Every worker had a spool of its own, and restarted workers replayed theirs.
    assert daemon.log_lines("spool.error") == []
    assert daemon.log_lines("spool.replay") != []


def test_sighup_reaches_every_worker(daemon: Daemon, dovecot: Dovecot) -> None:
    port = start_workers(daemon, dovecot)
    added = free_port()
    daemon.extra = (
        f"\n[listener:added]\nprotocol = pop3\nlisten = 127.0.0.1:{added}\n"
        f"backend = 127.0.0.1:{dovecot.ports.pop3}\nmax_connections_per_ip = {PER_IP}\n"
    )
    daemon.config_path.write_text(daemon.config_text())
    sighup_and_wait(daemon, "config.reloaded")
    wait_for("both workers to reload", lambda: len(daemon.log_lines("config.reloaded")) == 2)
    # Each worker binds the new listener beside its sibling's: clients reach both.
    held = held_by_every_worker(daemon, added)
    assert sorted(held) == sorted(worker_pids(daemon)), held
    login(added).quit()
    login(port).quit()
    assert len(daemon.log_lines("daemon.worker.exited")) == 0  # nobody died of the signal


def test_sighup_gives_every_worker_the_new_certificate_of_an_implicit_tls_listener(
    daemon: Daemon, dovecot: Dovecot, tmp_path: Path
) -> None:
    other_ca, other_ca_key = make_ca(tmp_path / "other", name="Other Test CA")
    other_cert, other_key = make_server_cert(tmp_path / "other", other_ca, other_ca_key)
    daemon.daemon_settings = WORKERS
    port = daemon.listener(
        "pop3s",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        tls="implicit",
        certificate=str(dovecot.server_certificate),
        private_key=str(dovecot.server_key),
        # 30 sessions from one address, however unevenly the workers take them:
        # each worker's share of this limit (limit / N) must still hold all 30.
        max_connections_per_ip=PER_IP,
    )
    daemon.start()
    daemon.wait_for_log("daemon.workers.ready")
    daemon.listeners[0].settings.update(certificate=str(other_cert), private_key=str(other_key))
    daemon.config_path.write_text(daemon.config_text())
    sighup_and_wait(daemon, "config.reloaded")
    wait_for("both workers to reload", lambda: len(daemon.log_lines("config.reloaded")) == 2)
    context = ssl.create_default_context(cafile=str(other_ca))
    with ExitStack() as stack:
        for _ in range(30):  # each verifies the new certificate, whichever worker took it
            client = poplib.POP3_SSL("localhost", port, context=context, timeout=10)
            stack.callback(client.close)
        held = wait_for(
            "the workers to hold the TLS sessions",
            lambda: (h := holders(port, worker_pids(daemon))).total() == 30 and h,
        )
    assert sorted(held) == sorted(worker_pids(daemon)), held


def test_a_proxy_header_from_a_trusted_peer_names_the_client_in_every_worker(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    daemon.daemon_settings = WORKERS
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        proxy_protocol_in="127.0.0.0/8",
    )
    daemon.start()
    daemon.wait_for_log("daemon.workers.ready")
    clients = [f"198.51.100.{n}" for n in range(1, 11)]
    for client in clients:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode())
            replies = connection.makefile("rb")
            assert replies.readline().startswith(b"+OK")
            connection.sendall(b"USER alice\r\nPASS alice-secret\r\n")
            assert replies.readline().startswith(b"+OK")
            assert replies.readline().startswith(b"+OK")
            connection.sendall(b"QUIT\r\n")
    assert daemon.stop() == 0
    assert set(clients) <= set(daemon.entries())


def test_sigusr1_reaches_every_worker(daemon: Daemon, dovecot: Dovecot) -> None:
    start_workers(daemon, dovecot)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR1)
    # The parent's line and each worker's.
    wait_for("three log.reopened lines", lambda: len(daemon.log_lines("log.reopened")) == 3)


def test_sigterm_lets_a_login_in_progress_finish_in_its_worker(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = start_workers(daemon, dovecot)
    client = SourcedPOP3("127.0.42.1", port)
    client.user("alice")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log("shutdown.waiting")
    assert client.pass_("alice-secret").startswith(b"+OK")
    client.quit()
    assert daemon.process.wait(timeout=30) == 0
    assert "127.0.42.1" in daemon.entries()
    assert len(daemon.log_lines("daemon.worker.exited")) == 2


def test_a_killed_parent_leaves_no_worker_behind(daemon: Daemon, dovecot: Dovecot) -> None:
    start_workers(daemon, dovecot)
    pids = worker_pids(daemon)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
        except FileNotFoundError:
            return True

    wait_for("the orphaned workers to stop", lambda: all(gone(pid) for pid in pids))
    assert len(daemon.log_lines("daemon.worker.orphaned")) == 2


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "0 is outside 1..1024"),
        ("many", "'many' is not a whole number (a number of processes, or auto)"),
        ("-2", "'-2' is not a whole number"),
        ("1025", "1025 is outside 1..1024"),
    ],
)
def test_a_bad_workers_value_is_a_config_error(tmp_path: Path, value: str, problem: str) -> None:
    config = tmp_path / "relayproxy.ini"
    config.write_text(
        f"[store]\npath = {tmp_path}/relayers.db\n[daemon]\nworkers = {value}\n"
        "[listener:pop3]\nprotocol = pop3\nlisten = 127.0.0.1:1110\nbackend = 127.0.0.1:110\n"
    )
    done = check_config(config)
    assert done.returncode == 2
    assert f"{config}: [daemon] workers: {problem}" in done.stderr


def test_metrics_with_several_workers_is_refused_naming_both_keys(tmp_path: Path) -> None:
    config = tmp_path / "relayproxy.ini"
    config.write_text(
        f"[store]\npath = {tmp_path}/relayers.db\n[daemon]\nworkers = auto\n"
        "[metrics]\nlisten = 127.0.0.1:9465\n"
        "[listener:pop3]\nprotocol = pop3\nlisten = 127.0.0.1:1110\nbackend = 127.0.0.1:110\n"
    )
    done = check_config(config)
    if len(os.sched_getaffinity(0)) == 1:
        assert done.returncode == 0  # auto is one worker here: nothing to refuse
        return
    assert done.returncode == 2
    assert "[daemon] workers:" in done.stderr and "[metrics] listen" in done.stderr


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the spools of several workers --


def leave(paths: tuple[str, str], key: str, seconds: int) -> None:
    with open(paths[1], "ab") as spool:
        spool.write(spool_line(key, seconds))
    Path(paths[0]).touch()


def test_worker_one_adopts_the_spools_no_running_worker_owns(tmp_path: Path) -> None:
    db = str(tmp_path / "relayers.db")
    leave(spool_paths(db), "192.0.2.1", 100)  # the single process's, before workers
    leave(spool_paths(db, 3), "192.0.2.3", 300)  # a worker beyond workers = 2
    leave(spool_paths(db, 2), "192.0.2.2", 200)  # worker 2's own: left to it
    first = Spool(db, 1, 2)
    assert first.open() == {"192.0.2.1": 100, "192.0.2.3": 300}
    second = Spool(db, 2, 2)
    assert second.open() == {"192.0.2.2": 200}
    for paths in (spool_paths(db), spool_paths(db, 3)):
        assert all(os.path.getsize(path) == 0 for path in paths)
    first.close()
    second.close()


def test_a_single_process_adopts_every_worker_spool(tmp_path: Path) -> None:
    db = str(tmp_path / "relayers.db")
    leave(spool_paths(db, 1), "192.0.2.1", 100)
    leave(spool_paths(db, 2), "192.0.2.2", 200)
    busy = Spool(db, 2, 2)
    busy.open()  # a worker still running keeps its own
    single = Spool(db)
    assert single.open() == {"192.0.2.1": 100}
    busy.close()
    single.close()


def test_vsmtprelay_applies_the_leftovers_of_every_free_spool(tmp_path: Path) -> None:
    db = str(tmp_path / "relayers.db")
    leave(spool_paths(db), "192.0.2.1", 100)
    leave(spool_paths(db, 1), "192.0.2.11", 110)
    leave(spool_paths(db, 2), "192.0.2.12", 120)
    running = Spool(db, 2, 2)
    running.open()
    store = RelayStore(db)
    assert apply_leftovers(store) == 2
    assert {e.key.decode() for e in store.entries()} == {"192.0.2.1", "192.0.2.11"}
    running.close()
    assert apply_leftovers(store) == 1


def test_a_crash_looping_worker_is_restarted_ever_more_slowly() -> None:
    backoff = Backoff(minimum=0.1, maximum=10.0, stable=5.0)
    delays = [backoff.next(ran_for=0.5) for _ in range(10)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == 10.0
    assert backoff.next(ran_for=60.0) == 0.1  # it had been running fine: restart at once
