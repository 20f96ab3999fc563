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
from twisted.logger import LogEvent, LogLevel, PredicateResult
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
# Namespaces are module and class names; the bound guards against one made per event.
MAX_NAMESPACES = 1024


@functools.lru_cache(maxsize=256)  # listener, mechanism, user, client: mostly seen before
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


# A format parsed: its fields as (field, spec, conversion, secret), and its literal text
# with a ``{}`` where each field's quoted value goes.
_Template = tuple[tuple[tuple[str, str, str | None, bool], ...], str]


@functools.lru_cache(maxsize=1024)  # formats are constants in the code: parsed once each
def _template(log_format: str) -> tuple[str | None, _Template | str]:
    """The event name a format starts with (None if it does not), and the format parsed
    (or why it cannot be)."""
    named = _EVENT_NAME.match(log_format)
    fields: list[tuple[str, str, str | None, bool]] = []
    skeleton: list[str] = []
    try:
        for literal, field, spec, conversion in _FORMATTER.parse(log_format):
            skeleton.append(literal.replace("{", "{{").replace("}", "}}"))
            if field is not None:
                fields.append((field, spec or "", conversion, _is_secret(field)))
                skeleton.append("{}")
    except ValueError as exc:
        return (named.group(1) if named else None), str(exc)
    return (named.group(1) if named else None), (tuple(fields), "".join(skeleton))


def _body(log_format: str, event: LogEvent, usernames: bool) -> str:
    """``log_format`` filled in as ``formatEvent`` would, each value quoted on its own."""
    parsed = _template(log_format)[1]
    if isinstance(parsed, str):
        raise ValueError(parsed)
    fields, skeleton = parsed
    values: list[str] = []
    for field, spec, conversion, secret in fields:
        if secret or (field == "user" and not usernames):
            values.append(HIDDEN if field == "user" else REDACTED)
            continue
        value = event[field] if field in event else _FORMATTER.get_field(field, (), event)[0]
        value = _FORMATTER.convert_field(value, conversion) if conversion else value
        text = value if type(value) is str and not spec else format(value, spec)
        values.append(quote_value(text))
    return skeleton.format(*values)


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


def _own_fields(event: LogEvent, usernames: bool) -> dict[str, object]:
    """The event's fields without Twisted's ``log_*`` ones; secrets redacted, a hidden user -."""
    return {
        key: REDACTED if _is_secret(key) else HIDDEN if key == "user" and not usernames else value
        for key, value in event.items()
        if isinstance(key, str) and not key.startswith("log_")
    }


@dataclass(slots=True)
class _Rendered:
    """An event made into text; its JSON fields only when a target asks for them."""

    time: float
    level: LogLevel
    name: str
    body: str
    traceback: str | None = None
    own: dict[str, object] | None = None  # else read from ``event`` when asked
    event: LogEvent | None = None
    usernames: bool = True
    error: tuple[str, str] | None = None  # a failure's field: (key, description)

    @property
    def fields(self) -> dict[str, object]:
        """JSON-ready, redacted, without a hidden user: what JSON and journald carry."""
        own = self.own
        if own is None:
            own = _own_fields(self.event, self.usernames) if self.event is not None else {}
        left_out = _NOT_JSON_FIELDS if self.usernames else _NOT_JSON_FIELDS | {"user"}
        fields = {k: _jsonable(v) for k, v in own.items() if k not in left_out}
        if self.error is not None:
            key, fields[key] = self.error
        return fields

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
        return _Rendered(self.time, LogLevel.debug, "log.traceback", body, own={})


def _render(event: LogEvent, usernames: bool) -> _Rendered:
    failure = event.get("log_failure") or (event.get("isError") and event.get("failure"))
    failure = failure if isinstance(failure, Failure) else None  # or a legacy log.err's
    log_format = event.get("log_format")
    name = _template(log_format)[0] if isinstance(log_format, str) else None
    own: dict[str, object] | None = None  # built here only when the line needs it
    if name is not None:
        assert isinstance(log_format, str)
        try:
            body = _body(log_format, event, usernames)
        except Exception as exc:  # a wrong format still gives one line: name, fields, error
            own = _own_fields(event, usernames)
            shown = (v if v is REDACTED else quote_value(safe_str(v)) for v in own.values())
            body = name + "".join(f" {k}={v}" for k, v in zip(own, shown, strict=True))
            body += f" format_error={quote_value(_describe(exc))}"
    else:
        own = _own_fields(event, usernames)
        name, foreign = "log.message", {"namespace": safe_str(event.get("log_namespace", "-"))}
        if event.get("log_system", "-") != "-":
            foreign["system"] = safe_str(event["log_system"])
        legacy_err = failure is not None and log_format == "{log_text}"  # its text: a traceback
        why = safe_str(event.get("why") or "Unhandled Error")
        foreign["text"] = why if legacy_err else logger.formatEvent(event | own)
        body = name + "".join(f" {key}={quote_value(text)}" for key, text in foreign.items())
        own = foreign | {k: v for k, v in own.items() if k not in _LEGACY_KEYS | foreign.keys()}
    traceback = error = None
    if failure is not None:
        has_error = "error" in own if own is not None else "error" in event
        error = ("exception" if has_error else "error"), _describe(failure)
        body += f" {error[0]}={quote_value(error[1])}"
        traceback = failure.getTraceback().rstrip("\n")
    when: Any = event.get("log_time")
    level: Any = event.get("log_level")
    return _Rendered(
        when if isinstance(when, int | float) and when else time.time(),
        level if level in _STDLIB_LEVEL else LogLevel.info,
        name,
        body,
        traceback,
        own,
        event if own is None else None,
        usernames,
        error,
    )


