"""The socketmap protocol: netstring requests in, netstring replies out.

Owns the wire format that Postfix's ``socketmap:`` table (socketmap_table(5))
and sendmail's ``socket`` map class both speak, and nothing else: no
addresses, no store. Never imports Twisted, never does I/O.

Theory of operation
-------------------
A client sends requests on a persistent connection, each a netstring
(``LEN:`` + LEN bytes + ``,``) holding ``name SP key``, and may send the
next before the answer to the last (pipelining); answers go back in
order, each a netstring holding one of::

    OK value        found
    NOTFOUND        not found (Postfix writes the trailing space: "NOTFOUND ")
    TEMP reason     a temporary failure: the MTA defers
    PERM reason     a permanent failure (here: a request we cannot read)

``SocketmapReader.feed`` takes bytes as they arrive, however split, and
returns what they complete:

* ``Request``: a well-formed request.
* ``BadRequest``: a netstring whose content is not ``name SP key``; the
  framing is intact, so the connection can go on after its ``PERM``.
* ``FramingError``: a length that is not decimal, too long, or a netstring
  not ended by ``,``. Nothing after it can be trusted: the reader stops
  (every later ``feed`` returns nothing) and the glue answers ``PERM`` and
  closes the connection.

Lengths are bounded (``max_length``) before any of the body is buffered, so
a client cannot make the server hold more than that per connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Postfix's own socketmap client refuses replies over 100,000 bytes
# (socketmap_max_reply_size); a request is a map name and an address, so
# this is ample and keeps a hostile client's buffer small.
DEFAULT_MAX_LENGTH: Final = 10_000
_MAX_REASON: Final = 200


@dataclass(frozen=True, slots=True)
class Request:
    """``name key``: look ``key`` up in the map ``name``.

    Both are decoded as ASCII with undecodable bytes kept as surrogates
    (``surrogateescape``): a key with them is not an address, and stays
    printable for a log line.
    """

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A whole netstring that is not ``name SP key``: answer ``PERM``, read on."""

    reason: str


@dataclass(frozen=True, slots=True)
class FramingError:
    """The byte stream is not netstrings: answer ``PERM`` and close."""

    reason: str


Event = Request | BadRequest | FramingError


class SocketmapReader:
    """Netstring requests from a byte stream fed in pieces; see the module docstring."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buffer = b""
        self.failed = False

    def feed(self, data: bytes) -> list[Event]:
        """The events ``data`` completes, in order; nothing once framing has failed."""
        if self.failed:
            return []
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        start = 0
        while start < len(buffer):
            colon = buffer.find(b":", start, start + self._max_digits + 1)
            if colon < 0:
                pending = buffer[start:]
                if len(pending) > self._max_digits or not pending.isdigit():
                    return self._fail(events, _length_problem(pending, self.max_length))
                break
            digits = buffer[start:colon]
            if not digits.isdigit():
                return self._fail(events, _length_problem(digits, self.max_length))
            length = int(digits)
            if length > self.max_length:
                return self._fail(
                    events, f"netstring of {length} bytes (at most {self.max_length})"
                )
            end = colon + 1 + length
            if end >= len(buffer):
                break
            if buffer[end] != 0x2C:  # ","
                return self._fail(events, "netstring not ended by ','")
            events.append(_request(buffer[colon + 1 : end]))
            start = end + 1
        self._buffer = buffer[start:]
        return events

    def _fail(self, events: list[Event], reason: str) -> list[Event]:
        self.failed = True
        self._buffer = b""
        events.append(FramingError(reason))
        return events


def _length_problem(digits: bytes, max_length: int) -> str:
    if digits.isdigit():
        return f"netstring length over {max_length} bytes"
    return "netstring length is not a decimal number"


def _request(body: bytes) -> Request | BadRequest:
    name, space, key = body.partition(b" ")
    if not space:
        return BadRequest("request is not 'name key'")
    if not name:
        return BadRequest("request has an empty map name")
    return Request(name.decode("ascii", "surrogateescape"), key.decode("ascii", "surrogateescape"))


# --- replies ---------------------------------------------------------------------------


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


NOTFOUND: Final = netstring(b"NOTFOUND ")


def ok(value: str) -> bytes:
    """``OK value``: the key was found (the value must be printable ASCII)."""
    return netstring(b"OK " + value.encode("ascii"))


def temp(reason: str) -> bytes:
    """``TEMP reason``: try again later (the MTA defers the mail, it does not relay it)."""
    return netstring(b"TEMP " + _printable(reason))


def perm(reason: str) -> bytes:
    """``PERM reason``: this request can never be answered."""
    return netstring(b"PERM " + _printable(reason))


def _printable(reason: str) -> bytes:
    # An MTA logs the reason: one short line of printable ASCII, whatever caused it.
    text = "".join(c if " " <= c <= "~" else "?" for c in reason[:_MAX_REASON])
    return text.encode("ascii")
