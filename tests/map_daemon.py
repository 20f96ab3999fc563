"""The real `relayproxy-map` as a subprocess, and a socketmap client that speaks to it."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon import DaemonProcess, free_port, wait_for


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class MapClient:
    """One persistent connection, as an MTA keeps it: requests out, answers in."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def send(self, *requests: bytes) -> None:
        """Send ``name key`` requests, all in one write (pipelined)."""
        self.sock.sendall(b"".join(netstring(r) for r in requests))

    def answer(self) -> str:
        """The next answer's body (``OK 1700000000``, ``NOTFOUND ``...); '' when closed."""
        while True:
            head, colon, rest = self._buffer.partition(b":")
            if colon and len(rest) > int(head):
                assert rest[int(head)] == ord(","), self._buffer
                self._buffer = rest[int(head) + 1 :]
                return rest[: int(head)].decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                assert not self._buffer, self._buffer
                return ""
            self._buffer += chunk

    def ask(self, *keys: str, name: str = "relayers") -> list[str]:
        """Look ``keys`` up, pipelined; their answers in order."""
        self.send(*(f"{name} {key}".encode() for key in keys))
        return [self.answer() for _ in keys]

    def close(self) -> None:
        self.sock.close()


@dataclass
class MapDaemon(DaemonProcess):
    name = "relayproxy-map"
    directory: Path
    store: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    log_settings: dict[str, str] = field(default_factory=dict)
    extra: str = ""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.directory / "relayers.db"

    @property
    def config_path(self) -> Path:
        return self.directory / "map.ini"

    @property
    def log_path(self) -> Path:
        return self.directory / "map.log"

    def config_text(self) -> str:
        store = {"path": str(self.db), **self.store}
        lines = ["[store]", *(f"{k} = {v}" for k, v in store.items()), ""]
        lines += ["[map]", f"listen = 127.0.0.1:{self.port}"]
        lines += [*(f"{k} = {v}" for k, v in self.settings.items()), ""]
        lines += ["[log]", f"target = file:{self.log_path}"]
        lines += [*(f"{k} = {v}" for k, v in self.log_settings.items()), ""]
        # The suite runs as root; production configurations set [daemon] user.
        lines += ["[daemon]", "allow_root = yes", ""]
        return "\n".join(lines) + self.extra

    def start(self) -> None:
        self.config_path.write_text(self.config_text())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relayproxy.cli.mapserver", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_for("relayproxy-map to accept", self.accepts)
        wait_for("map.start", lambda: self.log_lines("map.start"))

    def accepts(self) -> bool:
        return self.accepts_on(self.port)

    def client(self) -> MapClient:
        return MapClient(self.port)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
