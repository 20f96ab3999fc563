"""vsmtprelay and the logins a stopped daemon left in its spool.

A daemon appends each login to relayers.db.spool-a or -b before its client
reads the success line; a killed daemon leaves there what it had not stored
yet. vsmtprelay stores those logins (the newer time wins) and empties the
spool before any command, unless a running daemon holds the spool.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from relayproxy.spool import Spool, apply_leftovers, spool_line
from relayproxy.store import RelayStore
from tests.conftest import Run, makemap, makemap_entries
from tests.daemon import Daemon, free_port

IPV6_KEY = "ipv6:2001:db8:0:0:0:0:0:1"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "relayers.db"


def spool(db: Path, suffix: str, *logins: tuple[str, int], tail: bytes = b"") -> Path:
    path = Path(f"{db}.spool-{suffix}")
    path.write_bytes(b"".join(spool_line(key, seconds) for key, seconds in logins) + tail)
    return path


def spool_files(db: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in db.parent.glob(f"{db.name}.spool-*")}


def replayed_by_the_next_daemon(db: Path) -> dict[str, int]:
    """What a daemon starting now would replay: the daemon's own code."""
    leftovers = Spool(str(db))
    try:
        return leftovers.open()
    finally:
        leftovers.close()


@pytest.mark.parametrize("command", ["list", "dump"])
def test_the_logins_a_stopped_daemon_left_are_listed_and_the_spool_emptied(
    vsmtprelay: Run, db: Path, command: str
) -> None:
    makemap("hash", str(db)[:-3], stdin="192.0.2.1\t100\n192.0.2.2\t5000\n")
    spool(db, "a", ("192.0.2.1", 200), ("192.0.2.3", 300), tail=b"192.0.2.9 9")  # torn last line
    spool(db, "b", ("192.0.2.2", 400), (IPV6_KEY, 500), ("192.0.2.3", 250))
    result = vsmtprelay("--db", str(db), command)
    assert result.returncode == 0
    # The newer time wins either way: the spool's for .1, the file's for .2.
    assert result.stdout == (f"192.0.2.1\t200\n192.0.2.2\t5000\n192.0.2.3\t300\n{IPV6_KEY}\t500\n")
    assert result.stderr == (
        "vsmtprelay: applied 4 entries left in the spool by a stopped relayproxy\n"
    )
    assert spool_files(db) == {"relayers.db.spool-a": b"", "relayers.db.spool-b": b""}
    # In the file itself, for the MTA; and said once only.
    assert makemap_entries(db) == {
        "192.0.2.1": "200",
        "192.0.2.2": "5000",
        "192.0.2.3": "300",
        IPV6_KEY: "500",
    }
    again = vsmtprelay("--db", str(db), command)
    assert (again.stdout, again.stderr) == (result.stdout, "")


@pytest.mark.parametrize(
    "args",
    [["add", "192.0.2.9", "400"], ["delete", "192.0.2.1"], ["expire"], ["list"], ["dump"]],
)
def test_every_command_applies_the_spool_first(vsmtprelay: Run, db: Path, args: list[str]) -> None:
    makemap("hash", str(db)[:-3], stdin="192.0.2.1\t10\n")
    pinned = int(time.time()) + 3600  # in the future, so that expire leaves it
    spool(db, "a", ("192.0.2.50", pinned))
    result = vsmtprelay("--db", str(db), *args)
    assert result.returncode == 0, result.stderr
    assert makemap_entries(db)["192.0.2.50"] == str(pinned)
    assert spool_files(db) == {"relayers.db.spool-a": b""}


