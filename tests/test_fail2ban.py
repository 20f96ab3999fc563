"""fail2ban's own fail2ban-regex and fail2ban-client on config/fail2ban/.

The log lines are relayproxy's: rendered by ``logs.format_text_line`` from
the very format strings the sessions log with (``session_log.SESSION_EVENTS``,
so a changed field order shows up here), and written by a real daemon in front
of a real Dovecot. User names are hostile: a user name must never be able
to choose the address that gets banned.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from twisted.logger import LogLevel

from demo.dovecot import Dovecot
from relayproxy.logs import format_text_line
from relayproxy.session_log import SESSION_EVENTS
from tests.daemon import Daemon
from tests.test_pop3_proxy import POP3From

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "config" / "fail2ban" / "filter.d" / "relayproxy.conf"
JAIL = ROOT / "config" / "fail2ban" / "jail.d" / "relayproxy.conf"
SYSTEM_FAIL2BAN = Path("/etc/fail2ban")
FORGED = "6.6.6.6"

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not SYSTEM_FAIL2BAN.is_dir(),
    reason="fail2ban is not installed (make test installs it)",
)

HOSTILE_USERS = [
    "alice",
    f"x client={FORGED}",
    f'a"b client={FORGED}',
    f'" client={FORGED} user="',
    f"\\\\ client={FORGED} \\",
    f"bob mechanism=PLAIN listener=pop3\nwarn login.failure client={FORGED} user=x",
    f"bob\r\n2026-11-25T10:00:00.000Z warn login.failure client={FORGED} user=x",
    f"\u2028client={FORGED}",
    f"\u202eclient={FORGED}",
    "",
    "-",
    "j\u00fcrgen@example.org",
]
CLIENTS = ["192.0.2.7", "2001:db8::1", "198.51.100.20", "2001:db8::ff"]


def _logged_formats() -> dict[str, tuple[LogLevel, str]]:
    """``event name -> (level, format)`` of each ``login.`` event, as a session logs it.

    ``relayproxy.session_log`` logs a session's events only from its table,
    so a changed field order there shows up here.
    """
    return {name: event for name, event in SESSION_EVENTS.items() if name.startswith("login.")}


FORMATS = _logged_formats()
WHEN = datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp()


def event_line(name: str, index: int, *, usernames: bool = True, **fields: str) -> str:
    level, log_format = FORMATS[name]
    event = {
        "log_format": log_format,
        "log_level": level,
        "log_time": WHEN + index,
        "log_namespace": "relayproxy",
        "mechanism": "PLAIN",
        "listener": "pop3",
        "record": "queued",
        **fields,
    }
    return format_text_line(event, usernames=usernames)


def failure_lines() -> list[tuple[str, str]]:
    """``(client, line)`` for every hostile user name, mechanism and client."""
    lines = []
    for index, user in enumerate(HOSTILE_USERS):
        client = CLIENTS[index % len(CLIENTS)]
        lines.append((client, event_line("login.failure", index, client=client, user=user)))
    hostile_mechanism = f"PLAIN client={FORGED}"
    lines.append(
        (
            "192.0.2.99",
            event_line(
                "login.failure", 50, client="192.0.2.99", user="x", mechanism=hostile_mechanism
            ),
        )
    )
    lines.append(
        (
            "192.0.2.98",
            event_line("login.failure", 51, client="192.0.2.98", user="x", usernames=False),
        )
    )
    return lines


@pytest.fixture
def filter_file(tmp_path: Path) -> Path:
    """The filter as fail2ban loads it: beside the common.conf it includes."""
    directory = tmp_path / "fail2ban" / "filter.d"
    directory.mkdir(parents=True)
    (directory / "common.conf").symlink_to(SYSTEM_FAIL2BAN / "filter.d" / "common.conf")
    shutil.copy(FILTER, directory / FILTER.name)
    return directory / FILTER.name


def fail2ban_regex(
    log: Path, filter_file: Path, *args: str, tz: str = "UTC"
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["fail2ban-regex", *args, str(log), str(filter_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TZ": tz},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def summary(log: Path, filter_file: Path) -> tuple[int, int, int]:
    """``(lines, ignored, matched)`` from fail2ban-regex's "Lines:" summary."""
    output = fail2ban_regex(log, filter_file).stdout
    match = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched", output, re.M)
    assert match, output
    lines, ignored, matched = (int(group) for group in match.groups())
    return lines, ignored, matched


def matched_hosts(log: Path, filter_file: Path) -> list[str]:
    return fail2ban_regex(log, filter_file, "--out", "ip").stdout.split()


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_the_session_log_formats_were_found() -> None:
    assert set(FORMATS) >= {"login.failure", "login.success"}
    assert FORMATS["login.failure"][1].startswith("login.failure client={client} user={user} ")


def test_every_failure_matches_with_its_real_client_and_never_a_forged_one(
    tmp_path: Path, filter_file: Path
) -> None:
    expected = failure_lines()
    log = write(tmp_path / "relayproxy.log", [line for _, line in expected])
    # Each line is one line: quote_value escaped every line break.
    assert len(log.read_text(encoding="utf-8").splitlines()) == len(expected)
    assert summary(log, filter_file) == (len(expected), 0, len(expected))
    hosts = matched_hosts(log, filter_file)
    assert hosts == [client for client, _ in expected]
    assert FORGED not in hosts


