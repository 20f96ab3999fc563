"""Pins of what relayproxy relies on in Twisted's private modules (``relayproxy.twisted_private``).

Each test states one behaviour the PROXY header reader or the TLS start
needs; a Twisted release that changes it fails here, not in front of a
load balancer.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.ssl import CertificateOptions

from relayproxy.proxy_header import proxy_header_v1, proxy_header_v2
from relayproxy.twisted_private import (
    HeaderParser,
    InvalidHeaderError,
    ParsedHeader,
    feed_tls_layer,
)

V1 = proxy_header_v1(ip_address("198.51.100.7"), 40000, ip_address("192.0.2.1"), 110)
V2_TCP6 = proxy_header_v2(ip_address("2001:db8::7"), 40000, ip_address("2001:db8::1"), 993)
# Version 2, LOCAL (a health check), no address block.
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def test_v1_cut_at_every_byte_gives_both_addresses_and_what_follows() -> None:
    parser = HeaderParser(1)
    results = [parser.feed(bytes([byte])) for byte in V1[:-1]]
    assert results == [None] * (len(V1) - 1)
    assert parser.feed(V1[-1:] + b"USER alice\r\n") == ParsedHeader(
        IPv4Address("TCP", "198.51.100.7", 40000),
        IPv4Address("TCP", "192.0.2.1", 110),
        b"USER alice\r\n",
    )


def test_v2_once_its_fixed_part_is_there_gives_both_addresses_and_what_follows() -> None:
    parser = HeaderParser(2)
    assert parser.feed(V2_TCP6[:16]) is None
    parsed = parser.feed(V2_TCP6[16:] + b"\x16\x03\x01")
    assert parsed is not None
    assert parsed.rest == b"\x16\x03\x01"
    source, destination = parsed.source, parsed.destination
    assert isinstance(source, IPv6Address) and isinstance(destination, IPv6Address)
    # Twisted writes IPv6 hosts uncompressed: compared as addresses, not as text.
    assert (ip_address(source.host), source.port) == (ip_address("2001:db8::7"), 40000)
    assert (ip_address(destination.host), destination.port) == (ip_address("2001:db8::1"), 993)


def test_v2_refuses_a_first_feed_shorter_than_its_fixed_part() -> None:
    # Why proxy_header.TrustedHeaderReader holds bytes until 16 have come.
    with pytest.raises(InvalidHeaderError):
        HeaderParser(2).feed(V2_TCP6[:15])


@pytest.mark.parametrize(
    ("version", "header"),
    [(1, b"PROXY UNKNOWN 198.51.100.7 192.0.2.1 40000 110\r\n"), (2, V2_LOCAL)],
)
def test_a_health_check_header_names_no_addresses(version: int, header: bytes) -> None:
    parsed = HeaderParser(1 if version == 1 else 2).feed(header + b"x")
    assert parsed == ParsedHeader(None, None, b"x")


def test_a_bare_v1_unknown_is_refused() -> None:
    # The PROXY protocol allows "PROXY UNKNOWN" with nothing after it;
    # Twisted's parser wants a space after UNKNOWN. A load balancer that
    # sends the bare form has its connections rejected as invalid headers.
    with pytest.raises(InvalidHeaderError):
        HeaderParser(1).feed(b"PROXY UNKNOWN\r\n")


def test_v1_addresses_and_ports_are_passed_on_unchecked() -> None:
    # So relayproxy checks them itself: the host as a client address when the
    # session is admitted, the port in proxy_header.TrustedHeaderReader.
    parsed = HeaderParser(1).feed(b"PROXY TCP4 not-an-address 192.0.2.1 99999 110\r\n")
    assert parsed is not None
    assert parsed.source == IPv4Address("TCP", "not-an-address", 99999)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 198.51.100.7\r\n",  # addresses missing
        b"PROXY TCP4 198.51.100.7 192.0.2.1 port 110\r\n",
        b"PROXY UDP4 198.51.100.7 192.0.2.1 40000 110\r\n",
        b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 " + b"1" * 100,  # no line end in 107 bytes
    ],
)
def test_a_malformed_v1_header_is_refused(header: bytes) -> None:
    with pytest.raises(InvalidHeaderError):
        HeaderParser(1).feed(header)


def test_a_malformed_v2_header_is_refused() -> None:
    wrong_version = V2_TCP6[:12] + b"\x31" + V2_TCP6[13:]
    with pytest.raises(InvalidHeaderError):
        HeaderParser(2).feed(wrong_version)


# --- the TLS layer's dataReceived ---------------------------------------------------


def _server_options() -> CertificateOptions:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certificate),
    )


class HeaderThenImplicitTLS(Protocol):
    """As the glue does: a header line in clear, then TLS, fed what came behind the header."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options
        self.head = b""
        self.behind_header = b""
        self.plaintext = b""

    def dataReceived(self, data: bytes) -> None:
        if self.behind_header:
            self.plaintext += data
            return
        self.head += data
        _, found, rest = self.head.partition(b"\r\n")
        if found:
            self.behind_header = rest
            self.transport.startTLS(self.options)  # type: ignore[union-attr]
            feed_tls_layer(self.transport, rest)


# The certificate is made here rather than read from files, through pyOpenSSL as
# CertificateOptions takes it.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
def test_bytes_read_before_start_tls_are_decrypted_once_fed_to_the_tls_layer() -> None:
    reactor = SelectReactor()
    server_side, client_side = socket.socketpair()
    protocol = HeaderThenImplicitTLS(_server_options())
    reactor.adoptStreamConnection(
        server_side.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol)
    )
    server_side.close()  # the reactor holds its own copy of the descriptor

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    # The ClientHello in the same segment as the header, as a load balancer may send it.
    client_side.sendall(b"PROXY UNKNOWN\r\n" + outgoing.read())
    client_side.setblocking(False)
    handshaken = False
    try:
        # Each round waits for I/O, not for time; the bound only stops a broken run.
        for _ in range(500):
            if protocol.plaintext == b"hello\r\n":
                break
            reactor.iterate(0.1)
            with contextlib.suppress(BlockingIOError):
                incoming.write(client_side.recv(65536))
            if not handshaken:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                else:
                    handshaken = True
                    tls.write(b"hello\r\n")
            if pending := outgoing.read():
                client_side.setblocking(True)
                client_side.sendall(pending)
                client_side.setblocking(False)
    finally:
        client_side.close()
        reactor.disconnectAll()
    assert protocol.behind_header  # the ClientHello did come behind the header
    assert protocol.plaintext == b"hello\r\n"
