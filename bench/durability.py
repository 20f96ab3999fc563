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
USER/PASS (POP3) or LOGIN (IMAP), QUIT/LOGOUT, close.

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
                                         [--baseline REV] [--appends N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for demo/, which is not an installed package

from demo.dovecot import DEMO_USERS, running_dovecot  # noqa: E402
from relayproxy.spool import SPOOL_SUFFIXES, Spool  # noqa: E402
from relayproxy.store import RelayStore  # noqa: E402

HOST = "127.0.0.1"
PROTOCOLS = ("pop3", "imap")
SIDES = ("baseline", "spool")
CPU_RATIO_GOAL = 1.03
ADDED_LATENCY_GOAL_MS = 0.1
LOGIN_TIMEOUT = 10.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 60.0
WARMUP_LOGINS = 20
# The recorder writes a batch at most every second ([store] batch_interval) and the spool
# is synced every second (sync_interval): wait that long before and after the rounds so
# that the CPU of the last batch is counted, and the warm-up's is not.
SETTLE_SECONDS = 2.0
SPOOL_ADDED_IN = "relayproxy/spool.py"


class BenchError(Exception):
    """The benchmark cannot run or went wrong; the message says why."""


class LoginFailed(BenchError):
    """A server answered something other than success; the message quotes it."""


# --- source addresses ----------------------------------------------------------------------


class Addresses:
    """127.a.b.c, a >= 1 and b, c in 1..254: each handed out once per run."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def next(self) -> str:
        n = next(self._numbers)
        a, rest = divmod(n, 254 * 254)
        b, c = divmod(rest, 254)
        if a >= 254:
            raise BenchError("out of 127/8 source addresses")
        return f"127.{a + 1}.{b + 1}.{c + 1}"


# --- the client: exact protocol lines over asyncio streams ---------------------------------


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(source, 0)), LOGIN_TIMEOUT
        )
    except TimeoutError:
        raise LoginFailed(f"connect: no answer within {LOGIN_TIMEOUT:g} s") from None


async def _line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await asyncio.wait_for(reader.readline(), LOGIN_TIMEOUT)
    except TimeoutError:
        raise LoginFailed(f"{what}: no answer within {LOGIN_TIMEOUT:g} s") from None
    if not line.endswith(b"\n"):
        raise LoginFailed(f"{what}: connection closed ({line!r})")
    return line


async def _expect(reader: asyncio.StreamReader, what: str, prefix: bytes) -> None:
    line = await _line(reader, what)
    if not line.startswith(prefix):
        raise LoginFailed(f"{what}: {line!r}")


async def _tagged(reader: asyncio.StreamReader, tag: bytes, what: str) -> bytes:
    """Read lines until the one tagged `tag` (untagged lines in between are skipped)."""
    while True:
        line = await _line(reader, what)
        if line.startswith(tag + b" "):
            return line


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def pop3_login(port: int, source: str, user: str, password: str) -> float:
    """One POP3 login from `source`; seconds from connect to the `+OK` of PASS."""
    started = time.perf_counter()
    reader, writer = await _connect(port, source)
    try:
        await _expect(reader, "greeting", b"+OK")
        writer.write(b"USER %s\r\n" % user.encode())
        await _expect(reader, "USER", b"+OK")
        writer.write(b"PASS %s\r\n" % password.encode())
        reply = await _line(reader, "PASS")
        latency = time.perf_counter() - started
        if not reply.startswith(b"+OK Logged in"):
            raise LoginFailed(f"PASS: {reply!r}")
        writer.write(b"QUIT\r\n")
        await _expect(reader, "QUIT", b"+OK")
        return latency
    finally:
        await _close(writer)


async def imap_login(port: int, source: str, user: str, password: str) -> float:
    """One IMAP login from `source`; seconds from connect to the tagged OK of LOGIN."""
    started = time.perf_counter()
    reader, writer = await _connect(port, source)
    try:
        await _expect(reader, "greeting", b"* OK")
        writer.write(b'a1 LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        reply = await _tagged(reader, b"a1", "LOGIN")
        latency = time.perf_counter() - started
        if not reply.startswith(b"a1 OK"):
            raise LoginFailed(f"LOGIN: {reply!r}")
        writer.write(b"a2 LOGOUT\r\n")
        reply = await _tagged(reader, b"a2", "LOGOUT")
        if not reply.startswith(b"a2 OK"):
            raise LoginFailed(f"LOGOUT: {reply!r}")
        return latency
    finally:
        await _close(writer)


LOGIN: dict[str, Callable[[int, str, str, str], Awaitable[float]]] = {
    "pop3": pop3_login,
    "imap": imap_login,
}


# --- the daemons ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Daemon:
    """One relayproxy daemon run from `tree` (cwd and PYTHONPATH) with this Python."""

    name: str
    tree: Path
    directory: Path
    backends: dict[str, int]  # protocol -> Dovecot's plain port
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    sources: list[str] = field(default_factory=list)  # every address that logged in
    output_path: Path | None = None

    @property
    def db(self) -> Path:
        return self.directory / "relayers.db"

    @property
    def log(self) -> Path:
        return self.directory / "relayproxy.log"

    def config_text(self) -> str:
        lines = ["[store]", f"path = {self.db}", "min_interval = 0", ""]
        lines += ["[log]", f"target = file:{self.log}", ""]
        lines += ["[daemon]", "allow_root = yes", ""]
        for protocol, backend in self.backends.items():
            self.ports[protocol] = free_port()
            lines += [
                f"[listener:{protocol}]",
                f"protocol = {protocol}",
                f"listen = {HOST}:{self.ports[protocol]}",
                f"backend = {HOST}:{backend}",
                "",
            ]
        return "\n".join(lines)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "relayproxy.ini"
        config.write_text(self.config_text())
        self.output_path = self.directory / "output.txt"
        environment = dict(os.environ, PYTHONPATH=str(self.tree))
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.tree,
                env=environment,
            )

    def wait_listening(self, deadline: float) -> None:
        for port in self.ports.values():
            while not self._accepts(port):
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: relayproxy did not listen in time")
                time.sleep(0.02)

    def _accepts(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name}: relayproxy exited {self.process.returncode} at start:\n"
                f"{self.output()}{self.log_tail()}"
            )
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            return False
        return True

    def output(self) -> str:
        if self.output_path is None:
            return ""
        with contextlib.suppress(OSError):
            return self.output_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_ticks(self) -> tuple[int, int]:
        """(utime, stime) of the whole process so far, in clock ticks (/proc/PID/stat)."""
        assert self.process is not None
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError as exc:
            raise BenchError(f"{self.name}: cannot read its CPU time: {exc}") from None
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])

    def stop(self) -> int | None:
        """SIGTERM (the daemon drains its queue); its exit status, None if never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"{self.name}: did not stop within {STOP_TIMEOUT:g} s") from None

    def missing_records(self) -> list[str]:
        """The addresses that logged in and are not in relayers.db."""
        stored = {entry.key.decode("ascii", "replace") for entry in RelayStore(self.db).entries()}
        return [source for source in self.sources if source not in stored]

    def spool_files(self) -> list[str]:
        return [
            str(self.db) + suffix
            for suffix in SPOOL_SUFFIXES
            if Path(f"{self.db}{suffix}").exists()
        ]


