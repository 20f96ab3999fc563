"""The daemon's log output: one line per event, text or JSON, to stderr, a file, syslog or journald.

Owns how a ``twisted.logger`` event becomes bytes on a log target. Decides
nothing about *what* is logged: the rest of the code emits events with
``Logger`` and a format string whose first word is a stable, dotted event
name (``login.success client={client} user={user} ...``).

Theory of operation
-------------------
Every event is rendered once into a *body*, the text after time and level:

    2026-11-25T10:00:00.123Z info login.success client=192.0.2.7 user=alice mechanism=PLAIN
    ^ ISO-8601 UTC, ms       ^ level ^ body: the format string, fields rendered safely

*Safe fields.* Log lines are parsed by fail2ban and by people, so a value
must never be able to end a line or forge a ``key=value``. Each field is
rendered on its own before it is put into the format string
(``quote_value``): a value made only of ``[A-Za-z0-9_.:@/+-]`` is printed as
is; anything else (spaces, ``=``, quotes, control characters, the empty
string, and a bare ``-``, which means "hidden") is printed as a JSON string
literal, with control, format and non-ASCII space characters (CR, LF, NEL,
U+2028, bidi overrides...) escaped as ``\\uXXXX``. A user name
``alice record=recorded\\r\\n`` becomes ``user="alice record=recorded\\r\\n"``:
one line, one field. Numbers keep their format spec (``{duration:.3f}``).

*Secrets.* A field whose name contains ``password``, ``passwd``, ``secret``,
``sasl``, ``literal`` or ``response`` (also as an attribute reached from the
format, ``{session.password}``) is printed as ``<redacted>``, in every format
and target. Code is not supposed to pass one (secrets never leave a session); this is
the net under that rule.

*User names.* With ``[log] usernames = no`` the ``user`` field prints as ``-``
in text and is left out of JSON and journald fields.

*Failures.* An event carrying a failure (``log.failure(...)``, ``log_failure``,
or a legacy ``twisted.python.log.err``) keeps its single line and gains an
``error="ExceptionType: message"`` field (``exception=`` when the event
already has its own ``error`` field). The traceback is not dropped: the text
format (stderr, file, syslog) follows the line with a *separate* event
``debug log.traceback event=<name> traceback="<escaped, one line>"``, which a
reader filtering out ``debug`` never sees; JSON puts it in a ``traceback``
member of the same object and journald in ``RELAYPROXY_TRACEBACK``.

*Twisted's own events* (reactor, legacy ``log.msg``/``log.err``, warnings)
have free-text formats and no event name. They are rendered as
``log.message namespace=<emitter> text="<Twisted's rendering>"`` so every
line keeps the ``name key=value...`` shape.

JSON: one object per line, ASCII only, members in this order: ``time``,
``level``, ``event``, the event's own fields (not Twisted's ``log_*`` keys;
values JSON cannot hold are ``str()``-ed; a field named like a reserved
member is dropped), ``error``/``traceback`` for failures, then ``message``,
which is the text body.

Targets:

* ``stderr`` and ``file:/path`` write lines; a file is opened for append,
  line-buffered, created mode 0640 (it holds user names and addresses).
  ``LogObserver.reopen()`` (for SIGUSR1 after logrotate renamed the file) is
  safe to call from a signal handler: it reopens at once, or, if a write is in
  progress, just before the next write.
* ``syslog``: the stdlib ``syslog`` module, ident ``relayproxy``, facility
  ``LOG_MAIL``, priority from the level; the message is the text line without
  its timestamp (``warn login.failure client=...``), or the JSON object.
* ``journald``: the native protocol (systemd's ``sd_journal_send`` format)
  to ``/run/systemd/journal/socket``: ``MESSAGE`` (as for syslog),
  ``PRIORITY``, ``SYSLOG_IDENTIFIER=relayproxy``, ``SYSLOG_FACILITY=2`` and
  ``RELAYPROXY_<FIELD>`` for each field, so ``journalctl
  RELAYPROXY_EVENT=login.failure`` works. A datagram too large for the
  socket goes as a sealed memfd, as systemd does. When the socket does not
  exist, or stops answering, lines go to stderr after one warning event.

An observer must be thread-safe (``ILogObserver``): the store's worker
thread logs too, so writes are serialised by a lock.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import json
import math
import os
import re
import socket
import string
import struct
import sys
import syslog
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogBeginner,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from zope.interface import implementer

from relayproxy.config import LogConfig

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "relayproxy"
USER_FIELD = "user"
REDACTED = "<redacted>"
HIDDEN = "-"

# The name of a Twisted event that has none of its own.
FOREIGN_EVENT = "log.message"

_EVENT_NAME = re.compile(r"([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+)(?=\s|$)")
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:@/+-]+")
# Everything but printable ASCII other than `"` and `\`.
_NEEDS_ESCAPE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that are invisible or break lines in some reader (str.splitlines
# splits at NEL, U+2028, FS/GS/RS...); printable non-ASCII text stays readable.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_SECRET_WORDS = ("password", "passwd", "secret", "sasl", "literal", "response")
_RESERVED_JSON_MEMBERS = frozenset({"time", "level", "event", "message", "traceback"})
# Keys a legacy twisted.python.log event carries that the rendering already covers.
_LEGACY_KEYS = frozenset({"message", "time", "isError", "format", "why", "failure", "system"})

_SYSLOG_PRIORITY: dict[LogLevel, int] = {
    LogLevel.debug: syslog.LOG_DEBUG,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}
_DEFAULT_LEVEL: LogLevel = LogLevel.info
_LOG_MAIL_FACILITY_NUMBER = syslog.LOG_MAIL >> 3
_JOURNAL_FIELD_NAME_LIMIT = 64


# --- values -------------------------------------------------------------------


def quote_value(text: str) -> str:
    """Render one field value so it stays one token on one line.

    Bare when it is made of ``[A-Za-z0-9_.:@/+-]`` only (and is not ``-``,
    which stands for a hidden value); otherwise a JSON string literal.
    """
    if text != HIDDEN and _BARE_VALUE.fullmatch(text):
        return text
    return '"' + _NEEDS_ESCAPE.sub(_escape_character, text) + '"'


def _escape_character(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    if ord(char) > 0x7F and unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


@functools.lru_cache(maxsize=4096)  # called for every field of every event
def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


class _Fixed:
    """A placeholder printed the same way whatever the format asks for."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __format__(self, spec: str) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def __getattr__(self, name: str) -> _Fixed:
        return self

    def __getitem__(self, key: object) -> _Fixed:
        return self

    def __call__(self) -> _Fixed:
        return self


