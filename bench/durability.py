"""Durability cost: the relayproxy daemon with the spool versus the revision before it.

Issue 10, item 1: appending each login to relayers.db.spool-a/-b (one write(2)
on the reactor, before the backend's success line is forwarded) may cost at
most 3 % more daemon CPU per login and 0.1 ms more median login latency.

One run starts one demo Dovecot and two `relayproxy` daemons in front of it,
each a subprocess with its own INI, relayers.db and log in a temporary
directory ([store] min_interval = 0):

* "baseline": the revision just before the spool was added (the parent of
  the oldest commit that added relayproxy/spool.py; `--baseline REV` picks
  another), checked out with `git worktree add --detach` into the temporary
  directory and run from there (cwd and PYTHONPATH);
* "spool": this work tree, uncommitted changes included (`--spool REV` runs a
  revision instead, from a worktree likewise: `--spool R --baseline R` shows
  the noise floor, `--spool C --baseline C^` the cost of commit C alone).

Both run under the same Python (this one). Every login comes from an
address of its own (127.x.y.z, bound before connecting, never reused by
either side), so every login is a new record: with one address the recorder
coalesces and the spool is never written. Logins are sequential (one client)
in interleaved rounds (baseline, spool, then spool, baseline, ...) so that
machine noise falls on both sides alike. A login is: connect, greeting,
USER/PASS (POP3) or LOGIN (IMAP), QUIT/LOGOUT, close. The client, the
daemons' configuration, start and stop, and the CPU readings are those of
`bench/harness.py`.

Figures per protocol and side: daemon CPU per login, user and system, from
/proc/PID/stat (utime and stime over all the rounds plus a settling pause
for the last batch, divided by the logins); median and p90 latency from
connect to the login's success line; logins/s. Then CPU per login
spool/baseline (goal <= 1.03) and the added median latency spool - baseline
(goal <= 0.1 ms), each marked MISSED when missed, and the spread of the
added median over the rounds as a gauge of the noise. Independent of that
noise, the step's own cost: time per `Spool.append` call, in this process.

At the end both daemons get SIGTERM (they drain) and every address each
side logged in from must be in its relayers.db. Exit status 1 when one is
not, or when the benchmark itself fails; 0 otherwise, goals missed or not
(it is a measurement).

    .venv/bin/python bench/durability.py [--protocols pop3,imap] [--logins N]
                                         [--round-size N] [--quick]
                                         [--baseline REV] [--spool REV]
                                         [--appends N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, next to this file
from harness import (
    LOGIN,
    ROOT,
    Addresses,
    BenchError,
    Figures,
    LoginFailed,
    Relayproxy,
    attempt,
    git,
    git_head,
    run_in_temporary,
    start_relayproxy,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for demo/, which is not an installed package

from demo.dovecot import DEMO_USERS, running_dovecot
from relayproxy.spool import Spool, spool_paths

PROTOCOLS = ("pop3", "imap")
SIDES = ("baseline", "spool")
BACKEND = "dovecot"
CPU_RATIO_GOAL = 1.03
ADDED_LATENCY_GOAL_MS = 0.1
WARMUP_LOGINS = 20
# The recorder writes a batch at most every second ([store] batch_interval) and the spool
# is synced every second (sync_interval): wait that long before and after the rounds so
# that the CPU of the last batch is counted, and the warm-up's is not.
SETTLE_SECONDS = 2.0
SPOOL_ADDED_IN = "relayproxy/spool.py"
# The bare login, nothing after it but QUIT/LOGOUT (no STAT, no SELECT).
LOGIN_ONLY = {protocol: functools.partial(login, browse=False) for protocol, login in LOGIN.items()}


def spool_files(daemon: Relayproxy) -> list[str]:
    return [path for path in spool_paths(str(daemon.db)) if Path(path).exists()]


# --- figures -------------------------------------------------------------------------------


@dataclass
class Side(Figures):
    """One side's figures over a protocol's rounds, and each round's median latency."""

    round_medians: list[float] = field(default_factory=list)


Results = dict[str, dict[str, Side]]  # protocol -> side name -> figures


async def login_round(
    daemon: Relayproxy, protocol: str, count: int, addresses: Addresses, side: Side | None
) -> None:
    """`count` sequential logins to `daemon`, each from a new address; figures into `side`."""
    login = LOGIN_ONLY[protocol]
    port = daemon.ports[BACKEND, protocol]
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(count):
        user = DEMO_USERS[n % len(DEMO_USERS)]
        source = addresses.next()
        with attempt(daemon, source, f"{protocol} port {port}, login {n + 1} of {count},"):
            latencies.append(await login(port, source, user.name, user.password))
    elapsed = time.perf_counter() - started
    if side is not None:
        side.add(Figures(count, elapsed, latencies))
        side.round_medians.append(statistics.median(latencies))


