"""relayers.db deleted, replaced or on a full disk: the store says what happened, loses nothing.

The full disk is a real one: a tmpfs of a few hundred KiB, filled with a
file until the kernel answers ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayproxy.store import RelayStore, StoreError
from tests.conftest import makemap


def keys(store: RelayStore) -> set[str]:
    return {entry.key.decode() for entry in store.entries()}


def test_a_deleted_file_is_said_to_be_deleted_and_a_new_one_started(tmp_path: Path) -> None:
    notices: list[str] = []
    store = RelayStore(tmp_path / "relayers.db", notice=notices.append)
    store.record([("192.0.2.1", 1000), ("192.0.2.2", 1000)])
    os.unlink(store.path)
    store.record([("192.0.2.3", 2000)])
    assert keys(store) == {"192.0.2.3"}
    assert notices == [
        f"{store.path}: deleted while in use; 2 entries it held dropped with it "
        "and a new file is started"
    ]


def test_a_replaced_file_wins_and_the_notice_counts_what_it_dropped(tmp_path: Path) -> None:
    notices: list[str] = []
    store = RelayStore(tmp_path / "relayers.db", notice=notices.append)
    store.record([("192.0.2.1", 1000), ("192.0.2.2", 1000), ("192.0.2.3", 1000)])
    made = makemap("hash", str(tmp_path / "relayers"), stdin="192.0.2.1\t1000\n192.0.2.9\t1\n")
    assert made.returncode == 0, made.stderr
    store.record([("192.0.2.4", 2000)])
    assert keys(store) == {"192.0.2.1", "192.0.2.9", "192.0.2.4"}
    assert len(notices) == 1
    assert "replaced by another program" in notices[0]
    assert "2 entries it does not have dropped" in notices[0]


@contextlib.contextmanager
def small_disk(directory: Path, size: str = "384k") -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    directory.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem; returns the filler to delete later."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_is_reported_as_such_and_costs_nothing_once_space_returns(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        notices: list[str] = []
        store = RelayStore(disk / "relayers.db", notice=notices.append)
        store.record([(f"192.0.2.{i}", 1000) for i in range(1, 50)])
        filler = fill(disk)
        batch = [(f"198.51.100.{i}", 2000) for i in range(1, 200)]
        failures = []
        for _ in range(3):  # the recorder's retries, as they would come
            with pytest.raises(StoreError) as failure:
                store.record(batch)
            failures.append(str(failure.value))
        assert all("No space left on device" in message for message in failures), failures
        # The file is untouched and still readable as it was.
        assert keys(store) == {f"192.0.2.{i}" for i in range(1, 50)}
        filler.unlink()
        store.record(batch)
        assert keys(store) == {f"192.0.2.{i}" for i in range(1, 50)} | {k for k, _ in batch}
        assert not any("died" in notice for notice in notices), notices
