"""What every login watcher shares: actions, limits, line framing, SASL user names.

Owns the vocabulary between a sans-I/O watcher (pop3, imap) and the
Twisted glue that executes its decisions. Never imports Twisted, never
does I/O: a watcher is fed bytes and returns a list of actions, which the
glue carries out in order.

Secrets: the helpers that look inside SASL responses return the user name
only; the decoded bytes (and the password in them) stay local variables.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class ToServer:
    """Write these bytes to the backend."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Begin the TLS handshake with the client, after the bytes written before."""


@dataclass(frozen=True, slots=True)
class StartServerTLS:
    """Begin the TLS handshake with the backend, after the bytes written before."""


@dataclass(frozen=True, slots=True)
class LoginSucceeded:
    """The backend accepted a login: the moment to record the client's address."""

    user: str | None
    mechanism: str


@dataclass(frozen=True, slots=True)
class LoginFailed:
    user: str | None
    mechanism: str


@dataclass(frozen=True, slots=True)
class LoginRefused:
    """The proxy refused a login command itself (``reason``: e.g. ``tls-required``)."""

    user: str | None
    mechanism: str
    reason: str


@dataclass(frozen=True, slots=True)
class Splice:
    """Parsing is over: relay raw bytes both ways from now on."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close both connections once what was written before has been sent."""

    reason: str


Action = (
    ToServer
    | ToClient
    | StartClientTLS
    | StartServerTLS
    | LoginSucceeded
    | LoginFailed
    | LoginRefused
    | Splice
    | Close
)


@dataclass(frozen=True, slots=True)
class ClientOrigin:
    """Where a session comes from and where it arrived, for the backend's benefit."""

    client_ip: str
    client_port: int
    local_ip: str
    local_port: int


class Step(enum.Enum):
    """A watcher's states and events: hashed by identity, as a member equals only itself.

    ``Enum``'s own hash (of the member's name) is a Python call, and each line
    a watcher reads looks its state and event up in the transition table.
    """

    __hash__ = object.__hash__