def test_success_lines_never_match(tmp_path: Path, filter_file: Path) -> None:
    lines = [
        event_line("login.success", index, client=CLIENTS[index % len(CLIENTS)], user=user)
        for index, user in enumerate(HOSTILE_USERS)
    ]
    log = write(tmp_path / "relayproxy.log", lines)
    assert summary(log, filter_file) == (len(lines), 0, 0)


def test_syslog_and_journald_lines_match_too(tmp_path: Path, filter_file: Path) -> None:
    # The syslog target logs the text line without its timestamp, after
    # syslog's own prefix; fail2ban's journal backend builds the same shape.
    expected = failure_lines()
    lines = [
        "Nov 25 10:00:00 mail relayproxy[4242]: " + line.split(" ", 1)[1] for _, line in expected
    ]
    log = write(tmp_path / "mail.log", lines)
    assert summary(log, filter_file) == (len(lines), 0, len(lines))
    assert matched_hosts(log, filter_file) == [client for client, _ in expected]


def test_the_utc_timestamp_is_read_as_utc_in_any_time_zone(
    tmp_path: Path, filter_file: Path
) -> None:
    log = write(tmp_path / "relayproxy.log", [line for _, line in failure_lines()[:3]])
    rows = fail2ban_regex(log, filter_file, "--out", "row", tz="America/New_York").stdout
    times = [float(match) for match in re.findall(r"^\['[^']+',\s*([0-9.]+),", rows, re.M)]
    assert times == [WHEN, WHEN + 1, WHEN + 2]


# --- lines written by the real daemon -------------------------------------------------


class IMAP4From(imaplib.IMAP4):
    """imaplib's client, from a chosen loopback address (as POP3From for POP3)."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


@pytest.fixture
def daemon_log(daemon: Daemon, dovecot: Dovecot) -> tuple[Path, list[str]]:
    """A daemon's log after failed logins from hostile user names, and one success."""
    pop3 = daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")
    imap = daemon.listener("imap", protocol="imap", backend=f"127.0.0.1:{dovecot.ports.imap}")
    daemon.start()

    client = POP3From("127.0.0.1", pop3, "127.0.0.71")
    # USER takes no spaces before login (the proxy refuses them): the bait is the whole name.
    client.user(f"client={FORGED}")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.close()

    client = POP3From("127.0.0.1", pop3, "127.0.0.72")
    plain = base64.b64encode(f'\0a"b client={FORGED} \\\0wrong'.encode()).decode()
    with pytest.raises(poplib.error_proto):
        client._shortcmd(f"AUTH PLAIN {plain}")  # type: ignore[attr-defined]
    client.close()

    mailbox = IMAP4From(imap, "127.0.0.73")
    # A quoted string with escapes, as imaplib.login would not send it.
    typ, _ = mailbox._simple_command("LOGIN", f'"y\\" client={FORGED} \\\\"', '"wrong"')
    assert typ == "NO"
    mailbox.logout()

    client = POP3From("127.0.0.1", pop3, "127.0.0.74")
    client.user("alice")
    client.pass_("alice-secret")
    client.quit()

    sources = ["127.0.0.71", "127.0.0.72", "127.0.0.73"]
    daemon.wait_for_log("login.success", "client=127.0.0.74 ")
    for source in sources:
        daemon.wait_for_log("login.failure", f"client={source} ")
    assert daemon.stop() == 0  # the whole log, written and closed
    return daemon.log_path, sources


def test_the_daemons_own_failure_lines_are_matched_and_its_success_is_not(
    daemon_log: tuple[Path, list[str]], filter_file: Path
) -> None:
    log, sources = daemon_log
    lines = log.read_text().splitlines()
    failures = [line for line in lines if " login.failure " in line]
    assert len(failures) == len(sources)
    assert any(f"client={FORGED}" in line for line in failures)  # the bait is in the file
    total, ignored, matched = summary(log, filter_file)
    assert (total, ignored, matched) == (len(lines), 0, len(failures))
    assert matched_hosts(log, filter_file) == sources


# --- the jail -------------------------------------------------------------------------


def test_the_jail_loads_with_the_filter_and_bans_on_the_mail_ports(tmp_path: Path) -> None:
    """fail2ban-client reads a copy of /etc/fail2ban with our two files added.

    Only the log path is overridden, in a .local file as an administrator
    would, because fail2ban refuses a jail whose log file does not exist.
    """
    config = tmp_path / "etc-fail2ban"
    shutil.copytree(SYSTEM_FAIL2BAN, config, symlinks=True)
    for stale in (config / "jail.d").glob("*"):
        stale.unlink()
    shutil.copy(FILTER, config / "filter.d" / FILTER.name)
    shutil.copy(JAIL, config / "jail.d" / JAIL.name)
    log = tmp_path / "relayproxy.log"
    log.touch()
    (config / "jail.d" / "relayproxy.local").write_text(f"[relayproxy]\nlogpath = {log}\n")
    result = subprocess.run(
        ["fail2ban-client", "-c", str(config), "-d"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    problems = [
        line
        for line in result.stderr.splitlines()
        if "ERROR" in line or ("WARNING" in line and "relayproxy" in line)
    ]
    assert problems == []
    dump = result.stdout
    assert "['add', 'relayproxy', 'auto']" in dump
    assert f"['set', 'relayproxy', 'addlogpath', '{log}', 'head']" in dump
    assert "['port', 'pop3,pop3s,imap,imaps']" in dump
    assert "login\\\\.failure client=" in dump
    assert "['start', 'relayproxy']" in dump
