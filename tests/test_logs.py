"""relayproxy.logs: the exact lines operators, fail2ban, syslog and journald get."""

from __future__ import annotations

import array
import calendar
import io
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    ILogObserver,
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from relayproxy.config import LogConfig
from relayproxy.logs import (
    format_json_line,
    format_text_line,
    make_observer,
    quote_value,
    start_logging,
)

FIXED_TIME = calendar.timegm((2026, 11, 25, 10, 0, 0)) + 0.123
LOGIN_SUCCESS = (
    "login.success client={client} user={user} mechanism={mechanism} "
    "listener={listener} record={record}"
)
LOGIN_FAILURE = (
    "login.failure client={client} user={user} mechanism={mechanism} listener={listener}"
)
SECRET = "hunter2-c29tZXRoaW5n"


def login_success(user: str = "alice", **extra: Any) -> dict[str, Any]:
    return {
        "log_format": LOGIN_SUCCESS,
        "log_level": LogLevel.info,
        "log_time": FIXED_TIME,
        "log_namespace": "relayproxy.proxy",
        "client": "192.0.2.7",
        "user": user,
        "mechanism": "PLAIN",
        "listener": "pop3",
        "record": "queued",
        **extra,
    }


_TOKEN = re.compile(r' ([A-Za-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]+)')
_LINE = re.compile(
    r"(\S+Z) (debug|info|warn|error|critical) ([a-z_.]+)((?:" + _TOKEN.pattern + ")*)"
)


def parse_line(line: str) -> tuple[str, str, str, dict[str, str]]:
    """Split a text line the way a strict reader would; fails on any ambiguity."""
    match = _LINE.fullmatch(line)
    assert match, line
    fields: dict[str, str] = {}
    for key, raw in _TOKEN.findall(match.group(4)):
        assert key not in fields, f"duplicate {key} in {line}"
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return match.group(1), match.group(2), match.group(3), fields


def observe(config: LogConfig, *events: dict[str, Any]) -> str:
    stream = io.StringIO()
    observer = make_observer(config, stream=stream)
    for event in events:
        observer(event)
    return stream.getvalue()


# --- the text format -----------------------------------------------------------


def test_login_success_renders_the_exact_text_line() -> None:
    assert observe(LogConfig(), login_success()) == (
        "2026-11-25T10:00:00.123Z info login.success client=192.0.2.7 user=alice "
        "mechanism=PLAIN listener=pop3 record=queued\n"
    )
    assert format_text_line(login_success()) == observe(LogConfig(), login_success())[:-1]


def test_numbers_keep_their_format_spec_and_addresses_stay_bare() -> None:
    event = {
        "log_format": "connection.close client={client} listener={listener} "
        "bytes_in={bytes_in} bytes_out={bytes_out} duration={duration:.3f}",
        "log_level": LogLevel.info,
        "log_time": FIXED_TIME,
        "client": "2001:db8::1",
        "listener": "imap",
        "bytes_in": 512,
        "bytes_out": 1048576,
        "duration": 2.34567,
    }
    assert format_text_line(event) == (
        "2026-11-25T10:00:00.123Z info connection.close client=2001:db8::1 listener=imap "
        "bytes_in=512 bytes_out=1048576 duration=2.346"
    )


@pytest.mark.parametrize(
    "user",
    [
        "alice record=recorded",
        "alice\r\n2026-11-25T10:00:00.123Z info login.success client=203.0.113.9 record=recorded",
        'alice" record="recorded',
        'alice\\" record=recorded',
        "alice\u2028record=recorded",
        "alice\x85record=recorded",
        "alice\x00\x1b[2J",
        "-",
        "",
    ],
)
def test_hostile_user_name_stays_one_field_on_one_line(user: str) -> None:
    output = observe(LogConfig(), login_success(user))
    assert len(output.splitlines()) == 1
    assert output.endswith("\n")
    _, level, name, fields = parse_line(output[:-1])
    assert (level, name) == ("info", "login.success")
    assert fields == {
        "client": "192.0.2.7",
        "user": user,
        "mechanism": "PLAIN",
        "listener": "pop3",
        "record": "queued",
    }


