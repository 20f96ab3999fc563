"""The IMAP login watcher: sans-I/O, no Twisted.

Theory of operation
-------------------
Like the POP3 watcher, ``ImapWatcher`` is fed both directions' bytes until
the client has logged in, and returns actions for the glue. One client
command is in flight at a time (lockstep); later client bytes are held.

A command may span several *fragments*: a line ending in a literal marker
``{n}`` (synchronising: the client waits for the server's ``+``) or
``{n+}`` (RFC 7888: the bytes follow at once), then ``n`` bytes of literal,
then the rest of the command. Quoted strings (with ``\\"`` and ``\\\\``
escapes) are scanned so a ``{n}`` inside quotes is not taken for a
literal. The server's responses can carry literals too, and are read the
same way, so the watcher never loses its place in either stream.

A login succeeds only on the tagged ``OK`` whose tag is, byte for byte, the
tag of the in-flight ``LOGIN`` or ``AUTHENTICATE`` (RFC 9051 6.2.2, 6.2.3),
after the whole command was sent. Untagged responses, continuations, a
``NO``/``BAD``, an ``OK`` with another tag (by case or one character), and
anything the client sends never count. A ``* PREAUTH`` greeting means the
backend logged the client in by itself: recorded only with
``record_preauth``.

The proxy answers ``STARTTLS`` itself when its listener offers TLS and drops
whatever the client pipelined behind it (CVE-2011-0411). Capability lists,
wherever they appear before login (the greeting's ``[CAPABILITY ...]``,
``* CAPABILITY``, a tagged ``OK [CAPABILITY ...]``), are rewritten:
STARTTLS only when the proxy offers it; with ``require_tls`` and no TLS yet,
``LOGINDISABLED`` added and ``AUTH=`` mechanisms removed (RFC 9051 7.2.2).

Internal commands (the proxy's own ``STARTTLS`` to the backend, the ``ID``
that forwards the client's address) use tags starting ``rpx`` and their
responses are not shown to the client.

Everything that decides a state change lives in this file; the states and
their transitions are the table ``TRANSITIONS``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from relayproxy.protocols.common import (
    Action,
    ClientOrigin,
    Close,
    LineTooLongError,
    LoginFailed,
    LoginSucceeded,
    LoginWatcher,
    SaslUserFinder,
    Splice,
    StartClientTLS,
    StartServerTLS,
    TLSMode,
    ToClient,
    ToServer,
    WatcherSettings,
    printable_name,
    strip_eol,
)


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the backend's greeting
    READY = "ready"  # nothing in flight: the next client line starts a command
    CLIENT_LITERAL = "client-literal"  # the client owes n bytes of literal
    CLIENT_REST = "client-rest"  # the client owes the rest of the command line
    LITERAL_GO_AHEAD = "literal-go-ahead"  # waiting for the server's "+" for {n}
    RESPONSE = "response"  # the command is complete: waiting for its tagged response
    SASL_SERVER = "sasl-server"  # AUTHENTICATE: waiting for a server line
    SASL_CLIENT = "sasl-client"  # AUTHENTICATE: the client owes a response line
    SWALLOW = "swallow"  # a refused command's remaining bytes are discarded
    CLIENT_TLS = "client-tls"  # STARTTLS answered: the glue is starting TLS
    SPLICED = "spliced"  # logged in: no more parsing
    CLOSED = "closed"


class Event(enum.Enum):
    GREETING = "greeting"
    INTERNAL_COMMAND = "the proxy's own command"
    COMMAND = "complete command line"
    LITERAL = "fragment ending in a literal"
    SYNC_LITERAL = "fragment ending in {n}"
    GO_AHEAD = "server '+' for a literal"
    LITERAL_READ = "literal bytes read"
    AUTHENTICATE = "AUTHENTICATE"
    CONTINUATION = "'+' continuation"
    CLIENT_RESPONSE = "client SASL response"
    REFUSE = "refused command with literals to skip"
    LOCAL_ANSWER = "answered by the proxy"
    STARTTLS = "STARTTLS answered by the proxy"
    TLS_STARTED = "client TLS started"
    DONE = "tagged completion"
    LOGIN_OK = "tagged OK to a login"


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.GREETING: {
        Event.GREETING: State.READY,
        Event.INTERNAL_COMMAND: State.RESPONSE,
        Event.LOGIN_OK: State.SPLICED,  # PREAUTH
    },
    State.READY: {
        Event.COMMAND: State.RESPONSE,
        Event.LITERAL: State.CLIENT_LITERAL,
        Event.SYNC_LITERAL: State.LITERAL_GO_AHEAD,
        Event.AUTHENTICATE: State.SASL_SERVER,
        Event.REFUSE: State.SWALLOW,
        Event.LOCAL_ANSWER: State.READY,
        Event.STARTTLS: State.CLIENT_TLS,
        Event.INTERNAL_COMMAND: State.RESPONSE,
    },
    State.CLIENT_REST: {
        Event.COMMAND: State.RESPONSE,
        Event.LITERAL: State.CLIENT_LITERAL,
        Event.SYNC_LITERAL: State.LITERAL_GO_AHEAD,
    },
    State.LITERAL_GO_AHEAD: {Event.GO_AHEAD: State.CLIENT_LITERAL, Event.DONE: State.READY},
    State.CLIENT_LITERAL: {Event.LITERAL_READ: State.CLIENT_REST},
    State.SWALLOW: {Event.LITERAL_READ: State.SWALLOW, Event.LOCAL_ANSWER: State.READY},
    State.RESPONSE: {Event.DONE: State.READY, Event.LOGIN_OK: State.SPLICED},
    State.SASL_SERVER: {
        Event.CONTINUATION: State.SASL_CLIENT,
        Event.DONE: State.READY,
        Event.LOGIN_OK: State.SPLICED,
    },
    State.SASL_CLIENT: {Event.CLIENT_RESPONSE: State.SASL_SERVER},
    State.CLIENT_TLS: {Event.TLS_STARTED: State.READY},
    State.SPLICED: {},
    State.CLOSED: {},
}

# ASTRING-CHAR without "+" (RFC 9051 9): what a tag may be made of.
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")
_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9-]*")
_LITERAL = re.compile(rb"\{([0-9]{1,10})(\+?)\}$")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_CAPABILITY_CODE_AND_SPACE = re.compile(rb"\[CAPABILITY [^\]]*\] ?", re.IGNORECASE)
_INTERNAL_STARTTLS = b"rpx0"
_INTERNAL_ID = b"rpx1"


@dataclass(frozen=True, slots=True)
class Fragment:
    """One line of a command or response, as far as its literal marker."""

    tokens: list[bytes]  # atoms and (unquoted) strings, in order
    literal: int | None  # size of the literal that follows, if any
    synchronising: bool


def scan(text: bytes) -> Fragment:
    """Tokens of ``text`` (no line end) and the literal marker ending it, if any."""
    tokens: list[bytes] = []
    i, end = 0, len(text)
    while i < end:
        char = text[i : i + 1]
        if char == b" ":
            i += 1
        elif char == b'"':
            value = bytearray()
            i += 1
            while i < end and text[i : i + 1] != b'"':
                if text[i : i + 1] == b"\\" and i + 1 < end:
                    i += 1
                value += text[i : i + 1]
                i += 1
            if i >= end:
                return Fragment(tokens, None, False)  # unterminated: no literal follows
            tokens.append(bytes(value))
            i += 1
        elif char == b"{" and (marker := _LITERAL.match(text, i)):
            return Fragment(tokens, int(marker.group(1)), not marker.group(2))
        else:
            start = i
            while i < end and text[i : i + 1] not in (b" ", b'"'):
                i += 1
            tokens.append(text[start:i])
    return Fragment(tokens, None, False)


@dataclass
class _Command:
    tag: bytes
    verb: bytes
    internal: bool = False
    mechanism: str | None = None  # set for LOGIN and AUTHENTICATE
    user: str | None = None
    sasl: SaslUserFinder | None = None
    cancelled: bool = False
    arguments: int = 0  # arguments seen so far (the first of LOGIN is the user)
    literal: int | None = None  # bytes of literal the client still owes
    refusal: bytes = b""  # the tagged answer to give once a refused command is read


class ImapWatcher(LoginWatcher[tuple[bytes, bytes]]):
    """Sans-I/O IMAP login watcher; see the module docstring."""

    protocol = "imap"
    TRANSITIONS = TRANSITIONS
    INITIAL = State.GREETING
    CLIENT_TLS = State.CLIENT_TLS
    SPLICED = State.SPLICED
    CLOSED = State.CLOSED
    TLS_STARTED = Event.TLS_STARTED

    def __init__(self, settings: WatcherSettings, forward_id: ClientOrigin | None = None) -> None:
        super().__init__(settings)
        self._command: _Command | None = None
        self._forward_id = forward_id
        self._greeting = b""
        self._server_literal = 0  # bytes of a server literal still to pass
        self._server_response = bytearray()  # a response being read, literals included
        self._server_first = b""  # its first line (what decides its meaning)

    def refusal(self, reason: str) -> bytes:
        return b"* BYE " + reason.encode("ascii", "replace") + b"\r\n"

    # -- client side --

    def _drain_client(self) -> list[Action]:
        actions: list[Action] = []
        while True:
            state = self.state
            due = self._literal_due()
            if state in (State.CLIENT_LITERAL, State.SWALLOW) and due is not None:
                chunk = self._client.take(due)
                if chunk is None:
                    break
                actions += self._literal_read(chunk)
                continue
            if state not in (State.READY, State.CLIENT_REST, State.SASL_CLIENT, State.SWALLOW):
                break
            try:
                line = self._client.next_line()
            except LineTooLongError:
                return [*actions, *self._close("client line too long", "line too long")]
            if line is None:
                break
            if state is State.READY:
                actions += self._command_start(line)
            elif state is State.SASL_CLIENT:
                actions += self._sasl_response(line)
            else:
                actions += self._command_fragment(line)
        if len(self._client) > self.settings.max_held_bytes:
            return [*actions, *self._close("client sent too much before login", "too much data")]
        return actions

    def _literal_due(self) -> int | None:
        return self._command.literal if self._command is not None else None

    def _command_start(self, line: bytes) -> list[Action]:
        text = strip_eol(line)
        tag, _, rest = text.partition(b" ")
        verb_word, _, arguments = rest.partition(b" ")
        if not _TAG.fullmatch(tag) or not _VERB.fullmatch(verb_word):
            # Never forwarded: an untagged line gets no tagged answer, so
            # lockstep would wait for one forever.
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(b"* BAD Missing or invalid tag or command\r\n")]
        verb = verb_word.upper()
        command = _Command(tag, verb)
        self._command = command
        if verb == b"STARTTLS":
            if not self._offers_tls():
                self._command = None
                self._move(Event.LOCAL_ANSWER)
                return [ToClient(tag + b" BAD STARTTLS is not available here\r\n")]
            self._client.take_all()
            self._command = None
            self._move(Event.STARTTLS)
            return [ToClient(tag + b" OK Begin TLS negotiation now\r\n"), StartClientTLS()]
        if verb in (b"LOGIN", b"AUTHENTICATE") and self._tls_required_now():
            command.refusal = tag + b" NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"
            return self._refuse(text)
        if verb == b"AUTHENTICATE":
            return self._authenticate(command, line, arguments)
        if verb == b"LOGIN":
            command.mechanism = "LOGIN"
        return self._command_fragment(line, arguments)

    def _refuse(self, text: bytes) -> list[Action]:
        """Answer a refused command, after skipping the literals the client will send."""
        assert self._command is not None
        fragment = scan(text)
        if fragment.literal is None or fragment.synchronising:
            answer = self._command.refusal  # a {n} literal is never sent without "+"
            self._command = None
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(answer)]
        self._command.literal = fragment.literal
        self._move(Event.REFUSE)
        return []

    def _authenticate(self, command: _Command, line: bytes, arguments: bytes) -> list[Action]:
        mechanism, _, initial = arguments.partition(b" ")
        command.mechanism = mechanism.decode("ascii", "replace").upper()
        command.sasl = SaslUserFinder(command.mechanism)
        if initial and initial != b"=":
            command.sasl.response(initial)  # SASL-IR (RFC 4959)
        self._move(Event.AUTHENTICATE)
        return [ToServer(line)]

    def _command_fragment(self, line: bytes, arguments: bytes | None = None) -> list[Action]:
        """A line of the command in flight; ``arguments``: its text after tag and verb."""
        command = self._command
        assert command is not None
        fragment = scan(strip_eol(line) if arguments is None else arguments)
        if self.state is State.SWALLOW:
            if fragment.literal is None:
                answer, self._command = command.refusal, None
                self._move(Event.LOCAL_ANSWER)
                return [ToClient(answer)]
            if fragment.literal > self.settings.max_literal_length:
                return self._close("client literal too large", "literal too large")
            command.literal = fragment.literal
            return []
        self._note_arguments(command, fragment.tokens)
        if fragment.literal is None:
            self._move(Event.COMMAND)
            return [ToServer(line)]
        if fragment.literal > self.settings.max_literal_length:
            return self._literal_too_large(command, fragment)
        command.literal = fragment.literal
        self._move(Event.SYNC_LITERAL if fragment.synchronising else Event.LITERAL)
        return [ToServer(line)]

    def _literal_too_large(self, command: _Command, fragment: Fragment) -> list[Action]:
        answer = command.tag + b" BAD Literal too large before login\r\n"
        if fragment.synchronising and self.state is State.READY:
            self._command = None
            self._move(Event.LOCAL_ANSWER)
            return [ToClient(answer)]
        # The client sends the bytes without waiting, or part of the command
        # already went to the backend: no clean way back in this session.
        return [ToClient(answer), *self._close("client literal too large", "literal too large")]

    def _note_arguments(self, command: _Command, tokens: list[bytes]) -> None:
        if command.verb == b"LOGIN" and command.arguments == 0 and tokens:
            command.user = printable_name(tokens[0])
        command.arguments += len(tokens)

    def _literal_read(self, chunk: bytes) -> list[Action]:
        command = self._command
        assert command is not None
        command.literal = None
        if self.state is State.SWALLOW:
            self._move(Event.LITERAL_READ)
            return []
        self._note_arguments(command, [chunk])
        self._move(Event.LITERAL_READ)
        return [ToServer(chunk)]

    def _sasl_response(self, line: bytes) -> list[Action]:
        command = self._command
        assert command is not None and command.sasl is not None
        if strip_eol(line) == b"*":
            command.cancelled = True
        else:
            command.sasl.response(strip_eol(line))
        self._move(Event.CLIENT_RESPONSE)
        return [ToServer(line)]

    # -- server side --

    def _read_server(self) -> tuple[bytes, bytes] | None:
        """The next whole response (first line, all bytes), literals included."""
        while True:
            if self._server_literal:
                chunk = self._server.take(self._server_literal)
                if chunk is None:
                    return None
                self._server_response += chunk
                self._server_literal = 0
            line = self._server.next_line()
            if line is None:
                return None
            if not self._server_response:
                self._server_first = line
            self._server_response += line
            fragment = scan(strip_eol(line))
            if fragment.literal is not None:
                if fragment.literal > self.settings.max_server_line_length:
                    raise LineTooLongError
                self._server_literal = fragment.literal
                continue
            whole = bytes(self._server_response)
            self._server_response.clear()
            return self._server_first, whole

    def _on_server(self, response: tuple[bytes, bytes]) -> list[Action]:
        first, whole = response
        if self.state is State.GREETING:
            return self._greeting_read(first, whole)
        text = strip_eol(first)
        command = self._command
        if text.startswith(b"+"):
            return self._continuation(whole)
        if text.startswith(b"* "):
            if command is not None and command.internal:
                return []  # the answer to our own ID: not the client's business
            return [ToClient(self._rewrite_capabilities(whole))]
        tag, _, rest = text.partition(b" ")
        status = rest.split(b" ", 1)[0].upper()
        if command is None or tag != command.tag or status not in (b"OK", b"NO", b"BAD"):
            return [ToClient(whole)]  # not an answer to what is in flight
        if self.state is State.LITERAL_GO_AHEAD and status != b"OK":
            # The backend refused the literal: the command ends here, unsent.
            self._command = None
            self._move(Event.DONE)
            failed = [LoginFailed(command.user, command.mechanism)] if command.mechanism else []
            return [ToClient(whole), *failed]
        if self.state not in (State.RESPONSE, State.SASL_SERVER):
            # The backend finished a command the client has not finished sending.
            return [ToClient(whole), *self._close("backend answered an incomplete command")]
        if command.internal:
            return self._internal_done(command, status)
        if command.sasl is not None:
            command.user = command.sasl.user
        if status == b"OK" and command.mechanism is not None:
            self._move(Event.LOGIN_OK)
            return [ToClient(whole), LoginSucceeded(command.user, command.mechanism), Splice()]
        self._command = None
        self._move(Event.DONE)
        actions: list[Action] = [ToClient(self._rewrite_capabilities(whole))]
        if command.mechanism is not None and not command.cancelled:
            actions.append(LoginFailed(command.user, command.mechanism))
        return actions

    def _continuation(self, whole: bytes) -> list[Action]:
        if self.state is State.LITERAL_GO_AHEAD:
            self._move(Event.GO_AHEAD)
            return [ToClient(whole)]
        if self.state is State.SASL_SERVER:
            self._move(Event.CONTINUATION)
            return [ToClient(whole)]
        return [ToClient(whole)]  # unexpected: pass it on, decide nothing

    def _greeting_read(self, first: bytes, whole: bytes) -> list[Action]:
        text = strip_eol(first)
        kind = text[:10].upper()
        if kind.startswith(b"* PREAUTH"):
            self._move(Event.LOGIN_OK)
            actions: list[Action] = [ToClient(whole)]
            if self.settings.record_preauth:
                actions.append(LoginSucceeded(None, "PREAUTH"))
            return [*actions, Splice()]
        if not kind.startswith(b"* OK"):
            return [ToClient(whole), Close("backend refused the connection")]
        if self.settings.backend_tls is TLSMode.STARTTLS:
            # Capabilities change with TLS: the client asks again rather than
            # trusting a list the backend gave before it.
            self._greeting = _CAPABILITY_CODE_AND_SPACE.sub(b"", whole)
            self._command = _Command(_INTERNAL_STARTTLS, b"STARTTLS", internal=True)
            self._move(Event.INTERNAL_COMMAND)
            return [ToServer(_INTERNAL_STARTTLS + b" STARTTLS\r\n")]
        self._move(Event.GREETING)
        return [ToClient(self._rewrite_capabilities(whole)), *self._send_id()]

    def _internal_done(self, command: _Command, status: bytes) -> list[Action]:
        self._command = None
        if command.tag == _INTERNAL_STARTTLS:
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
        self._command = _Command(_INTERNAL_ID, b"ID", internal=True)
        self._move(Event.INTERNAL_COMMAND)
        fields = (
            f'"x-originating-ip" "{origin.client_ip}" "x-originating-port" "{origin.client_port}" '
            f'"x-connected-ip" "{origin.local_ip}" "x-connected-port" "{origin.local_port}"'
        )
        return [ToServer(_INTERNAL_ID + b" ID (" + fields.encode("ascii") + b")\r\n")]

    # -- capabilities --

    def _rewrite_capabilities(self, response: bytes) -> bytes:
        upper = response[:14].upper()
        if upper.startswith(b"* CAPABILITY "):
            eol = response[len(response.rstrip(b"\r\n")) :]
            listed = strip_eol(response)[len(b"* CAPABILITY ") :]
            return b"* CAPABILITY " + self._capabilities(listed) + eol
        return _CAPABILITY_CODE.sub(
            lambda match: b"[CAPABILITY " + self._capabilities(match.group(1)) + b"]", response
        )

    def _capabilities(self, listed: bytes) -> bytes:
        hide_logins = self._tls_required_now()
        shown = []
        for name in listed.split():
            upper = name.upper()
            # The backend's STARTTLS is the proxy's to offer, or not.
            if upper == b"STARTTLS" or (hide_logins and upper.startswith(b"AUTH=")):
                continue
            shown.append(name)
        if self._offers_tls():
            shown.append(b"STARTTLS")
        if hide_logins and b"LOGINDISABLED" not in (name.upper() for name in shown):
            shown.append(b"LOGINDISABLED")
        return b" ".join(shown)