def test_a_delete_or_an_expire_is_not_undone_by_the_next_daemon(vsmtprelay: Run, db: Path) -> None:
    old = int(time.time()) - 7200
    spool(db, "a", ("192.0.2.7", old), ("192.0.2.8", old))
    spool(db, "b")
    deleted = vsmtprelay("--db", str(db), "delete", "192.0.2.7")
    # Found: the spool's login was stored before the delete looked for it.
    assert (deleted.returncode, deleted.stdout) == (0, "")
    assert makemap_entries(db) == {"192.0.2.8": str(old)}
    spool(db, "b", ("192.0.2.9", old))
    expired = vsmtprelay("--db", str(db), "expire", "60")
    assert expired.stderr.endswith("vsmtprelay: expired 2 entries\n")
    assert makemap_entries(db) == {}
    assert replayed_by_the_next_daemon(db) == {}


def test_a_running_daemons_spool_is_left_alone_and_a_killed_ones_applied(
    vsmtprelay: Run, daemon: Daemon
) -> None:
    db = daemon.db
    daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{free_port()}")
    daemon.start()
    assert daemon.process is not None
    spool_a = Path(f"{db}.spool-a")
    assert spool_a.exists()  # the daemon's, held while it runs
    # A login the daemon spooled but has not stored yet.
    with spool_a.open("ab") as appending:
        appending.write(spool_line("192.0.2.77", 1234))
    before = spool_files(db)
    assert vsmtprelay("--db", str(db), "add", "192.0.2.1", "1").returncode == 0
    running = vsmtprelay("--db", str(db), "dump")
    assert (running.stdout, running.stderr) == ("192.0.2.1\t1\n", "")
    assert spool_files(db) == before
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=30)
    killed = vsmtprelay("--db", str(db), "dump")
    assert killed.stdout == "192.0.2.1\t1\n192.0.2.77\t1234\n"
    assert (
        killed.stderr == "vsmtprelay: applied 1 entry left in the spool by a stopped relayproxy\n"
    )
    assert set(spool_files(db).values()) == {b""}


def test_a_spool_held_by_another_open_file_is_left_alone(db: Path) -> None:
    # flock belongs to an open file description: a second open() in this same
    # process contends with the first exactly as another process would.
    spool(db, "a", ("192.0.2.5", 55))
    spool(db, "b")
    holder = Spool(str(db))
    assert holder.open() == {"192.0.2.5": 55}
    try:
        assert apply_leftovers(RelayStore(db)) == 0
        assert not db.exists()
        assert spool_files(db)["relayers.db.spool-a"] == spool_line("192.0.2.5", 55)
    finally:
        holder.close()
    assert apply_leftovers(RelayStore(db)) == 1
    assert makemap_entries(db) == {"192.0.2.5": "55"}


def test_without_a_spool_none_is_created(vsmtprelay: Run, db: Path) -> None:
    for args in (
        ["list"],
        ["add", "192.0.2.1", "1"],
        ["dump"],
        ["delete", "192.0.2.1"],
        ["expire"],
    ):
        assert vsmtprelay("--db", str(db), *args).returncode == 0
    assert sorted(path.name for path in db.parent.iterdir()) == [
        "relayers.db",
        "relayers.db.journal",
    ]


def test_a_bad_command_line_leaves_the_spool_alone(vsmtprelay: Run, db: Path) -> None:
    spool(db, "a", ("192.0.2.5", 55))
    before = spool_files(db)
    result = vsmtprelay("--db", str(db), "add", "192.0.2.1", "-5")
    assert result.returncode == 2
    assert spool_files(db) == before
    assert not db.exists()


def test_a_reader_who_may_not_write_the_spool_lists_without_a_word(
    vsmtprelay: Run, open_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two users")
    db = open_dir / "relayers.db"
    assert vsmtprelay("--db", str(db), "add", "192.0.2.1", "1").returncode == 0
    spool(db, "a", ("192.0.2.5", 55)).chmod(0o640)
    spool(db, "b").chmod(0o640)
    before = spool_files(db)
    result = vsmtprelay("--db", str(db), "list", user="65534")
    assert (result.returncode, result.stdout, result.stderr) == (0, "192.0.2.1\t1\n", "")
    assert spool_files(db) == before
