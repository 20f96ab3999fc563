"""A client that leaves while its login is at the backend still gets recorded.

Dovecot logs the user in whether or not the client waits for the answer
(``printf 'a LOGIN u p\\r\\n' | nc -N host 143``), and the MTA will see
that client next: so the proxy sees the login to its end, with the backend
connection kept open until the watcher says nothing is left in flight,
bounded by the pre-auth timeout.

The first tests drive the glue with a scripted watcher (what the glue does
with each action, when the session ends); the last ones run the real daemon
in front of the real Dovecot, with a raw socket that leaves right after its
login command.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from demo.dovecot import Dovecot
from relayproxy.protocols.common import Close, LoginSucceeded, Splice, ToClient, ToServer
from tests.daemon import Daemon, wait_for
from tests.glue import CLIENT, Glue


@pytest.fixture
def glue() -> Iterator[Glue]:
    session = Glue(preauth_timeout=60.0)
    yield session
    session.close()


def login_in_flight(glue: Glue) -> None:
    glue.connect_backend()
    glue.watcher.will("client_data", ToServer(b"a LOGIN alice secret\r\n"))
    glue.frontend.dataReceived(b"a LOGIN alice secret\r\n")
    assert glue.backend.value() == b"a LOGIN alice secret\r\n"


# --- the glue, with a scripted watcher ------------------------------------------------


def test_a_login_answered_after_the_client_left_is_recorded(glue: Glue) -> None:
    login_in_flight(glue)
    glue.client_leaves()
    assert glue.watcher.fed[-1] == ("client_closed", b"")
    # Still waiting for the answer: the backend stays, the session still counts.
    assert not glue.backend.disconnecting
    assert glue.runtime.limits.open == 1
    assert glue.frontend in glue.runtime.sessions
    assert glue.frontend.in_login  # a graceful shutdown waits for it
    assert glue.lines("connection.close") == []

    glue.watcher.will(
        "server_data", ToClient(b"a OK Logged in\r\n"), LoginSucceeded("alice", "LOGIN"), Close("")
    )
    glue.backend_protocol.dataReceived(b"a OK Logged in\r\n")
    assert glue.recorder.logins == [CLIENT]
    [success] = glue.lines("login.success")
    assert f"client={CLIENT} user=alice mechanism=LOGIN listener=glue record=queued" in success
    assert b"Logged in" not in glue.client.value()  # nobody to tell
    assert glue.backend.disconnecting

    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1
    assert glue.runtime.limits.open == 0
    assert glue.frontend not in glue.runtime.sessions
    assert not glue.reactor.getDelayedCalls()


def test_a_client_leaving_with_nothing_in_flight_closes_the_backend_at_once(glue: Glue) -> None:
    glue.connect_backend()
    glue.watcher.will("client_closed", Close("client left"))
    glue.client_leaves()
    assert glue.backend.disconnecting
    assert glue.lines("connection.close") == []  # the backend side is not done yet
    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1
    assert glue.runtime.limits.open == 0


def test_the_login_timeout_bounds_the_wait_for_an_answer(glue: Glue) -> None:
    login_in_flight(glue)
    written = glue.client.value()
    glue.client_leaves()
    glue.reactor.advance(59)
    assert not glue.backend.disconnecting
    glue.reactor.advance(1)
    assert glue.backend.disconnecting
    assert glue.client.value() == written  # the timeout's refusal went nowhere
    assert len(glue.lines("connection.timeout")) == 1
    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1
    assert glue.recorder.logins == []
    assert not glue.reactor.getDelayedCalls()


def test_a_client_gone_before_the_backend_answered_the_connect(glue: Glue) -> None:
    """What the client sent is played out once the backend is there (the watcher decides)."""
    glue.client_leaves()
    assert glue.watcher.fed == [("client_closed", b"")]
    assert glue.lines("connection.close") == []
    glue.connect_backend()
    glue.watcher.will("server_data", ToServer(b"a LOGIN alice secret\r\n"))
    glue.backend_protocol.dataReceived(b"* OK ready\r\n")
    assert glue.backend.value() == b"a LOGIN alice secret\r\n"
    glue.watcher.will("server_data", LoginSucceeded("alice", "LOGIN"), Close("client left"))
    glue.backend_protocol.dataReceived(b"a OK\r\n")
    assert glue.recorder.logins == [CLIENT]
    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1


def test_a_client_gone_and_a_backend_that_refuses_end_the_session(glue: Glue) -> None:
    glue.client_leaves()
    glue.refuse_backend()
    assert len(glue.lines("backend.unreachable")) == 1
    assert len(glue.lines("connection.close")) == 1
    assert glue.runtime.limits.open == 0


def test_a_backend_that_closes_before_answering_ends_the_session(glue: Glue) -> None:
    login_in_flight(glue)
    glue.client_leaves()
    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1
    assert glue.recorder.logins == []
    assert not glue.reactor.getDelayedCalls()


def test_after_the_splice_a_client_gone_closes_the_backend(glue: Glue) -> None:
    login_in_flight(glue)
    glue.watcher.will("server_data", LoginSucceeded("alice", "LOGIN"), Splice())
    glue.backend_protocol.dataReceived(b"a OK\r\n")
    assert glue.backend.producer is glue.client
    assert glue.client.producer is glue.backend
    glue.client_leaves()
    assert glue.watcher.fed[-1][0] == "server_data"  # no client_closed after the splice
    assert glue.backend.producer is None  # else a TLS backend would not close before the abort
    assert glue.backend.disconnecting
    glue.backend_leaves()
    assert len(glue.lines("connection.close")) == 1


def test_after_the_splice_a_backend_gone_closes_the_client(glue: Glue) -> None:
    login_in_flight(glue)
    glue.watcher.will("server_data", LoginSucceeded("alice", "LOGIN"), Splice())
    glue.backend_protocol.dataReceived(b"a OK\r\n")
    glue.client.pauseProducing()  # the backend's buffer was full: the client was throttled
    glue.backend_leaves()
    assert glue.client.producer is None  # else a TLS client would not close before the abort
    assert glue.client.producerState == "producing"  # so it can read the client's close_notify
    assert glue.client.disconnecting
    assert glue.lines("connection.close") == []
    glue.client_leaves()
    assert len(glue.lines("connection.close")) == 1


# --- the real daemon in front of the real Dovecot -------------------------------------


def haproxy_listener(daemon: Daemon, dovecot: Dovecot, protocol: str) -> int:
    # PROXY v2 to Dovecot, so that its log names each test's own source address.
    port = dovecot.ports.pop3_haproxy if protocol == "pop3" else dovecot.ports.imap_haproxy
    return daemon.listener(
        protocol,
        protocol=protocol,
        backend=f"127.0.0.1:{port}",
        proxy_protocol_out="v2",
    )


def dovecot_login(dovecot: Dovecot, source: str) -> str:
    def probe() -> str | None:
        for line in dovecot.log_text().splitlines():
            if "Login: user=<alice>" in line and f"rip={source}," in line:
                return line
        return None

    return wait_for(f"Dovecot's Login line for {source}", probe)


def leave(client: socket.socket, how: str) -> None:
    if how == "close":
        client.close()
        return
    client.shutdown(socket.SHUT_WR)  # nc -N
    client.settimeout(30)
    while client.recv(65536):
        pass  # whatever comes, the proxy then closes
    client.close()


class Leaving(NamedTuple):
    protocol: str
    source: str
    before: bytes  # sent and answered first
    login: bytes  # sent, and then the client leaves
    how: str


IMAP_LOGIN = b"a LOGIN alice alice-secret\r\n"
IMAP_SASL_IR = b"a AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==\r\n"
POP3_PASS = b"PASS alice-secret\r\n"


@pytest.mark.parametrize(
    "case",
    [
        Leaving("imap", "127.0.3.1", b"", IMAP_LOGIN, "close"),
        Leaving("imap", "127.0.3.2", b"", IMAP_LOGIN, "half-close"),
        Leaving("imap", "127.0.3.3", b"", IMAP_SASL_IR, "close"),
        Leaving("imap", "127.0.3.4", b"", IMAP_SASL_IR, "half-close"),
        Leaving("pop3", "127.0.3.5", b"USER alice\r\n", POP3_PASS, "close"),
        Leaving("pop3", "127.0.3.6", b"USER alice\r\n", POP3_PASS, "half-close"),
    ],
    ids=lambda case: (
        f"{case.protocol}-{case.login.split()[case.protocol == 'imap'].decode()}-{case.how}"
    ),
)
def test_a_login_sent_just_before_the_client_leaves_is_recorded(
    daemon: Daemon, dovecot: Dovecot, case: Leaving
) -> None:
    source = case.source
    port = haproxy_listener(daemon, dovecot, case.protocol)
    daemon.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    reader = client.makefile("rb")
    assert reader.readline().startswith(b"+OK" if case.protocol == "pop3" else b"* OK")
    if case.before:
        client.sendall(case.before)
        assert reader.readline().startswith(b"+OK")
    client.sendall(case.login)
    reader.close()
    leave(client, case.how)

    daemon.wait_for_record(source)
    assert "Login:" in dovecot_login(dovecot, source)
    success = daemon.wait_for_log("login.success", f"client={source} ")
    assert "user=alice" in success
    close = daemon.wait_for_log("connection.close", f"client={source} ")
    log = daemon.log().splitlines()
    assert log.index(success) < log.index(close)
    closes = daemon.log_lines("connection.close")
    assert [line for line in closes if f"client={source} " in line] == [close]
    assert "alice-secret" not in daemon.log()


def test_a_login_sent_before_the_greeting_then_half_close_is_recorded(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    """``printf 'a LOGIN ...' | nc -N``: the command is in before the backend said hello."""
    port = haproxy_listener(daemon, dovecot, "imap")
    daemon.start()
    source = "127.0.3.30"
    client = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    client.sendall(b"a LOGIN alice alice-secret\r\n")
    leave(client, "half-close")
    daemon.wait_for_record(source)
    assert "Login:" in dovecot_login(dovecot, source)
    daemon.wait_for_log("connection.close", f"client={source} ")
