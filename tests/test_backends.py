"""The balance and the backends' health (relayproxy.backends), with time moved by hand.

Then the glue that uses them (relayproxy.backend), driven by hand with a
scripted watcher and in-memory transports (tests/glue.py): what the client
sees while backends refuse. The real daemon in front of real Dovecots is
tests/test_backend_failover.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from relayproxy.backends import Backends
from relayproxy.config import HostPort
from relayproxy.protocols.common import ToClient
from tests.glue import Glue

A, B, C = HostPort("192.0.2.1", 110), HostPort("192.0.2.2", 110), HostPort("2001:db8::3", 110)
RETRY = 30.0


def first_choices(backends: Backends, clients: int, now: float = 0.0) -> Counter[HostPort]:
    return Counter(backends.order(now)[0] for _ in range(clients))


def test_first_sends_every_client_to_the_first_backend_and_keeps_the_rest_in_order() -> None:
    backends = Backends((A, B, C), "first", RETRY)
    assert [backends.order(0.0) for _ in range(3)] == [[A, B, C]] * 3


def test_roundrobin_starts_each_client_one_further_along() -> None:
    backends = Backends((A, B, C), "roundrobin", RETRY)
    assert [backends.order(0.0) for _ in range(4)] == [
        [A, B, C],
        [B, C, A],
        [C, A, B],
        [A, B, C],
    ]


def test_a_failed_backend_goes_last_for_backend_retry_seconds_then_back_in_its_place() -> None:
    backends = Backends((A, B, C), "first", RETRY)
    assert backends.failed(backends.attempt(A), now=100.0) is True
    assert backends.order(100.0) == [B, C, A]
    assert backends.order(100.0 + RETRY - 0.001) == [B, C, A]
    assert backends.order(100.0 + RETRY) == [A, B, C]
    assert backends.down() == [A]  # tried again, not known to answer


def test_roundrobin_shares_a_down_backends_clients_evenly_among_the_others() -> None:
    backends = Backends((A, B, C), "roundrobin", RETRY)
    backends.failed(backends.attempt(A), now=0.0)
    assert first_choices(backends, 100, now=1.0) == {B: 50, C: 50}
    assert all(backends.order(1.0)[-1] == A for _ in range(5))


def test_a_backend_going_down_is_reported_once_however_many_clients_find_it_down() -> None:
    backends = Backends((A, B), "first", RETRY)
    # Many clients connecting at once, all to A before the first failure comes back.
    attempts = [backends.attempt(A) for _ in range(50)]
    reports = [backends.failed(attempt, now=5.0) for attempt in attempts]
    assert reports.count(True) == 1
    # After backend_retry the next client tries it again; down still: not reported again.
    assert backends.order(5.0 + RETRY)[0] == A
    assert backends.failed(backends.attempt(A), now=5.0 + RETRY) is False
    assert backends.order(5.0 + RETRY + 1) == [B, A]  # and skipped for another backend_retry
    assert backends.order(5.0 + 2 * RETRY) == [A, B]


def test_a_down_backend_that_answers_again_is_reported_once_as_recovered() -> None:
    backends = Backends((A, B), "first", RETRY)
    backends.failed(backends.attempt(A), now=0.0)
    probes = [backends.attempt(A) for _ in range(3)]
    assert [backends.answered(probe) for probe in probes] == [True, False, False]
    assert backends.down() == []
    assert backends.order(1.0) == [A, B]


def test_an_answer_to_a_connect_begun_before_the_backend_went_down_is_not_a_recovery() -> None:
    backends = Backends((A, B), "first", RETRY)
    early = backends.attempt(A)
    backends.failed(backends.attempt(A), now=1.0)
    assert backends.answered(early) is False
    assert backends.down() == [A]


def test_a_timeout_begun_before_the_backend_recovered_does_not_put_it_down_again() -> None:
    backends = Backends((A, B), "first", RETRY)
    backends.failed(backends.attempt(A), now=0.0)
    slow = backends.attempt(A)  # a last resort that will time out
    assert backends.answered(backends.attempt(A)) is True
    assert backends.failed(slow, now=10.0) is False
    assert backends.down() == []
    assert backends.order(10.0) == [A, B]


def test_every_backend_down_still_gives_every_backend_to_try() -> None:
    backends = Backends((A, B, C), "roundrobin", RETRY)
    for backend in (A, B, C):
        backends.failed(backends.attempt(backend), now=0.0)
    assert backends.order(1.0) == [A, B, C]
    assert backends.down() == [A, B, C]


def test_a_reload_keeps_the_health_of_the_backends_it_keeps() -> None:
    before = Backends((A, B), "first", RETRY)
    before.failed(before.attempt(A), now=0.0)
    before.failed(before.attempt(B), now=0.0)
    after = Backends((C, A), "roundrobin", RETRY)
    after.carry_over(before)
    assert after.down() == [A]
    assert after.order(1.0) == [C, A]
    # A connect begun before the reload reports to the same record.
    assert before.answered(before.attempt(A)) is True
    assert after.down() == []


@pytest.mark.parametrize(
    ("backends", "balance", "message"),
    [((), "first", "at least one"), ((A,), "random", "'random' is not one of")],
)
def test_an_impossible_list_or_balance_is_refused(
    backends: tuple[HostPort, ...], balance: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Backends(backends, balance, RETRY)


# -- the glue --

FIRST, SECOND = HostPort("198.51.100.1", 110), HostPort("198.51.100.2", 110)


@pytest.fixture
def glue() -> Iterator[Glue]:
    session = Glue(backend=(FIRST, SECOND), preauth_timeout=60.0)
    yield session
    session.close()


def connects(glue: Glue) -> list[HostPort]:
    return [HostPort(host, port) for host, port, *_ in glue.reactor.tcpClients]


def test_a_refused_backend_is_invisible_to_the_client_which_the_next_one_greets(
    glue: Glue,
) -> None:
    glue.refuse_backend()
    assert connects(glue) == [FIRST, SECOND]
    assert glue.client.value() == b""
    assert not glue.client.disconnecting
    (line,) = glue.lines("backend.unreachable")
    assert "backend=198.51.100.1:110 " in line and "client=" not in line
    glue.connect_backend()
    glue.watcher.will("server_data", ToClient(b"+OK ready\r\n"))
    glue.backend_protocol.dataReceived(b"+OK ready\r\n")
    assert glue.client.value() == b"+OK ready\r\n"
    assert glue.lines("connection.refused") == []


def test_no_backend_answering_gives_the_client_a_temporary_error(glue: Glue) -> None:
    glue.refuse_backend()
    glue.refuse_backend()
    assert glue.client.value() == b"-ERR [SYS/TEMP] backend unavailable, try again later\r\n"
    assert glue.client.disconnecting
    assert len(glue.lines("backend.unreachable")) == 2
    (line,) = glue.lines("connection.refused")
    assert 'reason="no backend answered"' in line
    assert glue.recorder.logins == []
    glue.client_leaves()  # the close the proxy started, completed
    assert len(glue.lines("connection.close")) == 1
    assert glue.runtime.limits.open == 0


def test_a_session_that_timed_out_while_connecting_tries_no_further_backend(glue: Glue) -> None:
    glue.reactor.advance(60.0)
    glue.refuse_backend()
    assert connects(glue) == [FIRST]
    assert glue.client.value() == b"-ERR timeout waiting for login\r\n"
    assert glue.lines("connection.refused") == []
    glue.client_leaves()
    assert len(glue.lines("connection.close")) == 1
    assert glue.runtime.limits.open == 0
