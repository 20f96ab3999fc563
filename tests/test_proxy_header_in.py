"""The PROXY header a trusted peer sends, read by the glue (``proxy_header.TrustedHeaderReader``).

Driven through ``tests.glue``: the rejection is the ``connection.rejected``
line and a closed connection, never an exception in the reactor.
"""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from relayproxy.protocols.common import ToClient
from tests.glue import Glue

TRUSTING = {"proxy_protocol_in": (ip_network("192.0.2.0/24"),)}  # the glue's client: 192.0.2.7


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (b"USER alice\r\n", "a trusted peer sent no PROXY header"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 port 110\r\n", "invalid PROXY header"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 99999 110\r\n", "invalid PROXY header"),
        (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 -1\r\n", "invalid PROXY header"),
        (b"PROXY TCP4 not-an-address 192.0.2.1 40000 110\r\n", "unusable peer address"),
    ],
)
def test_a_bad_header_from_a_trusted_peer_is_rejected_and_logged(
    first_bytes: bytes, reason: str
) -> None:
    glue = Glue(**TRUSTING)
    try:
        glue.frontend.dataReceived(first_bytes)
        assert glue.client.disconnecting
        (line,) = glue.lines("connection.rejected")
        assert "peer=192.0.2.7 listener=glue reason=" in line
        assert reason in line
        assert glue.reactor.tcpClients == []  # no backend connection was started
    finally:
        glue.close()


def test_a_header_cut_at_every_byte_names_the_client_and_what_follows_reaches_the_watcher() -> None:
    glue = Glue(**TRUSTING)
    try:
        glue.watcher.will("client_data", ToClient(b"+OK\r\n"))
        header = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 110\r\n"
        for byte in header[:-1]:
            glue.frontend.dataReceived(bytes([byte]))
        assert glue.lines("connection.open") == []
        glue.frontend.dataReceived(header[-1:] + b"CAPA\r\n")
        (line,) = glue.lines("connection.open")
        assert "client=198.51.100.7 listener=glue" in line
        assert glue.watcher.fed == [("client_data", b"CAPA\r\n")]
    finally:
        glue.close()


def test_a_second_header_behind_the_first_is_a_forgery() -> None:
    glue = Glue(**TRUSTING)
    try:
        glue.frontend.dataReceived(
            b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 110\r\n"
            b"PROXY TCP4 6.6.6.6 192.0.2.1 40000 110\r\n"
        )
        assert glue.watcher.fed == []
        (line,) = glue.lines("connection.rejected")
        assert "PROXY header from an untrusted peer" in line
    finally:
        glue.close()