def format_text_line(event: LogEvent, usernames: bool = True) -> str:
    """The text format's line for ``event``, without the newline or a traceback line."""
    return _render(event, usernames).text_line()


def format_json_line(event: LogEvent, usernames: bool = True) -> str:
    """The JSON format's object for ``event``, one ASCII line, without the newline."""
    return _render(event, usernames).json_line()


_Layout = Callable[[_Rendered], str]
# Made once: LogRecord() looks up the time, thread and process names on every call.
_BLANK = vars(logging.makeLogRecord({"name": "relayproxy"}))


_STDLIB_LEVEL_NAME = {level: logging.getLevelName(level) for level in _STDLIB_LEVEL.values()}


def _record(rendered: _Rendered, layout: _Layout) -> logging.LogRecord:
    level = _STDLIB_LEVEL[rendered.level]  # SysLogHandler maps levelname to a priority
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(_BLANK)
    record.msg, record.levelno = layout(rendered), level
    record.levelname = _STDLIB_LEVEL_NAME[level]
    record.rendered = rendered
    return record


class _AsRendered(logging.Formatter):
    """The record's message is the finished line: the stdlib's formatting has nothing to add."""

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class _Stream(logging.StreamHandler):  # type: ignore[type-arg]
    """``stderr``."""

    def write_line(self, line: str) -> None:
        """``emit`` for a finished line, with the handler's lock held: no record made."""
        self.stream.write(line + "\n")
        self.stream.flush()


class _LogFile(logging.handlers.WatchedFileHandler):
    """``file:PATH``, created mode 0640: it holds user names and addresses."""

    def _open(self) -> Any:
        path, private = self.baseFilename, functools.partial(os.open, mode=0o640)
        return open(path, "a", encoding="utf-8", errors="backslashreplace", opener=private)

    def write_line(self, line: str) -> None:
        """``emit`` for a finished line, with the handler's lock held: no record made."""
        self.reopenIfNeeded()  # a failed reopen leaves no stream: opened again here
        if self.stream is None:
            self.stream = self._open()
        self.stream.write(line + "\n")
        self.stream.flush()

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
        handler.setFormatter(_AsRendered())
        # The text format's traceback line; JSON and journald carry it as a field.
        self.tracebacks = layout is not _Rendered.json_line and not isinstance(handler, _Journal)

    def __call__(self, event: LogEvent) -> None:
        rendered = _render(event, self.usernames)
        with self.handler.lock or contextlib.nullcontext():  # the traceback line right after
            self._hand_over(rendered)
            if self.tracebacks and rendered.traceback is not None:
                self._hand_over(rendered.traceback_event())

    def _hand_over(self, rendered: _Rendered) -> None:
        handler = self.handler
        if not isinstance(handler, _Stream | _LogFile):
            handler.handle(_record(rendered, self.layout))
            return
        # A stream's line needs no LogRecord, filter or formatter: the stdlib's
        # emit in short, and its error report (which wants a record) as it is.
        try:
            handler.write_line(self.layout(rendered))
        except RecursionError:
            raise
        except Exception:
            handler.handleError(_record(rendered, self.layout))

    def close(self) -> None:
        self.handler.close()


def make_observer(
    config: LogConfig, *, stream: IO[str] | None = None, syslog_socket: str = "/dev/log"
) -> LogObserver:
    """The ``[log]`` target's observer (``stream``: for stderr); a ``file:`` may raise OSError."""
    target, as_json = config.target, config.format == "json"
    lines = _Rendered.json_line if as_json else _Rendered.text_line
    stderr = LogObserver(_Stream(stream or sys.stderr), lines, config.usernames)
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


class _LevelThreshold(logger.LogLevelFilterPredicate):
    """Twisted's level filter, with the levels each namespace lets through remembered.

    It is asked for every event; Twisted's walks the namespace's parents and
    compares constants each time.
    """

    def __init__(self, defaultLogLevel: LogLevel = LogLevel.info) -> None:
        self._known: dict[str, frozenset[LogLevel]] = {}
        super().__init__(defaultLogLevel)

    def __call__(self, event: LogEvent) -> Any:  # a PredicateResult
        level, namespace = event.get("log_level"), event.get("log_namespace")
        if level is None or not namespace:
            return PredicateResult.no
        passing = self._known.get(namespace)
        if passing is None:
            lowest = self.logLevelForNamespace(namespace)
            passing = frozenset(each for each in _LEVELS if not each < lowest)
            if len(self._known) < MAX_NAMESPACES:
                self._known[namespace] = passing
        return PredicateResult.maybe if level in passing else PredicateResult.no

    def setLogLevelForNamespace(self, namespace: str, level: LogLevel) -> None:
        super().setLogLevelForNamespace(namespace, level)
        self._known.clear()

    def clearLogLevels(self) -> None:
        super().clearLogLevels()
        self._known.clear()


def start_logging(config: LogConfig, *, beginner: logger.LogBeginner | None = None) -> LogObserver:
    """Every event of the process, Twisted's too, to ``[log]``; stdout/stderr stay raw."""
    observer = make_observer(config)
    level = LogLevel.levelWithName(config.level)
    threshold = _LevelThreshold(defaultLogLevel=level)
    # Twisted's info lines (legacy log.msg's "ProxyFactory starting on 11110", its own
    # loggers' "Starting factory") are noise beside our events; its warnings are not.
    for namespace in ("log_legacy", "twisted") if level is LogLevel.info else ():
        threshold.setLogLevelForNamespace(namespace, LogLevel.warn)
    filtered = logger.FilteringLogObserver(observer, [threshold])
    (beginner or logger.globalLogBeginner).beginLoggingTo([filtered], redirectStandardIO=False)
    return observer