def test_login_failure_line_is_what_a_fail2ban_filter_matches() -> None:
    event = {
        "log_format": LOGIN_FAILURE,
        "log_level": LogLevel.warn,
        "log_time": FIXED_TIME,
        "client": "203.0.113.9",
        "user": "bob smith",
        "mechanism": "LOGIN",
        "listener": "imaps",
    }
    line = format_text_line(event)
    assert line == (
        "2026-11-25T10:00:00.123Z warn login.failure client=203.0.113.9 "
        'user="bob smith" mechanism=LOGIN listener=imaps'
    )
    assert re.search(r" warn login\.failure client=(?P<host>[0-9A-Fa-f.:]+) ", line)


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("alice", "alice"),
        ("alice@example.org", "alice@example.org"),
        ("2001:db8::1", "2001:db8::1"),
        ("/var/lib/relayproxy/relayers.db", "/var/lib/relayproxy/relayers.db"),
        ("a+b-c_d.e", "a+b-c_d.e"),
        ("", '""'),
        ("-", "-"),
        ("a b", '"a b"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("\r\n\t", '"\\r\\n\\t"'),
        ("\x7f", '"\\u007f"'),
        ("\u2028\u2029\x85", '"\\u2028\\u2029\\u0085"'),
        ("\u202eevil", '"\\u202eevil"'),
        ("no\u00a0break", '"no\\u00a0break"'),
        ("\U000e0041", '"\\udb40\\udc41"'),
        ("\udcff", '"\\udcff"'),
        ("jos\u00e9", '"jos\u00e9"'),
    ],
)
def test_quote_value(value: str, rendered: str) -> None:
    assert quote_value(value) == rendered
    if rendered.startswith('"'):
        assert json.loads(rendered) == value


@given(st.text())
def test_any_value_is_one_token_that_reads_back(value: str) -> None:
    rendered = quote_value(value)
    assert len(rendered.splitlines()) == 1
    if rendered.startswith('"'):
        assert json.loads(rendered) == value
        assert re.fullmatch(r'"(?:[^"\\]|\\.)*"', rendered)
    else:
        assert re.fullmatch(r"[A-Za-z0-9_.:@/+-]+", rendered)
        assert rendered == value


def test_repr_and_attribute_access_in_a_format_are_quoted_too() -> None:
    peer = types.SimpleNamespace(host="192.0.2.7 record=recorded", port=110)
    event = {
        "log_format": "connection.open peer={peer.host} port={peer.port} raw={raw!r}",
        "log_level": LogLevel.info,
        "log_time": FIXED_TIME,
        "peer": peer,
        "raw": "a\nb",
    }
    assert format_text_line(event) == (
        "2026-11-25T10:00:00.123Z info connection.open "
        'peer="192.0.2.7 record=recorded" port=110 raw="\'a\\\\nb\'"'
    )


def test_a_wrong_format_string_still_gives_one_named_line() -> None:
    event = login_success(log_format="login.success client={client} user={usr}")
    _, _, name, fields = parse_line(format_text_line(event))
    assert name == "login.success"
    assert fields["client"] == "192.0.2.7"
    assert fields["format_error"] == "KeyError: 'usr'"


# --- the JSON format -----------------------------------------------------------


def test_login_success_renders_the_exact_json_object() -> None:
    output = observe(LogConfig(format="json"), login_success())
    assert output == (
        '{"time":"2026-11-25T10:00:00.123Z","level":"info","event":"login.success",'
        '"client":"192.0.2.7","user":"alice","mechanism":"PLAIN","listener":"pop3",'
        '"record":"queued","message":"login.success client=192.0.2.7 user=alice '
        'mechanism=PLAIN listener=pop3 record=queued"}\n'
    )
    assert format_json_line(login_success()) == output[:-1]


def test_json_keeps_every_field_and_str_s_what_json_cannot_hold() -> None:
    class Peer:
        def __str__(self) -> str:
            return "192.0.2.7:4242"

    event = login_success(
        "j\u00f6rg\r\nrecord=recorded",
        peer=Peer(),
        batch=[1, 2],
        ratio=float("nan"),
        log_logger=object(),
    )
    line = format_json_line(event)
    assert line.isascii()
    assert len(line.splitlines()) == 1
    document = json.loads(line)
    assert list(document) == [
        "time",
        "level",
        "event",
        "client",
        "user",
        "mechanism",
        "listener",
        "record",
        "peer",
        "batch",
        "ratio",
        "message",
    ]
    assert document["user"] == "j\u00f6rg\r\nrecord=recorded"
    assert document["record"] == "queued"
    assert (document["peer"], document["batch"], document["ratio"]) == (
        "192.0.2.7:4242",
        [1, 2],
        "nan",
    )


