"""Login benchmark: what the proxy costs, not what Dovecot costs (issue 13, item 1).

One run starts a demo Dovecot and the stub backend (`bench/stub_backend.py`,
which accepts every login and costs little, so the proxy is the bottleneck),
then four targets in front of each backend, every one a process of its own on
loopback:

* direct      no proxy: the client talks to the backend;
* haproxy     Debian's HAProxy in TCP mode, one thread, generated config;
* bare-relay  `twisted.protocols.portforward` on the epoll reactor
              (`bench/bare_relay.py`): Twisted's floor for a relay;
* relayproxy  the daemon of this work tree (`python -m relayproxy.cli.daemon`),
              `[store] min_interval = 0`, logging to a file.

A login is, from a source address of its own (127.a.b.c, never reused in the
run, so every login through relayproxy is a new record): POP3 USER, PASS,
STAT, QUIT, or IMAP LOGIN, SELECT INBOX, LOGOUT; a random demo user against
Dovecot, any user against the stub. The client is this process (asyncio).

For each protocol and backend, after a warm-up, the targets are measured in
alternating rounds (the order rotates each round, so machine noise falls on all
alike), first with one client, then with C concurrent clients. Figures per
target: logins/s; latency p50/p99 from connect to the login's success line;
CPU per login of the PROXY process only, user and system, from the utime and
stime deltas in /proc/PID/stat (taken after a settling pause, so relayproxy's
batched recording of the last logins is counted). The stub's and the client's
CPU per login are printed too, to show they are not the bottleneck.

Then the ratios: relayproxy/bare-relay user CPU per login (goal <= 1.1),
relayproxy's added median latency over direct with one client (goal
<= 1.0 ms; HAProxy's and the bare relay's beside it for reference), and
CPU and logins/s ratios. A missed goal is marked MISSED; the exit status is 0
all the same (it is a measurement), 1 only when the benchmark itself fails: a
login fails, or after SIGTERM an address that logged in through relayproxy is
missing from its relayers.db.

    .venv/bin/python bench/logins.py [--protocols pop3,imap] [--backends dovecot,stub]
        [--targets direct,haproxy,bare-relay,relayproxy] [--logins N] [--round-size N]
        [--concurrency C] [--quick] [--profile FILE] [--py-spy FILE] [--uvloop] [--before TREE]

`--logins` counts per target, backend, protocol and client mode (one client,
C clients). `--quick` is 300 logins in rounds of 50. `--profile FILE` runs
relayproxy under cProfile; `--py-spy FILE` samples it with py-spy (raw
collapsed stacks to FILE) and prints the functions with the most own samples.
`--uvloop` adds bare-relay-uvloop and relayproxy-uvloop, the same programs on
Twisted's asyncioreactor over uvloop (`pip install uvloop`), for the reactor
comparison in the same run. `--before TREE` adds relayproxy-before, the daemon
of another checkout's relayproxy/ (e.g. `git archive REV relayproxy | tar -x -C
TREE`), so that before and after are measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, next to this file
from harness import (
    CLOCK_TICK,
    HOST,
    LOGIN,
    ROOT,
    Addresses,
    BenchError,
    Figures,
    Key,
    LoginFailed,
    Process,
    Relayproxy,
    Target,
    attempt,
    git_head,
    own_cpu_seconds,
    raise_descriptor_limit,
    records_kept,
    run_in_temporary,
    start_bare_relay,
    start_haproxy,
    start_relayproxy,
    start_stub,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for demo/, which is not an installed package

from demo.dovecot import DEMO_USERS, running_dovecot

PROTOCOLS = ("pop3", "imap")
BACKENDS = ("dovecot", "stub")
TARGETS = ("direct", "haproxy", "bare-relay", "relayproxy")
# The user CPU ratios reported, when both targets ran: (target, its floor).
PAIRS = (
    ("relayproxy", "bare-relay"),
    ("relayproxy-uvloop", "bare-relay-uvloop"),
    ("relayproxy-before", "bare-relay"),
    ("relayproxy", "relayproxy-before"),
    ("relayproxy-uvloop", "relayproxy"),
    ("bare-relay-uvloop", "bare-relay"),
)
CPU_RATIO_GOAL = 1.1
ADDED_LATENCY_GOAL_MS = 1.0
WARMUP_LOGINS = 20
# relayproxy writes a batch of records at most every second: wait that long before the
# first and after the last round of a group so that its CPU for the group is all counted.
SETTLE_SECONDS = 2.0
STUB_USER = ("bench", "bench-secret")


# --- figures -------------------------------------------------------------------------------


@dataclass
class Group:
    """One protocol, backend and client count: every target's figures, and the others'."""

    protocol: str
    backend: str
    clients: int
    targets: dict[str, Figures] = field(default_factory=dict)
    stub_ticks: tuple[int, int] | None = None  # the stub backend's CPU over the group
    client_seconds: tuple[float, float] = (0.0, 0.0)  # this process's user, system CPU

    @property
    def logins(self) -> int:
        return sum(figures.logins for figures in self.targets.values())


# --- measuring -----------------------------------------------------------------------------


def credentials(backend: str) -> tuple[str, str]:
    if backend == "stub":
        return STUB_USER
    user = random.choice(DEMO_USERS)
    return user.name, user.password


async def login_round(
    target: Target, key: Key, count: int, clients: int, addresses: Addresses
) -> Figures:
    """`count` logins to `target` by `clients` concurrent clients, each from a new address."""
    backend, protocol = key
    port = target.ports[key]
    login = LOGIN[protocol]

    async def series(share: int) -> list[float]:
        latencies: list[float] = []
        for _ in range(share):
            source = addresses.next()
            user, password = credentials(backend)
            with attempt(target, source, f"{backend} {protocol} port {port}"):
                latencies.append(await login(port, source, user, password))
        return latencies

    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    results = await asyncio.gather(*(series(share) for share in shares if share))
    elapsed = time.perf_counter() - started
    return Figures(count, elapsed, [x for r in results for x in r])


async def measure_group(
    group: Group,
    targets: Sequence[Target],
    stub: Process | None,
    options: argparse.Namespace,
    addresses: Addresses,
) -> None:
    key = (group.backend, group.protocol)
    for target in targets:
        group.targets[target.name] = Figures()
    before = {target.name: target.cpu_ticks() for target in targets}
    stub_before = stub.cpu_ticks() if stub is not None else None
    client_before = own_cpu_seconds()
    done = 0
    round_number = 0
    while done < options.logins:
        size = min(options.round_size, options.logins - done)
        shift = round_number % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            figures = await login_round(target, key, size, group.clients, addresses)
            group.targets[target.name].add(figures)
        done += size
        round_number += 1
    await asyncio.sleep(SETTLE_SECONDS)
    for target in targets:
        user, system = target.cpu_ticks()
        group.targets[target.name].user_ticks = user - before[target.name][0]
        group.targets[target.name].system_ticks = system - before[target.name][1]
    if stub is not None and stub_before is not None:
        user, system = stub.cpu_ticks()
        group.stub_ticks = (user - stub_before[0], system - stub_before[1])
    client_after = own_cpu_seconds()
    group.client_seconds = (
        client_after[0] - client_before[0],
        client_after[1] - client_before[1],
    )


async def measure(
    targets: Sequence[Target], stub: Process | None, options: argparse.Namespace
) -> list[Group]:
    addresses = Addresses()
    groups: list[Group] = []
    for protocol in options.protocols:
        for backend in options.backends:
            key = (backend, protocol)
            for target in targets:
                await login_round(target, key, WARMUP_LOGINS, 1, addresses)
            await asyncio.sleep(SETTLE_SECONDS)
            for clients in (1, options.concurrency):
                group = Group(protocol, backend, clients)
                await measure_group(
                    group, targets, stub if backend == "stub" else None, options, addresses
                )
                groups.append(group)
                print(f"  measured {protocol} {backend} {clients} client(s)", flush=True)
    return groups


# --- report --------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "" if ok else " MISSED"


def ratio_of(group: Group, mine: str, other: str) -> float:
    """User CPU per login of `mine` over `other`'s in one group."""
    below = group.targets[other].user_us
    return group.targets[mine].user_us / below if below else math.inf


