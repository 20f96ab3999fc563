"""A login the proxy refuses itself (``require_tls``) is logged, and is not a failure for fail2ban.

The watcher returns ``LoginRefused``; the glue logs ``login.refused`` with
the same user-name rules as ``login.failure``. It is a client set up
without TLS, not a password guess: fail2ban's filter must not count it,
or one misconfigured phone bans a whole office behind one NAT address.
"""

from __future__ import annotations

import poplib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.dovecot import Dovecot
from relayproxy.protocols.common import LoginRefused, ToClient
from tests.daemon import Daemon
from tests.glue import CLIENT, Glue
from tests.test_fail2ban import (
    SYSTEM_FAIL2BAN,
    event_line,
    filter_file,  # noqa: F401 (a fixture)
    matched_hosts,
    summary,
    write,
)
from tests.test_pop3_proxy import POP3From


@pytest.fixture
def glue() -> Iterator[Glue]:
    session = Glue()
    yield session
    session.close()


def test_a_refused_login_is_logged_once_and_answered(glue: Glue) -> None:
    glue.connect_backend()
    glue.watcher.will(
        "client_data",
        ToClient(b"-ERR TLS required: use STLS first\r\n"),
        LoginRefused("alice", "USER", "tls-required"),
    )
    glue.frontend.dataReceived(b"USER alice\r\n")
    assert glue.client.value() == b"-ERR TLS required: use STLS first\r\n"
    [line] = glue.lines("login.refused")
    assert line.endswith(
        f" warn login.refused client={CLIENT} user=alice mechanism=USER listener=glue "
        "reason=tls-required"
    )
    assert glue.lines("login.failure") == []
    assert glue.backend.value() == b""
    assert glue.recorder.logins == []


def test_a_refused_login_hides_the_user_when_usernames_are_off() -> None:
    glue = Glue(usernames=False)
    try:
        glue.connect_backend()
        glue.watcher.will("client_data", LoginRefused("alice", "PLAIN", "tls-required"))
        glue.frontend.dataReceived(b"AUTH PLAIN\r\n")
        [line] = glue.lines("login.refused")
        assert " user=- mechanism=PLAIN " in line
        assert "alice" not in line
    finally:
        glue.close()


def test_an_unknown_user_is_a_dash(glue: Glue) -> None:
    glue.connect_backend()
    glue.watcher.will("client_data", LoginRefused(None, "LOGIN", "tls-required"))
    glue.frontend.dataReceived(b"a LOGIN {5}\r\n")
    [line] = glue.lines("login.refused")
    assert " user=- mechanism=LOGIN " in line  # as a hidden user: '-' is no value


@pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not SYSTEM_FAIL2BAN.is_dir(),
    reason="fail2ban is not installed (make test installs it)",
)
def test_fail2ban_counts_failures_and_not_refusals(tmp_path: Path, filter_file: Path) -> None:  # noqa: F811
    refused = [
        event_line(
            "login.refused", index, client=f"192.0.2.{index + 1}", user=user, reason="tls-required"
        )
        for index, user in enumerate(["alice", "x client=6.6.6.6", ""])
    ]
    failure = event_line("login.failure", 10, client="198.51.100.7", user="alice")
    log = write(tmp_path / "relayproxy.log", [*refused, failure])
    assert " login.refused client=192.0.2.1 user=alice " in refused[0]  # the real format
    assert summary(log, filter_file) == (4, 0, 1)
    assert matched_hosts(log, filter_file) == ["198.51.100.7"]


def test_the_daemon_logs_a_login_refused_for_want_of_tls(daemon: Daemon, dovecot: Dovecot) -> None:
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        tls="starttls",
        require_tls="yes",
        certificate=str(dovecot.server_certificate),
        private_key=str(dovecot.server_key),
    )
    daemon.start()
    client = POP3From("127.0.0.1", port, "127.0.3.40")
    with pytest.raises(poplib.error_proto, match="TLS required"):
        client.user("alice")
    client.quit()
    line = daemon.wait_for_log("login.refused", "client=127.0.3.40 ")
    assert "user=alice mechanism=USER listener=pop3 reason=tls-required" in line
    assert daemon.log_lines("login.failure") == []
    assert daemon.entries() == {}
