"""Shared parts of `bench/logins.py`, `bench/memory.py` and `bench/durability.py`
(not a benchmark itself).

* a lean login client: asyncio Protocols (no streams, one timeout per login),
  each connection from a source address of its own (127.a.b.c, never reused
  in a run, so every login through relayproxy is a new record);
* the processes measured, each a subprocess on loopback: the stub backend
  (`bench/stub_backend.py`), HAProxy (TCP mode, generated config), the bare
  Twisted relay (`bench/bare_relay.py`) and the relayproxy daemon of this work
  tree, or of another checkout (`python -m relayproxy.cli.daemon --config INI`),
  and after SIGTERM the check that every address that logged in through it is
  in its relayers.db;
* CPU (utime/stime from /proc/PID/stat) and memory (VmRSS from
  /proc/PID/status) of a process, the descriptor limit raised, and the
  figures of a series of logins (rate, latency quantiles, CPU per login).

Run the benchmarks, not this file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
HOST = "127.0.0.1"
LOGIN_TIMEOUT = 10.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 60.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")

Key = tuple[str, str]  # (backend, protocol)


class BenchError(Exception):
    """The benchmark cannot run or went wrong; the message says why."""


class LoginFailed(BenchError):
    """A server answered something other than success; the message quotes it."""


# --- source addresses ----------------------------------------------------------------------


class Addresses:
    """127.a.b.c with a in 2..254 and b, c in 1..254: each handed out once per run.

    127.1/16 is left alone (other tools use 127.1.x.y), so that a shared
    relayers.db (there is none here) would not be ambiguous.
    """

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def next(self) -> str:
        n = next(self._numbers)
        a, rest = divmod(n, 254 * 254)
        b, c = divmod(rest, 254)
        if a >= 253:
            raise BenchError("out of 127/8 source addresses")
        return f"127.{a + 2}.{b + 1}.{c + 1}"


# --- the client ----------------------------------------------------------------------------


class LineClient(asyncio.Protocol):
    """Collects the lines a server sends; `line()` awaits the next one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lines: collections.deque[bytes] = collections.deque()
        self.buffer = b""
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *complete, self.buffer = (self.buffer + data).split(b"\n")
        if complete:
            self.lines.extend(complete)
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def line(self, what: str) -> bytes:
        while not self.lines:
            if self.closed:
                raise LoginFailed(f"{what}: connection closed ({self.buffer!r})")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.lines.popleft()

    async def expect(self, what: str, prefix: bytes) -> bytes:
        line = await self.line(what)
        if not line.startswith(prefix):
            raise LoginFailed(f"{what}: {line!r}")
        return line

    async def tagged(self, tag: bytes, what: str) -> bytes:
        """Lines until the one tagged `tag`, which must be OK (untagged ones skipped)."""
        while True:
            line = await self.line(what)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise LoginFailed(f"{what}: {line!r}")
                return line

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int, source: str) -> LineClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(LineClient, HOST, port, local_addr=(source, 0))
    return client


async def pop3_login(
    port: int, source: str, user: str, password: str, *, browse: bool = True
) -> float:
    """USER/PASS/STAT/QUIT from `source` (no STAT unless `browse`); seconds from connect
    to the `+OK` of PASS."""
    started = time.perf_counter()
    async with asyncio.timeout(LOGIN_TIMEOUT):
        client = await connect(port, source)
        try:
            await client.expect("greeting", b"+OK")
            client.send(b"USER %s\r\n" % user.encode())
            await client.expect("USER", b"+OK")
            client.send(b"PASS %s\r\n" % password.encode())
            await client.expect("PASS", b"+OK")
            latency = time.perf_counter() - started
            if browse:
                client.send(b"STAT\r\n")
                await client.expect("STAT", b"+OK")
            client.send(b"QUIT\r\n")
            await client.expect("QUIT", b"+OK")
            return latency
        finally:
            client.close()


