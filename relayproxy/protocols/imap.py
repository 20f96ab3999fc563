"""The IMAP login watcher: sans-I/O, no Twisted.

Theory of operation
-------------------
Like the POP3 watcher, ``ImapWatcher`` is fed both directions' bytes until
the client has logged in, and returns actions for the glue. One client
command is in flight at a time (lockstep); later client bytes are held.

No parser differential: the backend sees only commands the proxy wrote.
The proxy reads each client command whole (``imap_syntax``): its lines and
its literals, answering a synchronising literal's ``+`` itself. A command
that does not parse, or is not allowed before login, is answered ``BAD`` by
the proxy and never forwarded. One that parses is written anew with a tag
of the proxy's own (``rpx1``, ``rpx2``, ... unique in the session) and its
strings quoted; the backend's tagged answer is given back under the
client's tag. So a literal the backend might read as commands, a tag it
refuses, or a client line that looks like a server response never reach it
in a form it could read another way.

A login succeeds only on the tagged ``OK`` that answers the proxy's own
``LOGIN`` or ``AUTHENTICATE`` (RFC 9051 6.2.2, 6.2.3). Untagged responses,
continuations, a ``NO``/``BAD`` and anything the client sends never count;
a tagged response to a tag the proxy never sent closes the session. A ``*
PREAUTH`` greeting means the backend logged the client in by itself:
recorded only with ``record_preauth``.

The proxy answers ``STARTTLS`` itself when its listener offers TLS and drops
whatever the client pipelined behind it (CVE-2011-0411), and ``ID`` (RFC
2971) itself, so that no client-supplied field such as ``x-originating-ip``
reaches a backend that trusts the proxy. Capability lists, wherever they
appear before login (the greeting's ``[CAPABILITY ...]``, ``* CAPABILITY``,
a tagged ``OK [CAPABILITY ...]``), are rewritten: STARTTLS only when the
proxy offers it; with ``require_tls`` and no TLS yet, ``LOGINDISABLED``
added and ``AUTH=`` mechanisms removed (RFC 9051 7.2.2).

Internal commands (the proxy's own ``STARTTLS`` to the backend, the ``ID``
that forwards the client's address) use the same tags and their responses
are not shown to the client.

Everything that decides a state change lives in this file; the states and
their transitions are the table ``TRANSITIONS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relayproxy.protocols.common import (
    SASL_CANCEL,
    Action,
    ClientOrigin,
    Close,
    CommandSyntaxError,
    LineTooLongError,
    LoginFailed,
    LoginRefused,
    LoginWatcher,
    SaslUserFinder,
    Splice,
    StartClientTLS,
    StartServerTLS,
    Step,
    TLSMode,
    ToClient,
    ToServer,
    WatcherSettings,
    printable_name,
    sasl_response,
    strip_eol,
)
from relayproxy.protocols.imap_syntax import (
    LOGIN_VERBS,
    PRE_LOGIN_VERBS,
    WITHOUT_ARGUMENTS,
    ImapCommand,
    LiteralMarker,
    ResponseReader,
    String,
    Token,
    head,
    parse_command,
    read_line,
    tag_of,
)


class State(Step):
    GREETING = "greeting"  # waiting for the backend's greeting
    READY = "ready"  # nothing in flight: the next client line starts a command
    CLIENT_LITERAL = "client-literal"  # the client owes n bytes of literal
    CLIENT_REST = "client-rest"  # the client owes the rest of the command
    RESPONSE = "response"  # the proxy's command is at the backend: waiting for its tag
    SASL_SERVER = "sasl-server"  # AUTHENTICATE: waiting for a server line
    SASL_CLIENT = "sasl-client"  # AUTHENTICATE: the client owes a response line
    CLIENT_TLS = "client-tls"  # STARTTLS answered: the glue is starting TLS
    SPLICED = "spliced"  # logged in: no more parsing
    CLOSED = "closed"


class Event(Step):
    GREETING = "greeting"
    INTERNAL_COMMAND = "the proxy's own command"
    COMMAND = "command sent to the backend"
    LITERAL = "fragment ending in a literal"
    LITERAL_READ = "literal bytes read"
    AUTHENTICATE = "AUTHENTICATE sent to the backend"
    CONTINUATION = "'+' continuation"
    CLIENT_RESPONSE = "client SASL response"
    LOCAL_ANSWER = "answered by the proxy"
    STARTTLS = "STARTTLS answered by the proxy"
    TLS_STARTED = "client TLS started"
    DONE = "tagged completion"
    LOGIN_OK = "tagged OK to a login"
    CLOSE = "session closed (limit, error, client gone)"


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.GREETING: {
        Event.GREETING: State.READY,
        Event.INTERNAL_COMMAND: State.RESPONSE,
        Event.LOGIN_OK: State.SPLICED,  # PREAUTH
    },
    State.READY: {
        Event.COMMAND: State.RESPONSE,
        Event.AUTHENTICATE: State.SASL_SERVER,
        Event.LITERAL: State.CLIENT_LITERAL,
        Event.LOCAL_ANSWER: State.READY,
        Event.STARTTLS: State.CLIENT_TLS,
        Event.INTERNAL_COMMAND: State.RESPONSE,
    },
    State.CLIENT_LITERAL: {Event.LITERAL_READ: State.CLIENT_REST},
    State.CLIENT_REST: {
        Event.COMMAND: State.RESPONSE,
        Event.LITERAL: State.CLIENT_LITERAL,
        Event.LOCAL_ANSWER: State.READY,
    },
    State.RESPONSE: {Event.DONE: State.READY, Event.LOGIN_OK: State.SPLICED},
    State.SASL_SERVER: {
        Event.CONTINUATION: State.SASL_CLIENT,
        Event.DONE: State.READY,
        Event.LOGIN_OK: State.SPLICED,
    },
    # A tagged answer instead of the next challenge: the backend ended the exchange.
    State.SASL_CLIENT: {Event.CLIENT_RESPONSE: State.SASL_SERVER, Event.DONE: State.READY},
    State.CLIENT_TLS: {Event.TLS_STARTED: State.READY},
    State.SPLICED: {},
    State.CLOSED: {},
}
# Any state can end the session: a limit, an error, the client gone (even as
# its login succeeds: SPLICED, then CLOSED).
for _state, _moves in TRANSITIONS.items():
    if _state is not State.CLOSED:
        _moves[Event.CLOSE] = State.CLOSED

_READING_CLIENT = (State.READY, State.CLIENT_LITERAL, State.CLIENT_REST, State.SASL_CLIENT)
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_CAPABILITY_CODE_AND_SPACE = re.compile(rb"\[CAPABILITY [^\]]*\] ?", re.IGNORECASE)
# A line that ends like a non-synchronising literal marker: if it could not
# be read, where the command ends cannot be known.
_TRAILING_NONSYNC = re.compile(rb"\{[0-9]+\+\}$")


@dataclass
class _Reading:
    """A client command being read, fragment by fragment."""

    tag: bytes
    verb: bytes
    arguments: list[Token]
    size: int  # bytes read so far, literals included
    literal: LiteralMarker | None = None
    refusal: list[Action] = field(default_factory=list)  # decided before its end


@dataclass
class _InFlight:
    """A command the proxy wrote to the backend, under ``tag``."""

    tag: bytes
    client_tag: bytes = b""
    internal: bytes = b""  # the verb of the proxy's own command (STARTTLS, ID)
    mechanism: str | None = None  # set for LOGIN and AUTHENTICATE
    user: str | None = None
    sasl: SaslUserFinder | None = None
    cancelled: bool = False


class ImapWatcher(LoginWatcher[tuple[bytes, bytes]]):
    """Sans-I/O IMAP login watcher; see the module docstring."""

    TRANSITIONS = TRANSITIONS
    INITIAL = State.GREETING
    CLIENT_TLS = State.CLIENT_TLS
    SPLICED = State.SPLICED
    CLOSED = State.CLOSED
    TLS_STARTED = Event.TLS_STARTED
    CLOSE = Event.CLOSE
    AWAITING_CLIENT = frozenset(
        {State.READY, State.CLIENT_LITERAL, State.CLIENT_REST, State.SASL_CLIENT, State.CLIENT_TLS}
    )

    def __init__(self, settings: WatcherSettings, forward_id: ClientOrigin | None = None) -> None:
        super().__init__(settings)
        self._reading: _Reading | None = None
        self._inflight: _InFlight | None = None
        self._tags = 0
        self._forward_id = forward_id
        self._greeting = b""
        self._responses = ResponseReader(self._server, settings.max_server_line_length)

    def refusal(self, reason: str) -> bytes:
        return b"* BYE " + reason.encode("ascii", "replace") + b"\r\n"

    # -- client side: reading a command whole --

    def _drain_client(self) -> list[Action]:
        actions: list[Action] = []
        while self.state in (
            State.READY,
            State.CLIENT_LITERAL,
            State.CLIENT_REST,
            State.SASL_CLIENT,
        ):
            if self.state is State.CLIENT_LITERAL:
                assert self._reading is not None and self._reading.literal is not None
                chunk = self._client.take(self._reading.literal.size)
                if chunk is None:
                    break
                actions += self._literal_read(chunk)
                continue
            try:
                line = self._client.next_line()
            except LineTooLongError:
                return [*actions, *self._close("client line too long", "line too long")]
            if line is None:
                break
            if self.state is State.READY:
                actions += self._command_start(line)
            elif self.state is State.CLIENT_REST:
                actions += self._command_more(line)
            else:
                actions += self._sasl_response(line)
        if len(self._client) > self.settings.max_held_bytes:
            return [*actions, *self._close("client sent too much before login", "too much data")]
        return actions

    def _command_start(self, line: bytes) -> list[Action]:
        try:
            tokens, marker = read_line(line, continuing=False)
        except CommandSyntaxError as exc:
            return self._unreadable(tag_of(line), line, exc)
        start = head(tokens)
        if start is None:
            reading = _Reading(b"*", b"", [], len(line), marker)
            reading.refusal = [ToClient(b"* BAD Missing or invalid tag or command\r\n")]
        else:
            tag, verb = start
            reading = _Reading(tag, verb, tokens[2:], len(line), marker)
            reading.refusal = self._refusal_by_verb(tag, verb, marker)
        self._reading = reading
        return self._next_fragment(reading)

    def _refusal_by_verb(
        self, tag: bytes, verb: bytes, marker: LiteralMarker | None
    ) -> list[Action]:
        """A refusal known from the verb alone, before the command's end."""
        if verb not in PRE_LOGIN_VERBS or (verb in WITHOUT_ARGUMENTS and marker is not None):
            return [ToClient(tag + b" BAD Unknown command or not allowed before login\r\n")]
        if verb in LOGIN_VERBS and self._tls_required_now():
            answer = ToClient(tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first\r\n")
            return [answer, LoginRefused(None, verb.decode(), "tls-required")]
        return []

    def _command_more(self, line: bytes) -> list[Action]:
        reading = self._reading
        assert reading is not None
        try:
            tokens, reading.literal = read_line(line, continuing=True)
        except CommandSyntaxError as exc:
            return self._unreadable(reading.tag, line, exc)
        reading.arguments += tokens
        reading.size += len(line)
        return self._next_fragment(reading)

    def _unreadable(self, tag: bytes, line: bytes, error: CommandSyntaxError) -> list[Action]:
        self._reading = None
        answer = ToClient(tag + b" BAD " + str(error).encode() + b"\r\n")
        if _TRAILING_NONSYNC.search(strip_eol(line)):
            # Its literal's bytes follow at once, and where they end is unknown.
            return [answer, *self._close("client command unreadable")]
        self._move(Event.LOCAL_ANSWER)
        return [answer]

    def _next_fragment(self, reading: _Reading) -> list[Action]:
        marker = reading.literal
        if marker is None:
            self._reading = None
            return self._command_read(reading)
        too_large = marker.size > self.settings.max_literal_length or (
            reading.size + marker.size > self.settings.max_literal_length * 2
        )
        if marker.synchronising and (reading.refusal or too_large):
            # The client sends nothing more without our "+": answer now.
            self._reading = None
            self._move(Event.LOCAL_ANSWER)
            if reading.refusal:
                return reading.refusal
            return [ToClient(reading.tag + b" BAD Literal too large before login\r\n")]
        if too_large:
            answer = ToClient(reading.tag + b" BAD Literal too large before login\r\n")
            return [answer, *self._close("client literal too large", "literal too large")]
        self._move(Event.LITERAL)
        return [ToClient(b"+ Ready for literal data\r\n")] if marker.synchronising else []

    def _literal_read(self, chunk: bytes) -> list[Action]:
        reading = self._reading
        assert reading is not None and reading.literal is not None
        reading.size += reading.literal.size
        reading.literal = None
        reading.arguments.append(String(chunk))
        self._move(Event.LITERAL_READ)
        return []

    # -- client side: what a whole command does --

    def _command_read(self, reading: _Reading) -> list[Action]:
        if reading.refusal:
            self._move(Event.LOCAL_ANSWER)
            return reading.refusal
        try:
            command = parse_command(reading.tag, reading.verb, reading.arguments)
        except CommandSyntaxError as exc:
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(reading.tag + b" BAD " + str(exc).encode() + b"\r\n")]
        if command.verb == b"STARTTLS":
            return self._starttls(command.tag)
        if command.verb == b"ID":
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(b"* ID NIL\r\n" + command.tag + b" OK ID completed\r\n")]
        return self._send(command)

    def _starttls(self, tag: bytes) -> list[Action]:
        if not self._offers_tls():
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(tag + b" BAD STARTTLS is not available here\r\n")]
        self._client.take_all()
        self._move(Event.STARTTLS)
        return [ToClient(tag + b" OK Begin TLS negotiation now\r\n"), StartClientTLS()]

    def _send(self, command: ImapCommand) -> list[Action]:
        inflight = _InFlight(self._next_tag(), command.tag)
        if command.verb == b"LOGIN":
            inflight.mechanism, inflight.user = "LOGIN", printable_name(command.strings[0])
        elif command.verb == b"AUTHENTICATE":
            inflight.mechanism = command.atoms[0].decode()
            inflight.sasl = SaslUserFinder(inflight.mechanism)
            if len(command.atoms) > 1 and command.atoms[1] != b"=":
                inflight.sasl.response(command.atoms[1])  # SASL-IR (RFC 4959)
        self._inflight = inflight
        self._move(Event.AUTHENTICATE if inflight.sasl is not None else Event.COMMAND)
        return [ToServer(command.wire(inflight.tag))]

    def _next_tag(self) -> bytes:
        self._tags += 1
        return b"rpx%d" % self._tags

    def _sasl_response(self, line: bytes) -> list[Action]:
        inflight = self._inflight
        assert inflight is not None and inflight.sasl is not None
        answer = sasl_response(line, inflight.sasl)
        inflight.cancelled = answer == SASL_CANCEL
        self._move(Event.CLIENT_RESPONSE)
        return [ToServer(answer)]

    # -- server side --

    def _read_server(self) -> tuple[bytes, bytes] | None:
        return self._responses.next()

    def _on_server(self, response: tuple[bytes, bytes]) -> list[Action]:
        first, whole = response
        if self.state is State.GREETING:
            return self._greeting_read(first, whole)
        text = strip_eol(first)
        inflight = self._inflight
        if text.startswith(b"+"):
            if self.state is State.SASL_SERVER:
                self._move(Event.CONTINUATION)
            return [ToClient(whole)]
        if text.startswith(b"* "):
            if inflight is not None and inflight.internal:
                return []  # the answer to our own ID: not the client's business
            return [ToClient(self._shown(whole))]
        tag, _, rest = text.partition(b" ")
        status = rest.split(b" ", 1)[0].upper()
        if inflight is None or tag != inflight.tag or status not in (b"OK", b"NO", b"BAD"):
            return self._close("backend answered a command the proxy did not send", "backend error")
        self._inflight = None
        if inflight.internal:
            return self._internal_done(inflight, status)
        if inflight.sasl is not None:
            inflight.user = inflight.sasl.user
        answer = inflight.client_tag + whole[len(inflight.tag) :]
        if status == b"OK" and inflight.mechanism is not None:
            self._move(Event.LOGIN_OK)
            return self._logged_in(inflight.user, inflight.mechanism, answer)
        self._move(Event.DONE)
        actions: list[Action] = [ToClient(self._shown(answer))]
        if inflight.mechanism is not None and not inflight.cancelled:
            actions.append(LoginFailed(inflight.user, inflight.mechanism))
        return actions

    def _greeting_read(self, first: bytes, whole: bytes) -> list[Action]:
        text = strip_eol(first)
        kind = text[:10].upper()
        if kind.startswith(b"* PREAUTH"):
            self._move(Event.LOGIN_OK)
            if self.settings.record_preauth:
                return self._logged_in(None, "PREAUTH", whole)
            return [ToClient(whole), *self._after_preauth()]
        if not kind.startswith(b"* OK"):
            return [ToClient(whole), Close("backend refused the connection")]
        if self.settings.backend_tls is TLSMode.STARTTLS:
            # Capabilities change with TLS: the client asks again rather than
            # trusting a list the backend gave before it.
            self._greeting = _CAPABILITY_CODE_AND_SPACE.sub(b"", whole)
            return self._internal(b"STARTTLS")
        self._move(Event.GREETING)
        return [ToClient(self._shown(whole)), *self._send_id()]

    def _after_preauth(self) -> list[Action]:
        if self._client_gone:
            return self._close("client left")
        return [Splice()]

    def _internal(self, command: bytes) -> list[Action]:
        inflight = _InFlight(self._next_tag(), internal=command.split(b" ", 1)[0])
        self._inflight = inflight
        self._move(Event.INTERNAL_COMMAND)
        return [ToServer(inflight.tag + b" " + command + b"\r\n")]

    def _internal_done(self, inflight: _InFlight, status: bytes) -> list[Action]:
        if inflight.internal == b"STARTTLS":
            if status != b"OK":
                return self._close("backend refused STARTTLS", "backend unavailable")
            self._move(Event.DONE)  # the greeting is released, as if just received
            return [StartServerTLS(), ToClient(self._greeting), *self._send_id()]
        self._move(Event.DONE)
        return []

    def _send_id(self) -> list[Action]:
        # RFC 2971 ID with the fields Dovecot takes from login_trusted_networks.
        origin = self._forward_id
        if origin is None:
            return []
        fields = (
            f'"x-originating-ip" "{origin.client_ip}" "x-originating-port" "{origin.client_port}" '
            f'"x-connected-ip" "{origin.local_ip}" "x-connected-port" "{origin.local_port}"'
        )
        return self._internal(b"ID (" + fields.encode("ascii") + b")")

    def _shown(self, response: bytes) -> bytes:
        """``response`` with its capability lists as the proxy offers them."""
        return rewrite_capabilities(
            response, offers_tls=self._offers_tls(), hide_logins=self._tls_required_now()
        )


