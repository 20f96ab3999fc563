"""Login benchmark: Dovecot directly versus Dovecot behind the relayproxy daemon.

One run starts one demo Dovecot and one `relayproxy` daemon (a subprocess with
a generated INI in a temporary directory), then measures logins against both
side by side, in interleaved rounds (direct, proxied, direct, proxied, ...) so
that machine noise falls on both sides alike. A login is: open a TCP
connection, read the greeting, USER/PASS (POP3) or LOGIN (IMAP), QUIT/LOGOUT,
close. Every login is checked to have succeeded, and at the end relayers.db
must hold 127.0.0.1.

Figures per protocol: sequential logins/s and the ratio proxied/direct
(goal >= 0.8); median and p90 latency from connect to the login's positive
reply, and the median the proxy adds (goal <= 1 ms); then C concurrent
clients, total logins/s. Goals missed are marked MISSED; the exit status is
0 all the same (it is a measurement), 1 only when the benchmark itself fails.

    .venv/bin/python bench/logins.py [--protocols pop3,imap] [--logins N]
                                     [--concurrency C] [--quick] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for demo/, which is not an installed package

from demo.dovecot import DEMO_USERS, running_dovecot  # noqa: E402
from relayproxy.store import RelayStore, StoreMissingError  # noqa: E402

HOST = "127.0.0.1"
PROTOCOLS = ("pop3", "imap")
RATIO_GOAL = 0.8
ADDED_LATENCY_GOAL_MS = 1.0
LOGIN_TIMEOUT = 10.0
START_TIMEOUT = 20.0
WARMUP_LOGINS = 20

# --- the client: exact protocol lines over asyncio streams ------------------------------


class LoginFailed(Exception):
    """A server answered something other than success; the message quotes it."""


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(HOST, port), LOGIN_TIMEOUT)
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


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def pop3_login(port: int, user: str, password: str) -> float:
    """One POP3 login; returns seconds from connect to the `+OK` of PASS."""
    started = time.perf_counter()
    reader, writer = await _connect(port)
    try:
        greeting = await _line(reader, "greeting")
        if not greeting.startswith(b"+OK"):
            raise LoginFailed(f"greeting {greeting!r}")
        writer.write(b"USER %s\r\n" % user.encode())
        reply = await _line(reader, "USER")
        if not reply.startswith(b"+OK"):
            raise LoginFailed(f"USER: {reply!r}")
        writer.write(b"PASS %s\r\n" % password.encode())
        reply = await _line(reader, "PASS")
        latency = time.perf_counter() - started
        if not reply.startswith(b"+OK Logged in"):
            raise LoginFailed(f"PASS: {reply!r}")
        writer.write(b"QUIT\r\n")
        reply = await _line(reader, "QUIT")
        if not reply.startswith(b"+OK"):
            raise LoginFailed(f"QUIT: {reply!r}")
        return latency
    finally:
        await _close(writer)


async def _tagged(reader: asyncio.StreamReader, tag: bytes, what: str) -> bytes:
    """Read lines until the one tagged `tag` (untagged lines in between are skipped)."""
    while True:
        line = await _line(reader, what)
        if line.startswith(tag + b" "):
            return line


async def imap_login(port: int, user: str, password: str) -> float:
    """One IMAP login; returns seconds from connect to the tagged OK of LOGIN."""
    started = time.perf_counter()
    reader, writer = await _connect(port)
    try:
        greeting = await _line(reader, "greeting")
        if not greeting.startswith(b"* OK"):
            raise LoginFailed(f"greeting {greeting!r}")
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


LOGIN: dict[str, Callable[[int, str, str], Awaitable[float]]] = {
    "pop3": pop3_login,
    "imap": imap_login,
}


async def login_series(protocol: str, port: int, count: int, offset: int) -> list[float]:
    """`count` logins one after the other, alternating the demo users."""
    login = LOGIN[protocol]
    latencies: list[float] = []
    for n in range(count):
        user = DEMO_USERS[(offset + n) % len(DEMO_USERS)]
        try:
            latencies.append(await login(port, user.name, user.password))
        except (LoginFailed, OSError) as exc:
            raise LoginFailed(f"{protocol} port {port}, login {n + 1} of {count}: {exc}") from None
    return latencies


async def timed_round(protocol: str, port: int, count: int, clients: int) -> Side:
    """`count` logins by `clients` concurrent clients; the wall time of the whole round."""
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(login_series(protocol, port, share, i) for i, share in enumerate(shares) if share)
    )
    elapsed = time.perf_counter() - started
    return Side(logins=count, seconds=elapsed, latencies=[x for r in results for x in r])


# --- figures -----------------------------------------------------------------------------


@dataclass
class Side:
    logins: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Side) -> None:
        self.logins += other.logins
        self.seconds += other.seconds
        self.latencies += other.latencies

    @property
    def rate(self) -> float:
        return self.logins / self.seconds if self.seconds else 0.0

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.latencies)


@dataclass
class Comparison:
    direct: Side = field(default_factory=Side)
    proxied: Side = field(default_factory=Side)

    @property
    def ratio(self) -> float:
        return self.proxied.rate / self.direct.rate if self.direct.rate else 0.0


async def compare(
    protocol: str, ports: tuple[int, int], *, total: int, round_size: int, clients: int
) -> Comparison:
    """Interleaved rounds: direct, proxied, direct, proxied ... until `total` each."""
    direct_port, proxy_port = ports
    result = Comparison()
    done = 0
    while done < total:
        size = min(round_size, total - done)
        result.direct.add(await timed_round(protocol, direct_port, size, clients))
        result.proxied.add(await timed_round(protocol, proxy_port, size, clients))
        done += size
    return result


def verdict(ok: bool) -> str:
    return "" if ok else " MISSED"


# --- the daemon ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class DaemonRefused(Exception):
    """The daemon exited before it accepted; carries its status and output."""

    def __init__(self, status: int, output: str) -> None:
        super().__init__(f"relayproxy exited {status}: {output.strip()}")
        self.status = status
        self.output = output


@dataclass
class Daemon:
    directory: Path
    backends: dict[str, int]  # protocol -> Dovecot port
    profile: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.directory / "relayers.db"

    def config_text(self) -> str:
        lines = ["[store]", f"path = {self.db}", "min_interval = 0", ""]
        lines += ["[log]", f"target = file:{self.directory / 'relayproxy.log'}", ""]
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
        config = self.directory / "relayproxy.ini"
        config.write_text(self.config_text())
        command = [sys.executable]
        if self.profile is not None:
            command += ["-m", "cProfile", "-o", str(self.profile)]
        command += ["-m", "relayproxy.cli.daemon", "--config", str(config)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
        )
        deadline = time.monotonic() + START_TIMEOUT
        for port in self.ports.values():
            while not self._accepts(port):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("relayproxy did not start listening in time")
                time.sleep(0.02)

    def _accepts(self, port: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            output = self.process.stdout.read().decode() if self.process.stdout else ""
            raise DaemonRefused(self.process.returncode, output)
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = (self.directory / "relayproxy.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        """User plus system CPU the daemon has used so far (Linux /proc), else None."""
        assert self.process is not None
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.stdout:
                self.process.stdout.close()


def start_daemon(directory: Path, backends: dict[str, int], profile: Path | None) -> Daemon | None:
    """Start with every protocol; if the daemon refuses IMAP, start again without it."""
    try:
        daemon = Daemon(directory, dict(backends), profile)
        daemon.start()
        return daemon
    except DaemonRefused as exc:
        if "imap" not in backends or (exc.status != 2 and "imap" not in exc.output):
            raise
        last = exc.output.strip().splitlines()[-1:] or [""]
        print(f"imap: skipped, relayproxy refused the config (exit {exc.status}): {last[0]}")
    remaining = {p: port for p, port in backends.items() if p != "imap"}
    if not remaining:
        return None
    daemon = Daemon(directory, remaining, profile)
    daemon.start()
    return daemon


def wait_for_record(db: Path, key: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if RelayStore(db).get(key) is not None:
                return True
        except StoreMissingError:
            pass
        time.sleep(0.1)
    return False


# --- main ---------------------------------------------------------------------------------


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
    parser.add_argument("--round-size", type=int, default=200, help="logins per round")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once")
    parser.add_argument("--quick", action="store_true", help="200 logins, rounds of 50")
    parser.add_argument("--profile", type=Path, help="run the daemon under cProfile to FILE")
    options = parser.parse_args(argv)
    if options.quick:
        options.logins, options.round_size = 200, 50
    if options.logins < 1 or options.round_size < 1 or options.concurrency < 1:
        parser.error("--logins, --round-size and --concurrency must be positive")
    return options


async def measure(
    protocols: Sequence[str],
    direct: dict[str, int],
    proxied: dict[str, int],
    options: argparse.Namespace,
) -> dict[str, tuple[Comparison, Comparison]]:
    results: dict[str, tuple[Comparison, Comparison]] = {}
    for protocol in protocols:
        for port in (direct[protocol], proxied[protocol]):  # warm both paths up
            await login_series(protocol, port, WARMUP_LOGINS, 0)
        ports = (direct[protocol], proxied[protocol])
        total, size = options.logins, options.round_size
        sequential = await compare(protocol, ports, total=total, round_size=size, clients=1)
        concurrent = await compare(
            protocol, ports, total=total, round_size=size, clients=options.concurrency
        )
        results[protocol] = (sequential, concurrent)
    return results


def report(results: dict[str, tuple[Comparison, Comparison]], concurrency: int) -> None:
    header = f"{'protocol':<8} {'clients':>7} {'side':<7} {'logins':>6} {'logins/s':>9}"
    header += f" {'median ms':>9} {'p90 ms':>7}"
    print(header)
    for protocol, comparisons in results.items():
        for clients, comparison in zip((1, concurrency), comparisons, strict=True):
            for name, side in (("direct", comparison.direct), ("proxied", comparison.proxied)):
                print(
                    f"{protocol:<8} {clients:>7} {name:<7} {side.logins:>6} {side.rate:>9.1f}"
                    f" {side.median_ms:>9.3f} {side.quantile_ms(0.9):>7.3f}"
                )
            print(f"{'':<8} {clients:>7} {'ratio':<7} {'':>6} {comparison.ratio:>9.2f}")
    print()
    for protocol, (sequential, concurrent) in results.items():
        added = sequential.proxied.median_ms - sequential.direct.median_ms
        print(
            f"{protocol}: proxy/direct logins/s ratio {sequential.ratio:.2f}"
            f" (goal >= {RATIO_GOAL}){verdict(sequential.ratio >= RATIO_GOAL)};"
            f" added median latency {added:.2f} ms"
            f" (goal <= {ADDED_LATENCY_GOAL_MS:g} ms){verdict(added <= ADDED_LATENCY_GOAL_MS)};"
            f" {concurrency} clients ratio {concurrent.ratio:.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-logins-") as temp:
        directory = Path(temp)
        (directory / "dovecot").mkdir()
        with running_dovecot(directory / "dovecot") as dovecot:
            backends = {p: getattr(dovecot.ports, p) for p in options.protocols}
            daemon = start_daemon(directory, backends, options.profile)
            if daemon is None:
                print("nothing to measure")
                return 0
            protocols = list(daemon.ports)
            try:
                print(
                    f"{options.logins} logins per side per protocol in rounds of"
                    f" {options.round_size}, interleaved direct/proxied;"
                    f" concurrency {options.concurrency}"
                )
                cpu_before = daemon.cpu_seconds()
                try:
                    results = asyncio.run(measure(protocols, backends, daemon.ports, options))
                except LoginFailed as exc:
                    sides = {f"{p} direct": backends[p] for p in protocols}
                    sides.update({f"{p} proxied": daemon.ports[p] for p in protocols})
                    print(f"FAILED: {exc} (ports: {sides})")
                    print(f"last lines of the daemon log:\n{daemon.log_tail()}")
                    return 1
                cpu_after = daemon.cpu_seconds()
                recorded = wait_for_record(daemon.db, HOST)
            finally:
                status = daemon.stop()
    report(results, options.concurrency)
    if cpu_before is not None and cpu_after is not None:
        proxied = sum(2 * options.logins + WARMUP_LOGINS for _ in results)
        print(
            f"daemon CPU {cpu_after - cpu_before:.2f} s for {proxied} proxied logins:"
            f" {1000 * (cpu_after - cpu_before) / proxied:.2f} ms per login"
        )
    print(f"relayers.db holds {HOST}: {'yes' if recorded else 'NO'}; daemon exit status {status}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0 if recorded else 1


if __name__ == "__main__":
    sys.exit(main())