def report(groups: Sequence[Group]) -> None:
    header = (
        f"{'protocol':<8} {'backend':<7} {'clients':>7} {'target':<17} {'logins':>6}"
        f" {'logins/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'user µs':>8} {'sys µs':>7}"
        f" {'CPU µs':>7}"
    )
    print(header)
    for group in groups:
        for name, f in group.targets.items():
            cpu = f"{'-':>8} {'-':>7} {'-':>7}"
            if name != "direct":
                cpu = f"{f.user_us:>8.0f} {f.system_us:>7.0f} {f.cpu_us:>7.0f}"
            print(
                f"{group.protocol:<8} {group.backend:<7} {group.clients:>7} {name:<17}"
                f" {f.logins:>6} {f.rate:>8.1f} {f.median_ms:>7.3f} {f.quantile_ms(0.99):>7.3f}"
                f" {cpu}"
            )
        extras = []
        if group.stub_ticks is not None:
            user, system = (1e6 * t / CLOCK_TICK / group.logins for t in group.stub_ticks)
            extras.append(f"stub backend {user:.0f} user + {system:.0f} sys µs")
        user, system = (1e6 * s / group.logins for s in group.client_seconds)
        extras.append(f"client (this process) {user:.0f} user + {system:.0f} sys µs")
        print(f"{'':<8} {'':<7} {'':>7} per login, all targets: {'; '.join(extras)}")
    print()
    pairs = dict.fromkeys((g.protocol, g.backend) for g in groups)
    for protocol, backend in pairs:
        mine = [g for g in groups if (g.protocol, g.backend) == (protocol, backend)]
        total: dict[str, Figures] = {}
        for group in mine:
            for name, figures in group.targets.items():
                total.setdefault(name, Figures()).add(figures)
        print(f"{protocol} {backend}:")
        relay, haproxy = total.get("relayproxy"), total.get("haproxy")
        for mine_name, floor_name in PAIRS:
            over, under = total.get(mine_name), total.get(floor_name)
            if not (over and under and under.user_us):
                continue
            ratio = over.user_us / under.user_us
            per_group = ", ".join(
                f"{g.clients} client(s) {ratio_of(g, mine_name, floor_name):.2f}" for g in mine
            )
            goal = ""
            if floor_name.startswith("bare-relay") and mine_name.startswith("relayproxy"):
                goal = f" (goal <= {CPU_RATIO_GOAL}){verdict(ratio <= CPU_RATIO_GOAL)}"
            print(
                f"  {mine_name}/{floor_name} user CPU per login {ratio:.2f}{goal} [{per_group}];"
                f" total CPU {over.cpu_us / under.cpu_us:.2f}"
            )
        if relay and haproxy and haproxy.cpu_us:
            print(
                f"  relayproxy/haproxy CPU per login: total {relay.cpu_us / haproxy.cpu_us:.2f},"
                f" user {relay.user_us / haproxy.user_us if haproxy.user_us else math.inf:.2f},"
                f" sys {relay.system_us / haproxy.system_us if haproxy.system_us else math.inf:.2f}"
            )
        single = next((g for g in mine if g.clients == 1), None)
        if single is not None and "direct" in single.targets:
            direct = single.targets["direct"]
            added = {
                name: f.median_ms - direct.median_ms
                for name, f in single.targets.items()
                if name != "direct"
            }
            text = []
            for name, value in added.items():
                goal = ""
                if name == "relayproxy":
                    goal = (
                        f" (goal <= {ADDED_LATENCY_GOAL_MS:g} ms)"
                        f"{verdict(value <= ADDED_LATENCY_GOAL_MS)}"
                    )
                text.append(f"{name} {value:+.3f} ms{goal}")
            print(f"  added p50 over direct, one client: {'; '.join(text)}")
        for group in mine:
            floor = group.targets.get("direct")
            if floor is None or not floor.rate:
                continue
            rates = ", ".join(
                f"{name} {f.rate / floor.rate:.2f}"
                for name, f in group.targets.items()
                if name != "direct"
            )
            print(f"  logins/s over direct, {group.clients} client(s): {rates}")


