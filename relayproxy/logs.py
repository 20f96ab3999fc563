"""The daemon's log output: one line per event, text or JSON, to stderr, a file, syslog or journald.

Owns how a ``twisted.logger`` event becomes a line, not *what* is logged: code logs with
``Logger`` and a format whose first word is a dotted event name (``login.success ...``).
Twisted's observers filter (``[log] level``; Twisted's info chatter only at ``debug``), stdlib
handlers write (``WatchedFileHandler`` reopens after logrotate's rename; their re-entrant lock
lets a signal handler log mid-line), ``systemd.journal`` sends.
The renderer is ours, for what it guarantees to fail2ban and to people::

    2026-11-25T10:00:00.123Z info login.success client=192.0.2.7 user=alice mechanism=PLAIN

* A value is one token on one line: bare if made of ``[A-Za-z0-9_.:@/+-]``, else a JSON string
  with control, format and non-ASCII space characters escaped (``user="x client=6.6.6.6"``);
  ``-`` is "none": an unknown or a hidden user is ``user=-`` (JSON, journald omit a hidden one).
* A field named (or a ``{a.b[c]}`` path) with ``password``, ``passwd``, ``secret``, ``sasl``,
  ``literal`` or ``response`` in it is ``<redacted>``, in every format and target.
* A failure adds ``error="Type: message"`` and a ``debug log.traceback`` line (JSON, journald:
  a field). Twisted's nameless events are ``log.message namespace= text=``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import logging.handlers
import math
import os
import re
import string
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from systemd import journal
from twisted import logger
from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from zope.interface import implementer

from relayproxy.config import LogConfig

JOURNAL_SOCKET = "/run/systemd/journal/socket"  # libsystemd's, fixed
REDACTED, HIDDEN = "<redacted>", "-"
_EVENT_NAME = re.compile(r"([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+)(?=\s|$)")
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:@/+-]+")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# Invisible, or a line break to some reader (str.splitlines splits at NEL, U+2028...).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_SECRET = re.compile("password|passwd|secret|sasl|literal|response", re.IGNORECASE)
_NOT_JSON_FIELDS = frozenset({"time", "level", "event", "message", "traceback"})
# What a legacy twisted.python.log event carries besides the text log.message shows.
_LEGACY_KEYS = frozenset({"message", "time", "isError", "format", "why", "failure", "system"})
_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
_STDLIB_LEVEL = dict(zip(_LEVELS, (10, 20, 30, 40, 50), strict=True))
_JOURNAL_PRIORITY = dict(zip(_LEVELS, (7, 6, 4, 3, 2), strict=True))
_FORMATTER = string.Formatter()


def quote_value(text: str) -> str:
    """One field value as one token on one line: bare, or a JSON string literal."""
    if _BARE_VALUE.fullmatch(text):
        return text
    return _NOT_PRINTABLE_ASCII.sub(_escape, json.dumps(text, ensure_ascii=False))


def _escape(match: re.Match[str]) -> str:
    char = match.group()  # DEL or not ASCII: json.dumps escaped the rest
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char  # printable text stays readable
    return "\\u007f" if char == "\x7f" else json.dumps(char)[1:-1]


@functools.lru_cache(maxsize=4096)  # asked for every field of every event
def _is_secret(name: str) -> bool:
    return _SECRET.search(name) is not None


def _body(log_format: str, event: LogEvent, usernames: bool) -> str:
    """``log_format`` filled in as ``formatEvent`` would, each value quoted on its own."""
    out: list[str] = []
    for literal, field, spec, conversion in _FORMATTER.parse(log_format):
        out.append(literal)
        if field is None:
            continue
        if _is_secret(field) or (field == "user" and not usernames):
            out.append(HIDDEN if field == "user" else REDACTED)
            continue
        value = event[field] if field in event else _FORMATTER.get_field(field, (), event)[0]
        value = _FORMATTER.convert_field(value, conversion) if conversion else value
        out.append(quote_value(format(value, spec or "")))
    return "".join(out)


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): REDACTED if _is_secret(str(k)) else _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if value is None or isinstance(value, str | int | float) else safe_str(value)


@functools.lru_cache(maxsize=4)  # most events share their second with the one before
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _describe(error: BaseException | Failure) -> str:
    value = error.value if isinstance(error, Failure) else error
    return f"{type(value).__name__}: {safe_str(value)}".removesuffix(": ")  # if no message


@dataclass(frozen=True)
class _Rendered:
    time: float
    level: LogLevel
    name: str
    body: str
    fields: dict[str, object]  # JSON-ready, redacted, without a hidden user
    traceback: str | None = None

    def stamp(self) -> str:
        whole, millis = divmod(round(self.time * 1000), 1000)
        return f"{_second(whole)}.{millis:03d}Z"

    def text_line(self) -> str:
        return f"{self.stamp()} {self.level.name} {self.body}"

    def message(self) -> str:  # syslog and journald stamp the time themselves
        return f"{self.level.name} {self.body}"

    def json_line(self) -> str:
        head = {"time": self.stamp(), "level": self.level.name, "event": self.name}
        tail = {} if self.traceback is None else {"traceback": self.traceback}
        document = head | self.fields | tail | {"message": self.body}
        return json.dumps(document, ensure_ascii=True, separators=(",", ":"))

    def traceback_event(self) -> _Rendered:
        body = f"log.traceback event={self.name} traceback={quote_value(self.traceback or '')}"
        return _Rendered(self.time, LogLevel.debug, "log.traceback", body, {})


def _render(event: LogEvent, usernames: bool) -> _Rendered:
    own = {
        key: REDACTED if _is_secret(key) else HIDDEN if key == "user" and not usernames else value
        for key, value in event.items()
        if isinstance(key, str) and not key.startswith("log_")
    }
    failure = event.get("log_failure") or (event.get("isError") and event.get("failure"))
    failure = failure if isinstance(failure, Failure) else None  # or a legacy log.err's
    log_format = event.get("log_format")
    named = _EVENT_NAME.match(log_format) if isinstance(log_format, str) else None
    if named:
        name = named.group(1)
        try:
            body = _body(named.string, event, usernames)
        except Exception as exc:  # a wrong format still gives one line: name, fields, error
            shown = (v if v is REDACTED else quote_value(safe_str(v)) for v in own.values())
            body = name + "".join(f" {k}={v}" for k, v in zip(own, shown, strict=True))
            body += f" format_error={quote_value(_describe(exc))}"
    else:
        name, foreign = "log.message", {"namespace": safe_str(event.get("log_namespace", "-"))}
        if event.get("log_system", "-") != "-":
            foreign["system"] = safe_str(event["log_system"])
        legacy_err = failure is not None and log_format == "{log_text}"  # its text: a traceback
        why = safe_str(event.get("why") or "Unhandled Error")
        foreign["text"] = why if legacy_err else logger.formatEvent(event | own)
        body = name + "".join(f" {key}={quote_value(text)}" for key, text in foreign.items())
        own = foreign | {k: v for k, v in own.items() if k not in _LEGACY_KEYS | foreign.keys()}
    left_out = _NOT_JSON_FIELDS if usernames else _NOT_JSON_FIELDS | {"user"}
    fields = {k: _jsonable(v) for k, v in own.items() if k not in left_out}
    traceback = None
    if failure is not None:
        key, fields[key] = ("exception" if "error" in own else "error"), _describe(failure)
        body += f" {key}={quote_value(_describe(failure))}"
        traceback = failure.getTraceback().rstrip("\n")
    when: Any = event.get("log_time") if isinstance(event.get("log_time"), int | float) else None
    level: Any = event.get("log_level") if event.get("log_level") in _STDLIB_LEVEL else None
    return _Rendered(when or time.time(), level or LogLevel.info, name, body, fields, traceback)


def format_text_line(event: LogEvent, usernames: bool = True) -> str:
    """The text format's line for ``event``, without the newline or a traceback line."""
    return _render(event, usernames).text_line()