_REDACTED = _Fixed(REDACTED)
_HIDDEN = _Fixed(HIDDEN)


def _render_value(value: object) -> str:
    return value.text if isinstance(value, _Fixed) else quote_value(safe_str(value))


class _SafeField:
    """A field value as a format string sees it: every way out is quoted.

    ``format``, ``!s``, ``!r``, attribute and item access and Twisted's
    ``{name()}`` call syntax all end in ``quote_value``; an attribute with a
    secret's name is redacted.
    """

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return quote_value(format(self._value, spec))

    def __str__(self) -> str:
        return quote_value(safe_str(self._value))

    def __repr__(self) -> str:
        return quote_value(_safe_repr(self._value))

    def __getattr__(self, name: str) -> _SafeField | _Fixed:
        call = name.endswith("()")
        name = name.removesuffix("()")
        if _is_secret(name):
            return _REDACTED
        value = getattr(self._value, name)
        return _SafeField(value() if call else value)

    def __getitem__(self, key: Any) -> _SafeField | _Fixed:
        if isinstance(key, str) and _is_secret(key):
            return _REDACTED
        return _SafeField(self._value[key])  # type: ignore[index]


class _SafeFields(Mapping[str, Any]):
    """The event as a format string sees it (with Twisted's ``{name()}`` syntax)."""

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> object:
        call = key.endswith("()")
        value = self._values[key.removesuffix("()")]
        if isinstance(value, _Fixed):
            return value
        return _SafeField(value() if call else value)  # type: ignore[operator]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


