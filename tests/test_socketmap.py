"""The socketmap reader and replies (relayproxy.protocols.socketmap), and the key folding.

Every stream is also fed in every split into pieces (hypothesis): a
request's answer may never depend on how TCP cut the bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayproxy.addresses import IPv6KeyStyle, lookup_keys
from relayproxy.protocols.socketmap import (
    NOTFOUND,
    BadRequest,
    Event,
    FramingError,
    Request,
    SocketmapReader,
    netstring,
    ok,
    perm,
    temp,
)


def whole(data: bytes, max_length: int = 10_000) -> list[Event]:
    return SocketmapReader(max_length).feed(data)


def in_pieces(data: bytes, cuts: list[int], max_length: int = 10_000) -> list[Event]:
    reader = SocketmapReader(max_length)
    events: list[Event] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events += reader.feed(data[start:cut])
        start = cut
    return events


def request(name: bytes, key: bytes) -> bytes:
    return netstring(name + b" " + key)


def test_pipelined_requests_come_out_in_order() -> None:
    data = request(b"drac", b"192.0.2.1") + request(b"relayers", b"2001:db8::1")
    assert whole(data) == [Request("drac", "192.0.2.1"), Request("relayers", "2001:db8::1")]


def test_the_key_is_everything_after_the_first_space() -> None:
    assert whole(netstring(b"m a b ")) == [Request("m", "a b ")]
    assert whole(netstring(b"m ")) == [Request("m", "")]


def test_a_netstring_that_is_not_name_and_key_is_refused_and_reading_goes_on() -> None:
    data = netstring(b"nospace") + netstring(b" 192.0.2.1") + request(b"m", b"k")
    assert whole(data) == [
        BadRequest("request is not 'name key'"),
        BadRequest("request has an empty map name"),
        Request("m", "k"),
    ]


def test_undecodable_bytes_are_kept_as_surrogates() -> None:
    [event] = whole(request(b"m", b"\xff1"))
    assert isinstance(event, Request)
    assert event.key.encode("ascii", "surrogateescape") == b"\xff1"
    assert lookup_keys(event.key, IPv6KeyStyle.BOTH) == ()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"x:m k,", "netstring length is not a decimal number"),
        (b":m k,", "netstring length is not a decimal number"),
        (b"-3:m k,", "netstring length is not a decimal number"),
        (b"3:m k;", "netstring not ended by ','"),
        (b"10001:", "netstring of 10001 bytes (at most 10000)"),
        (b"99999999999999", "netstring length over 10000 bytes"),
        (b"GET / HTTP/1.0\r\n", "netstring length is not a decimal number"),
    ],
)
def test_a_broken_stream_ends_in_one_framing_error(data: bytes, reason: str) -> None:
    reader = SocketmapReader()
    assert reader.feed(request(b"m", b"k") + data) == [Request("m", "k"), FramingError(reason)]
    assert reader.failed
    assert reader.feed(request(b"m", b"k")) == []


def test_an_oversized_length_is_refused_before_its_body_arrives() -> None:
    reader = SocketmapReader(max_length=100)
    assert reader.feed(b"101:") == [FramingError("netstring of 101 bytes (at most 100)")]


def test_a_request_of_exactly_the_bound_is_read() -> None:
    body = b"m " + b"k" * 98
    assert whole(netstring(body), max_length=100) == [Request("m", "k" * 98)]


def test_an_incomplete_request_waits_for_the_rest() -> None:
    reader = SocketmapReader()
    assert reader.feed(b"14:drac 192.0.2") == []
    assert reader.feed(b".1") == []
    assert reader.feed(b",") == [Request("drac", "192.0.2.1")]


keys = st.one_of(
    st.sampled_from(["192.0.2.1", "IPv6:2001:DB8:0:0:0:0:0:1", "2001:db8::1", "", "a b"]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
pieces = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([b"drac", b"relayers"]), keys).map(
            lambda nk: request(nk[0], nk[1].encode("latin-1"))
        ),
        st.binary(max_size=12).map(netstring),  # anything framed: Request or BadRequest
        st.sampled_from([b"5:m k,", b"0:,", b"12a:", b"3:abc;", b"20000:", b"::"]),
    ),
    max_size=8,
)


@given(pieces.map(b"".join), st.data())
def test_every_split_of_the_stream_gives_the_same_events(data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=len(data) + 1))
    assert in_pieces(data, cuts) == whole(data)


@given(pieces.map(b"".join))
def test_byte_at_a_time_gives_the_same_events(data: bytes) -> None:
    assert in_pieces(data, list(range(len(data)))) == whole(data)


@given(st.binary(max_size=200))
def test_any_bytes_give_events_never_an_exception(data: bytes) -> None:
    events = whole(data, max_length=50)
    assert all(isinstance(e, Request | BadRequest | FramingError) for e in events)
    assert not any(isinstance(e, FramingError) for e in events[:-1])


def test_the_replies_are_netstrings_as_the_mtas_expect() -> None:
    assert ok("1700000000") == b"13:OK 1700000000,"
    assert NOTFOUND == b"9:NOTFOUND ,"
    assert temp("store down") == b"15:TEMP store down,"
    assert perm("bad") == b"8:PERM bad,"


def test_a_reason_is_one_printable_line() -> None:
    assert perm("a\r\nb\x00c,é") == b"13:PERM a??b?c,?,"
    assert len(temp("x" * 5000)) < 220


# --- key folding: what the MTAs send -> the store's key forms --------------------------

SENDMAIL_KEY = "ipv6:2001:db8:0:0:0:0:0:1"
POSTFIX_KEY = "2001:db8::1"


@pytest.mark.parametrize(
    ("sent", "style", "expected"),
    [
        ("192.0.2.1", IPv6KeyStyle.SENDMAIL, ("192.0.2.1",)),
        ("IPv6:2001:db8:0:0:0:0:0:1", IPv6KeyStyle.SENDMAIL, (SENDMAIL_KEY,)),
        ("ipv6:2001:DB8:0:0:0:0:0:1", IPv6KeyStyle.SENDMAIL, (SENDMAIL_KEY,)),
        ("IPV6:2001:db8::1", IPv6KeyStyle.SENDMAIL, (SENDMAIL_KEY,)),
        ("2001:db8::1", IPv6KeyStyle.SENDMAIL, (SENDMAIL_KEY,)),
        ("IPv6:2001:db8:0:0:0:0:0:1", IPv6KeyStyle.POSTFIX, (POSTFIX_KEY,)),
        ("2001:DB8::1", IPv6KeyStyle.POSTFIX, (POSTFIX_KEY,)),
        ("2001:db8::1", IPv6KeyStyle.BOTH, (SENDMAIL_KEY, POSTFIX_KEY)),
        ("::ffff:192.0.2.1", IPv6KeyStyle.POSTFIX, ("192.0.2.1",)),
        ("IPv6:::ffff:192.0.2.1", IPv6KeyStyle.SENDMAIL, ("192.0.2.1",)),
        ("IPv6:0:0:0:0:0:ffff:c000:201", IPv6KeyStyle.SENDMAIL, ("192.0.2.1",)),
    ],
)
def test_the_mtas_spellings_fold_to_the_store_keys(
    sent: str, style: IPv6KeyStyle, expected: tuple[str, ...]
) -> None:
    assert lookup_keys(sent, style) == expected


@pytest.mark.parametrize(
    "sent", ["", "mail.example", "192.0.2.1 ", "192.0.2", "192.0.2.01", "IPv6:", "fe80::1%eth0"]
)
def test_a_key_that_is_not_an_address_has_no_store_key(sent: str) -> None:
    assert lookup_keys(sent, IPv6KeyStyle.BOTH) == ()