# --- user names and secrets ------------------------------------------------------


def test_usernames_no_hides_the_user_in_text_and_json() -> None:
    config = LogConfig(usernames=False)
    assert observe(config, login_success("alice")) == (
        "2026-11-25T10:00:00.123Z info login.success client=192.0.2.7 user=- "
        "mechanism=PLAIN listener=pop3 record=queued\n"
    )
    document = json.loads(observe(LogConfig(format="json", usernames=False), login_success()))
    assert "user" not in document
    assert "alice" not in json.dumps(document)
    assert document["message"].startswith("login.success client=192.0.2.7 user=- ")


def test_an_unknown_user_and_a_hidden_one_read_the_same() -> None:
    """The proxy logs ``-`` for a user it never learnt; ``usernames = no`` hides as ``-``."""
    unknown = observe(LogConfig(), login_success("-"))
    hidden = observe(LogConfig(usernames=False), login_success("alice"))
    assert unknown == hidden
    assert " user=- " in unknown
    assert parse_line(unknown[:-1])[3]["user"] == "-"


def test_secret_fields_are_redacted_in_every_format() -> None:
    class Credentials:
        def __init__(self) -> None:
            self.user = "alice"
            self.password = SECRET

    credentials = Credentials()
    event = {
        "log_format": "login.debug user={user} password={password} sasl={sasl} "
        "literal={literal!r} response={response:>40} via={credentials.password} "
        "item={table[client_secret]}",
        "log_level": LogLevel.info,
        "log_time": FIXED_TIME,
        "user": "alice",
        "password": SECRET,
        "sasl": SECRET,
        "literal": SECRET,
        "response": SECRET,
        "initial_response": SECRET,
        "client_secret": SECRET,
        "credentials": credentials,
        "table": {"client_secret": SECRET},
    }
    text = observe(LogConfig(), event)
    assert text == (
        "2026-11-25T10:00:00.123Z info login.debug user=alice password=<redacted> "
        "sasl=<redacted> literal=<redacted> response=<redacted> via=<redacted> "
        "item=<redacted>\n"
    )
    document = json.loads(observe(LogConfig(format="json"), event))
    for key in ("password", "sasl", "literal", "response", "initial_response", "client_secret"):
        assert document[key] == "<redacted>"
    assert SECRET not in json.dumps(document)


def test_secrets_stay_out_of_the_fallback_for_unformattable_events() -> None:
    twisted_style = {
        "log_format": "Received {missing}",
        "log_level": LogLevel.info,
        "log_time": FIXED_TIME,
        "password": SECRET,
    }
    ours = {**twisted_style, "log_format": "login.debug {missing}"}
    for event in (twisted_style, ours):
        for config in (LogConfig(), LogConfig(format="json")):
            output = observe(config, event)
            assert SECRET not in output
            assert len(output.splitlines()) == 1


# --- failures and Twisted's own events ----------------------------------------------


def test_failure_is_one_line_with_error_then_a_debug_traceback_line() -> None:
    stream = io.StringIO()
    log = Logger(namespace="relayproxy.store", observer=make_observer(LogConfig(), stream=stream))
    try:
        raise OSError("disk full")
    except OSError:
        log.failure(
            "store.error path={path}", path="/var/lib/relayproxy/relayers.db", level=LogLevel.error
        )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    _, level, name, fields = parse_line(lines[0])
    assert (level, name, fields) == (
        "error",
        "store.error",
        {"path": "/var/lib/relayproxy/relayers.db", "error": "OSError: disk full"},
    )
    _, level, name, fields = parse_line(lines[1])
    assert (level, name, fields["event"]) == ("debug", "log.traceback", "store.error")
    assert fields["traceback"].startswith("Traceback (most recent call last):\n")
    assert fields["traceback"].endswith("OSError: disk full")


