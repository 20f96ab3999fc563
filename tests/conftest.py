"""Shared fixtures: the real vsmtprelay command and the real MTA tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.dovecot import Dovecot, running_dovecot
from demo.redis_servers import RedisGroup, RedisServer
from tests.daemon import Daemon

MAKEMAP = shutil.which("makemap") or "/usr/sbin/makemap"
DB_DUMP = shutil.which("db5.3_dump") or "/usr/bin/db5.3_dump"
DB_LOAD = shutil.which("db5.3_load") or "/usr/bin/db5.3_load"
DB_VERIFY = shutil.which("db5.3_verify") or "/usr/bin/db5.3_verify"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relayproxy-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def vsmtprelay(tmp_path: Path) -> Run:
    """Run the installed command as an administrator would, in a clean environment."""

    def run(
        *args: str, env: dict[str, str] | None = None, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
        command = [sys.executable, "-m", "relayproxy.cli.vsmtprelay", *args]
        if user is not None:
            command = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", *command]
        return subprocess.run(
            command, capture_output=True, text=True, env={**base, **(env or {})}, timeout=60
        )

    return run


def s_client(port: int, ca: Path, *options: str) -> subprocess.Popen[bytes]:
    """``openssl s_client`` to the proxy, verifying its certificate for localhost."""
    return subprocess.Popen(
        [
            "openssl",
            "s_client",
            *options,
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(ca),
            "-verify_return_error",
            "-servername",
            "localhost",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def makemap(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """sendmail's own makemap; /tmp's world-writable warning goes to stderr, harmlessly."""
    return subprocess.run([MAKEMAP, *args], input=stdin, capture_output=True, text=True, timeout=60)


def makemap_entries(db_path: Path) -> dict[str, str]:
    """What sendmail's `makemap -u hash` reads from the file (it takes LOCK_SH)."""
    result = makemap("-u", "hash", str(db_path)[: -len(".db")])
    assert result.returncode == 0, result.stderr
    return dict(line.split("\t", 1) for line in result.stdout.splitlines())


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """One real Dovecot for the whole run (POP3, IMAP, TLS, haproxy listeners)."""
    if shutil.which("dovecot") is None:
        pytest.skip("dovecot is not installed (make test installs it)")
    with running_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A relayproxy daemon to configure (``listener()``), then ``start()``."""
    proxy = Daemon(tmp_path)
    yield proxy
    if proxy.process is not None and proxy.process.poll() is None:
        assert proxy.stop() == 0, proxy.log()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own on a free loopback port (stop/kill/start it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer(tmp_path / "redis")
    with server:
        yield server


@pytest.fixture
def redis_group(tmp_path: Path) -> Iterator[RedisGroup]:
    """A real primary, one replica and three redis-sentinels (service ``relayers``)."""
    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed (make test installs it)")
    with RedisGroup(tmp_path / "redis-group") as group:
        yield group
