"""Memory per idle logged-in connection through relayproxy (issue 13, item 6).

One run starts the stub backend (`bench/stub_backend.py`) and, in front of its
IMAP port, the relayproxy daemon of this work tree (`[store] min_interval = 0`,
`max_connections` above the session count, logging to a file) and, for
reference, the bare Twisted relay (`bench/bare_relay.py`). For each proxy in
turn: a warm-up of logins, a settling pause, its VmRSS (/proc/PID/status);
then N IMAP sessions opened through it, each from a source address of its own
(127.a.b.c), logged in (LOGIN) and with INBOX selected, and left idle; after
another pause its VmRSS again. The growth divided by N is the memory per idle
logged-in connection (goal for relayproxy: <= 8 KiB). The sessions are then
closed and the RSS once more shown (memory Python keeps after they end).

This process raises its own RLIMIT_NOFILE up to the hard limit (it holds one
descriptor per session); relayproxy raises its own from `max_connections`.
At the end relayproxy gets SIGTERM and every address that logged in through it
must be in its relayers.db. Exit status 1 when one is not or a login fails,
else 0 (a measurement: a missed goal is marked MISSED).

    .venv/bin/python bench/memory.py [--sessions N] [--concurrency C] [--quick]
                                     [--targets relayproxy,bare-relay]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, next to this file
from harness import (
    LOGIN_TIMEOUT,
    Addresses,
    LineClient,
    LoginFailed,
    Relayproxy,
    Target,
    attempt,
    git_head,
    imap_login,
    imap_open,
    raise_descriptor_limit,
    records_kept,
    run_in_temporary,
    start_bare_relay,
    start_relayproxy,
    start_stub,
)

TARGETS = ("relayproxy", "bare-relay")
GOAL_KIB = 8.0
WARMUP_LOGINS = 50
SETTLE_SECONDS = 2.0
KEY = ("stub", "imap")


@dataclass
class Memory:
    target: str
    sessions: int
    before_kib: int
    after_kib: int
    closed_kib: int
    open_seconds: float

    @property
    def per_connection_kib(self) -> float:
        return (self.after_kib - self.before_kib) / self.sessions


async def open_sessions(
    target: Target, count: int, concurrency: int, addresses: Addresses
) -> list[LineClient]:
    port = target.ports[KEY]
    gate = asyncio.Semaphore(concurrency)
    sessions: list[LineClient] = []

    async def one() -> None:
        async with gate:
            source = addresses.next()
            with attempt(target, source, f"port {port}, session {len(sessions) + 1},"):
                async with asyncio.timeout(LOGIN_TIMEOUT):
                    client, _ = await imap_open(port, source, "bench", "bench-secret")
            sessions.append(client)

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        for client in sessions:
            client.close()
        raise
    return sessions


async def measure_target(
    target: Target, options: argparse.Namespace, addresses: Addresses
) -> Memory:
    assert target.process is not None
    port = target.ports[KEY]
    for _ in range(WARMUP_LOGINS):
        source = addresses.next()
        await imap_login(port, source, "bench", "bench-secret")
        target.sources.append(source)
    await asyncio.sleep(SETTLE_SECONDS)
    before = target.process.rss_kb()
    started = time.perf_counter()
    sessions = await open_sessions(target, options.sessions, options.concurrency, addresses)
    opened = time.perf_counter() - started
    await asyncio.sleep(SETTLE_SECONDS)
    if any(client.closed for client in sessions):
        raise LoginFailed(f"{target.name}: sessions closed while idle")
    after = target.process.rss_kb()
    for client in sessions:
        client.close()
    await asyncio.sleep(SETTLE_SECONDS)
    closed = target.process.rss_kb()
    return Memory(target.name, options.sessions, before, after, closed, opened)


async def measure(targets: Sequence[Target], options: argparse.Namespace) -> list[Memory]:
    addresses = Addresses()
    results = []
    for target in targets:
        results.append(await measure_target(target, options, addresses))
        print(f"  measured {target.name}", flush=True)
    return results


def report(results: Sequence[Memory]) -> None:
    print(
        f"{'target':<10} {'sessions':>8} {'RSS before':>10} {'RSS idle':>9} {'per conn':>9}"
        f" {'RSS closed':>10} {'opened in':>9}"
    )
    for m in results:
        print(
            f"{m.target:<10} {m.sessions:>8} {m.before_kib / 1024:>7.1f} MiB"
            f" {m.after_kib / 1024:>5.1f} MiB {m.per_connection_kib:>5.2f} KiB"
            f" {m.closed_kib / 1024:>6.1f} MiB {m.open_seconds:>7.2f} s"
        )
    for m in results:
        if m.target == "relayproxy":
            ok = m.per_connection_kib <= GOAL_KIB
            print(
                f"relayproxy: {m.per_connection_kib:.2f} KiB per idle logged-in IMAP connection"
                f" (goal <= {GOAL_KIB:g} KiB){'' if ok else ' MISSED'}"
            )


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=2000, help="idle sessions per proxy")
    parser.add_argument("--concurrency", type=int, default=100, help="sessions opened at once")
    parser.add_argument("--quick", action="store_true", help="500 sessions")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="relayproxy,bare-relay (a comma-separated subset)",
    )
    parser.add_argument("--dir", type=Path, help="where the temporary files go")
    options = parser.parse_args(argv)
    if options.quick:
        options.sessions = 500
    options.targets = [t.strip() for t in options.targets.split(",") if t.strip()]
    if not options.targets or any(t not in TARGETS for t in options.targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if options.sessions < 1 or options.concurrency < 1:
        parser.error("--sessions and --concurrency must be positive")
    return options


def run(options: argparse.Namespace, directory: Path) -> bool:
    stub, stub_ports = start_stub(directory / "stub")
    targets: list[Target] = []
    try:
        backends = {KEY: stub_ports["imap"]}
        for name in options.targets:
            if name == "relayproxy":
                targets.append(
                    start_relayproxy(
                        directory / "relayproxy", backends, max_connections=options.sessions + 100
                    )
                )
            else:
                targets.append(start_bare_relay(directory / "bare-relay", backends))
        try:
            results = asyncio.run(measure(targets, options))
        except LoginFailed as exc:
            print(f"FAILED: {exc}")
            for target in targets:
                if isinstance(target, Relayproxy):
                    print(f"last lines of the relayproxy log:\n{target.log_tail()}")
            return False
    finally:
        statuses = {target.name: target.stop() for target in targets}
        stub.stop()
    print()
    report(results)
    return records_kept(targets, statuses)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    limit = raise_descriptor_limit()
    print(
        f"relayproxy: work tree at {git_head()}; {os.cpu_count()} CPUs;"
        f" {options.sessions} idle IMAP sessions per proxy to the stub backend;"
        f" descriptor limit here {limit}"
    )
    if limit < options.sessions + 100:
        print(f"FAILED: {options.sessions} sessions need more descriptors than {limit}")
        return 1
    return run_in_temporary("bench-memory-", options.dir, lambda temp: run(options, temp), started)


if __name__ == "__main__":
    sys.exit(main())