def test_failure_with_its_own_error_field_goes_to_exception() -> None:
    stream = io.StringIO()
    log = Logger(observer=make_observer(LogConfig(format="json"), stream=stream))
    try:
        raise TimeoutError("lock held")
    except TimeoutError:
        log.failure("store.error path={path} error={error}", path="/db", error="lock timeout")
    document = json.loads(stream.getvalue())
    assert (document["error"], document["exception"]) == ("lock timeout", "TimeoutError: lock held")
    assert document["traceback"].endswith("TimeoutError: lock held")
    assert document["message"] == (
        'store.error path=/db error="lock timeout" exception="TimeoutError: lock held"'
    )


@pytest.fixture
def global_events() -> Iterator[io.StringIO]:
    """Lines for what Twisted logs through its global publisher (reactor, log.err)."""
    stream = io.StringIO()
    observer = make_observer(LogConfig(), stream=stream)
    globalLogPublisher.addObserver(observer)
    try:
        yield stream
    finally:
        globalLogPublisher.removeObserver(observer)


def test_twisted_legacy_messages_become_log_message_lines(global_events: io.StringIO) -> None:
    legacy_log.msg("Main loop terminated.\nbye", system="-")
    legacy_log.err(ValueError("boom"), "while testing")
    lines = global_events.getvalue().splitlines()
    assert len(lines) == 3
    _, level, name, fields = parse_line(lines[0])
    assert (level, name, fields) == (
        "info",
        "log.message",
        {"namespace": "log_legacy", "text": "Main loop terminated.\nbye"},
    )
    _, level, name, fields = parse_line(lines[1])
    assert (level, name, fields) == (
        "critical",
        "log.message",
        {"namespace": "log_legacy", "text": "while testing", "error": "ValueError: boom"},
    )
    assert parse_line(lines[2])[1:3] == ("debug", "log.traceback")


def test_start_logging_routes_twisted_events_and_warnings(tmp_path: Path) -> None:
    publisher = LogPublisher()
    warnings_module = types.SimpleNamespace(showwarning=warnings.showwarning)
    beginner = LogBeginner(publisher, io.StringIO(), types.SimpleNamespace(), warnings_module)
    path = tmp_path / "relayproxy.log"
    observer = start_logging(LogConfig(target=f"file:{path}"), beginner=beginner)
    assert ILogObserver.providedBy(observer)
    try:
        Logger(observer=publisher, namespace="relayproxy.proxy").info(
            LOGIN_SUCCESS, **{k: v for k, v in login_success().items() if k[:4] != "log_"}
        )
        warnings_module.showwarning("old API", DeprecationWarning, "/x.py", 3)
    finally:
        observer.close()
    lines = path.read_text().splitlines()
    assert [parse_line(line)[2] for line in lines] == ["login.success", "log.message"]
    assert parse_line(lines[1])[3]["text"] == "/x.py:3: builtins.DeprecationWarning: old API"


def start_logging_at(level: str, path: Path) -> tuple[LogPublisher, Any]:
    """``start_logging`` on a private publisher, as the daemon starts it on the global one."""
    publisher = LogPublisher()
    warnings_module = types.SimpleNamespace(showwarning=warnings.showwarning)
    beginner = LogBeginner(publisher, io.StringIO(), types.SimpleNamespace(), warnings_module)
    config = LogConfig(target=f"file:{path}", level=level)
    return publisher, start_logging(config, beginner=beginner)


def twisted_chatter_and_an_error(publisher: LogPublisher) -> None:
    """What a reactor logs on its own: a port starting (legacy), a factory, an error."""
    legacy = legacy_log.LogPublisher(publisher, publisher)  # as twisted.python.log's
    legacy.msg("ProxyFactory starting on 11110")
    Logger(observer=publisher, namespace="twisted.internet.protocol.Factory").info(
        "Starting factory {factory!r}", factory="<ProxyFactory>"
    )
    Logger(observer=publisher, namespace="relayproxy.proxy").info(
        LOGIN_SUCCESS, **{k: v for k, v in login_success().items() if k[:4] != "log_"}
    )
    # what twisted.python.log.err sends (on the global publisher)
    legacy.msg(failure=Failure(ValueError("boom")), why="while testing", isError=1)


