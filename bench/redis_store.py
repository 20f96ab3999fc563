"""Recording into Redis in batches, beside recording into the local file, in one run.

Each row records the same addresses (each new) in batches, and prints
addresses/s and the ratio to a baseline measured in the same run: a bare
redis-py pipeline of ``SET key value EXAT t`` (no keep-newer check, no
change stream) for Redis, and ``RelayStore`` (relayers.db) for the file.
Goal (issue 12): Redis recording >= 50,000 addresses/s in batches.

The Redis server is Debian's redis-server, started on a free loopback port.

    .venv/bin/python bench/redis_store.py [--count N] [--batch N ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
# store.py is next to this file; demo/ (next to bench/) is not an installed package.
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
from store import batches  # noqa: E402

from demo.redis_servers import RedisServer, client  # noqa: E402
from relayproxy.redis_store import RedisStore  # noqa: E402
from relayproxy.store import RelayStore  # noqa: E402

TTL_SECONDS = 1440 * 60


def timed(write: Callable[[list[tuple[str, int]]], object], count: int, size: int) -> float:
    started = time.perf_counter()
    for batch in batches(0, count, size):
        write(batch)
    return time.perf_counter() - started


def bare_pipeline(connection: redis.Redis) -> Callable[[list[tuple[str, int]]], object]:
    def write(batch: list[tuple[str, int]]) -> object:
        pipe = connection.pipeline(transaction=False)
        for key, seconds in batch:
            pipe.set(key, seconds, exat=seconds + TTL_SECONDS)
        return pipe.execute()

    return write


def line(name: str, count: int, seconds: float, baseline: float, against: str) -> None:
    print(
        f"{name:<44} {count / seconds:>12,.0f} addr/s   "
        f"ratio {baseline / seconds:.2f} of {against} ({count / baseline:,.0f} addr/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="addresses per row")
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 2000])
    options = parser.parse_args()
    count = options.count

    with tempfile.TemporaryDirectory(prefix="relayproxy-bench-") as temp:
        work = Path(temp)
        with RedisServer(work / "redis") as server:
            connection = client(server.port)
            print(f"recording {count:,} new addresses per row; redis-server on {server.port}")
            for size in options.batch:
                connection.flushall()
                bare = timed(bare_pipeline(connection), count, size)
                connection.flushall()
                store = RedisStore(connection, path=server.url)
                ours = timed(store.record, count, size)
                assert connection.dbsize() == count + 1  # the addresses and the change stream
                line(f"Redis, batches of {size} (RedisStore)", count, ours, bare, "bare SET EXAT")
                relay_file = RelayStore(work / f"relayers-{size}.db")
                on_file = timed(relay_file.record, count, size)
                line(f"file, batches of {size} (RelayStore)", count, on_file, ours, "RedisStore")
            print("goal: Redis recording >= 50,000 addresses/s in batches")


if __name__ == "__main__":
    main()