# --- figures -------------------------------------------------------------------------------


@dataclass
class Side:
    logins: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    user_ticks: int = 0
    system_ticks: int = 0

    @property
    def rate(self) -> float:
        return self.logins / self.seconds if self.seconds else 0.0

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.latencies)

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def _us_per_login(self, ticks: int) -> float:
        return 1e6 * ticks / os.sysconf("SC_CLK_TCK") / self.logins if self.logins else 0.0

    @property
    def user_us(self) -> float:
        return self._us_per_login(self.user_ticks)

    @property
    def system_us(self) -> float:
        return self._us_per_login(self.system_ticks)

    @property
    def cpu_us(self) -> float:
        return self._us_per_login(self.user_ticks + self.system_ticks)


Results = dict[str, dict[str, Side]]  # protocol -> side name -> figures


async def login_round(
    daemon: Daemon, protocol: str, count: int, addresses: Addresses, side: Side | None
) -> None:
    """`count` sequential logins to `daemon`, each from a new address; figures into `side`."""
    login = LOGIN[protocol]
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(count):
        user = DEMO_USERS[n % len(DEMO_USERS)]
        source = addresses.next()
        try:
            latencies.append(await login(daemon.ports[protocol], source, user.name, user.password))
        except (LoginFailed, OSError) as exc:
            raise LoginFailed(
                f"{daemon.name} {protocol} port {daemon.ports[protocol]}, from {source},"
                f" login {n + 1} of {count}: {exc}"
            ) from None
        daemon.sources.append(source)
    elapsed = time.perf_counter() - started
    if side is not None:
        side.logins += count
        side.seconds += elapsed
        side.latencies += latencies
        side.round_medians.append(statistics.median(latencies))


