"""The per-login shortcuts keep the behaviour of the long way round (issue 13).

Each shortcut replaces a general path on a session's hot path: a table of
the watcher's actions instead of a chain of isinstance, the kernel's spelling
of a peer instead of the strict parse of text from outside, and Twisted's
level filter with each namespace's level remembered. What they give must be
what the general path gives.
"""

from __future__ import annotations

import copy
import ipaddress
import pickle
import typing
from collections.abc import Callable

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, PredicateResult, globalLogPublisher

from relayproxy.addresses import peer_address
from relayproxy.login_phase import _CARRY_OUT
from relayproxy.logs import _LevelThreshold
from relayproxy.protocols import imap, pop3
from relayproxy.protocols.common import (
    Action,
    Close,
    LoginSucceeded,
    Splice,
    Step,
    ToClient,
    ToServer,
)
from relayproxy.proxy import ConnectionLimits, FrontendProtocol, kernel_peer_address
from tests.glue import CLIENT, Glue


def test_every_action_a_watcher_returns_is_carried_out() -> None:
    assert set(_CARRY_OUT) == set(typing.get_args(Action))


@pytest.mark.parametrize(
    "host", ["192.0.2.7", "127.2.13.152", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::1"]
)
def test_the_kernels_peer_is_the_address_the_strict_parse_gives(host: str) -> None:
    assert kernel_peer_address(host) == peer_address(host)
    assert str(kernel_peer_address(host)) == str(peer_address(host))


def test_an_ipv4_mapped_peer_is_its_ipv4_address() -> None:
    assert kernel_peer_address("::ffff:192.0.2.7") == ipaddress.IPv4Address("192.0.2.7")


def test_a_link_local_peer_loses_its_zone_index() -> None:
    assert kernel_peer_address("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")


def test_connection_limits_count_each_address_text_apart() -> None:
    limits = ConnectionLimits(total=3, per_address=1)
    assert limits.admit("192.0.2.7")
    assert not limits.admit("192.0.2.7")
    assert limits.admit("2001:db8::1")
    limits.release("192.0.2.7")
    assert limits.admit("192.0.2.7")
    assert limits.open == 2


def test_a_level_set_for_a_namespace_after_its_first_event_counts() -> None:
    """The remembered level of a namespace is forgotten when a level is set."""
    threshold = _LevelThreshold(LogLevel.info)
    event = {"log_level": LogLevel.info, "log_namespace": "twisted.internet.tcp"}
    assert threshold(event) is PredicateResult.maybe  # and info remembered for the namespace
    threshold.setLogLevelForNamespace("twisted", LogLevel.warn)
    assert threshold(event) is PredicateResult.no
    threshold.clearLogLevels()
    assert threshold(event) is PredicateResult.maybe


# --- the success path: the client's line first, then the log --------------------------


def _journal_of(glue: Glue) -> tuple[list[tuple[str, object]], Callable[[LogEvent], None]]:
    """What the client was sent and what was logged, in the order it happened."""
    journal: list[tuple[str, object]] = []
    sent = glue.client.value
    glue.client.doWrite = lambda: journal.append(("sent", sent()))  # type: ignore[attr-defined,no-untyped-call]

    def observe(event: LogEvent) -> None:
        journal.append(("logged", str(event.get("log_format", "")).split(" ")[0]))

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    return journal, observe


def _login_answered(glue: Glue, *actions: Action) -> None:
    glue.connect_backend()
    glue.watcher.will("client_data", ToServer(b"a LOGIN alice secret\r\n"))
    glue.frontend.dataReceived(b"a LOGIN alice secret\r\n")
    glue.watcher.will("server_data", *actions)
    glue.backend_protocol.dataReceived(b"rpx1 OK Logged in\r\n")


def test_the_success_line_is_sent_before_the_login_is_logged() -> None:
    glue = Glue()
    journal, observe = _journal_of(glue)
    try:
        answer = ToClient(b"a OK Logged in\r\n")
        _login_answered(glue, LoginSucceeded("alice", "LOGIN"), answer, Splice())
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
        glue.close()
    assert glue.recorder.logins == [CLIENT]  # recorded before anything is sent
    assert journal.index(("sent", b"a OK Logged in\r\n")) < journal.index(
        ("logged", "login.success")
    )
    assert len(glue.lines("login.success")) == 1


def test_a_login_whose_client_left_is_logged_before_the_close() -> None:
    glue = Glue()
    journal, observe = _journal_of(glue)
    try:
        _login_answered(glue, LoginSucceeded("alice", "LOGIN"), Close("client left"))
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
        glue.close()
    logged = [what for kind, what in journal if kind == "logged"]
    assert logged.index("login.success") < logged.index("connection.closing")


@pytest.mark.parametrize(
    ("peer", "again", "logged"),
    [
        ("192.0.2.9", "192.0.2.9", "192.0.2.9"),
        ("::ffff:192.0.2.9", "192.0.2.9", "192.0.2.9"),
        ("2001:db8:0:0::9", "2001:db8::9", "2001:db8::9"),
    ],
)
def test_the_client_is_logged_and_counted_as_its_address(
    peer: str, again: str, logged: str
) -> None:
    """One address, however the kernel spelled it: one line's client=, one count."""
    glue = Glue(max_connections_per_ip=1)

    def connect(host: str) -> None:
        kind = IPv6Address if ":" in host else IPv4Address
        FrontendProtocol(glue.runtime).makeConnection(
            StringTransport(peerAddress=kind("TCP", host, 4))
        )

    try:
        connect(peer)
        connect(again)  # the same client: over its limit
        opened = [line for line in glue.lines("connection.open") if f"client={logged} " in line]
        refused = glue.lines("connection.refused")
    finally:
        glue.close()
    assert len(opened) == 1
    assert len(refused) == 1
    assert f"client={logged} " in refused[0]


@pytest.mark.parametrize("step", [*pop3.State, *pop3.Event, *imap.State, *imap.Event])
def test_a_watcher_step_hashed_by_identity_is_one_object_however_reached(step: Step) -> None:
    # Pickled, copied or looked up by value, a member is the member itself: its
    # identity hash finds it in a transition table as Enum's hash of its name would.
    reached = (pickle.loads(pickle.dumps(step)), copy.deepcopy(step), type(step)(step.value))
    assert all(each is step and hash(each) == hash(step) for each in reached)
    assert {step: True}[reached[0]]
