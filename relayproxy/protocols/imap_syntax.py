"""IMAP before login: the strict reading of client commands and their canonical writing.

Owns the grammar (RFC 9051 section 9, RFC 7888 literals, RFC 4959 SASL-IR)
of the few commands a client may send before login, and the bytes the
proxy writes to the backend in their place. Never imports Twisted.

Why a reader of our own rather than a library's: the point is to accept
exactly the RFC grammar and nothing a backend might read another way
(issue 9: Dovecot and the old proxy disagreed on ``AUTH  ``, on a bare CR,
on tags like ``a]`` and on literals after ``ID``). A command is read as
fragments: a line, and if it ends in a literal marker ``{n}``/``{n+}``,
``n`` bytes of literal and the next line. ``read_fragment`` turns one line
into tokens; ``parse_command`` checks the whole token list against the
command's grammar; ``ImapCommand.wire`` writes what the backend sees, with
the proxy's tag and every string quoted, never the client's bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayproxy.protocols.common import (
    CommandSyntaxError,
    LineBuffer,
    LineTooLongError,
    command_text,
    has_control_bytes,
    sasl_initial_response,
    sasl_mechanism,
    strip_eol,
)


@dataclass(frozen=True, slots=True)
class Atom:
    value: bytes


@dataclass(frozen=True, slots=True)
class String:
    """A quoted string (unescaped) or a literal's bytes."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Paren:
    value: bytes  # b"(" or b")"


Token = Atom | String | Paren
OPEN, CLOSE = Paren(b"("), Paren(b")")


@dataclass(frozen=True, slots=True)
class LiteralMarker:
    size: int
    synchronising: bool