async def measure(
    daemons: Sequence[Daemon], protocols: Sequence[str], options: argparse.Namespace
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


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


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


def run(options: argparse.Namespace, directory: Path) -> tuple[Results, AppendCost, bool] | None:
    """Everything that needs the temporary directory: figures and whether the checks
    passed, or None when a login failed."""
    baseline = resolve_baseline(options.baseline)
    print(f"baseline: {git('log', '-1', '--format=%h %s', baseline)}")
    if options.spool is None:
        dirty = git("status", "--porcelain", "--", "relayproxy")
        print(
            f"spool:    work tree at {git('log', '-1', '--format=%h %s', 'HEAD')}"
            + (" + uncommitted changes in relayproxy/" if dirty else "")
        )
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
            backends = {p: getattr(dovecot.ports, p) for p in options.protocols}
            daemons = [
                Daemon("baseline", tree, directory / "baseline", backends),
                Daemon("spool", spool_tree, directory / "spool", backends),
            ]
            try:
                for daemon in daemons:
                    daemon.start()
                deadline = time.monotonic() + START_TIMEOUT
                for daemon in daemons:
                    daemon.wait_listening(deadline)
                try:
                    results = asyncio.run(measure(daemons, options.protocols, options))
                except LoginFailed as exc:
                    print(f"FAILED: {exc}")
                    for daemon in daemons:
                        print(f"last lines of the {daemon.name} log:\n{daemon.log_tail()}")
                    return None
            finally:
                statuses = {daemon.name: daemon.stop() for daemon in daemons}
    ok = True
    for daemon in daemons:
        missing = daemon.missing_records()
        spool_errors = daemon.log.read_text(errors="replace").count("spool.error")
        print(
            f"{daemon.name}: exit status {statuses[daemon.name]};"
            f" {len(daemon.sources) - len(missing)} of {len(daemon.sources)} addresses in"
            f" relayers.db; spool files {'present' if daemon.spool_files() else 'none'};"
            f" spool.error lines {spool_errors}"
        )
        if missing:
            print(f"  MISSING from {daemon.db}: {', '.join(missing[:10])}")
        ok = ok and not missing and statuses[daemon.name] == 0
    spool_failed = not daemons[1].spool_files() or "spool.error" in daemons[1].log.read_text()
    if has_spool and spool_failed:
        print("FAILED: the spool side ran without a working spool; the comparison is void")
        ok = False
    print()
    return results, append, ok


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-durability-", dir=options.dir) as temp:
            outcome = run(options, Path(temp))
    except BenchError as exc:
        print(f"FAILED: {exc}")
        return 1
    if outcome is None:
        print(f"wall time {time.perf_counter() - started:.1f} s")
        return 1
    results, append, ok = outcome
    report(results, append)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