def format_json_line(event: LogEvent, usernames: bool = True) -> str:
    """The JSON format's object for ``event``, one ASCII line, without the newline."""
    return _render(event, usernames).json_line()


_Layout = Callable[[_Rendered], str]
# Made once: LogRecord() looks up the time, thread and process names on every call.
_BLANK = vars(logging.makeLogRecord({"name": "relayproxy"}))


def _record(rendered: _Rendered, layout: _Layout) -> logging.LogRecord:
    level = _STDLIB_LEVEL[rendered.level]  # SysLogHandler maps levelname to a priority
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = {"levelno": level, "levelname": logging.getLevelName(level), "rendered": rendered}
    record.__dict__.update(_BLANK, msg=layout(rendered), **fields)
    return record


class _LogFile(logging.handlers.WatchedFileHandler):
    """``file:PATH``, created mode 0640: it holds user names and addresses."""

    def _open(self) -> Any:
        path, private = self.baseFilename, functools.partial(os.open, mode=0o640)
        return open(path, "a", encoding="utf-8", errors="backslashreplace", opener=private)

    def emit(self, record: logging.LogRecord) -> None:
        try:  # the stdlib lets a failed reopen escape, and Twisted's publisher would drop it
            super().emit(record)
        except OSError:
            self.handleError(record)


