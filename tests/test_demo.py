"""`make run`'s demo does what its banner says, and the shipped example config parses."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

from relayproxy.config import parse_config
from tests.daemon import wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_is_valid() -> None:
    config = parse_config((ROOT / "config" / "relayproxy.ini").read_text(), "relayproxy.ini")
    assert [listener.name for listener in config.listeners] == ["pop3", "pop3s"]


def test_the_demo_banner_commands_work_as_printed(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo.run", "--state", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        banner: list[str] = []
        for line in demo.stdout:
            banner.append(line)
            if "listener.ready" in line:
                break
        commands = [line.strip() for line in banner if line.strip().startswith(("curl", "/"))]
        curls = [c for c in commands if c.startswith("curl")]
        dump = next(c for c in commands if c.endswith("dump"))
        assert len(curls) == 3
        for command in curls:
            result = subprocess.run(shlex.split(command), capture_output=True, text=True)
            assert result.returncode == 0, (command, result.stderr)

        def listed() -> str | None:
            out = subprocess.run(shlex.split(dump), capture_output=True, text=True).stdout
            wanted = ("127.0.0.5\t", "127.0.0.6\t", "127.0.0.7\t")
            return out if all(address in out for address in wanted) else None

        wait_for("every demo login in the dump", listed)
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