_FORMATTER = string.Formatter()


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<{type(value).__name__} object, repr failed: {_describe(exc)}>"


def _json_ready(value: object) -> object:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, _Fixed):
        return value.text
    if isinstance(value, dict):
        return {
            str(key): REDACTED if _is_secret(str(key)) else _json_ready(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return safe_str(value)
    return value


def _timestamp(seconds: float) -> str:
    millis = round(seconds * 1000)
    whole, fraction = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{fraction:03d}Z"


# --- one event, rendered ------------------------------------------------------------


@dataclass(frozen=True)
class _Rendered:
    time: float
    level: LogLevel
    name: str
    body: str
    # JSON-ready explicit fields, after redaction and user hiding, plus error.
    fields: dict[str, object]
    traceback: str | None

    def text_line(self) -> str:
        return f"{_timestamp(self.time)} {self.level.name} {self.body}"

    def traceback_body(self) -> str:
        assert self.traceback is not None
        return f"log.traceback event={self.name} traceback={quote_value(self.traceback)}"

    def text_lines(self) -> str:
        """The text format: the event's line, then its traceback event's line."""
        lines = self.text_line() + "\n"
        if self.traceback is not None:
            lines += f"{_timestamp(self.time)} {LogLevel.debug.name} {self.traceback_body()}\n"
        return lines

    def json_line(self) -> str:
        document: dict[str, object] = {
            "time": _timestamp(self.time),
            "level": self.level.name,
            "event": self.name,
            **self.fields,
        }
        if self.traceback is not None:
            document["traceback"] = self.traceback
        document["message"] = self.body
        return json.dumps(document, ensure_ascii=True, separators=(",", ":"))


def _render(event: LogEvent, usernames: bool) -> _Rendered:
    try:
        return _render_event(event, usernames)
    except Exception as exc:
        # A bug here must not lose the fact that something was logged.
        namespace = safe_str(event.get("log_namespace", "-"))
        body = (
            f"log.render_failed namespace={quote_value(namespace)} "
            f"error={quote_value(_describe(exc))}"
        )
        return _Rendered(time.time(), LogLevel.error, "log.render_failed", body, {}, None)


def _render_event(event: LogEvent, usernames: bool) -> _Rendered:
    when = event.get("log_time")
    failure = _failure_of(event)
    values: dict[str, object] = {}
    for key, value in event.items():
        if not isinstance(key, str):
            continue
        if _is_secret(key) and not key.startswith("log_"):
            values[key] = _REDACTED
        elif key == USER_FIELD and not usernames:
            values[key] = _HIDDEN
        else:
            values[key] = value
    own = {k: v for k, v in values.items() if not k.startswith("log_")}

    log_format = event.get("log_format")
    if isinstance(log_format, bytes):
        log_format = log_format.decode("utf-8", "replace")
    match = _EVENT_NAME.match(log_format) if isinstance(log_format, str) else None
    if isinstance(log_format, str) and match:
        name = match.group(1)
        body = _render_format(name, log_format, values, own)
    else:
        name = FOREIGN_EVENT
        foreign = _foreign_fields(event, values, failure)
        own = foreign | {k: v for k, v in own.items() if k not in _LEGACY_KEYS and k not in foreign}
        body = name + "".join(
            f" {key}={_render_value(own[key])}"
            for key in ("namespace", "system", "text")
            if key in own
        )

    fields = {
        key: _json_ready(value)
        for key, value in own.items()
        if key not in _RESERVED_JSON_MEMBERS and value is not _HIDDEN
    }
    traceback = None
    if failure is not None:
        key = "exception" if "error" in own else "error"
        summary = _describe_failure(failure)
        body += f" {key}={quote_value(summary)}"
        fields[key] = summary
        traceback = _traceback_of(failure)
    return _Rendered(
        time=when if isinstance(when, int | float) else time.time(),
        level=_level_of(event),
        name=name,
        body=body,
        fields=fields,
        traceback=traceback,
    )


@functools.lru_cache(maxsize=1024)
def _parsed_format(
    log_format: str,
) -> tuple[tuple[str, str | None, str | None, str | None], ...] | None:
    """A format string split once into its pieces; None when it nests fields in a spec."""
    pieces = tuple(_FORMATTER.parse(log_format))
    if any(spec and "{" in spec for _, _, spec, _ in pieces):
        return None
    return pieces


def _vformat(log_format: str, fields: _SafeFields) -> str:
    # string.Formatter.vformat re-parses the format on every event; the
    # daemon's few formats are parsed once (the hot path is login events).
    pieces = _parsed_format(log_format)
    if pieces is None:
        return _FORMATTER.vformat(log_format, (), fields)
    out: list[str] = []
    for literal, field_name, spec, conversion in pieces:
        out.append(literal)
        if field_name is None:
            continue
        if not field_name:
            raise ValueError("positional fields are not supported in log formats")
        value, _ = _FORMATTER.get_field(field_name, (), fields)
        out.append(format(_FORMATTER.convert_field(value, conversion), spec or ""))
    return "".join(out)


def _render_format(
    name: str, log_format: str, values: Mapping[str, object], own: Mapping[str, object]
) -> str:
    try:
        return _vformat(log_format, _SafeFields(values))
    except Exception as exc:
        # A wrong format string (a missing key, a bad spec) still gives one
        # parseable line with the event's name and its fields.
        fields = "".join(f" {key}={_render_value(value)}" for key, value in own.items())
        return f"{name}{fields} format_error={quote_value(_describe(exc))}"


def _foreign_fields(
    event: LogEvent, values: Mapping[str, object], failure: Failure | None
) -> dict[str, object]:
    fields: dict[str, object] = {"namespace": safe_str(event.get("log_namespace", "-"))}
    system = event.get("log_system")
    if system is not None and system != "-":
        fields["system"] = safe_str(system)
    if failure is not None and "failure" in event and event.get("log_format") == "{log_text}":
        # twisted.python.log.err: its log_text is the why line plus the traceback.
        text = safe_str(event.get("why") or "Unhandled Error")
    else:
        text = formatEvent(dict(values))
    fields["text"] = text
    return fields


def _level_of(event: LogEvent) -> LogLevel:
    level: object = event.get("log_level")
    return next((known for known in _SYSLOG_PRIORITY if known is level), _DEFAULT_LEVEL)


def _failure_of(event: LogEvent) -> Failure | None:
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        failure = event.get("failure")
    return failure if isinstance(failure, Failure) else None


def _describe(exc: BaseException) -> str:
    message = safe_str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _describe_failure(failure: Failure) -> str:
    kind = getattr(failure.type, "__name__", safe_str(failure.type))
    message = safe_str(failure.value)
    return f"{kind}: {message}" if message else kind


def _traceback_of(failure: Failure) -> str:
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception as exc:
        return f"(no traceback: {_describe(exc)})"


def format_text_line(event: LogEvent, usernames: bool = True) -> str:
    """The text format's line for ``event``, without the newline.

    ``2026-11-25T10:00:00.123Z info login.success client=192.0.2.7 user=alice ...``
    Always one line. A failure's traceback line is not part of it.
    """
    return _render(event, usernames).text_line()


def format_json_line(event: LogEvent, usernames: bool = True) -> str:
    """The JSON format's object for ``event``, one ASCII line, without the newline."""
    return _render(event, usernames).json_line()


# --- targets ------------------------------------------------------------------


class _Sink(Protocol):
    def emit(self, rendered: _Rendered) -> None: ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


class _StreamSink:
    def __init__(self, stream: IO[str], log_format: str) -> None:
        self.stream = stream
        self._json = log_format == "json"

    def emit(self, rendered: _Rendered) -> None:
        self.stream.write(rendered.json_line() + "\n" if self._json else rendered.text_lines())
        self.stream.flush()

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.stream.flush()


def _open_log_file(path: str) -> IO[str]:
    def opener(name: str, flags: int) -> int:
        return os.open(name, flags, 0o640)

    return open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1, opener=opener)


class _FileSink(_StreamSink):
    def __init__(self, path: str, log_format: str) -> None:
        super().__init__(_open_log_file(path), log_format)
        self.path = path

    def reopen(self) -> None:
        try:
            fresh = _open_log_file(self.path)
        except OSError as exc:
            # Keep writing to the old file rather than losing lines.
            self.emit(
                _internal_event(
                    LogLevel.error,
                    "log.reopen_failed path={path} error={error}",
                    path=self.path,
                    error=_describe(exc),
                )
            )
            return
        old, self.stream = self.stream, fresh
        old.close()

    def close(self) -> None:
        self.stream.close()


def _syslog_message(rendered: _Rendered, as_json: bool) -> str:
    if as_json:
        return rendered.json_line()
    return f"{rendered.level.name} {rendered.body}"


class _SyslogSink:
    def __init__(self, log_format: str) -> None:
        self._json = log_format == "json"
        syslog.openlog(SYSLOG_IDENTIFIER, syslog.LOG_PID, syslog.LOG_MAIL)

    def emit(self, rendered: _Rendered) -> None:
        priority = _SYSLOG_PRIORITY.get(rendered.level, syslog.LOG_INFO)
        syslog.syslog(syslog.LOG_MAIL | priority, _syslog_message(rendered, self._json))
        if rendered.traceback is not None and not self._json:
            message = f"{LogLevel.debug.name} {rendered.traceback_body()}"
            syslog.syslog(syslog.LOG_MAIL | syslog.LOG_DEBUG, message)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        syslog.closelog()


def _journal_field_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Z0-9_]", "_", name.upper())
    return f"RELAYPROXY_{cleaned}"[:_JOURNAL_FIELD_NAME_LIMIT]