async def imap_open(
    port: int, source: str, user: str, password: str, *, select: bool = True
) -> tuple[LineClient, float]:
    """Greeting, LOGIN and SELECT INBOX (unless not `select`) from `source`: the open
    session and the seconds from connect to the tagged OK of LOGIN."""
    started = time.perf_counter()
    client = await connect(port, source)
    try:
        await client.expect("greeting", b"* OK")
        client.send(b'a1 LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        await client.tagged(b"a1", "LOGIN")
        latency = time.perf_counter() - started
        if select:
            client.send(b"a2 SELECT INBOX\r\n")
            await client.tagged(b"a2", "SELECT")
    except BaseException:
        client.close()
        raise
    return client, latency


async def imap_login(
    port: int, source: str, user: str, password: str, *, browse: bool = True
) -> float:
    """LOGIN/SELECT INBOX/LOGOUT from `source` (no SELECT unless `browse`); seconds from
    connect to the OK of LOGIN."""
    async with asyncio.timeout(LOGIN_TIMEOUT):
        client, latency = await imap_open(port, source, user, password, select=browse)
        try:
            client.send(b"a3 LOGOUT\r\n")
            await client.tagged(b"a3", "LOGOUT")
            return latency
        finally:
            client.close()


@contextlib.contextmanager
def attempt(target: Target, source: str, what: str) -> Iterator[None]:
    """A login (or session) to `target` from `source`: a failure raised as LoginFailed
    that names `what`; on success `source` is added to the target's sources."""
    try:
        yield
    except (LoginFailed, OSError, TimeoutError) as exc:
        raise LoginFailed(
            f"{target.name} {what} from {source}: {type(exc).__name__} {exc}"
        ) from None
    target.sources.append(source)


LOGIN: dict[str, Callable[..., Coroutine[Any, Any, float]]] = {
    "pop3": pop3_login,
    "imap": imap_login,
}
"""The login by protocol: (port, source, user, password, *, browse=True) -> latency."""


# --- figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    """A series of logins to one target: count, time, latencies and the target's CPU."""

    logins: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    user_ticks: int = 0
    system_ticks: int = 0

    def add(self, other: Figures) -> None:
        self.logins += other.logins
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.user_ticks += other.user_ticks
        self.system_ticks += other.system_ticks

    @property
    def rate(self) -> float:
        return self.logins / self.seconds if self.seconds else 0.0

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.latencies)

    def _us(self, ticks: int) -> float:
        return 1e6 * ticks / CLOCK_TICK / self.logins if self.logins else 0.0

    @property
    def user_us(self) -> float:
        return self._us(self.user_ticks)

    @property
    def system_us(self) -> float:
        return self._us(self.system_ticks)

    @property
    def cpu_us(self) -> float:
        return self._us(self.user_ticks + self.system_ticks)


# --- processes -----------------------------------------------------------------------------


def raise_descriptor_limit(wanted: int | None = None) -> int:
    """The soft RLIMIT_NOFILE raised to `wanted` (default: the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(word) for word in text.split()]
    return []


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of process `pid` (all its threads) so far, in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of {pid}: {exc}") from None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def rss_kb(pid: int) -> int:
    """VmRSS of process `pid` in KiB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def own_cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Process:
    """One measured subprocess, run in `cwd`; output to `directory/NAME.out`."""

    name: str
    command: list[str]
    directory: Path
    environment: dict[str, str] | None = None
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = None

    @property
    def output_path(self) -> Path:
        return self.directory / f"{self.name}.out"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                self.command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.environment,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The process and its children (HAProxy's workers in master-worker mode)."""
        return [self.pid, *children(self.pid)]

    def cpu_ticks(self) -> tuple[int, int]:
        user = system = 0
        for pid in self.pids():
            u, s = cpu_ticks(pid)
            user, system = user + u, system + s
        return user, system

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids())

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.output_path.read_text(errors="replace")
        return ""

    def alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited {self.process.returncode}:\n{self.output()[-2000:]}"
            )

    def first_line(self, prefix: str) -> str:
        """The first output line starting with `prefix` (waits for it)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :]
            self.alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {prefix!r} line within {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def wait_listening(self, ports: Sequence[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for port in ports:
            while not accepts(port):
                self.alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: port {port} not listening in time")
                time.sleep(0.02)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status, None if never started."""
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