async def measure(
    daemons: Sequence[Relayproxy], protocols: Sequence[str], options: argparse.Namespace
) -> Results:
    addresses = Addresses()
    results: Results = {}
    round_number = 0
    for protocol in protocols:
        sides = {daemon.name: Side() for daemon in daemons}
        for daemon in daemons:
            await login_round(daemon, protocol, WARMUP_LOGINS, addresses, None)
        await asyncio.sleep(SETTLE_SECONDS)
        before = {daemon.name: daemon.cpu_ticks() for daemon in daemons}
        done = 0
        while done < options.logins:
            size = min(options.round_size, options.logins - done)
            order = daemons if round_number % 2 == 0 else list(reversed(daemons))
            for daemon in order:
                await login_round(daemon, protocol, size, addresses, sides[daemon.name])
            done += size
            round_number += 1
        await asyncio.sleep(SETTLE_SECONDS)
        for daemon in daemons:
            user, system = daemon.cpu_ticks()
            sides[daemon.name].user_ticks = user - before[daemon.name][0]
            sides[daemon.name].system_ticks = system - before[daemon.name][1]
        results[protocol] = sides
    return results


@dataclass
class AppendCost:
    calls: int
    wall_us: float  # per call, median of the chunks
    cpu_us: float  # per call, process CPU over all the chunks


