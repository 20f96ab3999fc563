"""PROXY protocol headers the proxy sends to its backend (v1 text, v2 binary).

Owns only building headers; parsing the ones clients' load balancers send
is Twisted's (``twisted.protocols.haproxy``). Dovecot's ``haproxy = yes``
listeners read either version, so the backend's logs, its
``login_trusted_networks`` and its brute-force limits see the real client.
"""

from __future__ import annotations

import ipaddress
import struct

from relayproxy.addresses import IPAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
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
    return head.startswith(b"PROXY ") or head.startswith(V2_SIGNATURE)