def start_stub(directory: Path) -> tuple[Process, dict[str, int]]:
    """The stub backend; its ports by protocol."""
    stub = Process("stub", [sys.executable, str(BENCH / "stub_backend.py")], directory)
    stub.start()
    line = "pop3=" + stub.first_line("pop3=")  # "pop3=PORT imap=PORT"
    pairs = (item.split("=") for item in line.split())
    return stub, {protocol: int(port) for protocol, port in pairs}


@dataclass
class Target:
    """Something logins go to: its port per (backend, protocol); a process unless direct."""

    name: str
    ports: dict[Key, int]
    process: Process | None = None
    sources: list[str] = field(default_factory=list)  # every address that logged in

    def cpu_ticks(self) -> tuple[int, int]:
        """(utime, stime) of its process so far, in clock ticks; (0, 0) when direct."""
        return self.process.cpu_ticks() if self.process is not None else (0, 0)

    def stop(self) -> int | None:
        return self.process.stop() if self.process is not None else None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# The reactors a measured Twisted process can run on: epoll (Twisted's default on
# Linux, what relayproxy uses), or Twisted's asyncioreactor over uvloop's event loop,
# installed by a prelude before the program imports the reactor.
REACTORS = ("epoll", "uvloop")
UVLOOP_PRELUDE = (
    "import uvloop; from twisted.internet import asyncioreactor;"
    " asyncioreactor.install(uvloop.new_event_loop())"
)


