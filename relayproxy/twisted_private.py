"""The one door to Twisted's private modules; tests/test_twisted_private.py pins each use.

Twisted's public PROXY protocol support (``twisted.protocols.haproxy.proxyEndpoint``)
wraps a whole port, and does not fit: every peer must send a header, a bad
or a short first segment is dropped without a word, the wrapped protocol is
connected before the header has named the client, and the bytes behind the
header go straight to it, past a TLS layer started since. relayproxy takes a
header from trusted peers only, rejects anything else with a logged reason,
and starts implicit TLS after the header: so it drives Twisted's v1 and v2
parsers itself, and hands the TLS layer the handshake bytes that came behind
the header. ``pyproject.toml`` keeps Twisted below its next major version, so
that an upgrade that moves any of this meets the pins before it meets clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.interfaces import IAddress
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser


class InvalidHeaderError(Exception):
    """Twisted's parser refused the header."""


@dataclass(frozen=True)
class ParsedHeader:
    # None for "PROXY UNKNOWN" and v2 LOCAL: a load balancer's own health check.
    source: IAddress | None
    destination: IAddress | None
    rest: bytes  # what came behind the header, in the same segments


class HeaderParser:
    """Twisted's parser of one header version, fed until the header is complete."""

    def __init__(self, version: Literal[1, 2]) -> None:
        self._parser = V1Parser() if version == 1 else V2Parser()

    def feed(self, data: bytes) -> ParsedHeader | None:
        try:
            info, rest = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError) as exc:
            # ValueError: v1's int() of a port that is not a number escapes Twisted's checks.
            raise InvalidHeaderError(str(exc)) from None
        if info is None:
            return None
        return ParsedHeader(info.source, info.destination, rest or b"")


def feed_tls_layer(transport: Any, data: bytes) -> None:
    """Give the TLS layer ``startTLS`` just put on ``transport`` bytes read before it started.

    ``startTLS`` (``twisted.internet._newtls``) makes the transport's
    ``protocol`` attribute the TLS layer; bytes read from the socket go there.
    """
    transport.protocol.dataReceived(data)
