"""Store benchmark: recording, listing and expiring relayers.db at scale.

Prints absolute figures and, because these machines are noisy, ratios
against a baseline measured in the same run: plain Berkeley DB doing the
same work with no lock, no journal and no sorting. Goals (issue 2):
recording >= 50,000 addresses/s in batches of 100; expire of 1,000,000
entries under 10 s; peak memory of `list` flat in the number of entries.

    .venv/bin/python bench/store.py [--small]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from berkeleydb import db

from relayproxy.store import RelayStore


def addresses(start: int, count: int) -> Iterator[str]:
    for n in range(start, start + count):
        yield f"{10 + (n >> 24) % 200}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def batches(start: int, count: int, size: int) -> Iterator[list[tuple[str, int]]]:
    now = int(time.time())
    batch: list[tuple[str, int]] = []
    for address in addresses(start, count):
        batch.append((address, now))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def record_store(path: Path, count: int, size: int) -> float:
    store = RelayStore(path)
    started = time.perf_counter()
    for batch in batches(0, count, size):
        store.record(batch)
    return time.perf_counter() - started


def record_plain(path: Path, count: int, size: int) -> float:
    """Baseline: the same batches straight into Berkeley DB, open/put/sync/close."""
    started = time.perf_counter()
    for batch in batches(0, count, size):
        handle = db.DB()
        handle.open(str(path), dbtype=db.DB_HASH, flags=db.DB_CREATE, mode=0o644)
        for key, seconds in batch:
            handle.put(key.encode(), b"%d" % seconds)
        handle.sync()
        handle.close()
    return time.perf_counter() - started


def expire_plain(path: Path, cutoff: int) -> tuple[float, int]:
    started = time.perf_counter()
    handle = db.DB()
    handle.open(str(path), dbtype=db.DB_HASH)
    cursor = handle.cursor()
    removed = 0
    record = cursor.first()
    while record is not None:
        if int(record[1]) <= cutoff:
            cursor.delete()
            removed += 1
        record = cursor.next()
    cursor.close()
    handle.sync()
    handle.close()
    return time.perf_counter() - started, removed


def peak_rss_kib(command: list[str]) -> tuple[float, int]:
    """Run a child to completion; its wall time and its own peak RSS (not ours)."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        child = subprocess.Popen(command, stdout=devnull)
        _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, command
    return time.perf_counter() - started, usage.ru_maxrss


def vsmtprelay(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "relayproxy.cli.vsmtprelay", "--db", str(path), *args]


def line(name: str, value: str, ratio: str = "") -> None:
    print(f"{name:<48} {value:>22} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="10x fewer entries (a quick look)")
    options = parser.parse_args()
    scale = 10 if options.small else 1
    recorded, large = 100_000 // scale, 1_000_000 // scale

    with tempfile.TemporaryDirectory(prefix="relayproxy-bench-") as temp:
        work = Path(temp)
        print(f"relayproxy store benchmark, {recorded} recorded, {large} listed/expired")
        plain = record_plain(work / "plain.db", recorded, 100)
        ours = record_store(work / "store.db", recorded, 100)
        line(
            "record, batches of 100 (store)",
            f"{recorded / ours:,.0f} addr/s",
            f"ratio {plain / ours:.2f} of plain BDB ({recorded / plain:,.0f} addr/s); "
            "goal >= 50,000",
        )

        small_list, small_rss = peak_rss_kib(vsmtprelay(work / "store.db", "list"))
        # Grow the same file to the large size in big batches.
        store = RelayStore(work / "store.db")
        for batch in batches(recorded, large - recorded, 10_000):
            store.record(batch)
        large_list, large_rss = peak_rss_kib(vsmtprelay(work / "store.db", "list"))
        line(
            f"list {large:,} entries (sorted, streamed)",
            f"{large / large_list:,.0f} entries/s",
            f"{large_list:.2f} s",
        )
        line(
            "list peak RSS (whole process)",
            f"{large_rss / 1024:.1f} MiB at {large:,}",
            f"vs {small_rss / 1024:.1f} MiB at {recorded:,} ({small_list:.2f} s): "
            f"ratio {large_rss / small_rss:.2f} for {large // recorded}x the entries (flat: ~1)",
        )

        # Expire everything: the worst case for the journal and the file.
        subprocess.run(["cp", work / "store.db", work / "plain-large.db"], check=True)
        cutoff = int(time.time()) + 1
        plain_expire, plain_removed = expire_plain(work / "plain-large.db", cutoff)
        started = time.perf_counter()
        removed = RelayStore(work / "store.db").expire(cutoff)
        ours_expire = time.perf_counter() - started
        assert removed == plain_removed == large, (removed, plain_removed)
        line(
            f"expire {large:,} entries (store)",
            f"{ours_expire:.2f} s",
            f"ratio {ours_expire / plain_expire:.2f} of plain BDB ({plain_expire:.2f} s); "
            "goal < 10 s",
        )


if __name__ == "__main__":
    main()