def python_command(reactor: str, script: Path | None = None, module: str = "") -> list[str]:
    """This Python running `script` (or `module`) on `reactor`; append its arguments."""
    if reactor == "epoll":
        return [sys.executable, *([str(script)] if script is not None else ["-m", module])]
    if reactor != "uvloop":
        raise BenchError(f"unknown reactor {reactor!r}: choose from {', '.join(REACTORS)}")
    run = (
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
        if script is not None
        else f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", f"{UVLOOP_PRELUDE}; import runpy; {run}"]


def start_bare_relay(
    directory: Path, backends: dict[Key, int], *, reactor: str = "epoll", name: str = "bare-relay"
) -> Target:
    keys = list(backends)
    command = python_command(reactor, BENCH / "bare_relay.py")
    command += [f"{HOST}:{backends[key]}" for key in keys]
    process = Process(name, command, directory)
    process.start()
    ports = [int(port) for port in process.first_line("ports=").split(",")]
    return Target(name, dict(zip(keys, ports, strict=True)), process)


HAPROXY_GLOBAL = """\
# Written by bench/harness.py. One thread, like the Python proxies beside it.
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
"""


def start_haproxy(directory: Path, backends: dict[Key, int]) -> Target:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise BenchError("haproxy is not installed (apt-get install haproxy; `make venv` does)")
    ports = dict(zip(backends, free_ports(len(backends)), strict=True))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = 100_000 if hard == resource.RLIM_INFINITY else hard
    text = HAPROXY_GLOBAL.format(maxconn=max(256, (room - 200) // 2))
    for (backend, protocol), port in ports.items():
        text += (
            f"\nlisten {backend}-{protocol}\n"
            f"    bind {HOST}:{port}\n"
            f"    server {backend} {HOST}:{backends[backend, protocol]}\n"
        )
    config = directory / "haproxy.cfg"
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    process = Process("haproxy", [binary, "-db", "-f", str(config)], directory)
    process.start()
    process.wait_listening(list(ports.values()))
    return Target("haproxy", ports, process)


@dataclass
class Relayproxy(Target):
    """A relayproxy daemon (of this work tree unless told), one listener per
    (backend, protocol)."""

    directory: Path = Path()

    @property
    def db(self) -> Path:
        return self.directory / "relayers.db"

    @property
    def log(self) -> Path:
        return self.directory / "relayproxy.log"

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def missing_records(self) -> list[str]:
        """The addresses that logged in through it and are not in relayers.db."""
        from relayproxy.store import RelayStore, StoreMissingError  # noqa: PLC0415

        try:
            stored = {
                entry.key.decode("ascii", "replace") for entry in RelayStore(self.db).entries()
            }
        except StoreMissingError:
            stored = set()
        return [source for source in self.sources if source not in stored]


def records_kept(targets: Sequence[Target], statuses: dict[str, int | None]) -> bool:
    """After SIGTERM (`statuses` by target name): whether every address that logged in
    through each relayproxy is in its relayers.db; says so for each."""
    ok = True
    for target in targets:
        if isinstance(target, Relayproxy):
            missing = target.missing_records()
            print(
                f"{target.name}: exit status {statuses[target.name]} after SIGTERM;"
                f" {len(target.sources) - len(missing)} of {len(target.sources)} source"
                f" addresses in relayers.db"
            )
            if missing:
                print(f"  FAILED, MISSING from {target.db}: {', '.join(missing[:10])}")
            ok = ok and not missing
    return ok


def start_relayproxy(
    directory: Path,
    backends: dict[Key, int],
    *,
    max_connections: int | None = None,
    profile: Path | None = None,
    tree: Path = ROOT,
    name: str = "relayproxy",
    reactor: str = "epoll",
    workers: int = 1,
) -> Relayproxy:
    """The daemon of `tree` (its cwd and PYTHONPATH) under this Python on `reactor`,
    called `name`, its files in `directory`; returns once it listens."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(backends, free_ports(len(backends)), strict=True))
    lines = ["[store]", f"path = {directory / 'relayers.db'}", "min_interval = 0", ""]
    lines += ["[log]", f"target = file:{directory / 'relayproxy.log'}", ""]
    # workers only when asked for: a --before tree may predate the key.
    lines += [
        "[daemon]",
        "allow_root = yes",
        *([f"workers = {workers}"] if workers != 1 else []),
        "",
    ]
    for (backend, protocol), port in ports.items():
        lines += [
            f"[listener:{backend}-{protocol}]",
            f"protocol = {protocol}",
            f"listen = {HOST}:{port}",
            f"backend = {HOST}:{backends[backend, protocol]}",
        ]
        if max_connections is not None:
            lines += [f"max_connections = {max_connections}"]
        lines += [""]
    config = directory / "relayproxy.ini"
    config.write_text("\n".join(lines))
    if profile is not None:
        command = [sys.executable, "-m", "cProfile", "-o", str(profile)]
        command += ["-m", "relayproxy.cli.daemon"]
    else:
        command = python_command(reactor, module="relayproxy.cli.daemon")
    command += ["--config", str(config)]
    environment = dict(os.environ, PYTHONPATH=str(tree))
    process = Process(name, command, directory, environment, cwd=tree)
    process.start()
    process.wait_listening(list(ports.values()))
    return Relayproxy(name, ports, process, directory=directory)


# --- running -------------------------------------------------------------------------------


def run_in_temporary(
    prefix: str, parent: Path | None, run: Callable[[Path], bool], started: float
) -> int:
    """`run` in a fresh temporary directory (under `parent`), then the wall time since
    `started`; the exit status: 0 when `run` returned true, 1 when not or on a BenchError."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as temp:
            ok = run(Path(temp))
    except BenchError as exc:
        print(f"FAILED: {exc}")
        ok = False
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


# --- git -----------------------------------------------------------------------------------


def git(*args: str) -> str:
    """`git -C ROOT ARGS`: its output, stripped; BenchError when it fails."""
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def git_head() -> str:
    """HEAD's short id and subject, and whether relayproxy/ has uncommitted changes."""
    try:
        head = git("log", "-1", "--format=%h %s") or "?"
    except BenchError:
        head = "?"
    try:
        dirty = git("status", "--porcelain", "--", "relayproxy")
    except BenchError:
        dirty = ""
    return head + (" + uncommitted changes in relayproxy/" if dirty else "")
