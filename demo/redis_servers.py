"""Real redis-server and redis-sentinel processes on free loopback ports.

For the tests and the fleet demo, as ``demo.dovecot`` is for Dovecot: each
server gets a directory of its own with a config file written there, runs
in the foreground as a child process, and is stopped (or killed, to show a
crash) by the caller. Nothing here is a fake: these are Debian's binaries.

* ``RedisServer``: one redis-server; ``replica_of`` makes it a replica.
* ``RedisGroup``: a primary, replicas and sentinels watching them (service
  name ``relayers``), with a ``failover_by_kill`` that kills the primary
  and waits for a sentinel to promote a replica.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from demo.dovecot import _free_ports

SERVICE_NAME = "relayers"


class RedisError(RuntimeError):
    """A Redis process did not start, stop or fail over; the message has its log's tail."""


def client(port: int) -> redis.Redis:
    """A short-timeout client of the server or sentinel on ``port``."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, socket_connect_timeout=2.0)


def _poll(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, redis.RedisError):
            if check():
                return
        time.sleep(0.02)
    raise RedisError(f"{what} within {timeout:g} s; log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc.strerror})"


class RedisServer:
    """One redis-server on 127.0.0.1:port, its config and data under ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        replica_of: int | None = None,
        persistent: bool = False,
    ) -> None:
        self.directory = directory
        self.port = port if port is not None else _free_ports("127.0.0.1", 1)[0]
        self.replica_of = replica_of
        # An append-only file synced at every write, as a fleet's Redis should run:
        # a SIGKILL then loses nothing it acknowledged.
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"logfile {self.log}",
            "save ''",
            f"appendonly {'yes' if self.persistent else 'no'}",
            "appendfsync always",
            "protected-mode no",
            "daemonize no",
        ]
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        config = self.directory / "redis.conf"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _poll(lambda: bool(client(self.port).ping()), 10, "no PONG", self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGKILL for a crash); waits for the process to end."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def role(self) -> str:
        """``master`` or ``slave``, as ROLE says."""
        role = client(self.port).execute_command("ROLE")[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Sentinel:
    """One redis-sentinel watching the primary at ``primary_port`` (quorum given by the group)."""

    def __init__(self, directory: Path, primary_port: int, quorum: int) -> None:
        self.directory = directory
        self.port = _free_ports("127.0.0.1", 1)[0]
        self.primary_port = primary_port
        self.quorum = quorum
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "sentinel.log"

    def start(self) -> None:
        binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\nlogfile {self.log}\n"
            "protected-mode no\ndaemonize no\n"
            f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE_NAME} 500\n"
            f"sentinel failover-timeout {SERVICE_NAME} 5000\n"
            f"sentinel parallel-syncs {SERVICE_NAME} 1\n"
        )
        self.process = subprocess.Popen(
            [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _poll(lambda: bool(client(self.port).ping()), 10, "no PONG", self.log)

    def primary_port_now(self) -> int | None:
        """The port this sentinel currently names as the primary."""
        reply = client(self.port).execute_command(
            "SENTINEL", "get-master-addr-by-name", SERVICE_NAME
        )
        return None if not reply else int(reply[1])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class RedisGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (service ``relayers``)."""

    def __init__(self, directory: Path, *, replicas: int = 1, sentinels: int = 3) -> None:
        self.directory = directory
        self.servers = [RedisServer(directory / "redis-0")]
        primary = self.servers[0].port
        self.servers += [
            RedisServer(directory / f"redis-{n}", replica_of=primary)
            for n in range(1, replicas + 1)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            Sentinel(directory / f"sentinel-{n}", primary, quorum) for n in range(sentinels)
        ]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    @property
    def sentinels_setting(self) -> str:
        """The ``[store] sentinels`` value for these sentinels."""
        return ", ".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def primary(self) -> RedisServer:
        port = self.sentinels[0].primary_port_now()
        for server in self.servers:
            if server.port == port:
                return server
        raise RedisError(f"the sentinels name port {port}, which is none of ours")

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for replica in self.servers[1:]:
            _poll(_in_sync(replica.port), 10, "replica not in sync", replica.log)
        for sentinel in self.sentinels:
            sentinel.start()
        # Each sentinel must know the replicas before it can promote one.
        wanted = len(self.servers) - 1
        for sentinel in self.sentinels:
            _poll(_knows(sentinel.port, wanted), 15, "sentinel lacks replicas", sentinel.log)

    def failover_by_kill(self, timeout: float = 20.0) -> RedisServer:
        """SIGKILL the primary and wait until the sentinels name a replica; returns it."""
        old = self.primary()
        old.kill()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RedisError):
                new = self.primary()
                if new is not old and new.role() == "master":
                    return new
            time.sleep(0.05)
        raise RedisError(f"no replica promoted within {timeout:g} s; log:\n{_tail(old.log)}")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _in_sync(port: int) -> Callable[[], bool]:
    def check() -> bool:
        info = client(port).info("replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    return check


def _knows(sentinel_port: int, replicas: int) -> Callable[[], bool]:
    def check() -> bool:
        reply = client(sentinel_port).execute_command("SENTINEL", "replicas", SERVICE_NAME)
        return len(reply or ()) >= replicas

    return check