# --- py-spy --------------------------------------------------------------------------------


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    binary = Path(sys.executable).with_name("py-spy")
    if not binary.exists():
        raise BenchError(f"{binary} not found: pip install py-spy into the venv")
    command = [str(binary), "record", "--pid", str(pid), "--format", "raw"]
    command += ["--output", str(output), "--rate", "250", "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_py_spy(spy: subprocess.Popen[bytes], output: Path, top: int = 25) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    if not output.exists():
        stderr = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        print(f"py-spy wrote nothing: {stderr.strip()[-500:]}")
        return
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in output.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        print("py-spy: no samples")
        return
    print(f"py-spy ({total} samples of relayproxy, idle excluded): most own samples")
    for frame, count in own.most_common(top):
        print(
            f"  {100 * count / total:5.1f} % own"
            f" {100 * inclusive[frame] / total:5.1f} % incl  {frame}"
        )
    print("most inclusive samples below the reactor: relayproxy's and the log's functions")
    shown = [
        (frame, count)
        for frame, count in inclusive.most_common()
        if ("relayproxy/" in frame and "cli/daemon.py" not in frame) or "logg" in frame
    ]
    for frame, count in shown[:top]:
        print(f"  {100 * count / total:5.1f} % incl  {frame}")


# --- main ----------------------------------------------------------------------------------


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in choices]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return [c for c in choices if c in chosen]

    return parse


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--protocols", type=parse_list(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--backends", type=parse_list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--targets", type=parse_list(TARGETS), default=list(TARGETS))
    parser.add_argument(
        "--logins", type=int, default=2000, help="per target, backend, protocol, client mode"
    )
    parser.add_argument("--round-size", type=int, default=200, help="logins per round")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once")
    parser.add_argument("--quick", action="store_true", help="300 logins, rounds of 50")
    parser.add_argument("--profile", type=Path, help="run relayproxy under cProfile to FILE")
    parser.add_argument("--py-spy", type=Path, help="sample relayproxy with py-spy to FILE")
    parser.add_argument("--dir", type=Path, help="where the temporary files go")
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="also bare-relay-uvloop and relayproxy-uvloop: Twisted's asyncioreactor over uvloop",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="also relayproxy-before: the daemon of another checkout (e.g. git archive of a"
        " revision), for before/after figures in one run",
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.logins, options.round_size = 300, 50
    if options.logins < 1 or options.round_size < 1 or options.concurrency < 1:
        parser.error("--logins, --round-size and --concurrency must be positive")
    if options.py_spy and "relayproxy" not in options.targets:
        parser.error("--py-spy samples relayproxy: keep it in --targets")
    return options


