"""The daemon as an operator runs it: privileges, SIGHUP reload, SIGTERM shutdown.

Each test keeps a real client connected across the signal it sends.
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from demo.certs import make_ca, make_server_cert
from demo.dovecot import Dovecot
from tests.daemon import Daemon, free_port, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def pop3(daemon: Daemon, dovecot: Dovecot, name: str = "pop3", **settings: str) -> int:
    base = {"protocol": "pop3", "backend": f"127.0.0.1:{dovecot.ports.pop3}"}
    return daemon.listener(name, **{**base, **settings})


def login(port: int, user: str = "alice", password: str = "alice-secret") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(user)
    client.pass_(password)
    return client


def sighup_and_wait(daemon: Daemon, event: str) -> str:
    before = len(daemon.log_lines(event))
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    return wait_for(
        f"a new {event} line",
        lambda: (lines := daemon.log_lines(event))[before:] and lines[-1],
    )


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@needs_root
def test_started_as_root_it_binds_then_runs_as_the_configured_user(
    open_dir: Path, dovecot: Dovecot
) -> None:
    os.chown(open_dir, 65534, 65534)
    daemon = Daemon(open_dir, daemon_settings={"user": "nobody", "group": "nogroup"})
    port = pop3(daemon, dovecot)
    daemon.start()
    try:
        assert daemon.process is not None
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == ["65534"] * 4  # real, effective, saved and filesystem
        login(port).quit()
        daemon.wait_for_record("127.0.0.1")
        assert daemon.db.stat().st_uid == 65534  # written after the switch
        assert "daemon.identity user=nobody group=nogroup" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_root_without_a_user_is_refused(daemon: Daemon, dovecot: Dovecot) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root is refused")
    daemon.daemon_settings = {}
    pop3(daemon, dovecot)
    daemon.config_path.write_text(daemon.config_text())
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to run as root: set [daemon] user" in result.stderr


def test_sighup_adds_and_removes_listeners_while_sessions_continue(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    first = pop3(daemon, dovecot, "first")
    daemon.start()
    session = login(first, "bob", "bob-secret")  # logged in on the old listener
    daemon.listeners.clear()
    second = pop3(daemon, dovecot, "second")
    daemon.config_path.write_text(daemon.config_text())
    line = sighup_and_wait(daemon, "config.reloaded")
    assert "listeners=1 problems=0" in line
    assert refused(first)  # removed: no new connections
    login(second).quit()  # added: serves logins
    assert session.stat()[0] >= 0  # the old session goes on
    session.quit()
    assert "listener=second" in daemon.wait_for_log("login.success", "listener=second")


def test_sighup_swaps_the_certificate_for_new_connections(
    daemon: Daemon, dovecot: Dovecot, tmp_path: Path
) -> None:
    other_ca, other_ca_key = make_ca(tmp_path / "other", name="Other Test CA")
    other_cert, other_key = make_server_cert(tmp_path / "other", other_ca, other_ca_key)
    port = pop3(
        daemon,
        dovecot,
        tls="implicit",
        certificate=str(dovecot.server_certificate),
        private_key=str(dovecot.server_key),
    )
    daemon.start()
    old = poplib.POP3_SSL(
        "localhost", port, context=ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    )
    old.user("alice")
    old.pass_("alice-secret")
    daemon.listeners[0].settings.update(certificate=str(other_cert), private_key=str(other_key))
    daemon.config_path.write_text(daemon.config_text())
    sighup_and_wait(daemon, "config.reloaded")
    new = poplib.POP3_SSL(
        "localhost", port, context=ssl.create_default_context(cafile=str(other_ca))
    )
    new.user("bob")
    new.pass_("bob-secret")
    new.quit()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            "localhost",
            port,
            context=ssl.create_default_context(cafile=str(dovecot.ca_certificate)),
        )
    assert old.noop().startswith(b"+OK")  # the session from before keeps its TLS
    old.quit()


def test_an_invalid_reload_is_logged_and_the_old_config_stays(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3(daemon, dovecot)
    daemon.start()
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[listener:broken]\nprotocol = smtp\ncolour = red\n")
    sighup_and_wait(daemon, "config.reload.kept")
    problems = daemon.log_lines("config.reload.failed")
    assert any("[listener:broken] colour: unknown key" in line for line in problems)
    assert any("[listener:broken] protocol: 'smtp' is not one of" in line for line in problems)
    login(port).quit()
    daemon.wait_for_record("127.0.0.1")


def test_sigterm_stops_accepting_lets_a_login_finish_and_writes_it(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3(daemon, dovecot)
    daemon.start()
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user("alice")  # mid-login when the signal comes
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_log("shutdown.waiting", "sessions=1")
    assert refused(port)
    client.pass_("alice-secret")
    client.quit()
    assert daemon.process.wait(timeout=30) == 0
    assert "127.0.0.1" in daemon.entries()


def test_a_new_listener_that_cannot_bind_is_reported_and_the_rest_applies(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    first = pop3(daemon, dovecot, "first")
    daemon.start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        daemon.listeners.append(
            type(daemon.listeners[0])(
                "taken",
                busy.getsockname()[1],
                {"protocol": "pop3", "backend": f"127.0.0.1:{dovecot.ports.pop3}"},
            )
        )
        extra = pop3(daemon, dovecot, "extra")
        daemon.config_path.write_text(daemon.config_text())
        line = sighup_and_wait(daemon, "config.reloaded")
    finally:
        busy.close()
    assert "problems=1" in line
    assert any("[listener:taken] listen" in x for x in daemon.log_lines("config.reload.failed"))
    login(first).quit()
    login(extra).quit()
    assert free_port() > 0


def test_sigusr1_reopens_the_log_file_after_logrotate_renamed_it(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3(daemon, dovecot)
    daemon.start()
    login(port).quit()
    daemon.wait_for_log("login.success")
    rotated = daemon.log_path.with_suffix(".log.1")
    daemon.log_path.rename(rotated)  # what logrotate does before its postrotate
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGUSR1)
    wait_for("the log file to be created again", daemon.log_path.exists)
    login(port, "bob", "bob-secret").quit()
    line = daemon.wait_for_log("login.success", "user=bob")
    assert "user=bob" not in rotated.read_text()
    assert "user=alice" in rotated.read_text()
    assert "user=bob" in line


def test_an_unopenable_log_file_is_one_clear_line(daemon: Daemon, dovecot: Dovecot) -> None:
    pop3(daemon, dovecot)
    text = daemon.config_text().replace(
        f"target = file:{daemon.log_path}", "target = file:/nonexistent-dir/relayproxy.log"
    )
    daemon.config_path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"relayproxy: {daemon.config_path}: [log] target: "
        "file:/nonexistent-dir/relayproxy.log: No such file or directory"
    ]
