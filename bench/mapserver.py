"""Map server benchmark: socketmap lookups/s and latency through relayproxy-map.

relayproxy-map runs pinned to one core (taskset) on a Redis store seeded
with ``--entries`` relayers as the data contract lays them out (half the
looked-up addresses are there). Load comes from client processes on the
other cores, each with many persistent connections:

* ``request/response``: each connection sends a lookup, waits for its
  answer, sends the next (what one smtpd process or sendmail child does);
* ``pipelined``: each connection keeps ``--depth`` lookups outstanding.

Latency is from the client's send to its read of the whole answer (paced:
from when the lookup was due). The load generator shares a core with Redis,
so the same paced load is also run against a bare asyncio server answering
NOTFOUND at once, on the map server's core: the floor this harness adds.
Baselines measured in the same run, printed as ratios:

* a direct Redis GET loop (redis-py, one connection, request/response):
  what one client gets from Redis with no map server between;
* ``postmap -q -`` on a hash file of the same entries (Postfix's own
  lookups in Berkeley DB, every key read from stdin), and ``postmap -q -``
  through relayproxy-map (one sequential client), when Postfix's .deb is in
  the tests' cache (tests/test_mta_recipes.py fetches it) or ``--postfix``
  names an unpacked tree.

Goal (issue 12): >= 10,000 lookups/s on one core with p99 <= 2 ms.

    .venv/bin/python bench/mapserver.py [--small] [--store redis|file]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.redis_servers import RedisServer
from relayproxy.store import RelayStore

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
DEB_CACHE = Path(os.environ.get("RELAYPROXY_TEST_DEBS", "/var/cache/relayproxy-test-debs"))


def address(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


# --- the load: client processes with many connections ------------------------------------


@dataclass(frozen=True)
class Load:
    port: int
    connections: int
    depth: int  # lookups outstanding per connection (1: request/response)
    seconds: float
    entries: int
    seed: int
    # Lookups/s per connection, depth 1 (0: the next as soon as the answer is in).
    # Latency is then counted from when a lookup was due, not when it went out,
    # so that a slow answer's delay to the next ones is counted too.
    rate: float = 0.0


class _Connection(asyncio.Protocol):
    """Keeps ``depth`` lookups in flight (or one at ``rate``); notes each answer's latency."""

    def __init__(self, load: Load, latencies: list[int], number: int) -> None:
        self.load = load
        self.latencies = latencies
        self.next = number * 7919 + load.seed
        self.sent: list[int] = []
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self.lost = self.loop.create_future()
        self.due = time.perf_counter_ns()
        self.interval = int(1e9 / load.rate) if load.rate else 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send(self.load.depth)

    def _send(self, count: int) -> None:
        assert self.transport is not None
        requests = []
        for _ in range(count):
            # Every other address was seeded: half the answers are OK.
            self.next = (self.next + 1) % (2 * self.load.entries)
            requests.append(netstring(b"relayers " + address(self.next).encode()))
            self.sent.append(self.due if self.interval else time.perf_counter_ns())
        self.transport.write(b"".join(requests))

    def _send_when_due(self) -> None:
        self.due += self.interval
        wait = self.due - time.perf_counter_ns()
        if wait <= 0:
            self._send(1)
        else:
            self.loop.call_later(wait / 1e9, self._send_due)

    def _send_due(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.stopping:
            self._send(1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answered = 0
        now = time.perf_counter_ns()
        while True:
            head, colon, rest = self.buffer.partition(b":")
            if not colon or len(rest) <= int(head):
                break
            self.buffer = rest[int(head) + 1 :]
            self.latencies.append(now - self.sent.pop(0))
            answered += 1
        if answered and not self.stopping:
            if self.interval:
                self._send_when_due()
            else:
                self._send(answered)
        elif self.stopping and not self.sent and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _drive(load: Load) -> list[int]:
    loop = asyncio.get_running_loop()
    latencies: list[int] = []
    connections = []
    for number in range(load.connections):
        _, protocol = await loop.create_connection(
            lambda n=number: _Connection(load, latencies, n), "127.0.0.1", load.port
        )
        connections.append(protocol)
    await asyncio.sleep(load.seconds)
    for connection in connections:
        connection.stopping = True
        if not connection.sent and connection.transport is not None:
            connection.transport.close()
    await asyncio.wait_for(asyncio.gather(*(c.lost for c in connections)), 30)
    return latencies


def _client_process(load: Load, results: multiprocessing.Queue[list[int]]) -> None:
    results.put(asyncio.run(_drive(load)))


def run_load(load: Load, processes: int) -> tuple[float, list[int]]:
    """Lookups/s over the load's seconds and every latency (ns), from ``processes`` processes."""
    results: multiprocessing.Queue[list[int]] = multiprocessing.Queue()
    seconds = load.seconds
    workers = [
        multiprocessing.Process(
            target=_client_process,
            args=(dataclasses.replace(load, seed=n * 104729), results),
        )
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    latencies = [value for _ in workers for value in results.get(timeout=seconds + 60)]
    for worker in workers:
        worker.join(timeout=30)
    return len(latencies) / seconds, latencies


def quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6  # ms


# --- the processes ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_map_server(directory: Path, store: str, cpu: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = directory / "map.ini"
    config.write_text(
        f"[store]\n{store}\n[map]\nlisten = 127.0.0.1:{port}\n"
        f"[log]\ntarget = file:{directory}/map.log\n[daemon]\nallow_root = yes\n"
    )
    command = [sys.executable, "-m", "relayproxy.cli.mapserver", "--config", str(config)]
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        command = ["taskset", "-c", str(cpu), *command]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("relayproxy-map did not start") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def seed_redis(server: RedisServer, entries: int) -> None:
    """Relayers per the contract: a string of epoch seconds with EXAT at time + ttl."""
    now = int(time.time())
    client = redis.Redis(host="127.0.0.1", port=server.port)
    for start in range(0, entries, 10_000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + 10_000, entries)):
            pipe.set(address(2 * n), str(now), exat=now + 86400)
        pipe.execute()


def redis_get_loop(port: int, seconds: float, entries: int) -> tuple[float, list[int]]:
    """Baseline: one redis-py connection, GET after GET."""
    client = redis.Redis(host="127.0.0.1", port=port)
    latencies: list[int] = []
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter_ns()
        client.get(address(n % (2 * entries)))
        latencies.append(time.perf_counter_ns() - started)
        n += 1
    return len(latencies) / seconds, latencies


class _Notfound(asyncio.Protocol):
    """The floor's server: NOTFOUND to every netstring at once (no store, no Twisted)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = []
        while True:
            head, colon, rest = self.buffer.partition(b":")
            if not colon or len(rest) <= int(head):
                break
            self.buffer = rest[int(head) + 1 :]
            answers.append(b"9:NOTFOUND ,")
        self.transport.write(b"".join(answers))


def _floor_server(port: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_Notfound, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def measure_floor(cpu: int, seconds: float) -> float:
    """What the load generator itself adds: the goal's load against a trivial server."""
    port = free_port()
    server = multiprocessing.Process(target=_floor_server, args=(port, cpu), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the floor's server did not start") from None
            time.sleep(0.05)
    processes, connections, depth, offered = SHAPES[0]
    load = Load(port, connections, depth, seconds, 1000, 0, offered / (processes * connections))
    rate, latencies = run_load(load, processes)
    report(f"floor: the same {offered:,}/s, a bare NOTFOUND server", rate, latencies)
    server.terminate()
    server.join(timeout=10)
    return quantile(latencies, 0.99)


# --- Postfix's postmap, when available -----------------------------------------------------


def postfix_tree(explicit: str | None, directory: Path) -> Path | None:
    if explicit:
        return Path(explicit)
    debs = sorted(DEB_CACHE.glob("postfix_*.deb"))
    if not debs or shutil.which("dpkg") is None:
        return None
    root = directory / "postfix-root"
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
    return root


def postmap_rate(root: Path, directory: Path, table: str, keys: list[str]) -> float:
    """Lookups/s of `postmap -q - TABLE` reading ``keys`` from stdin (start-up included)."""
    confdir = directory / "postfix"
    confdir.mkdir(exist_ok=True)
    main_cf = confdir / "main.cf"
    if not main_cf.exists():
        main_cf.write_text("compatibility_level = 3.6\nmail_owner = daemon\nsetgid_group = mail\n")
        past = time.time() - 60  # a fresh main.cf costs postmap a re-read
        os.utime(main_cf, (past, past))
    libraries = [root / "usr/lib/postfix", *sorted((root / "usr/lib").glob("*-linux-gnu"))]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(map(str, libraries))}
    command = [str(root / "usr/sbin/postmap"), "-c", str(confdir), "-q", "-", table]
    started = time.perf_counter()
    result = subprocess.run(
        command, input="\n".join(keys) + "\n", capture_output=True, text=True, env=env, timeout=600
    )
    elapsed = time.perf_counter() - started
    found = len(result.stdout.splitlines())
    if result.returncode not in (0, 1) or abs(found - len(keys) / 2) > 1:
        raise SystemExit(f"postmap {table}: status {result.returncode}, {found} found")
    return len(keys) / elapsed


# --- the run -------------------------------------------------------------------------------

# (client processes, connections each, lookups outstanding per connection, total rate)
SHAPES = (
    (2, 16, 1, 10_000),  # the goal: 10,000 lookups/s offered, latency counted from due time
    (1, 4, 1, 0),
    (2, 8, 1, 0),
    (2, 16, 1, 0),
    (2, 16, 8, 0),
)


def report(name: str, rate: float, latencies: list[int]) -> None:
    print(
        f"  {name:<40} {rate:>9,.0f} lookups/s   p50 {quantile(latencies, 0.5):6.3f} ms"
        f"   p99 {quantile(latencies, 0.99):6.3f} ms   p99.9 {quantile(latencies, 0.999):6.3f} ms"
    )


def measure_map(port: int, pid: int, options: argparse.Namespace) -> dict[str, float]:
    """The load shapes through relayproxy-map: each one's rate, and the goal's row's p99."""
    figures: dict[str, float] = {}
    for processes, connections, depth, offered in SHAPES:
        per_connection = offered / (processes * connections)
        warm = Load(port, connections, depth, 0.5, 1000, 0, per_connection)
        run_load(warm, processes)
        before = cpu_seconds(pid)
        load = Load(port, connections, depth, options.seconds, options.entries, 0, per_connection)
        rate, latencies = run_load(load, processes)
        busy = (cpu_seconds(pid) - before) / options.seconds
        shape = "pipelined" if depth > 1 else "request/response"
        name = f"{shape} {processes}x{connections}" + (f" depth {depth}" if depth > 1 else "")
        name += f" at {offered:,}/s" if offered else ""
        report(f"relayproxy-map {name}", rate, latencies)
        print(f"  {'':<40} (relayproxy-map CPU: {busy:.0%} of one core)")
        figures[name] = rate
        if offered:
            figures["paced"], figures["paced p99"] = rate, quantile(latencies, 0.99)
        else:
            figures["most"] = max(figures.get("most", 0.0), rate)
            if quantile(latencies, 0.99) <= 2.0:
                figures["within 2 ms"] = max(figures.get("within 2 ms", 0.0), rate)
    return figures


def measure_postmap(root: Path, directory: Path, port: int, entries: int) -> dict[str, float]:
    now = int(time.time())
    subprocess.run(
        ["makemap", "hash", str(directory / "plain")],
        input="".join(f"{address(2 * n)} {now}\n" for n in range(entries)),
        text=True,
        check=True,
        stderr=subprocess.DEVNULL,  # its warning about world-writable /tmp
    )
    keys = [address(n) for n in range(min(2 * entries, 50_000))]
    hash_rate = postmap_rate(root, directory, f"hash:{directory}/plain", keys)
    print(f"  {'baseline: postmap -q - hash: (1 process)':<40} {hash_rate:>9,.0f} lookups/s")
    table = f"socketmap:inet:127.0.0.1:{port}:relayers"
    socket_rate = postmap_rate(root, directory, table, keys)
    print(f"  {'postmap -q - socketmap: (1 connection)':<40} {socket_rate:>9,.0f} lookups/s")
    return {"postmap hash": hash_rate, "postmap socketmap": socket_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (fewer entries, 2 s)")
    parser.add_argument("--store", choices=("redis", "file"), default="redis")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--postfix", help="an unpacked Postfix tree (default: from the .deb)")
    options = parser.parse_args()
    if options.small:
        options.entries, options.seconds = 10_000, 2.0
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpus = cpus[0], set(cpus[1:]) or {cpus[0]}

    with tempfile.TemporaryDirectory(prefix="relayproxy-bench-map-") as temp:
        directory = Path(temp)
        redis_server = RedisServer(directory / "redis")
        redis_server.start()
        try:
            seed_redis(redis_server, options.entries)
            db = directory / "relayers.db"
            now = int(time.time())
            RelayStore(db).record((address(2 * n), now) for n in range(options.entries))
            store = f"backend = redis\nredis_url = {redis_server.url}"
            map_server, port = start_map_server(
                directory, store if options.store == "redis" else f"path = {db}", server_cpu
            )
            os.sched_setaffinity(0, client_cpus)
            os.sched_setaffinity(redis_server.process.pid, client_cpus)  # type: ignore[union-attr]
            print(
                f"relayproxy-map on CPU {server_cpu} ({options.store} store, "
                f"{options.entries:,} entries); clients and Redis on CPU "
                f"{','.join(map(str, sorted(client_cpus)))}; {options.seconds:g} s per line"
            )
            try:
                figures = measure_map(port, map_server.pid, options)
                figures["floor p99"] = measure_floor(server_cpu, options.seconds)
                rate, latencies = redis_get_loop(
                    redis_server.port, options.seconds, options.entries
                )
                report("baseline: Redis GET loop (1 connection)", rate, latencies)
                figures["Redis GET loop"] = rate
                postfix = postfix_tree(options.postfix, directory)
                if postfix is not None:
                    figures |= measure_postmap(postfix, directory, port, options.entries)
                else:
                    print("  (no Postfix .deb in the test cache: postmap baselines skipped)")
            finally:
                stop(map_server)
        finally:
            redis_server.stop()
    print(
        f"goal (>= 10,000 lookups/s with p99 <= 2 ms): paced {figures['paced']:,.0f} lookups/s "
        f"with p99 {figures['paced p99']:.3f} ms (the harness's own floor: "
        f"{figures['floor p99']:.3f} ms); closed loop, the most with p99 <= 2 ms: "
        f"{figures.get('within 2 ms', 0.0):,.0f} lookups/s; the most: {figures['most']:,.0f}"
    )
    print("ratios:")
    for baseline in ("Redis GET loop", "postmap hash"):
        if baseline in figures:
            most = figures["most"] / figures[baseline]
            print(f"  relayproxy-map at most / {baseline}: {most:.2f}")
    if "postmap socketmap" in figures:
        ratio = figures["postmap socketmap"] / figures["postmap hash"]
        print(f"  postmap -q - through relayproxy-map / on the hash file: {ratio:.3f}")


if __name__ == "__main__":
    main()