def start_targets(
    options: argparse.Namespace, directory: Path, backends: dict[Key, int], targets: list[Target]
) -> None:
    """Each target of `options` in front of `backends`, appended to `targets` as it starts."""
    for name in options.targets:
        if name == "direct":
            targets.append(Target("direct", dict(backends)))
        elif name == "haproxy":
            targets.append(start_haproxy(directory / "haproxy", backends))
        elif name == "bare-relay":
            targets.append(start_bare_relay(directory / name, backends))
            if options.uvloop:
                uvloop = f"{name}-uvloop"
                targets.append(
                    start_bare_relay(directory / uvloop, backends, reactor="uvloop", name=uvloop)
                )
        else:
            targets.append(start_relayproxy(directory / name, backends, profile=options.profile))
            if options.uvloop:
                uvloop = f"{name}-uvloop"
                targets.append(
                    start_relayproxy(directory / uvloop, backends, name=uvloop, reactor="uvloop")
                )
            if options.before is not None:
                before = f"{name}-before"
                targets.append(
                    start_relayproxy(directory / before, backends, tree=options.before, name=before)
                )


def run(options: argparse.Namespace, directory: Path) -> bool:
    """Start everything, measure, report; whether the benchmark itself went right."""
    dovecot_context = (
        running_dovecot(directory / "dovecot")
        if "dovecot" in options.backends
        else contextlib.nullcontext()
    )
    with dovecot_context as dovecot:
        stub: Process | None = None
        targets: list[Target] = []
        try:
            backends: dict[Key, int] = {}
            if dovecot is not None:
                for protocol in options.protocols:
                    backends["dovecot", protocol] = getattr(dovecot.ports, protocol)
            if "stub" in options.backends:
                stub, stub_ports = start_stub(directory / "stub")
                for protocol in options.protocols:
                    backends["stub", protocol] = stub_ports[protocol]
            start_targets(options, directory, backends, targets)
            relay = next((t for t in targets if isinstance(t, Relayproxy)), None)
            spy = None
            if options.py_spy and relay is not None and relay.process is not None:
                spy = start_py_spy(relay.process.pid, options.py_spy)
            try:
                groups = asyncio.run(measure(targets, stub, options))
            except LoginFailed as exc:
                print(f"FAILED: {exc}")
                if relay is not None:
                    print(f"last lines of the relayproxy log:\n{relay.log_tail()}")
                return False
            finally:
                if spy is not None:
                    assert options.py_spy is not None
                    stop_py_spy(spy, options.py_spy)
        finally:
            statuses = {target.name: target.stop() for target in reversed(targets)}
            if stub is not None:
                stub.stop()
    print()
    report(groups)
    print()
    return records_kept(targets, statuses)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    raise_descriptor_limit()
    print(
        f"relayproxy: work tree at {git_head()}; {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{options.logins} logins per target, backend, protocol and client mode, in rounds of"
        f" {options.round_size}, targets alternated; 1 and {options.concurrency} clients;"
        f" each login from its own address; client and backends on {HOST}"
    )
    return run_in_temporary("bench-logins-", options.dir, lambda temp: run(options, temp), started)


if __name__ == "__main__":
    sys.exit(main())
