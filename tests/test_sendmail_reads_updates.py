"""A running sendmail that holds relayers.db open sees every update, in place.

sendmail's db_map_lookup() reopens a hash map only when fstat() of the
descriptor it holds shows a later st_mtime, in whole seconds. This test
keeps one `sendmail -bt` process alive across several quick updates made
by vsmtprelay, which is what the daemon does to a long-lived sendmail.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("sendmail") is None,
    reason="needs root (a private UTS namespace) and sendmail-bin",
)


class SendmailTestMode:
    """`sendmail -bt` on a pseudo-terminal: it buffers its answers on a pipe."""

    def __init__(self, cf: Path) -> None:
        self._master, slave = pty.openpty()
        # An unqualified host name makes sendmail sleep 60 s at start-up:
        # give this one a qualified name in a UTS namespace of its own.
        command = f"hostname mta.relayproxy.test && exec sendmail -C {cf} -bt"
        self.process = subprocess.Popen(
            ["unshare", "--uts", "sh", "-c", command], stdin=slave, stdout=slave, stderr=slave
        )
        os.close(slave)

    def lookup(self, map_name: str, key: str) -> str:
        os.write(self._master, f"/map {map_name} {key}\n".encode())
        seen = b""
        deadline = time.monotonic() + 20
        while b" (0)" not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no answer from sendmail: {seen!r}"
            if select.select([self._master], [], [], remaining)[0]:
                seen += os.read(self._master, 4096)
        answer = seen.decode().split("map_lookup:")[-1].split(" (0)")[0] + " (0)"
        answer = answer.replace("WARNING: World writable directory /tmp", "")
        return " ".join(answer.split())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        os.close(self._master)


@pytest.fixture
def sendmail(tmp_path: Path) -> Iterator[SendmailTestMode]:
    cf = tmp_path / "test.cf"
    # The same map declaration as Debian's FEATURE(`drac'): hash, -o, no -f.
    cf.write_text(
        f"V10/Berkeley\nO DontBlameSendmail=MapInUnsafeDirPath\nKdrac hash -o {tmp_path}/relayers\n"
    )
    tester = SendmailTestMode(cf)
    yield tester
    tester.close()


def test_one_sendmail_process_sees_quick_successive_updates(
    vsmtprelay: Run, tmp_path: Path, sendmail: SendmailTestMode
) -> None:
    db = str(tmp_path / "relayers.db")
    assert vsmtprelay("--db", db, "add", "192.0.2.1", "5").returncode == 0
    assert sendmail.lookup("drac", "192.0.2.1") == "drac (192.0.2.1) returns 5 (0)"
    assert sendmail.lookup("drac", "192.0.2.2") == "drac (192.0.2.2) no match (0)"
    # Three updates, each seen by the same sendmail, typically within one second.
    assert vsmtprelay("--db", db, "add", "192.0.2.2", "7").returncode == 0
    assert sendmail.lookup("drac", "192.0.2.2") == "drac (192.0.2.2) returns 7 (0)"
    assert vsmtprelay("--db", db, "add", "192.0.2.3", "8").returncode == 0
    assert sendmail.lookup("drac", "192.0.2.3") == "drac (192.0.2.3) returns 8 (0)"
    assert vsmtprelay("--db", db, "delete", "192.0.2.3").returncode == 0
    assert sendmail.lookup("drac", "192.0.2.3") == "drac (192.0.2.3) no match (0)"


def test_sendmail_finds_ipv6_clients_under_the_key_we_write(
    vsmtprelay: Run, tmp_path: Path, sendmail: SendmailTestMode
) -> None:
    db = str(tmp_path / "relayers.db")
    assert vsmtprelay("--db", db, "add", "2001:db8::1", "9").returncode == 0
    # ${client_addr} as sendmail sets it for an IPv6 peer (IPV6_FULL); the
    # map lookup folds it to lower case, which is the key we store.
    assert sendmail.lookup("drac", "IPv6:2001:db8:0:0:0:0:0:1") == (
        "drac (IPv6:2001:db8:0:0:0:0:0:1) returns 9 (0)"
    )
