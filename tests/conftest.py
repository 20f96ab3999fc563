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


def makemap(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """sendmail's own makemap; /tmp's world-writable warning goes to stderr, harmlessly."""
    return subprocess.run([MAKEMAP, *args], input=stdin, capture_output=True, text=True, timeout=60)


def makemap_entries(db_path: Path) -> dict[str, str]:
    """What sendmail's `makemap -u hash` reads from the file (it takes LOCK_SH)."""
    result = makemap("-u", "hash", str(db_path)[: -len(".db")])
    assert result.returncode == 0, result.stderr
    return dict(line.split("\t", 1) for line in result.stdout.splitlines())