def rewrite_capabilities(response: bytes, *, offers_tls: bool, hide_logins: bool) -> bytes:
    """Every capability list in a response (``* CAPABILITY``, ``[CAPABILITY ...]``) rewritten."""
    upper = response[:14].upper()
    if upper.startswith(b"* CAPABILITY "):
        eol = response[len(response.rstrip(b"\r\n")) :]
        listed = strip_eol(response)[len(b"* CAPABILITY ") :]
        return b"* CAPABILITY " + _capabilities(listed, offers_tls, hide_logins) + eol
    return _CAPABILITY_CODE.sub(
        lambda match: (
            b"[CAPABILITY " + _capabilities(match.group(1), offers_tls, hide_logins) + b"]"
        ),
        response,
    )


def _capabilities(listed: bytes, offers_tls: bool, hide_logins: bool) -> bytes:
    shown = []
    for name in listed.split():
        upper = name.upper()
        # The backend's STARTTLS is the proxy's to offer, or not.
        if upper == b"STARTTLS" or (hide_logins and upper.startswith(b"AUTH=")):
            continue
        shown.append(name)
    if offers_tls:
        shown.append(b"STARTTLS")
    if hide_logins and b"LOGINDISABLED" not in (name.upper() for name in shown):
        shown.append(b"LOGINDISABLED")
    return b" ".join(shown)