def measure_append(calls: int, directory: Path, chunks: int = 5) -> AppendCost:
    """Time `Spool.append` in this process: `calls` appends to a fresh spool."""
    spool = Spool(str(directory / "relayers.db"))
    spool.open()
    keys = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(calls)]
    seconds = int(time.time())
    size = max(1, calls // chunks)
    walls: list[float] = []
    try:
        cpu_started = time.process_time()
        for start in range(0, calls, size):
            chunk = keys[start : start + size]
            started = time.perf_counter()
            for key in chunk:
                spool.append(key, seconds)
            walls.append((time.perf_counter() - started) / len(chunk))
        cpu = (time.process_time() - cpu_started) / calls
    finally:
        spool.close()
    return AppendCost(calls, 1e6 * statistics.median(walls), 1e6 * cpu)


def verdict(ok: bool) -> str:
    return "" if ok else " MISSED"


def report(results: Results, append: AppendCost) -> None:
    header = f"{'protocol':<8} {'side':<8} {'logins':>6} {'logins/s':>8} {'median ms':>9}"
    header += f" {'p90 ms':>7} {'user µs':>8} {'sys µs':>7} {'CPU µs/login':>12}"
    print(header)
    for protocol, sides in results.items():
        for name in SIDES:
            side = sides[name]
            print(
                f"{protocol:<8} {name:<8} {side.logins:>6} {side.rate:>8.1f}"
                f" {side.median_ms:>9.3f} {side.quantile_ms(0.9):>7.3f}"
                f" {side.user_us:>8.1f} {side.system_us:>7.1f} {side.cpu_us:>12.1f}"
            )
    print()
    for protocol, sides in results.items():
        baseline, spool = sides["baseline"], sides["spool"]
        ratio = spool.cpu_us / baseline.cpu_us if baseline.cpu_us else math.inf
        added = spool.median_ms - baseline.median_ms
        per_round = [
            1000 * (s - b) for b, s in zip(baseline.round_medians, spool.round_medians, strict=True)
        ]
        quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else 3 * per_round
        print(
            f"{protocol}: CPU per login spool/baseline {ratio:.3f}"
            f" (goal <= {CPU_RATIO_GOAL}){verdict(ratio <= CPU_RATIO_GOAL)};"
            f" added median latency {added:+.3f} ms"
            f" (goal <= {ADDED_LATENCY_GOAL_MS:g} ms){verdict(added <= ADDED_LATENCY_GOAL_MS)}"
        )
        print(
            f"{'':<6}per round ({len(per_round)}), spool - baseline median: median"
            f" {statistics.median(per_round):+.3f} ms, quartiles {quartiles[0]:+.3f} .."
            f" {quartiles[2]:+.3f} ms, range {min(per_round):+.3f} .. {max(per_round):+.3f} ms"
        )
    shares = [
        f"{100 * append.cpu_us / sides['baseline'].cpu_us:.2f} % of {protocol}'s"
        for protocol, sides in results.items()
        if sides["baseline"].cpu_us
    ]
    print(
        f"Spool.append in-process ({append.calls} calls): {append.wall_us:.2f} µs per call"
        f" (median of 5 chunks), {append.cpu_us:.2f} µs CPU per call"
        + (f" = {', '.join(shares)} baseline CPU per login" if shares else "")
    )


# --- revisions -----------------------------------------------------------------------------


def resolve_baseline(revision: str | None) -> str:
    """`revision` as a commit id; by default the parent of the commit that added the spool."""
    if revision is None:
        added = git("log", "--diff-filter=A", "--format=%H", "--", SPOOL_ADDED_IN).split()
        if not added:
            raise BenchError(f"no commit adds {SPOOL_ADDED_IN}: give --baseline REV")
        revision = f"{added[-1]}^"
    return git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")


@contextlib.contextmanager
def worktree(revision: str, path: Path) -> Iterator[Path]:
    """`revision` checked out (detached) at `path`, removed again on exit."""
    git("worktree", "add", "--detach", "--quiet", str(path), revision)
    try:
        yield path
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
        except BenchError as exc:
            print(f"warning: {exc}; removing it by hand")
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(BenchError):
                git("worktree", "prune")


def filesystem_of(path: Path) -> str:
    """The type of the file system `path` is on (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


# --- main ----------------------------------------------------------------------------------


def parse_protocols(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(chosen))


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--protocols", type=parse_protocols, default=["pop3"], help="pop3,imap")
    parser.add_argument("--logins", type=int, default=2000, help="per side per protocol")
    parser.add_argument("--round-size", type=int, default=100, help="logins per round")
    parser.add_argument("--quick", action="store_true", help="300 logins, rounds of 50")
    parser.add_argument("--baseline", metavar="REV", help="default: before the spool")
    parser.add_argument("--spool", metavar="REV", help="default: this work tree")
    parser.add_argument("--appends", type=int, default=100_000, help="Spool.append calls")
    parser.add_argument("--dir", type=Path, help="where the temporary files go")
    options = parser.parse_args(argv)
    if options.quick:
        options.logins, options.round_size = 300, 50
    if options.logins < 1 or options.round_size < 1 or options.appends < 1:
        parser.error("--logins, --round-size and --appends must be positive")
    return options


def run(options: argparse.Namespace, directory: Path) -> bool:
    """Everything that needs the temporary directory, and the report; whether the checks
    passed (false when a login failed)."""
    baseline = resolve_baseline(options.baseline)
    print(f"baseline: {git('log', '-1', '--format=%h %s', baseline)}")
    if options.spool is None:
        print(f"spool:    work tree at {git_head()}")
    else:
        spool_revision = git("rev-parse", "--verify", "--quiet", f"{options.spool}^{{commit}}")
        print(f"spool:    {git('log', '-1', '--format=%h %s', spool_revision)}")
    print(
        f"{options.logins} sequential logins per side per protocol, each from its own address,"
        f" in rounds of {options.round_size}, interleaved; relayers.db on"
        f" {filesystem_of(directory)}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    (directory / "append").mkdir()
    append = measure_append(options.appends, directory / "append")
    with contextlib.ExitStack() as trees:
        tree = trees.enter_context(worktree(baseline, directory / "baseline-tree"))
        spool_tree = ROOT
        if options.spool is not None:
            spool_tree = trees.enter_context(worktree(spool_revision, directory / "spool-tree"))
        has_spool = (spool_tree / SPOOL_ADDED_IN).exists()
        (directory / "dovecot").mkdir()
        with running_dovecot(directory / "dovecot") as dovecot:
            backends = {(BACKEND, p): getattr(dovecot.ports, p) for p in options.protocols}
            daemons: list[Relayproxy] = []
            try:
                for name, side_tree in (("baseline", tree), ("spool", spool_tree)):
                    daemons.append(
                        start_relayproxy(directory / name, backends, tree=side_tree, name=name)
                    )
                try:
                    results = asyncio.run(measure(daemons, options.protocols, options))
                except LoginFailed as exc:
                    print(f"FAILED: {exc}")
                    for daemon in daemons:
                        print(f"last lines of the {daemon.name} log:\n{daemon.log_tail()}")
                    return False
            finally:
                statuses = {daemon.name: daemon.stop() for daemon in daemons}
    ok = True
    for daemon in daemons:
        missing = daemon.missing_records()
        spool_errors = daemon.log.read_text(errors="replace").count("spool.error")
        print(
            f"{daemon.name}: exit status {statuses[daemon.name]};"
            f" {len(daemon.sources) - len(missing)} of {len(daemon.sources)} addresses in"
            f" relayers.db; spool files {'present' if spool_files(daemon) else 'none'};"
            f" spool.error lines {spool_errors}"
        )
        if missing:
            print(f"  MISSING from {daemon.db}: {', '.join(missing[:10])}")
        ok = ok and not missing and statuses[daemon.name] == 0
    spool_failed = not spool_files(daemons[1]) or "spool.error" in daemons[1].log.read_text()
    if has_spool and spool_failed:
        print("FAILED: the spool side ran without a working spool; the comparison is void")
        ok = False
    print()
    report(results, append)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    return run_in_temporary(
        "bench-durability-", options.dir, lambda temp: run(options, temp), started
    )


if __name__ == "__main__":
    sys.exit(main())