def test_twisted_info_chatter_is_left_out_at_level_info(tmp_path: Path) -> None:
    path = tmp_path / "relayproxy.log"
    publisher, observer = start_logging_at("info", path)
    try:
        twisted_chatter_and_an_error(publisher)
    finally:
        observer.close()
    text = path.read_text()
    assert "starting on" not in text
    assert "Starting factory" not in text
    lines = [parse_line(line)[1:3] for line in text.splitlines()]
    assert lines == [
        ("info", "login.success"),
        ("critical", "log.message"),
        ("debug", "log.traceback"),
    ]


def test_twisted_info_chatter_shows_at_level_debug(tmp_path: Path) -> None:
    path = tmp_path / "relayproxy.log"
    publisher, observer = start_logging_at("debug", path)
    try:
        twisted_chatter_and_an_error(publisher)
    finally:
        observer.close()
    texts = [parse_line(line)[3].get("text") for line in path.read_text().splitlines()]
    assert texts[:2] == ["ProxyFactory starting on 11110", "Starting factory '<ProxyFactory>'"]


# --- targets ---------------------------------------------------------------------


def user_of_each_line(path: Path) -> list[str]:
    return [parse_line(line)[3]["user"] for line in path.read_text().splitlines()]


def test_file_target_reopens_at_the_path_by_itself_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "relayproxy.log"
    observer = make_observer(LogConfig(target=f"file:{path}"))
    try:
        observer(login_success("first"))
        path.rename(tmp_path / "relayproxy.log.1")  # logrotate, no signal (yet)
        observer(login_success("second"))
    finally:
        observer.close()
    assert user_of_each_line(tmp_path / "relayproxy.log.1") == ["first"]
    assert user_of_each_line(path) == ["second"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_a_path_that_cannot_be_reopened_is_reported_and_the_file_comes_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relayproxy.log"
    observer = make_observer(LogConfig(target=f"file:{path}"))
    try:
        observer(login_success("first"))
        path.rename(tmp_path / "relayproxy.log.1")
        path.mkdir()  # in the way of the new file
        observer(login_success("second"))  # must not raise into Twisted's publisher
        path.rmdir()
        observer(login_success("third"))
    finally:
        observer.close()
    report = capsys.readouterr().err  # the stdlib's handleError: the error and the line
    assert "IsADirectoryError" in report
    assert "user=second" in report
    assert user_of_each_line(tmp_path / "relayproxy.log.1") == ["first"]
    assert user_of_each_line(path) == ["third"]


def test_file_target_appends(tmp_path: Path) -> None:
    path = tmp_path / "relayproxy.log"
    path.write_text("earlier line\n")
    observer = make_observer(LogConfig(target=f"file:{path}"))
    observer(login_success())
    observer.close()
    assert path.read_text().splitlines()[0] == "earlier line"
    assert len(path.read_text().splitlines()) == 2


def test_lines_from_two_threads_stay_whole(tmp_path: Path) -> None:
    """The store's worker thread logs beside the reactor."""
    path = tmp_path / "relayproxy.log"
    observer = make_observer(LogConfig(target=f"file:{path}"))

    def log_many(user: str) -> None:
        for _ in range(500):
            observer(login_success(user))

    threads = [threading.Thread(target=log_many, args=(user,)) for user in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    observer.close()
    assert sorted(user_of_each_line(path)) == ["a"] * 500 + ["b"] * 500


def test_a_line_logged_in_the_middle_of_a_line_is_written_not_deadlocked() -> None:
    """Twisted's SIGTERM handler logs; the signal can land while a line is being written."""

    class InterruptedStream(io.StringIO):
        interrupt: Any = None

        def write(self, text: str) -> int:
            written = super().write(text)
            if self.interrupt is not None:
                interrupt, self.interrupt = self.interrupt, None
                interrupt(login_success(log_format="signal.received name={name}", name="TERM"))
            return written

    stream = InterruptedStream()
    observer = make_observer(LogConfig(), stream=stream)
    stream.interrupt = observer
    first = login_success(log_format="first.event a={a}", a="1")
    writer = threading.Thread(target=observer, args=(first,), daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "the nested line waits for the outer one: deadlock"
    names = [line.split()[2] for line in stream.getvalue().splitlines()]
    assert names == ["first.event", "signal.received"]


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setblocking(False)
    try:
        yield server, path
    finally:
        server.close()


def received(server: socket.socket) -> list[bytes]:
    """Every datagram already sent: a local datagram is queued by the time send returns."""
    datagrams = []
    while True:
        try:
            datagrams.append(server.recv(1 << 20))
        except BlockingIOError:
            return datagrams


def test_syslog_target_sends_mail_facility_and_priority_by_level(
    syslog_socket: tuple[socket.socket, str],
) -> None:
    server, path = syslog_socket
    observer = make_observer(LogConfig(target="syslog"), syslog_socket=path)
    levels = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
    for level in levels:
        observer(login_success(log_level=level, password=SECRET))
    observer.close()
    body = "login.success client=192.0.2.7 user=alice mechanism=PLAIN listener=pop3 record=queued"
    ident = f"relayproxy[{os.getpid()}]: "
    # LOG_MAIL (2) * 8 + the priority: debug 7, info 6, warning 4, err 3, crit 2
    assert received(server) == [
        f"<{16 + priority}>{ident}{level.name} {body}".encode()
        for level, priority in zip(levels, (7, 6, 4, 3, 2), strict=True)
    ]


def test_syslog_gets_a_failure_and_then_its_traceback_as_two_messages(
    syslog_socket: tuple[socket.socket, str],
) -> None:
    server, path = syslog_socket
    log = Logger(observer=make_observer(LogConfig(target="syslog"), syslog_socket=path))
    try:
        raise OSError("disk full")
    except OSError:
        log.failure("store.error path={path}", path="/db", level=LogLevel.error)
    failure, traceback = (message.decode() for message in received(server))
    assert failure.endswith(': error store.error path=/db error="OSError: disk full"')
    assert failure.startswith("<19>relayproxy[")
    assert traceback.startswith("<23>relayproxy[")
    assert ": debug log.traceback event=store.error traceback=" in traceback
    assert "\n" not in traceback


def test_syslog_falls_back_to_stderr_once_when_the_socket_is_missing(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-log")
    stderr = io.StringIO()
    observer = make_observer(LogConfig(target="syslog"), stream=stderr, syslog_socket=missing)
    observer(login_success("first"))
    observer(login_success("second"))
    lines = stderr.getvalue().splitlines()
    _, level, name, fields = parse_line(lines[0])
    assert (level, name, fields["socket"]) == ("warn", "log.syslog_unavailable", missing)
    assert [parse_line(line)[3]["user"] for line in lines[1:]] == ["first", "second"]


# journald: libsystemd always sends to /run/systemd/journal/socket, so these tests
# log from a child process whose /run/systemd/journal is a directory of the test's.
ROOT = Path(__file__).resolve().parent.parent
_JOURNAL_MOUNT = (
    "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
    'mount --bind "$0" /run/systemd/journal && exec "$@"'
)


def log_to_journald(directory: Path, config: LogConfig, code: str) -> str:
    """Run ``code`` with ``observer`` (and this module's names) in the child; its stderr."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux)")
    script = f"from tests.test_logs import *\nobserver = make_observer({config!r})\n{code}\n"
    argv = ["unshare", "--mount", "sh", "-c", _JOURNAL_MOUNT, str(directory), sys.executable]
    result = subprocess.run(
        [*argv, "-c", script + "observer.close()"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if result.returncode != 0 and "unshare:" in result.stderr:
        pytest.skip(f"no mount namespace for a private journal socket: {result.stderr}")
    assert result.returncode == 0, result.stderr
    return result.stderr


def parse_journal(datagram: bytes) -> dict[str, bytes]:
    """The native journal protocol, as journald's server reads it."""
    fields: dict[str, bytes] = {}
    rest = datagram
    while rest:
        line, newline, after = rest.partition(b"\n")
        assert newline
        if b"=" in line:
            name, _, value = line.partition(b"=")
            rest = after
        else:
            name = line
            (size,) = struct.unpack("<Q", after[:8])
            value = after[8 : 8 + size]
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", name), name
        assert name.decode() not in fields
        fields[name.decode()] = value
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    directory = tmp_path / "journal"
    directory.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(directory / "socket"))
    server.setblocking(False)
    try:
        yield server, directory
    finally:
        server.close()


def test_journald_target_sends_native_fields(
    journal_socket: tuple[socket.socket, Path],
) -> None:
    server, directory = journal_socket
    config = LogConfig(target="journald", usernames=True)
    code = "observer(login_success('alice\\nrecord=recorded', password=SECRET))"
    assert log_to_journald(directory, config, code) == ""
    [datagram] = received(server)
    assert parse_journal(datagram) == {
        "MESSAGE": b'info login.success client=192.0.2.7 user="alice\\nrecord=recorded" '
        b"mechanism=PLAIN listener=pop3 record=queued",
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"relayproxy",
        "SYSLOG_FACILITY": b"2",
        "RELAYPROXY_EVENT": b"login.success",
        "RELAYPROXY_CLIENT": b"192.0.2.7",
        "RELAYPROXY_USER": b"alice\nrecord=recorded",
        "RELAYPROXY_MECHANISM": b"PLAIN",
        "RELAYPROXY_LISTENER": b"pop3",
        "RELAYPROXY_RECORD": b"queued",
        "RELAYPROXY_PASSWORD": b"<redacted>",
    }


def test_journald_message_is_the_text_body_in_the_json_format_too(
    journal_socket: tuple[socket.socket, Path],
) -> None:
    """journalctl shows MESSAGE; the fields already carry what JSON would."""
    server, directory = journal_socket
    config = LogConfig(target="journald", format="json")
    log_to_journald(directory, config, "observer(login_success())")
    [datagram] = received(server)
    assert parse_journal(datagram)["MESSAGE"].startswith(b"info login.success client=192.0.2.7 ")


def test_journald_failure_priority_and_traceback(
    journal_socket: tuple[socket.socket, Path],
) -> None:
    server, directory = journal_socket
    code = """
log = Logger(observer=observer)
try:
    raise ConnectionRefusedError("backend down")
except ConnectionRefusedError:
    log.failure("backend.unreachable client={client} user={user}", client="::1", user="bob")
"""
    log_to_journald(directory, LogConfig(target="journald", usernames=False), code)
    [datagram] = received(server)  # the traceback is a field, not an entry of its own
    fields = parse_journal(datagram)
    assert fields["PRIORITY"] == b"2"
    assert fields["MESSAGE"] == (
        b"critical backend.unreachable client=::1 user=- "
        b'error="ConnectionRefusedError: backend down"'
    )
    assert "RELAYPROXY_USER" not in fields
    assert fields["RELAYPROXY_ERROR"] == b"ConnectionRefusedError: backend down"
    assert fields["RELAYPROXY_TRACEBACK"].startswith(b"Traceback (most recent call last):\n")


def test_journald_gets_an_oversized_entry_as_a_sealed_memfd(
    journal_socket: tuple[socket.socket, Path],
) -> None:
    """Past the socket's datagram limit libsystemd passes the entry in a sealed memfd."""
    server, directory = journal_socket
    code = "observer(login_success(detail='x' * (8 << 20)))"
    assert log_to_journald(directory, LogConfig(target="journald"), code) == ""
    data, ancillary, _, _ = server.recvmsg(16, socket.CMSG_SPACE(4))
    assert data == b""
    [(level, kind, payload)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload)[0]
    try:
        fields = parse_journal(os.pread(fd, 16 << 20, 0))
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"changed", 0)
    finally:
        os.close(fd)
    assert fields["RELAYPROXY_DETAIL"] == b"x" * (8 << 20)
    assert fields["RELAYPROXY_USER"] == b"alice"


def test_journald_falls_back_to_stderr_once_when_the_socket_is_missing(tmp_path: Path) -> None:
    code = "observer(login_success('first'))\nobserver(login_success('second'))"
    stderr = log_to_journald(tmp_path, LogConfig(target="journald"), code)
    lines = stderr.splitlines()
    assert len(lines) == 3
    _, level, name, fields = parse_line(lines[0])
    assert (level, name) == ("warn", "log.journald_unavailable")
    assert fields["socket"] == "/run/systemd/journal/socket"
    assert [parse_line(line)[3]["user"] for line in lines[1:]] == ["first", "second"]


def test_journald_refusing_an_entry_is_reported_on_stderr_with_the_line(
    journal_socket: tuple[socket.socket, Path],
) -> None:
    server, directory = journal_socket
    server.close()  # the socket file stays, nothing reads it: ECONNREFUSED
    code = "observer(login_success('first'))"
    report = log_to_journald(directory, LogConfig(target="journald"), code)
    assert "ConnectionRefusedError" in report
    assert "login.success client=192.0.2.7 user=first" in report