def _journal_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "backslashreplace")
    key = name.encode("ascii")
    if b"\n" in data:
        # The native protocol's binary form: name, newline, 64-bit LE length, data.
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def _journal_datagram(rendered: _Rendered) -> bytes:
    """The native journal protocol message for one rendered event."""
    priority = _SYSLOG_PRIORITY.get(rendered.level, syslog.LOG_INFO)
    parts = [
        _journal_field("MESSAGE", _syslog_message(rendered, as_json=False)),
        _journal_field("PRIORITY", str(priority)),
        _journal_field("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        _journal_field("SYSLOG_FACILITY", str(_LOG_MAIL_FACILITY_NUMBER)),
        _journal_field("RELAYPROXY_EVENT", rendered.name),
    ]
    for key, value in rendered.fields.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(_journal_field(_journal_field_name(key), text))
    if rendered.traceback is not None:
        parts.append(_journal_field("RELAYPROXY_TRACEBACK", rendered.traceback))
    return b"".join(parts)


class _JournaldSink:
    def __init__(self, socket_path: str, fallback: _StreamSink) -> None:
        self._path = socket_path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._fallback = fallback
        self._warned = False

    def emit(self, rendered: _Rendered) -> None:
        datagram = _journal_datagram(rendered)
        try:
            try:
                self._socket.sendto(datagram, self._path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_as_memfd(datagram)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self._fallback.emit(_journald_unavailable(self._path, exc))
            self._fallback.emit(rendered)

    def _send_as_memfd(self, datagram: bytes) -> None:
        # What sd_journal_send does past the socket's size limit: the data in
        # a sealed memfd, the descriptor passed over the socket.
        fd = os.memfd_create("relayproxy-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with os.fdopen(os.dup(fd), "wb") as handle:
                handle.write(datagram)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
            rights = array.array("i", [fd]).tobytes()
            self._socket.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self._path
            )
        finally:
            os.close(fd)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self._socket.close()
        self._fallback.close()


def _internal_event(level: LogLevel, log_format: str, **fields: object) -> _Rendered:
    event: LogEvent = {
        "log_format": log_format,
        "log_level": level,
        "log_time": time.time(),
        "log_namespace": __name__,
        **fields,
    }
    return _render(event, usernames=True)


def _journald_unavailable(path: str, exc: BaseException | None) -> _Rendered:
    return _internal_event(
        LogLevel.warn,
        "log.journald_unavailable socket={socket} error={error} fallback=stderr",
        socket=path,
        error="no such socket" if exc is None else _describe(exc),
    )


# --- the observer -------------------------------------------------------------


@implementer(ILogObserver)
class LogObserver:
    """The daemon's ILogObserver: renders each event and writes it to one target."""

    def __init__(self, sink: _Sink, *, usernames: bool) -> None:
        self._sink = sink
        self._usernames = usernames
        # Reentrant, and a depth count: a signal handler that logs (Twisted's
        # SIGTERM handler does) runs in the middle of an emit on the same
        # thread. With a plain lock that deadlocked the daemon at shutdown;
        # now the nested line waits in _nested and the outer call writes it.
        self._lock = threading.RLock()
        self._depth = 0
        self._nested: list[_Rendered] = []
        self._reopen_requested = False

    def __call__(self, event: LogEvent) -> None:
        rendered = _render(event, self._usernames)
        with self._lock:
            self._depth += 1
            try:
                if self._depth > 1:
                    self._nested.append(rendered)
                    return
                self._reopen_if_requested()
                self._sink.emit(rendered)
                while self._nested:
                    self._sink.emit(self._nested.pop(0))
            finally:
                self._depth -= 1

    def reopen(self) -> None:
        """Reopen a ``file:`` target at its path (after logrotate); a no-op otherwise.

        Safe in a signal handler: never waits for the lock, and never swaps
        the file under an emit in progress (the next emit reopens instead).
        """
        self._reopen_requested = True
        if self._lock.acquire(blocking=False):
            try:
                if self._depth == 0:
                    self._reopen_if_requested()
            finally:
                self._lock.release()

    def _reopen_if_requested(self) -> None:
        if self._reopen_requested:
            self._reopen_requested = False
            self._sink.reopen()

    def close(self) -> None:
        with self._lock:
            self._sink.close()


def make_observer(
    config: LogConfig, *, stream: IO[str] | None = None, journal_socket: str = JOURNAL_SOCKET
) -> LogObserver:
    """The observer for ``[log]``; ``stream`` stands in for stderr.

    Opening a ``file:`` target may raise OSError: the daemon reports that at
    start-up, before it listens.
    """
    stderr = stream if stream is not None else sys.stderr
    target = config.target
    sink: _Sink
    if target == "stderr":
        sink = _StreamSink(stderr, config.format)
    elif target.startswith("file:"):
        sink = _FileSink(target[len("file:") :], config.format)
    elif target == "syslog":
        sink = _SyslogSink(config.format)
    elif target == "journald":
        fallback = _StreamSink(stderr, config.format)
        if os.path.exists(journal_socket):
            sink = _JournaldSink(journal_socket, fallback)
        else:
            fallback.emit(_journald_unavailable(journal_socket, None))
            sink = fallback
    else:
        raise ValueError(f"unknown log target {target!r}")
    return LogObserver(sink, usernames=config.usernames)


def start_logging(config: LogConfig, *, beginner: LogBeginner | None = None) -> LogObserver:
    """Send every log event of the process, Twisted's included, to the ``[log]`` target.

    ``beginLoggingTo`` replays what was logged before it and routes
    ``twisted.python.log`` and ``warnings`` into the same observer;
    stdout and stderr are not redirected into the log: what lands there
    (an interpreter crash, a C library's complaint) stays raw for systemd
    to capture, and the stderr target does not feed itself.
    """
    observer = make_observer(config)
    threshold = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(config.level))
    filtered = FilteringLogObserver(observer, [threshold])
    (beginner or globalLogBeginner).beginLoggingTo([filtered], redirectStandardIO=False)
    return observer
