from __future__ import annotations

import fcntl
import itertools
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayproxy import mapfile
from relayproxy import store as store_module
from relayproxy.store import (
    Entry,
    RelayStore,
    StoreError,
    StoreLockTimeoutError,
    StoreMissingError,
)
from tests.conftest import DB_DUMP, DB_VERIFY, makemap, makemap_entries


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "relayers.db"


def test_records_are_read_back_by_the_store_makemap_and_db_dump(db_path: Path) -> None:
    store = RelayStore(db_path)
    assert store.record([("192.0.2.1", 1700000000), ("ipv6:2001:db8:0:0:0:0:0:1", 5)]) == 2
    assert store.get("192.0.2.1") == Entry(b"192.0.2.1", b"1700000000")
    assert store.get("192.0.2.2") is None
    assert makemap_entries(db_path) == {
        "192.0.2.1": "1700000000",
        "ipv6:2001:db8:0:0:0:0:0:1": "5",
    }
    dump = subprocess.run([DB_DUMP, "-p", str(db_path)], capture_output=True, text=True)
    assert dump.returncode == 0
    # db_dump -p prints keys and values printably, one per line, with no trailing NUL.
    assert " 192.0.2.1\n 1700000000\n" in dump.stdout
    assert "\\00" not in dump.stdout
    assert "type=hash" in dump.stdout


def test_a_batch_rewrites_existing_keys_and_delete_reports_the_absent(db_path: Path) -> None:
    store = RelayStore(db_path)
    store.record([("192.0.2.1", 1), ("192.0.2.2", 2)])
    store.record([("192.0.2.1", 3)])
    assert store.delete(["192.0.2.2", "192.0.2.9"]) == {"192.0.2.9"}
    assert [(e.key, e.value) for e in store.entries()] == [(b"192.0.2.1", b"3")]


def test_expire_removes_old_entries_and_keeps_pinned_and_hand_made_ones(db_path: Path) -> None:
    store = RelayStore(db_path)
    store.record([("192.0.2.1", 100), ("192.0.2.2", 200), ("192.0.2.3", 300)])
    makemap_add = makemap("-u", "hash", str(db_path)[:-3])  # read-only sanity
    assert makemap_add.returncode == 0
    assert store.expire(200) == 2
    assert {e.key for e in store.entries()} == {b"192.0.2.3"}


def test_reading_a_missing_file_creates_nothing(db_path: Path) -> None:
    store = RelayStore(db_path)
    with pytest.raises(StoreMissingError):
        list(store.entries())
    assert store.delete(["192.0.2.1"]) == {"192.0.2.1"}
    assert store.expire(10) == 0
    assert not db_path.exists()


def test_a_new_file_gets_the_configured_mode_whatever_the_umask(db_path: Path) -> None:
    old = os.umask(0o077)
    try:
        RelayStore(db_path, mode=0o640, group=0).record([("192.0.2.1", 1)])
    finally:
        os.umask(old)
    st = db_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == 0
    journal = Path(str(db_path) + ".journal").stat()
    assert stat.S_IMODE(journal.st_mode) == 0o640


def test_an_existing_file_keeps_its_mode_and_its_inode(db_path: Path) -> None:
    makemap("hash", str(db_path)[:-3], stdin="192.0.2.1\t1\n")
    os.chmod(db_path, 0o600)
    inode = db_path.stat().st_ino
    store = RelayStore(db_path, mode=0o644)
    store.record([("192.0.2.2", 2)])
    store.expire(1)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert db_path.stat().st_ino == inode
    assert makemap_entries(db_path) == {"192.0.2.2": "2"}


def test_an_unknown_group_is_a_clear_error(db_path: Path) -> None:
    with pytest.raises(StoreError, match="unknown group 'no-such-group'"):
        RelayStore(db_path, group="no-such-group").record([("192.0.2.1", 1)])
    assert not db_path.exists()


def test_a_file_that_is_not_a_hash_database_is_named_in_the_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database\n" * 200)
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match=str(db_path)):
        list(RelayStore(db_path).entries())
    with pytest.raises(StoreError, match=str(db_path)):
        RelayStore(db_path).record([("192.0.2.1", 1)])
    assert db_path.read_bytes() == before


def test_a_rebuild_by_makemap_is_taken_as_the_truth(db_path: Path) -> None:
    store = RelayStore(db_path)
    store.record([("192.0.2.1", 1)])
    # The administrator rebuilds the map by hand: the journal must not resurrect 192.0.2.1.
    assert makemap("hash", str(db_path)[:-3], stdin="192.0.2.5\t5\n").returncode == 0
    store.record([("192.0.2.6", 6)])
    assert makemap_entries(db_path) == {"192.0.2.5": "5", "192.0.2.6": "6"}


def test_sorted_entries_spill_to_disk_and_merge_in_address_order(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_SORT_CHUNK", 7)
    store = RelayStore(db_path)
    keys = [f"10.0.{i // 10}.{i % 10 * 3}" for i in range(50)] + [
        "ipv6:0:0:0:0:0:0:0:2",
        "::1",
        "9.255.255.255",
    ]
    store.record((k, 1) for k in keys)
    listed = [e.key.decode() for e in store.sorted_entries()]
    assert listed[0] == "9.255.255.255"
    assert listed[-2:] == ["::1", "ipv6:0:0:0:0:0:0:0:2"]
    assert listed[1:4] == ["10.0.0.0", "10.0.0.3", "10.0.0.6"]
    assert sorted(listed) == sorted(keys)
    assert len(listed) == len(keys)


def _hold_lock(path: Path, operation: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, operation)
    return fd


def test_a_reader_holding_a_shared_lock_delays_a_writer_which_then_succeeds(
    db_path: Path,
) -> None:
    RelayStore(db_path).record([("192.0.2.1", 1)])
    reader = _hold_lock(db_path, fcntl.LOCK_SH)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relayproxy.cli.vsmtprelay",
            "--db",
            str(db_path),
            "add",
            "192.0.2.2",
            "2",
        ],
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=1.0)  # blocked: the reader's lock is honoured
        assert "192.0.2.2" not in makemap_entries(db_path)
    finally:
        os.close(reader)
    assert writer.wait(timeout=30) == 0
    assert makemap_entries(db_path)["192.0.2.2"] == "2"