class _Journal(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        rendered: _Rendered = record.__dict__["rendered"]
        fields = {"MESSAGE": rendered.message(), "PRIORITY": _JOURNAL_PRIORITY[rendered.level]}
        fields |= {"SYSLOG_IDENTIFIER": "relayproxy", "SYSLOG_FACILITY": 2}  # mail
        ours = {"event": rendered.name, **rendered.fields, "traceback": rendered.traceback}
        for key, value in ours.items():  # so that journalctl RELAYPROXY_EVENT=... works
            name = "RELAYPROXY_" + re.sub(r"[^A-Z0-9_]", "_", key.upper())[:53]
            if value is not None:  # journald has no null: the field is left out
                fields[name] = value if isinstance(value, str) else json.dumps(value)
        entry = [f"{k}={v}".encode("utf-8", "backslashreplace") for k, v in fields.items()]
        try:
            journal.sendv(*entry)
        except OSError:
            self.handleError(record)


@implementer(logger.ILogObserver)
class LogObserver:
    """Renders each event and hands it to the ``[log]`` target's handler."""

    def __init__(self, handler: logging.Handler, layout: _Layout, usernames: bool) -> None:
        self.handler, self.layout, self.usernames = handler, layout, usernames
        # The text format's traceback line; JSON and journald carry it as a field.
        self.tracebacks = layout is not _Rendered.json_line and not isinstance(handler, _Journal)

    def __call__(self, event: LogEvent) -> None:
        rendered = _render(event, self.usernames)
        with self.handler.lock or contextlib.nullcontext():  # the traceback line right after
            self.handler.handle(_record(rendered, self.layout))
            if self.tracebacks and rendered.traceback is not None:
                self.handler.handle(_record(rendered.traceback_event(), self.layout))

    def close(self) -> None:
        self.handler.close()


def make_observer(
    config: LogConfig, *, stream: IO[str] | None = None, syslog_socket: str = "/dev/log"
) -> LogObserver:
    """The ``[log]`` target's observer (``stream``: for stderr); a ``file:`` may raise OSError."""
    target, as_json = config.target, config.format == "json"
    lines = _Rendered.json_line if as_json else _Rendered.text_line
    stderr = LogObserver(logging.StreamHandler(stream or sys.stderr), lines, config.usernames)
    socket = {"syslog": syslog_socket, "journald": JOURNAL_SOCKET}.get(target, "")
    if target == "stderr" or (socket and not os.path.exists(socket)):  # libsystemd: silently
        if socket:
            gone = f"log.{target}_unavailable socket={{socket}} fallback=stderr"
            logger.Logger(observer=stderr).warn(gone, socket=socket)
        return stderr
    handler: logging.Handler
    layout = _Rendered.json_line if as_json else _Rendered.message  # syslog stamps the time
    if target.startswith("file:"):
        handler, layout = _LogFile(target.removeprefix("file:")), lines
    elif target == "syslog":
        handler = syslog = logging.handlers.SysLogHandler(socket, facility=2)  # mail
        syslog.ident, syslog.append_nul = f"relayproxy[{os.getpid()}]: ", False  # as glibc's
    else:  # journald: config.py admits no other target
        handler = _Journal()
    return LogObserver(handler, layout, config.usernames)


def start_logging(config: LogConfig, *, beginner: logger.LogBeginner | None = None) -> LogObserver:
    """Every event of the process, Twisted's too, to ``[log]``; stdout/stderr stay raw."""
    observer = make_observer(config)
    level = LogLevel.levelWithName(config.level)
    threshold = logger.LogLevelFilterPredicate(defaultLogLevel=level)
    # Twisted's info lines (legacy log.msg's "ProxyFactory starting on 11110", its own
    # loggers' "Starting factory") are noise beside our events; its warnings are not.
    for namespace in ("log_legacy", "twisted") if level is LogLevel.info else ():
        threshold.setLogLevelForNamespace(namespace, LogLevel.warn)
    filtered = logger.FilteringLogObserver(observer, [threshold])
    (beginner or logger.globalLogBeginner).beginLoggingTo([filtered], redirectStandardIO=False)
    return observer
