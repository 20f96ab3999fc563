"""PROXY protocol headers: the one a trusted load balancer sends, the one the backend gets.

Owns where a header may come from and building the proxy's own (v1 text, v2
binary); parsing is Twisted's, through ``relayproxy.twisted_private``. A
header is read only from a peer in ``proxy_protocol_in``, before anything
else and in clear (before implicit TLS); the same bytes from any other peer
would let it choose the client address that gets recorded, so they end the
connection. Dovecot's ``haproxy = yes`` listeners read either version, so the
backend's logs, its ``login_trusted_networks`` and its brute-force limits see
the real client.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from twisted.internet.interfaces import IAddress

from relayproxy.addresses import IPAddress, peer_address
from relayproxy.twisted_private import HeaderParser, InvalidHeaderError, ParsedHeader

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_START = b"PROXY "
_V2_FIXED_PART = 16  # signature, version and command, family, length: Twisted's parser needs all
_V2_PROXY_COMMAND = 0x21  # version 2, PROXY
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


def _same_family(source: IPAddress, destination: IPAddress) -> tuple[IPAddress, IPAddress]:
    if source.version == destination.version:
        return source, destination

    # An IPv4 client on a dual-stack socket: express both as IPv6.
    def as_v6(address: IPAddress) -> ipaddress.IPv6Address:
        if isinstance(address, ipaddress.IPv6Address):
            return address
        return ipaddress.IPv6Address(f"::ffff:{address}")

    return as_v6(source), as_v6(destination)


def proxy_header_v1(
    source: IPAddress, source_port: int, destination: IPAddress, destination_port: int
) -> bytes:
    source, destination = _same_family(source, destination)
    family = "TCP4" if source.version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def proxy_header_v2(
    source: IPAddress, source_port: int, destination: IPAddress, destination_port: int
) -> bytes:
    source, destination = _same_family(source, destination)
    family = _V2_TCP4 if source.version == 4 else _V2_TCP6
    addresses = (
        source.packed + destination.packed + struct.pack("!HH", source_port, destination_port)
    )
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY_COMMAND, family, len(addresses)) + addresses


def looks_like_proxy_header(head: bytes) -> bool:
    """Whether a connection's first bytes are (the start of) a PROXY header."""
    return head.startswith(_V1_START) or head.startswith(V2_SIGNATURE)


def header_for_backend(
    version: str, client: IPAddress, client_port: int, local: tuple[str, int] | None
) -> bytes:
    """``proxy_protocol_out``'s header (``b""`` for ``none``) for a client arrived at ``local``."""
    if version == "none" or local is None:
        return b""
    build = proxy_header_v1 if version == "v1" else proxy_header_v2
    return build(client, client_port, peer_address(local[0]), local[1])


class ProxyHeaderRejectedError(Exception):
    """A connection's first bytes are refused; the message is the logged reason."""


class TrustedHeaderReader:
    """The header a trusted peer sends first; the version is told by its first bytes.

    A header may come cut at any byte (a load balancer's segments are its
    own), so nothing is decided until enough has arrived to tell.
    """

    def __init__(self) -> None:
        self._head = b""
        self._parser: HeaderParser | None = None

    def feed(self, data: bytes) -> ParsedHeader | None:
        """The header once complete, ``None`` until then; raises ProxyHeaderRejectedError."""
        if self._parser is None:
            self._head += data
            version = self._version(self._head)
            if version is None:
                return None
            self._parser, data = HeaderParser(version), self._head
        try:
            header = self._parser.feed(data)
        except InvalidHeaderError:
            raise ProxyHeaderRejectedError("invalid PROXY header") from None
        if header is not None and not (_port_ok(header.source) and _port_ok(header.destination)):
            raise ProxyHeaderRejectedError("invalid PROXY header")
        return header

    @staticmethod
    def _version(head: bytes) -> Literal[1, 2] | None:
        if len(head) >= _V2_FIXED_PART and head.startswith(V2_SIGNATURE):
            return 2
        if head.startswith(_V1_START):
            return 1
        if V2_SIGNATURE.startswith(head[:12]) or _V1_START.startswith(head[:6]):
            return None  # too short to tell yet
        raise ProxyHeaderRejectedError("a trusted peer sent no PROXY header")


def _port_ok(address: IAddress | None) -> bool:
    # Twisted's v1 parser takes any integer; the port goes into our own header.
    port = getattr(address, "port", 0)
    return isinstance(port, int) and 0 <= port <= 0xFFFF


class UntrustedHeaderCheck:
    """An untrusted peer's first bytes: a PROXY header there is a forged client address."""

    def __init__(self) -> None:
        self._head = b""

    def forged(self, data: bytes) -> bool:
        if len(self._head) >= len(V2_SIGNATURE):
            return False  # past the first bytes: whatever follows is the protocol's
        self._head += data[:12]
        return looks_like_proxy_header(self._head)