class TLSMode(enum.Enum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


@dataclass(frozen=True, slots=True)
class WatcherSettings:
    """The listener settings a watcher's decisions depend on."""

    client_tls: TLSMode = TLSMode.NONE
    require_tls: bool = False
    backend_tls: TLSMode = TLSMode.NONE
    max_line_length: int = 8192
    # Client bytes held while a command is in flight (lockstep before login).
    max_held_bytes: int = 65536
    # A capability list or a greeting from the backend, before login.
    max_server_line_length: int = 65536
    # IMAP: the largest literal a client may send before login.
    max_literal_length: int = 65536
    record_preauth: bool = False


class Watcher(Protocol):
    """The face every protocol watcher shows the glue."""

    def client_data(self, data: bytes) -> list[Action]: ...

    def server_data(self, data: bytes) -> list[Action]: ...

    def client_tls_started(self) -> list[Action]: ...

    def client_closed(self) -> list[Action]:
        """The client has gone (closed or half-closed).

        A login command already at the backend is seen to its answer: the
        watcher keeps being fed ``server_data`` and returns ``LoginSucceeded``
        or ``LoginFailed``, then ``Close``. It returns ``Close`` (now or
        later) once nothing is in flight, and never ``Splice`` after this.
        ``ToClient`` actions after this call are to be dropped by the glue.
        """
        ...

    def refusal(self, reason: str) -> bytes:
        """What to tell a client before closing it (limits, timeouts, backend down)."""
        ...


class ProtocolViolationError(Exception):
    """An event a watcher's transition table has no entry for: the glue closes the session."""


class LineTooLongError(Exception):
    """More bytes than the limit arrived without a line end."""


class LineBuffer:
    """Bytes in, complete lines (with their line end) out; bounded.

    A line ends at LF; the CR before it, if any, stays part of the line, so
    that ``command_text`` can refuse a line that did not end in CRLF.
    """

    def __init__(self, max_line_length: int) -> None:
        self.max_line_length = max_line_length
        self._buffer = bytearray()
        self._scanned = 0  # bytes already known to hold no LF

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.max_line_length:
                raise LineTooLongError
            return None
        if end + 1 > self.max_line_length:
            raise LineTooLongError
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line

    def take(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes (an IMAP literal), or None until they are here."""
        if len(self._buffer) < size:
            return None
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._scanned = 0
        return chunk

    def take_all(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return rest


def strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


# Bytes no command line may hold before login: C0 controls (bare CR and LF
# among them) and DEL. A backend that skips or splits on them would read a
# line the proxy read another way (issue 9: "\rPASS" logged in on Dovecot).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# RFC 4422 3.1: 1*20 (UPPER-ALPHA / DIGIT / "-" / "_"); folded to upper case.
_SASL_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}")
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class CommandSyntaxError(Exception):
    """A client command the proxy does not forward; the text is safe to show the client."""


def command_text(line: bytes) -> bytes | None:
    """The text of a client line that ends in CRLF and holds no control byte, else None."""
    if not line.endswith(b"\r\n"):
        return None
    text = line[:-2]
    return None if has_control_bytes(text) else text


def has_control_bytes(value: bytes) -> bool:
    return _CONTROL.search(value) is not None


def sasl_mechanism(name: bytes) -> bytes:
    """The canonical (upper-case) form of an RFC 4422 mechanism name."""
    if not _SASL_MECHANISM.fullmatch(name):
        raise CommandSyntaxError("Invalid SASL mechanism name")
    return name.upper()


def is_base64(text: bytes) -> bool:
    return _BASE64.fullmatch(text) is not None


def sasl_initial_response(text: bytes) -> bytes:
    """RFC 4959 / 5034: base64, or "=" for an empty response."""
    if text != b"=" and not (text and is_base64(text)):
        raise CommandSyntaxError("Invalid SASL initial response")
    return text


SASL_CANCEL: Final = b"*\r\n"


def sasl_response(line: bytes, finder: SaslUserFinder) -> bytes:
    """The line to send the backend for a client's SASL response line.

    A base64 response is passed on (and shown to ``finder``); ``*`` cancels
    (RFC 5034 4, RFC 9051 6.2.2), and so does anything else, which the
    backend never sees.
    """
    text = command_text(line)
    if text is None or text == b"*" or not is_base64(text):
        return SASL_CANCEL
    finder.response(text)
    return text + b"\r\n"


def _b64(text: bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def printable_name(raw: bytes) -> str | None:
    """A login name fit for a log line, or None."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name and name.isprintable() and len(name) <= 256 else None


class SaslUserFinder:
    """Learns the login name from a SASL exchange, never the password.

    PLAIN carries ``authzid NUL authcid NUL password`` (RFC 4616), LOGIN sends
    the user name as its first response, CRAM-MD5 answers ``user digest``
    (RFC 2195), SCRAM's client-first message holds ``n=user`` (RFC 5802).
    Other mechanisms leave the name unknown.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        self.user: str | None = None
        self._responses = 0

    def response(self, encoded: bytes) -> None:
        """One client response (base64, as sent on the wire)."""
        self._responses += 1
        if self.user is not None or self._responses > 1:
            return
        decoded = _b64(encoded.strip())
        if decoded is None:
            return
        if self.mechanism == "PLAIN":
            parts = decoded.split(b"\x00")
            if len(parts) == 3:
                self.user = printable_name(parts[1])
        elif self.mechanism == "LOGIN":
            self.user = printable_name(decoded)
        elif self.mechanism == "CRAM-MD5":
            self.user = printable_name(decoded.rsplit(b" ", 1)[0]) if b" " in decoded else None
        elif self.mechanism.startswith("SCRAM-"):
            for field in decoded.split(b","):
                if field.startswith(b"n="):
                    self.user = printable_name(
                        field[2:].replace(b"=2C", b",").replace(b"=3D", b"=")
                    )
                    break
        del decoded


Unit = TypeVar("Unit")  # what a watcher reads from the server at a time


class LoginWatcher(Generic[Unit]):
    """What the POP3 and IMAP watchers share: buffers, the table, TLS flags, the splice.

    A subclass names its states and events (class attributes below), and
    provides how it reads the client (``_drain_client``), what a server
    unit is (``_read_server``: a line, or a response with its literals) and
    what that unit means (``_on_server``).

    When the client goes away, what it sent before is still played out (as
    the backend would have, had the client talked to it directly), and a
    login at the backend is seen to its answer; the session closes as soon
    as the watcher would next wait for the client.
    """

    TRANSITIONS: ClassVar[Mapping[Any, Mapping[Any, Any]]]
    INITIAL: ClassVar[enum.Enum]
    CLIENT_TLS: ClassVar[enum.Enum]
    SPLICED: ClassVar[enum.Enum]
    CLOSED: ClassVar[enum.Enum]
    TLS_STARTED: ClassVar[enum.Enum]  # the event that ends CLIENT_TLS
    CLOSE: ClassVar[enum.Enum]  # the event that leads to CLOSED, from any live state
    AWAITING_CLIENT: ClassVar[frozenset[Any]]  # states only the client can move on from

    def __init__(self, settings: WatcherSettings) -> None:
        self.settings = settings
        self.state: enum.Enum = self.INITIAL
        self.tls_active = settings.client_tls is TLSMode.IMPLICIT
        self._client = LineBuffer(settings.max_line_length)
        self._server = LineBuffer(settings.max_server_line_length)
        self._client_gone = False

    # -- the glue's entry points --

    def client_data(self, data: bytes) -> list[Action]:
        if self.state is self.SPLICED:
            raise ProtocolViolationError("consulted after the splice")  # the glue relays now
        if self.state in (self.CLIENT_TLS, self.CLOSED) or self._client_gone:
            return []  # after STLS/STARTTLS: discarded, never carried into TLS
        self._client.feed(data)
        return self._drain()

    def server_data(self, data: bytes) -> list[Action]:
        if self.state is self.SPLICED:
            raise ProtocolViolationError("consulted after the splice")  # the glue relays now
        if self.state is self.CLOSED:
            return []
        self._server.feed(data)
        actions: list[Action] = []
        while self.state not in (self.SPLICED, self.CLOSED):
            try:
                unit = self._read_server()
            except LineTooLongError:
                return [*actions, *self._close("backend sent an overlong line", "backend error")]
            if unit is None:
                break
            actions += self._on_server(unit)
        if self.state is self.SPLICED:
            if rest := self._server.take_all():
                actions.append(ToClient(rest))
            if held := self._client.take_all():
                actions.append(ToServer(held))  # pipelined after the login: post-login now
            return actions
        if self.state is self.CLOSED:
            return actions
        return actions + self._drain()

    def client_tls_started(self) -> list[Action]:
        self._move(self.TLS_STARTED)
        self.tls_active = True
        return self._drain()

    def client_closed(self) -> list[Action]:
        self._client_gone = True
        if self.state in (self.SPLICED, self.CLOSED):
            return []
        return self._drain()

    def refusal(self, reason: str) -> bytes:
        raise NotImplementedError

    # -- for subclasses --

    def _drain_client(self) -> list[Action]:
        raise NotImplementedError

    def _read_server(self) -> Unit | None:
        raise NotImplementedError

    def _on_server(self, unit: Unit) -> list[Action]:
        raise NotImplementedError

    def _drain(self) -> list[Action]:
        actions = self._drain_client()
        if self._client_gone and self.state in self.AWAITING_CLIENT:
            actions += self._close("client left")
        return actions

    def _logged_in(self, user: str | None, mechanism: str, answer: bytes) -> list[Action]:
        """After the move to SPLICED: record, pass the backend's answer on, then relay.

        ``LoginSucceeded`` comes before the answer: the glue makes the record
        durable before the client can read that its login worked.
        """
        if self._client_gone:
            return [LoginSucceeded(user, mechanism), *self._close("client left during its login")]
        return [LoginSucceeded(user, mechanism), ToClient(answer), Splice()]

    def _move(self, event: enum.Enum) -> None:
        try:
            self.state = self.TRANSITIONS[self.state][event]
        except KeyError:
            raise ProtocolViolationError(f"{event.value} in state {self.state.value}") from None

    def _close(self, reason: str, tell_client: str | None = None) -> list[Action]:
        self._move(self.CLOSE)
        actions: list[Action] = []
        if tell_client is not None:
            actions.append(ToClient(self.refusal(tell_client)))
        actions.append(Close(reason))
        return actions

    def _tls_required_now(self) -> bool:
        return self.settings.require_tls and not self.tls_active

    def _offers_tls(self) -> bool:
        return self.settings.client_tls is TLSMode.STARTTLS and not self.tls_active
