"""`make run`'s demo does what its banner says, and the shipped example config parses."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

from relayproxy.cli.daemon import config_notes
from relayproxy.config import parse_config
from tests.daemon import wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_is_valid() -> None:
    config = parse_config((ROOT / "config" / "relayproxy.ini").read_text(), "relayproxy.ini")
    assert [listener.name for listener in config.listeners] == ["pop3", "pop3s"]
    # Every listener tells its backend who the client is: no note from --check-config.
    assert config_notes(config) == []


def test_check_config_notes_a_listener_that_hides_the_client_from_its_backend(
    tmp_path: Path,
) -> None:
    ini = tmp_path / "relayproxy.ini"
    ini.write_text(
        "[listener:pop3]\nprotocol = pop3\nlisten = 127.0.0.1:1\nbackend = 127.0.0.1:2\n"
        "[listener:imap]\nprotocol = imap\nlisten = 127.0.0.1:3\nbackend = 127.0.0.1:4\n"
        "proxy_protocol_out = v2\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--check-config", "--config", str(ini)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    notes = [line for line in result.stderr.splitlines() if ": note: " in line]
    assert len(notes) == 1
    assert "[listener:pop3] sends no client address to its backend" in notes[0]
    assert "proxy_protocol_out = v2" in notes[0]


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
        # Dovecot saw each client, not the proxy (PROXY v2 to its haproxy listener).
        dovecot_log = tmp_path / "dovecot" / "dovecot.log"
        wait_for(
            "Dovecot logging the real clients",
            lambda: (
                all(
                    f"rip={address}," in dovecot_log.read_text()
                    for address in ("127.0.0.5", "127.0.0.6", "127.0.0.7")
                )
                or None
            ),
        )
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
