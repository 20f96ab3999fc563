"""The real `relayproxy` daemon as a subprocess, configured from a test."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from relayproxy.store import RelayStore, StoreMissingError

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)  # a polling interval, not a timing assumption
        pause = min(pause * 2, 0.2)


class DaemonProcess:
    """One of our daemons as a subprocess: an exit noticed early, a clean stop, its log.

    Subclasses (dataclasses) hold ``process`` and say where the log is.
    """

    name = "relayproxy"
    process: subprocess.Popen[bytes] | None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def accepts_on(self, port: int) -> bool:
        """Whether ``port`` accepts; a daemon that has exited fails the test with its output."""
        assert self.process is not None
        if self.process.poll() is not None:
            output = self.process.stdout.read().decode() if self.process.stdout else ""
            raise AssertionError(f"{self.name} exited {self.process.returncode}: {output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.stdout:
                self.process.stdout.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def log_lines(self, event: str) -> list[str]:
        return [line for line in self.log().splitlines() if f" {event} " in f"{line} "]


def told_pop3_login(
    port: int,
    source: str,
    *,
    timeout: float = 10.0,
    pass_sent: Callable[[], None] | None = None,
) -> bool:
    """A raw POP3 login as alice from ``source``: whether the client was told +OK.

    ``pass_sent`` runs once PASS is on the wire, before its answer is read
    (a test may kill the daemon then).
    """
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as connection:
        replies = connection.makefile("rb")
        if not replies.readline().startswith(b"+OK"):
            return False
        connection.sendall(b"USER alice\r\n")
        if not replies.readline().startswith(b"+OK"):
            return False
        connection.sendall(b"PASS alice-secret\r\n")
        if pass_sent is not None:
            pass_sent()
        told = replies.readline().startswith(b"+OK")
        connection.sendall(b"QUIT\r\n")
        return told


@dataclass
class Listener:
    name: str
    port: int
    settings: dict[str, str]


@dataclass
class Daemon(DaemonProcess):
    directory: Path
    store_settings: dict[str, str] = field(default_factory=dict)
    daemon_settings: dict[str, str] = field(default_factory=lambda: {"allow_root": "yes"})
    extra: str = ""
    listeners: list[Listener] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    # RLIMIT_NOFILE (soft and hard) to start the daemon under, as `ulimit -n` would.
    descriptor_limit: int | None = None

    @property
    def db(self) -> Path:
        return self.directory / "relayers.db"

    @property
    def config_path(self) -> Path:
        return self.directory / "relayproxy.ini"

    @property
    def log_path(self) -> Path:
        return self.directory / "relayproxy.log"

    def listener(self, name: str, *, backends: Sequence[str] = (), **settings: str) -> int:
        """A listener section; ``backends`` is its ``backend`` list, in order."""
        if backends:
            settings["backend"] = ", ".join(backends)
        port = free_port()
        self.listeners.append(Listener(name, port, settings))
        return port

    def config_text(self) -> str:
        store = {"path": str(self.db), "min_interval": "0", **self.store_settings}
        lines = ["[store]", *(f"{k} = {v}" for k, v in store.items()), ""]
        lines += ["[log]", f"target = file:{self.log_path}", ""]
        # The suite runs as root; production configurations set [daemon] user.
        lines += ["[daemon]", *(f"{k} = {v}" for k, v in self.daemon_settings.items()), ""]
        for listener in self.listeners:
            lines += [f"[listener:{listener.name}]", f"listen = 127.0.0.1:{listener.port}"]
            lines += [f"{k} = {v}" for k, v in listener.settings.items()]
            lines.append("")
        return "\n".join(lines) + self.extra

    def start(self) -> None:
        self.config_path.write_text(self.config_text())
        limit = self.descriptor_limit

        def limit_descriptors() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_descriptors if limit is not None else None,  # noqa: PLW1509
        )
        for listener in self.listeners:
            wait_for(
                f"[listener:{listener.name}] to accept", lambda p=listener.port: self.accepts_on(p)
            )

    def entries(self) -> dict[str, str]:
        try:
            return {e.key.decode(): e.value.decode() for e in RelayStore(self.db).entries()}
        except StoreMissingError:
            return {}

    def wait_for_record(self, key: str) -> str:
        return wait_for(f"{key} in relayers.db", lambda: self.entries().get(key))

    def wait_for_log(self, event: str, needle: str = "") -> str:
        def probe() -> str | None:
            for line in self.log_lines(event):
                if needle in line:
                    return line
            return None

        return wait_for(f"a {event} line with {needle!r}", probe)