# ASTRING-CHAR: any CHAR but atom-specials, "]" allowed (RFC 9051 9).
_ASTRING = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+")
_VERB = re.compile(rb"[A-Za-z]+")
_LITERAL = re.compile(rb"\{([0-9]{1,10})(\+?)\}")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\["\\])*)"')
_UNESCAPE = re.compile(rb'\\(["\\])')

# What a client may do before login, and nothing else (RFC 9051 6.1, 6.2;
# RFC 2971 ID). ENABLE, XCLIENT and the rest are for later or for others.
PRE_LOGIN_VERBS = frozenset(
    {b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE", b"ID"}
)
WITHOUT_ARGUMENTS = frozenset({b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS"})
LOGIN_VERBS = frozenset({b"LOGIN", b"AUTHENTICATE"})


def read_fragment(text: bytes, continuing: bool) -> tuple[list[Token], LiteralMarker | None]:
    """Tokens of one line (no CRLF, no control byte) and the literal marker ending it.

    ``continuing``: the line follows a literal, so it starts with a space,
    a ``)`` or nothing. Tokens are separated by exactly one space, except
    inside a parenthesised list next to its parentheses.
    """
    tokens: list[Token] = []
    i, end = 0, len(text)
    after_token = continuing
    while i < end:
        char = text[i : i + 1]
        if char == b")":
            tokens.append(CLOSE)
            i, after_token = i + 1, True
            continue
        if after_token:
            if char != b" " or i + 1 == end or text[i + 1 : i + 2] == b")":
                raise CommandSyntaxError("Expected a single space between arguments")
            i, after_token = i + 1, False
            continue
        if char == b"(":
            tokens.append(OPEN)
            i += 1
        elif char == b'"':
            quoted = _QUOTED.match(text, i)
            if quoted is None:
                raise CommandSyntaxError("Invalid quoted string")
            tokens.append(String(_UNESCAPE.sub(rb"\1", quoted.group(1))))
            i, after_token = quoted.end(), True
        elif char == b"{":
            marker = _LITERAL.match(text, i)
            if marker is None or marker.end() != end:
                raise CommandSyntaxError("Invalid literal")
            return tokens, LiteralMarker(int(marker.group(1)), not marker.group(2))
        else:
            atom = _ASTRING.match(text, i)
            if atom is None:
                raise CommandSyntaxError("Invalid characters in command")
            tokens.append(Atom(atom.group()))
            i, after_token = atom.end(), True
    if not after_token and (tokens or continuing):
        raise CommandSyntaxError("Expected an argument after the space")
    return tokens, None


def read_line(line: bytes, continuing: bool) -> tuple[list[Token], LiteralMarker | None]:
    """``read_fragment`` of a client line, which must end in CRLF and hold no control byte."""
    text = command_text(line)
    if text is None:
        raise CommandSyntaxError("Invalid characters or line end")
    return read_fragment(text, continuing)


def head(tokens: list[Token]) -> tuple[bytes, bytes] | None:
    """The tag and the (upper-case) verb a command starts with, if they are valid."""
    if len(tokens) < 2:
        return None
    tag, verb = tokens[0], tokens[1]
    if not isinstance(tag, Atom) or not _TAG.fullmatch(tag.value):
        return None
    if not isinstance(verb, Atom) or not _VERB.fullmatch(verb.value):
        return None
    return tag.value, verb.value.upper()


def tag_of(text: bytes) -> bytes:
    """The tag to answer an unreadable line with: its own if valid, else "*"."""
    word = text.split(b" ", 1)[0]
    return word if _TAG.fullmatch(word) else b"*"


def quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@dataclass(frozen=True, slots=True)
class ImapCommand:
    """A command as the proxy understood it; ``wire(tag)`` is all the backend sees."""

    tag: bytes  # the client's
    verb: bytes
    strings: tuple[bytes, ...] = ()  # LOGIN: user, password
    atoms: tuple[bytes, ...] = ()  # AUTHENTICATE: mechanism [, initial response]

    def wire(self, tag: bytes) -> bytes:
        words = [tag, self.verb, *map(quoted, self.strings), *self.atoms]
        return b" ".join(words) + b"\r\n"


def parse_command(tag: bytes, verb: bytes, arguments: list[Token]) -> ImapCommand:
    """Check a whole command's arguments against its grammar; raises CommandSyntaxError."""
    if verb in WITHOUT_ARGUMENTS:
        if arguments:
            raise CommandSyntaxError(f"{verb.decode()} takes no arguments")
        return ImapCommand(tag, verb)
    if verb == b"LOGIN":
        if (
            len(arguments) != 2
            or isinstance(arguments[0], Paren)
            or isinstance(arguments[1], Paren)
        ):
            raise CommandSyntaxError("LOGIN takes a user name and a password")
        user, password = arguments[0].value, arguments[1].value
        if has_control_bytes(user) or has_control_bytes(password):
            raise CommandSyntaxError("Control characters are not accepted before login")
        return ImapCommand(tag, verb, strings=(user, password))
    if verb == b"AUTHENTICATE":
        if not 1 <= len(arguments) <= 2 or not all(isinstance(a, Atom) for a in arguments):
            raise CommandSyntaxError("AUTHENTICATE takes a mechanism and an initial response")
        atoms = [sasl_mechanism(arguments[0].value)]
        if len(arguments) == 2:
            atoms.append(sasl_initial_response(arguments[1].value))
        return ImapCommand(tag, verb, atoms=tuple(atoms))
    if verb == b"ID":
        _check_id(arguments)
        return ImapCommand(tag, verb)
    raise CommandSyntaxError("Unknown command or not allowed before login")


def _check_id(arguments: list[Token]) -> None:
    """RFC 2971: ``NIL`` or a list of string/nstring pairs (at most 30)."""
    if arguments == [Atom(b"NIL")] or arguments == [Atom(b"nil")]:
        return
    if len(arguments) < 2 or arguments[0] != OPEN or arguments[-1] != CLOSE:
        raise CommandSyntaxError("ID takes NIL or a parenthesised list")
    pairs = arguments[1:-1]
    if len(pairs) % 2 or len(pairs) > 60:
        raise CommandSyntaxError("ID takes at most 30 field-value pairs")
    for field, value in zip(pairs[::2], pairs[1::2], strict=True):
        if not isinstance(field, String) or not (
            isinstance(value, String) or (isinstance(value, Atom) and value.value.upper() == b"NIL")
        ):
            raise CommandSyntaxError("ID fields are strings, values strings or NIL")


class ResponseReader:
    """Whole server responses: the first line, and all bytes with their literals.

    A server line ending in ``{n}`` is followed by ``n`` bytes of literal and
    the rest of the response, so a literal's bytes are never taken for a
    response of their own. One bound (``limit``) holds for the whole
    response, however many literals it has.
    """

    def __init__(self, buffer: LineBuffer, limit: int) -> None:
        self._buffer = buffer
        self._limit = limit
        self._literal = 0  # bytes of a literal still to read
        self._response = bytearray()
        self._first = b""  # the first line: what decides the response's meaning

    def next(self) -> tuple[bytes, bytes] | None:
        """The next whole response, or None until it has arrived."""
        while True:
            if self._literal:
                chunk = self._buffer.take(self._literal)
                if chunk is None:
                    return None
                self._response += chunk
                self._literal = 0
            line = self._buffer.next_line()
            if line is None:
                return None
            if not self._response:
                self._first = line
            self._response += line
            size = server_literal(strip_eol(line))
            if size is not None:
                if len(self._response) + size > self._limit:
                    raise LineTooLongError
                self._literal = size
                continue
            whole = bytes(self._response)
            self._response.clear()
            return self._first, whole


_SERVER_LITERAL = re.compile(rb"\{([0-9]{1,10})\}$")


def server_literal(text: bytes) -> int | None:
    """The size of the literal a server line announces at its end, if any.

    A server quotes strings it could not send as atoms, so a ``{n}`` inside
    quotes is skipped by counting the quotes (with their escapes) before it.
    """
    marker = _SERVER_LITERAL.search(text)
    if marker is None:
        return None
    inside = False
    i = 0
    while i < marker.start():
        char = text[i : i + 1]
        if char == b"\\" and inside:
            i += 2
            continue
        if char == b'"':
            inside = not inside
        i += 1
    return None if inside else int(marker.group(1))
