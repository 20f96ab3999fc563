"""Mirror lag: from a login written to Redis to the same login in the mirrored hash file.

Starts a real redis-server and ``relayproxy-mirror`` (this work tree's) on
loopback, writes logins into Redis through the Redis store (the proxies'
own writes: one script call and its stream entry per batch) at a steady
rate, and polls the mirrored file as an MTA reads it (open, shared lock,
Berkeley DB lookup, close). A login's lag is from the moment Redis
acknowledged its write to the first poll that finds it. Goal (issue 12):
p99 <= 1 s.

    .venv/bin/python bench/mirror_lag.py [--rate 500] [--seconds 10] [--batch 1]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from berkeleydb import db

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for demo/, which is not an installed package

from demo.redis_servers import RedisServer  # noqa: E402
from relayproxy.config import parse_config  # noqa: E402
from relayproxy.redis_store import RedisStore  # noqa: E402

GOAL_P99 = 1.0


def address(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Writer(threading.Thread):
    """Logins into Redis at ``rate`` per second, ``batch`` per write; notes when each landed.

    ``written`` is in the order of the writes, which is the stream's order,
    in which the mirror applies them: a login found in the file means every
    earlier one is there too, so the poller reads from the first one not yet seen.
    """

    def __init__(self, store: RedisStore, rate: float, seconds: float, batch: int) -> None:
        super().__init__(daemon=True)
        self.store, self.rate, self.seconds, self.batch = store, rate, seconds, batch
        self.written: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        start = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - start) < self.seconds:
            due = int(elapsed * self.rate) + 1
            if n >= due:
                time.sleep(min(0.001, (n + 1) / self.rate - elapsed))
                continue
            keys = [address(k) for k in range(n, min(due, n + self.batch))]
            self.store.record([(key, int(time.time())) for key in keys])
            landed = time.monotonic()
            with self.lock:
                self.written += [(key, landed) for key in keys]
            n += len(keys)


def read_as_an_mta(path: str, keys: list[str]) -> int:
    """How many of ``keys``, in order, are there, read as sendmail's hash map does.

    LOCK_SH, open read-only, one get per key, close: a new open per poll, as
    an MTA reopens a map whose mtime moved.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        database = db.DB()
        database.open(path, dbtype=db.DB_HASH, flags=db.DB_RDONLY)
        try:
            for count, key in enumerate(keys):
                if database.get(key.encode()) is None:
                    return count
            return len(keys)
        finally:
            database.close()
    finally:
        os.close(fd)


def measure(directory: Path, rate: float, seconds: float, batch: int, poll: float) -> int:
    server = RedisServer(directory / "redis")
    server.start()
    mirror_db = directory / "relayers.db"
    log = directory / "mirror.log"
    store_section = f"[store]\nbackend = redis\nredis_url = {server.url}\n"
    ini = directory / "mirror.ini"
    ini.write_text(
        f"{store_section}path = {directory / 'spool'}\n"
        f"[mirror]\npath = {mirror_db}\n[log]\ntarget = file:{log}\n"
    )
    mirror = subprocess.Popen(
        [sys.executable, "-m", "relayproxy.cli.mirror", "--config", str(ini)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and " mirror.resync " in log.read_text()):
            if time.monotonic() > deadline or mirror.poll() is not None:
                print("the mirror did not start; its log:", file=sys.stderr)
                print(log.read_text() if log.exists() else "(none)", file=sys.stderr)
                return 1
            time.sleep(0.05)
        store = RedisStore.from_config(parse_config(store_section, "bench").store)
        writer = Writer(store, rate, seconds, batch)
        lags: list[float] = []
        polls = 0
        writer.start()
        seen = 0
        while writer.is_alive() or seen < len(writer.written):
            with writer.lock:
                pending = writer.written[seen:]
            found = read_as_an_mta(str(mirror_db), [key for key, _ in pending])
            now = time.monotonic()
            polls += 1
            lags += [now - landed for _, landed in pending[:found]]
            seen += found
            if not writer.is_alive() and found < len(pending) and now - pending[-1][1] > 30:
                print(f"{len(pending) - found} logins never reached the file", file=sys.stderr)
                return 1
            time.sleep(poll)
        lags.sort()
        p50 = statistics.median(lags)
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        resyncs = log.read_text().count(" mirror.resync ")
        print(
            f"mirror lag: {len(lags)} logins at {len(lags) / seconds:.0f}/s "
            f"(target {rate:g}/s, {batch} per write), polled every {poll * 1000:g} ms "
            f"({polls} polls)"
        )
        print(
            f"  p50 {p50 * 1000:.1f} ms  p90 {lags[int(len(lags) * 0.9)] * 1000:.1f} ms  "
            f"p99 {p99 * 1000:.1f} ms  max {lags[-1] * 1000:.1f} ms  (resyncs: {resyncs})"
        )
        met = "met" if p99 <= GOAL_P99 else "NOT met"
        print(f"  goal p99 <= {GOAL_P99:g} s: {met}")
        return 0 if p99 <= GOAL_P99 else 1
    finally:
        mirror.send_signal(signal.SIGTERM)
        mirror.wait(timeout=30)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="logins per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1, help="logins per Redis write")
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between reads")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-lag-") as directory:
        return measure(Path(directory), options.rate, options.seconds, options.batch, options.poll)


if __name__ == "__main__":
    sys.exit(main())
