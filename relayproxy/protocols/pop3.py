"""The POP3 login watcher: sans-I/O, no Twisted.

Theory of operation
-------------------
One ``Pop3Watcher`` sits between a client and a POP3 backend until the
client has logged in. It is fed the bytes of both directions and returns
actions (``relayproxy.protocols.common``) for the glue to carry out.

Lockstep: a client command is forwarded only when no other command is in
flight; later client bytes are held (up to ``max_held_bytes``) until the
backend's complete response to that command has passed. So the response a
watcher reads is always the answer to the command it remembers, and a
pipelined ``PASS bad`` + ``NOOP`` cannot have the ``+OK`` meant for the NOOP
taken as a login (RFC 1939 has no tags to tell them apart).

No parser differential: before login the backend sees only commands the
proxy wrote. Each client line is parsed strictly (``parse_command``: CRLF
only, no control byte, one space between fields, a whitelist of the
commands RFC 1939, 2449, 2595 and 5034 allow before login, RFC 4422
mechanism names, base64 SASL responses); what does not parse is answered
``-ERR`` by the proxy and never forwarded, what parses is re-written in
canonical form. So ``AUTH  `` (two spaces), ``\rPASS`` or ``PA\rSS`` never
reach a backend that could read them another way.

A login succeeds only on ``+OK`` answering ``PASS``, ``APOP`` or the final
line of ``AUTH`` (RFC 5034: ``+ `` lines are continuations, ``*`` from the
client cancels). Then the watcher emits ``LoginSucceeded`` and ``Splice``
and is never consulted again: post-login bytes are relayed raw.

The proxy, not the backend, answers ``STLS`` (RFC 2595) when its listener
offers TLS: client bytes that arrived after the STLS line are discarded,
never carried into the TLS session (CVE-2011-0411). ``CAPA`` (RFC 2449) is
rewritten so the client sees the proxy's truth: STLS offered only when the
proxy can, and with ``require_tls`` no USER and no SASL before TLS.

Everything that decides a state change lives in this file; the states and
their transitions are the table ``TRANSITIONS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relayproxy.protocols.common import (
    SASL_CANCEL,
    Action,
    Close,
    CommandSyntaxError,
    LineTooLongError,
    LoginFailed,
    LoginRefused,
    LoginWatcher,
    SaslUserFinder,
    StartClientTLS,
    StartServerTLS,
    Step,
    TLSMode,
    ToClient,
    ToServer,
    WatcherSettings,
    command_text,
    printable_name,
    sasl_initial_response,
    sasl_mechanism,
    sasl_response,
    strip_eol,
)


class State(Step):
    GREETING = "greeting"  # waiting for the backend's greeting
    BACKEND_STLS = "backend-stls"  # the proxy sent STLS to the backend
    READY = "ready"  # nothing in flight: the next client line is a command
    RESPONSE = "response"  # waiting for the status line of the command in flight
    MULTILINE = "multiline"  # inside a multi-line response, until "."
    SASL_SERVER = "sasl-server"  # AUTH in flight: waiting for a server line
    SASL_CLIENT = "sasl-client"  # AUTH in flight: the client owes a response
    CLIENT_TLS = "client-tls"  # STLS answered: the glue is starting TLS
    SPLICED = "spliced"  # logged in: no more parsing
    CLOSED = "closed"


class Event(Step):
    GREETING = "greeting"
    GREETING_NEEDS_STLS = "greeting, backend STLS first"
    COMMAND = "command"
    AUTH = "AUTH command"
    STLS = "STLS answered by the proxy"
    TLS_STARTED = "client TLS started"
    STATUS = "status line, single-line response"
    STATUS_MULTILINE = "+OK opening a multi-line response"
    END_OF_BODY = "'.' ending a multi-line response"
    CONTINUATION = "'+ ' continuation"
    CLIENT_RESPONSE = "client SASL response"
    LOGIN_OK = "+OK to a login command"
    CLOSE = "session closed (limit, error, client gone)"


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.GREETING: {
        Event.GREETING: State.READY,
        Event.GREETING_NEEDS_STLS: State.BACKEND_STLS,
    },
    State.BACKEND_STLS: {Event.STATUS: State.READY},
    State.READY: {
        Event.COMMAND: State.RESPONSE,
        Event.AUTH: State.SASL_SERVER,
        Event.STLS: State.CLIENT_TLS,
    },
    State.CLIENT_TLS: {Event.TLS_STARTED: State.READY},
    State.RESPONSE: {
        Event.STATUS: State.READY,
        Event.STATUS_MULTILINE: State.MULTILINE,
        Event.LOGIN_OK: State.SPLICED,
    },
    State.MULTILINE: {Event.END_OF_BODY: State.READY},
    State.SASL_SERVER: {
        Event.CONTINUATION: State.SASL_CLIENT,
        Event.STATUS: State.READY,
        Event.LOGIN_OK: State.SPLICED,
    },
    # A status line instead of the next challenge: the backend ended the exchange.
    State.SASL_CLIENT: {Event.CLIENT_RESPONSE: State.SASL_SERVER, Event.STATUS: State.READY},
    State.SPLICED: {},
    State.CLOSED: {},
}
# Any state can end the session: a limit, an error, the client gone (even as
# its login succeeds: SPLICED, then CLOSED).
for _state, _moves in TRANSITIONS.items():
    if _state is not State.CLOSED:
        _moves[Event.CLOSE] = State.CLOSED

_LOGIN_COMMANDS = frozenset({b"USER", b"PASS", b"APOP", b"AUTH"})
_WITHOUT_ARGUMENT = frozenset({b"CAPA", b"QUIT", b"STLS"})
_APOP_DIGEST = re.compile(rb"[0-9a-fA-F]{32}")
_NAME = re.compile(rb"[^ ]+")


@dataclass(frozen=True, slots=True)
class Pop3Command:
    """A client command as the proxy understood it; ``wire`` is all the backend sees."""

    verb: bytes
    arguments: tuple[bytes, ...] = ()

    @property
    def wire(self) -> bytes:
        return b" ".join((self.verb, *self.arguments)) + b"\r\n"


def parse_command(line: bytes) -> Pop3Command:
    """Read one pre-login command line strictly; raises CommandSyntaxError."""
    text = command_text(line)
    if text is None:
        raise CommandSyntaxError("Invalid characters or line end")
    verb_word, space, rest = text.partition(b" ")
    verb = verb_word.upper()
    if verb in _WITHOUT_ARGUMENT:
        if space:
            raise CommandSyntaxError(f"{verb.decode()} takes no argument")
        return Pop3Command(verb)
    if verb == b"USER" and _NAME.fullmatch(rest):
        return Pop3Command(verb, (rest,))
    if verb == b"PASS" and rest:
        return Pop3Command(verb, (rest,))  # RFC 1939 7: a password may hold spaces
    if verb == b"APOP":
        name, _, digest = rest.partition(b" ")
        if _NAME.fullmatch(name) and _APOP_DIGEST.fullmatch(digest):
            return Pop3Command(verb, (name, digest))
    elif verb == b"AUTH":
        if not space:
            return Pop3Command(verb)  # lists the mechanisms (multi-line)
        mechanism, space, initial = rest.partition(b" ")
        if not space:
            return Pop3Command(verb, (sasl_mechanism(mechanism),))
        return Pop3Command(verb, (sasl_mechanism(mechanism), sasl_initial_response(initial)))
    elif verb not in _LOGIN_COMMANDS:
        raise CommandSyntaxError("Unknown command or not allowed before login")
    raise CommandSyntaxError(f"Invalid arguments to {verb.decode()}")


OK, ERR, CONTINUE, OTHER = "ok", "err", "continue", "other"


def status_of(line: bytes) -> str:
    text = strip_eol(line)
    if text == b"+OK" or text.startswith(b"+OK "):
        return OK
    if text == b"-ERR" or text.startswith(b"-ERR "):
        return ERR
    if text == b"+" or text.startswith(b"+ "):
        return CONTINUE
    return OTHER


@dataclass
class _InFlight:
    verb: bytes
    multiline: bool = False
    mechanism: str | None = None  # set for the commands whose +OK is a login
    user: str | None = None
    sasl: SaslUserFinder | None = None
    cancelled: bool = False
    capa_lines: list[bytes] = field(default_factory=list)
    capa_size: int = 0  # bounded by max_server_line_length: it is held whole


class Pop3Watcher(LoginWatcher[bytes]):
    """Sans-I/O POP3 login watcher; see the module docstring."""

    TRANSITIONS = TRANSITIONS
    INITIAL = State.GREETING
    CLIENT_TLS = State.CLIENT_TLS
    SPLICED = State.SPLICED
    CLOSED = State.CLOSED
    TLS_STARTED = Event.TLS_STARTED
    CLOSE = Event.CLOSE
    AWAITING_CLIENT = frozenset({State.READY, State.SASL_CLIENT, State.CLIENT_TLS})

    def __init__(self, settings: WatcherSettings) -> None:
        super().__init__(settings)
        self._inflight: _InFlight | None = None
        self._user: str | None = None  # from an accepted USER, for the log
        self._greeting = b""

    def refusal(self, reason: str) -> bytes:
        return b"-ERR " + reason.encode("ascii", "replace") + b"\r\n"

    # -- client side --

    def _drain_client(self) -> list[Action]:
        actions: list[Action] = []
        while self.state in (State.READY, State.SASL_CLIENT):
            try:
                line = self._client.next_line()
            except LineTooLongError:
                return [*actions, *self._close("client line too long", "line too long")]
            if line is None:
                break
            if self.state is State.READY:
                actions += self._command(line)
            else:
                actions += self._sasl_response(line)
        if len(self._client) > self.settings.max_held_bytes:
            return [*actions, *self._close("client sent too much before login", "too much data")]
        return actions

    def _command(self, line: bytes) -> list[Action]:
        try:
            command = parse_command(line)
        except CommandSyntaxError as exc:
            return [ToClient(b"-ERR " + str(exc).encode() + b"\r\n")]
        verb, arguments = command.verb, command.arguments
        if verb == b"STLS":
            if not self._offers_tls():
                return [ToClient(b"-ERR STLS not available\r\n")]
            self._client.take_all()
            self._move(Event.STLS)
            return [ToClient(b"+OK Begin TLS negotiation\r\n"), StartClientTLS()]
        inflight = _InFlight(verb, multiline=verb == b"CAPA" or (verb == b"AUTH" and not arguments))
        if verb == b"USER":
            inflight.user = printable_name(arguments[0])
        elif verb == b"PASS":
            inflight.mechanism, inflight.user = "USER", self._user
        elif verb == b"APOP":
            inflight.mechanism, inflight.user = "APOP", printable_name(arguments[0])
        elif verb == b"AUTH" and arguments:
            inflight.mechanism = arguments[0].decode()
            inflight.sasl = SaslUserFinder(inflight.mechanism)
            if len(arguments) > 1 and arguments[1] != b"=":
                inflight.sasl.response(arguments[1])
        if verb in _LOGIN_COMMANDS and self._tls_required_now():
            refused = LoginRefused(inflight.user, inflight.mechanism or "USER", "tls-required")
            return [ToClient(b"-ERR TLS required: use STLS first\r\n"), refused]
        self._inflight = inflight
        self._move(Event.AUTH if inflight.sasl is not None else Event.COMMAND)
        return [ToServer(command.wire)]

    def _sasl_response(self, line: bytes) -> list[Action]:
        inflight = self._inflight
        assert inflight is not None and inflight.sasl is not None
        answer = sasl_response(line, inflight.sasl)
        inflight.cancelled = answer == SASL_CANCEL
        self._move(Event.CLIENT_RESPONSE)
        return [ToServer(answer)]

    # -- server side --

    def _read_server(self) -> bytes | None:
        return self._server.next_line()

    def _on_server(self, line: bytes) -> list[Action]:
        state = self.state
        if state is State.GREETING:
            return self._greeting_line(line)
        if state is State.BACKEND_STLS:
            if status_of(line) != OK:
                return self._close("backend refused STLS", "backend unavailable")
            self._move(Event.STATUS)
            return [StartServerTLS(), ToClient(self._greeting)]
        if state is State.MULTILINE:
            return self._body_line(line)
        inflight = self._inflight
        if state in (State.READY, State.CLIENT_TLS) or inflight is None:
            return [ToClient(line)]  # unsolicited (a timeout notice before the backend closes)
        status = status_of(line)
        if state is State.SASL_SERVER:
            if status == CONTINUE:
                self._move(Event.CONTINUATION)
                return [ToClient(line)]
            assert inflight.sasl is not None
            inflight.user = inflight.sasl.user
        if status == OK and inflight.mechanism is not None:
            self._move(Event.LOGIN_OK)
            return self._logged_in(inflight.user, inflight.mechanism, line)
        if status == OK and inflight.multiline:
            self._move(Event.STATUS_MULTILINE)
            if inflight.verb == b"CAPA":
                inflight.capa_lines.append(line)
                return []  # held whole, to be rewritten at its end
            return [ToClient(line)]
        self._move(Event.STATUS)
        self._inflight = None
        actions: list[Action] = [ToClient(line)]
        if inflight.verb == b"USER":
            self._user = inflight.user if status == OK else None
        elif inflight.mechanism is not None and not inflight.cancelled:
            actions.append(LoginFailed(inflight.user, inflight.mechanism))
        return actions

    def _greeting_line(self, line: bytes) -> list[Action]:
        if status_of(line) != OK:
            return [ToClient(line), Close("backend refused the connection")]
        if self.settings.backend_tls is TLSMode.STARTTLS:
            self._greeting = line
            self._move(Event.GREETING_NEEDS_STLS)
            return [ToServer(b"STLS\r\n")]
        self._move(Event.GREETING)
        return [ToClient(line)]

    def _body_line(self, line: bytes) -> list[Action]:
        inflight = self._inflight
        assert inflight is not None
        if strip_eol(line) != b".":
            if inflight.verb == b"CAPA":
                inflight.capa_lines.append(line)
                inflight.capa_size += len(line)
                if inflight.capa_size > self.settings.max_server_line_length:
                    return self._close("backend sent an overlong capability list", "backend error")
                return []
            return [ToClient(line)]
        self._move(Event.END_OF_BODY)
        self._inflight = None
        if inflight.verb == b"CAPA":
            status, *listed = inflight.capa_lines
            return [ToClient(status + b"".join(self._capabilities(listed)) + line)]
        return [ToClient(line)]

    def _capabilities(self, lines: list[bytes]) -> list[bytes]:
        hide_logins = self._tls_required_now()
        shown = []
        for line in lines:
            name = strip_eol(line).split(b" ", 1)[0].upper()
            # The backend's STLS is the proxy's to offer, or not.
            if name == b"STLS" or (hide_logins and name in (b"USER", b"SASL")):
                continue
            shown.append(line)
        if self._offers_tls():
            shown.append(b"STLS\r\n")
        return shown