def test_a_lock_held_past_the_deadline_fails_clearly_and_changes_nothing(db_path: Path) -> None:
    RelayStore(db_path).record([("192.0.2.1", 1)])
    before = db_path.read_bytes()
    holder = _hold_lock(db_path, fcntl.LOCK_EX)
    try:
        store = RelayStore(db_path, lock_timeout=0.3)
        with pytest.raises(StoreLockTimeoutError, match=rf"{db_path}: could not get the exclusive"):
            store.record([("192.0.2.2", 2)])
        with pytest.raises(StoreLockTimeoutError, match=r"shared lock within 0\.3 s"):
            store.get("192.0.2.1")
    finally:
        os.close(holder)
    assert db_path.read_bytes() == before


def test_makemap_waits_for_our_exclusive_lock(db_path: Path) -> None:
    """The lock we take is the one makemap honours (flock on the .db file)."""
    RelayStore(db_path).record([("192.0.2.1", 1)])
    holder = _hold_lock(db_path, fcntl.LOCK_EX)
    reader = subprocess.Popen(
        ["makemap", "-u", "hash", str(db_path)[:-3]], stdout=subprocess.PIPE, text=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            reader.wait(timeout=1.0)
    finally:
        os.close(holder)
    out, _ = reader.communicate(timeout=30)
    assert out == "192.0.2.1\t1\n"


_WRITER = """
import sys
from relayproxy.store import RelayStore
store = RelayStore(sys.argv[1])
first = int(sys.argv[2])
for batch in range(100):
    store.record((f"10.{first}.{batch}.{i}", batch) for i in range(20))
"""


def test_four_concurrent_writers_lose_nothing(db_path: Path) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(db_path), str(n)]) for n in range(4)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    assert len(makemap_entries(db_path)) == 8000
    assert sum(1 for _ in RelayStore(db_path).entries()) == 8000
    assert subprocess.run([DB_VERIFY, "-q", str(db_path)]).returncode == 0


def _writer_child(path: Path, generation: int, ack_fd: int) -> None:
    # A cache far smaller than the file makes Berkeley DB write pages while a
    # batch is applied, as it does in production once relayers.db outgrows
    # the cache: that is when an unjournalled writer corrupts the file.
    mapfile._CACHE_BYTES = 32 * 1024
    store = RelayStore(path)
    batch = 0
    while True:
        store.record((f"10.{generation % 250}.{batch % 250}.{i}", generation) for i in range(200))
        os.write(ack_fd, b"%d\n" % batch)
        batch += 1


def test_sigkill_at_random_moments_never_loses_an_acknowledged_batch(db_path: Path) -> None:
    """A forked writer is killed 200 times mid-stream; every acked batch must survive."""
    rng = random.Random(20261125)
    # A file much larger than the writer's cache, so that pages are written
    # (and hash buckets split) while a batch is being applied.
    seed = {f"172.16.{i // 250}.{i % 250}": 7 for i in range(60000)}
    RelayStore(db_path).record(seed.items())
    expected = {k.encode(): b"7" for k in seed}
    killed_mid_write = 0
    for generation in range(200):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(read_fd)
            try:
                _writer_child(db_path, generation, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        # Kill at a random moment: sometimes before the first ack, mostly mid-batch.
        acks = b""
        wanted = rng.randint(0, 6)
        while acks.count(b"\n") < wanted:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            acks += chunk
        spin = rng.randint(0, 20000)
        while spin:
            spin -= 1
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        acks += _drain(read_fd)
        os.close(read_fd)
        killed_mid_write += not RelayStore(db_path).journal.clean()
        for line in acks.split():
            batch = int(line)
            for i in range(200):
                expected[f"10.{generation % 250}.{batch % 250}.{i}".encode()] = b"%d" % generation
        if generation % 20 == 19:
            # What the MTA side sees before any repair: makemap can still open and read it.
            assert makemap("-u", "hash", str(db_path)[:-3]).returncode == 0
    # The test means something only if many kills landed inside a write.
    print("killed mid-write", killed_mid_write)
    assert killed_mid_write >= 20, killed_mid_write
    store = RelayStore(db_path)
    store.recover()
    found = {e.key: e.value for e in store.entries()}
    missing = [k for k in expected if k not in found]
    assert not missing, f"{len(missing)} acknowledged keys lost"
    assert all(found[k] == v for k, v in expected.items())
    assert subprocess.run([DB_VERIFY, "-q", str(db_path)]).returncode == 0
    assert len(makemap_entries(db_path)) == len(found)


def _drain(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def test_every_write_moves_the_mtime_to_a_later_second_for_sendmail(db_path: Path) -> None:
    """sendmail rereads a map only when st_mtime (whole seconds) grows."""
    store = RelayStore(db_path)
    store.record([("192.0.2.1", 1)])
    seconds = [db_path.stat().st_mtime_ns // 10**9]
    for n in range(5):
        store.record([(f"192.0.2.{n + 2}", 1)])
        seconds.append(db_path.stat().st_mtime_ns // 10**9)
    assert all(later > earlier for earlier, later in itertools.pairwise(seconds))
    # Bounded lead over the clock, however fast the writes come.
    assert seconds[-1] <= time.time() + mapfile._MTIME_MAX_LEAD
