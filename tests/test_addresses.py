from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayproxy.addresses import (
    AddressError,
    IPv6KeyStyle,
    all_relayer_keys,
    parse_client_address,
    peer_address,
    relayer_keys,
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("01.2.3.4", "leading zero"),
        ("1.2.3.04", "leading zero"),
        ("1.2.3", "exactly four"),
        ("1.2.3.4.5", "exactly four"),
        ("256.0.0.1", "larger than 255"),
        ("1.2.3.4 ", "whitespace"),
        (" 1.2.3.4", "whitespace"),
        ("1.2.3.\t4", "whitespace"),
        ("mail.example.com", "host names"),
        ("", "empty"),
        ("1.2.3.4\x00", "NUL"),
        ("1.2.3.4/32", "host names"),
        ("2001:db8::g", "not a valid IPv6"),
        ("2001:db8:::1", "not a valid IPv6"),
        ("fe80::1%eth0", "zone index"),
        ("IPv6:1.2.3.4", "without an IPv6"),
        ("1.2.3.\u0664", "non-ASCII"),
    ],
)
def test_refuses_what_is_not_a_canonical_address_and_says_why(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        parse_client_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::FFFF:c000:0207", "192.0.2.7"),
        ("ipv6:2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("ipv6:::ffff:192.0.2.7", "192.0.2.7"),
    ],
)
def test_accepts_every_valid_spelling(text: str, expected: str) -> None:
    assert str(parse_client_address(text)) == expected


def test_peer_address_drops_the_zone_of_a_link_local_peer() -> None:
    assert str(peer_address("fe80::1%eth0")) == "fe80::1"
    assert str(peer_address("::ffff:10.1.2.3")) == "10.1.2.3"


def test_ipv6_keys_follow_the_configured_mta() -> None:
    address = parse_client_address("2001:db8::1")
    # sendmail looks up ${client_addr} ("IPv6:" + IPV6_FULL groups) folded to lower case.
    assert relayer_keys(address, IPv6KeyStyle.SENDMAIL) == ("ipv6:2001:db8:0:0:0:0:0:1",)
    # Postfix's client_addr: RFC 5952 compressed.
    assert relayer_keys(address, IPv6KeyStyle.POSTFIX) == ("2001:db8::1",)
    assert relayer_keys(address, IPv6KeyStyle.BOTH) == (
        "ipv6:2001:db8:0:0:0:0:0:1",
        "2001:db8::1",
    )
    assert all_relayer_keys(address) == relayer_keys(address, IPv6KeyStyle.BOTH)


def test_ipv4_and_mapped_ipv4_have_one_key_in_every_style() -> None:
    for style in IPv6KeyStyle:
        assert relayer_keys(parse_client_address("::ffff:198.51.100.9"), style) == ("198.51.100.9",)


@given(st.ip_addresses())
def test_every_address_parses_back_from_each_key_it_is_written_under(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    expected = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        expected = address.ipv4_mapped
    assert parse_client_address(str(address)) == expected
    for key in all_relayer_keys(expected):
        assert parse_client_address(key) == expected


def test_postfix_keys_are_written_as_the_c_library_writes_them() -> None:
    # Postfix and Exim print peers with inet_ntop(); ipaddress would say ::102:304.
    address = parse_client_address("::1.2.3.4")
    assert relayer_keys(address, IPv6KeyStyle.POSTFIX) == ("::1.2.3.4",)
    assert relayer_keys(parse_client_address("2001:db8:0:0:1:0:0:1"), IPv6KeyStyle.POSTFIX) == (
        "2001:db8::1:0:0:1",
    )
