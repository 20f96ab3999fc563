"""The daemon with relayers.db deleted under it, or on a full disk: logs say so, nothing lost."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from demo.dovecot import Dovecot
from relayproxy.store import RelayStore, StoreMissingError
from tests.daemon import Daemon, wait_for
from tests.test_store_changed_behind_its_back import fill, small_disk


def pop3_login(port: int, source: str) -> None:
    """Log in as alice from ``source``; returns once the client has read the +OK."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0)
    ) as connection:
        replies = connection.makefile("rb")
        assert replies.readline().startswith(b"+OK")
        for command in (b"USER alice\r\n", b"PASS alice-secret\r\n"):
            connection.sendall(command)
            assert replies.readline().startswith(b"+OK"), command
        connection.sendall(b"QUIT\r\n")


def stored_keys(path: Path) -> set[str]:
    try:
        return {entry.key.decode() for entry in RelayStore(path).entries()}
    except StoreMissingError:
        return set()


def test_a_deleted_file_is_logged_and_a_new_one_started(daemon: Daemon, dovecot: Dovecot) -> None:
    port = daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")
    daemon.start()
    pop3_login(port, "127.30.0.1")
    daemon.wait_for_record("127.30.0.1")
    os.unlink(daemon.db)
    pop3_login(port, "127.30.0.2")
    daemon.wait_for_record("127.30.0.2")
    line = daemon.wait_for_log("store.notice", "deleted while in use")
    assert "1 entry it held dropped with it and a new file is started" in line
    assert line.split()[1] == "warn"
    assert set(daemon.entries()) == {"127.30.0.2"}


def test_a_full_disk_is_logged_as_such_and_every_login_lands_once_space_returns(
    daemon: Daemon, dovecot: Dovecot, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        db = disk / "relayers.db"
        daemon.store_settings["path"] = str(db)
        port = daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")
        daemon.start()
        pop3_login(port, "127.31.0.1")
        wait_for("the first login stored", lambda: "127.31.0.1" in stored_keys(db) or None)
        filler = fill(disk)
        sources = [f"127.31.1.{i}" for i in range(1, 21)]
        for source in sources:
            pop3_login(port, source)
        error = daemon.wait_for_log("store.error", "No space left on device")
        assert "died" not in daemon.log()
        filler.unlink()
        wait_for(
            "every login stored once space returned",
            lambda: set(sources) <= stored_keys(db) or None,
            timeout=60,
        )
        assert daemon.stop() == 0
        assert "127.31.0.1" in stored_keys(db)
        assert error.split()[1] == "error"
