"""Every core (issue 13, item 5): relayproxy with N workers against one, in the same run.

Two daemons of this work tree in front of the stub backend
(`bench/stub_backend.py`, which accepts every login and costs little, so the
proxy is the bottleneck): `[daemon] workers = 1` (the single process) and
`workers = N`. Many concurrent clients (this process, asyncio; each login
from a source address of its own, so every login is a new record) log in
to each in alternating rounds, the order rotating each round so that the
machine's noise falls on both alike.

Printed per target: logins/s, latency p50/p99 from connect to the login's
success line, and CPU per login summed over the daemon's processes (the
parent and every worker: /proc utime and stime deltas, taken after a
settling pause so that the batched recording of the last logins counts).
Then the ratio logins/s(N workers) / logins/s(1 worker), against the goal
of 1.6 for 2 workers where the machine has the cores; the share of the
N-worker daemon's CPU each worker took (how evenly the one shared socket
spreads the connections); the CPU count, the load average before and
after, and this client's and the stub's CPU per login (on a small machine
they compete with the workers for the same cores).

The exit status is 0 (it is a measurement) unless a login fails or, after
SIGTERM, an address that logged in is missing from a daemon's relayers.db.

    .venv/bin/python bench/workers.py [--workers N] [--protocols pop3,imap]
        [--logins N] [--round-size N] [--concurrency C] [--quick]
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
    CLOCK_TICK,
    LOGIN,
    Addresses,
    Figures,
    Process,
    Relayproxy,
    Target,
    attempt,
    children,
    cpu_ticks,
    git_head,
    own_cpu_seconds,
    raise_descriptor_limit,
    records_kept,
    run_in_temporary,
    start_relayproxy,
    start_stub,
)

GOAL = 1.6  # logins/s of 2 workers over 1, where the machine has 2 free cores
SETTLE_SECONDS = 2.0
WARMUP_LOGINS = 100
USER, PASSWORD = "bench", "bench-secret"


async def login_round(
    target: Target, protocol: str, count: int, clients: int, addresses: Addresses
) -> Figures:
    """`count` logins by `clients` concurrent clients, each from a new address."""
    port = target.ports["stub", protocol]
    login = LOGIN[protocol]

    async def series(share: int) -> list[float]:
        latencies = []
        for _ in range(share):
            source = addresses.next()
            with attempt(target, source, f"stub {protocol} port {port}"):
                latencies.append(await login(port, source, USER, PASSWORD))
        return latencies

    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    results = await asyncio.gather(*(series(share) for share in shares if share))
    return Figures(count, time.perf_counter() - started, [x for r in results for x in r])


def worker_ticks(target: Target) -> dict[int, int]:
    """user + system ticks of each worker process of `target`, by pid."""
    assert target.process is not None
    return {pid: sum(cpu_ticks(pid)) for pid in children(target.process.pid)}


@dataclass
class Measured:
    """One protocol's figures: each target's, and what the rest of the machine spent."""

    figures: dict[str, Figures]
    per_worker: dict[int, int]  # the many-worker daemon's CPU ticks, by worker pid
    client_seconds: tuple[float, float]  # this process: user, system
    stub_ticks: tuple[int, int]


async def measure(
    targets: Sequence[Target], stub: Process, protocol: str, options: argparse.Namespace
) -> Measured:
    """Every target's figures for `protocol` (the last target has the many workers)."""
    addresses = Addresses()
    for target in targets:
        await login_round(target, protocol, WARMUP_LOGINS, options.concurrency, addresses)
    await asyncio.sleep(SETTLE_SECONDS)
    figures = {target.name: Figures() for target in targets}
    before = {target.name: target.cpu_ticks() for target in targets}
    workers_before = worker_ticks(targets[-1])
    stub_before = stub.cpu_ticks()
    client_before = own_cpu_seconds()
    done = 0
    while done < options.logins:
        size = min(options.round_size, options.logins - done)
        shift = (done // options.round_size) % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            result = await login_round(target, protocol, size, options.concurrency, addresses)
            figures[target.name].add(result)
        done += size
    await asyncio.sleep(SETTLE_SECONDS)
    for target in targets:
        user, system = target.cpu_ticks()
        figures[target.name].user_ticks = user - before[target.name][0]
        figures[target.name].system_ticks = system - before[target.name][1]
    after = worker_ticks(targets[-1])
    per_worker = {pid: ticks - workers_before.get(pid, 0) for pid, ticks in after.items()}
    client = own_cpu_seconds()
    client_seconds = (client[0] - client_before[0], client[1] - client_before[1])
    stub_after = stub.cpu_ticks()
    stub_ticks = (stub_after[0] - stub_before[0], stub_after[1] - stub_before[1])
    return Measured(figures, per_worker, client_seconds, stub_ticks)


def report(protocol: str, measured: Measured, workers: int) -> None:
    figures, per_worker = measured.figures, measured.per_worker
    print(
        f"{'protocol':<8} {'target':<10} {'logins':>6} {'logins/s':>8} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'user µs':>8} {'sys µs':>7} {'CPU µs':>7}"
    )
    for name, f in figures.items():
        print(
            f"{protocol:<8} {name:<10} {f.logins:>6} {f.rate:>8.1f} {f.median_ms:>7.3f}"
            f" {f.quantile_ms(0.99):>7.3f} {f.user_us:>8.0f} {f.system_us:>7.0f} {f.cpu_us:>7.0f}"
        )
    one, many = figures["workers-1"], figures[f"workers-{workers}"]
    ratio = many.rate / one.rate if one.rate else float("inf")
    goal = ""
    if workers == 2:
        goal = f" (goal >= {GOAL} where 2 cores are free){'' if ratio >= GOAL else ' MISSED'}"
    print(f"  logins/s {workers} workers / 1 worker: {ratio:.2f}{goal}")
    print(f"  CPU per login {workers} workers / 1 worker: {many.cpu_us / one.cpu_us:.2f}")
    total = sum(per_worker.values()) or 1
    shares = ", ".join(f"{100 * ticks / total:.0f} %" for ticks in sorted(per_worker.values()))
    print(f"  share of the {workers} workers' CPU per worker: {shares}")
    logins = sum(f.logins for f in figures.values())
    client = " + ".join(f"{1e6 * s / logins:.0f}" for s in measured.client_seconds)
    stub = " + ".join(f"{1e6 * t / CLOCK_TICK / logins:.0f}" for t in measured.stub_ticks)
    print(f"  per login, user + sys µs: client (this process) {client}; stub backend {stub}")


def run(options: argparse.Namespace, directory: Path) -> bool:
    stub, stub_ports = start_stub(directory / "stub")
    backends = {("stub", protocol): stub_ports[protocol] for protocol in options.protocols}
    targets: list[Target] = []
    try:
        for count in (1, options.workers):
            name = f"workers-{count}"
            targets.append(start_relayproxy(directory / name, backends, name=name, workers=count))
        for target in targets:
            wait_ready(target)
        for protocol in options.protocols:
            print()
            measured = asyncio.run(measure(targets, stub, protocol, options))
            report(protocol, measured, options.workers)
    finally:
        statuses = {target.name: target.stop() for target in reversed(targets)}
        stub.stop()
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return records_kept(targets, statuses)


def wait_ready(target: Target) -> None:
    """The daemon's workers serve (the parent's socket accepts before they do)."""
    assert isinstance(target, Relayproxy) and target.process is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if target.name == "workers-1" or " daemon.workers.ready " in target.log_tail(200):
            return
        target.process.alive()
        time.sleep(0.05)


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=2, help="the many-worker daemon's N")
    parser.add_argument("--protocols", default="pop3,imap", type=lambda t: t.split(","))
    parser.add_argument("--logins", type=int, default=6000, help="per target and protocol")
    parser.add_argument("--round-size", type=int, default=1000, help="logins per round")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at once")
    parser.add_argument("--quick", action="store_true", help="1,000 logins, rounds of 250")
    parser.add_argument("--dir", type=Path, help="where the temporary files go")
    options = parser.parse_args(argv)
    if options.quick:
        options.logins, options.round_size = 1000, 250
    if options.workers < 2 or options.logins < 1 or options.round_size < 1:
        parser.error("--workers must be 2 or more; --logins and --round-size positive")
    if not set(options.protocols) <= set(LOGIN):
        parser.error(f"--protocols: choose from {', '.join(LOGIN)}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    raise_descriptor_limit()
    print(
        f"relayproxy: work tree at {git_head()}; {os.cpu_count()} CPUs"
        f" ({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{options.logins} logins per target and protocol, rounds of {options.round_size},"
        f" targets alternated; {options.concurrency} concurrent clients; stub backend"
    )
    return run_in_temporary("bench-workers-", options.dir, lambda d: run(options, d), started)


if __name__ == "__main__":
    sys.exit(main())
