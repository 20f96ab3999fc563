"""Several backends per listener, through the real daemon to real Dovecots.

A dead backend is a loopback port nobody listens on (the connect is
refused, as it is while a Dovecot restarts); a second Dovecot of the test's
own is stopped and started again on the same ports, as an administrator
restarts a backend. Which backend served a login is what each Dovecot logs.
"""

from __future__ import annotations

import imaplib
import poplib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.dovecot import Dovecot, running_dovecot
from tests.daemon import Daemon, free_port, wait_for
from tests.test_imap_proxy import IMAP4From
from tests.test_imap_proxy import curl as imap_curl
from tests.test_pop3_proxy import POP3From
from tests.test_pop3_proxy import curl as pop3_curl

TEMPORARY = {
    "pop3": b"-ERR [SYS/TEMP] backend unavailable, try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] backend unavailable, try again later\r\n",
}


@pytest.fixture
def second_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    """A Dovecot of the test's own, to stop and start (about 1 s and 0.1 s)."""
    with running_dovecot(tmp_path / "second-dovecot") as server:
        yield server


def pop3_login(port: int, source: str, user: str = "alice") -> None:
    client = POP3From("127.0.0.1", port, source)
    client.user(user)
    client.pass_(f"{user}-secret")
    client.quit()


def logins_served(dovecot: Dovecot, user: str) -> int:
    """Logins ``dovecot`` has logged for ``user`` (its log is written asynchronously)."""
    return dovecot.log_text().count(f"Login: user=<{user}>")


def wait_for_served(dovecots: dict[str, Dovecot], user: str, counts: dict[str, int]) -> None:
    wait_for(
        f"logins of {user} counted {counts}",
        lambda: {name: logins_served(d, user) for name, d in dovecots.items()} == counts,
    )


def received_until_closed(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as client:
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    return received


def test_a_dead_first_backend_is_skipped_and_said_once_whatever_the_number_of_clients(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    pop3 = daemon.listener(
        "pop3", protocol="pop3", backends=[dead, f"127.0.0.1:{dovecot.ports.pop3}"]
    )
    imap = daemon.listener(
        "imap", protocol="imap", backends=[dead, f"127.0.0.1:{dovecot.ports.imap}"]
    )
    daemon.start()
    assert (
        pop3_curl("127.0.30.1", "-u", "bob:bob-secret", f"pop3://127.0.0.1:{pop3}/").returncode == 0
    )
    listing = imap_curl("127.0.30.2", "-u", "bob:bob-secret", f"imap://127.0.0.1:{imap}/INBOX")
    assert listing.returncode == 0, listing.stderr
    pop3_login(pop3, "127.0.30.3")
    client = IMAP4From("127.0.0.1", imap, "127.0.30.4")
    client.login("alice", "alice-secret")
    client.logout()
    # Many clients at once: the connects to the dead one race each other.
    sources = [f"127.0.31.{n}" for n in range(1, 21)]
    errors: list[BaseException] = []

    def login(source: str) -> None:
        try:
            pop3_login(pop3, source)
        except BaseException as exc:  # any failure, reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=login, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for source in ["127.0.30.1", "127.0.30.2", "127.0.30.3", "127.0.30.4", *sources]:
        daemon.wait_for_record(source)
    unreachable = daemon.log_lines("backend.unreachable")
    assert len(unreachable) == 2, unreachable  # one per listener
    assert {line.split(" listener=")[1].split()[0] for line in unreachable} == {"pop3", "imap"}
    assert all(f"backend={dead} " in line and "error=" in line for line in unreachable)
    assert daemon.log_lines("connection.refused") == []
    assert len(daemon.log_lines("login.success")) == 4 + len(sources)


def test_roundrobin_spreads_clients_and_rides_out_a_backend_stopped_and_started(
    daemon: Daemon, dovecot: Dovecot, second_dovecot: Dovecot
) -> None:
    one, two = f"127.0.0.1:{dovecot.ports.pop3}", f"127.0.0.1:{second_dovecot.ports.pop3}"
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backends=[one, two],
        backend_balance="roundrobin",
        backend_retry="0.5",
    )
    daemon.start()
    dovecots = {"one": dovecot, "two": second_dovecot}
    user = "bob"  # the session's Dovecot serves other tests too: counted from here
    served = {"one": logins_served(dovecot, user), "two": 0}
    for n in range(1, 11):
        pop3_login(port, f"127.0.32.{n}", user)
    served = {"one": served["one"] + 5, "two": 5}
    wait_for_served(dovecots, user, served)

    second_dovecot.stop()
    for n in range(11, 21):
        pop3_login(port, f"127.0.32.{n}", user)
    served["one"] += 10
    wait_for_served(dovecots, user, served)
    (unreachable,) = daemon.log_lines("backend.unreachable")
    assert f"backend={two} " in unreachable
    assert daemon.log_lines("backend.recovered") == []

    second_dovecot.start(same_ports=True)
    sources = (f"127.0.33.{n}" for n in range(1, 255))

    def recovered() -> str | None:
        pop3_login(port, next(sources), user)  # one client a poll: the next after the retry
        return next(iter(daemon.log_lines("backend.recovered")), None)

    line = wait_for("backend.recovered", recovered)
    assert f"backend={two}" in line
    before = logins_served(second_dovecot, user)
    for n in range(1, 5):
        pop3_login(port, f"127.0.34.{n}", user)
    wait_for(f"two to serve again {before}", lambda: logins_served(second_dovecot, user) > before)
    assert len(daemon.log_lines("backend.unreachable")) == 1
    for n in range(1, 21):
        daemon.wait_for_record(f"127.0.32.{n}")
    logins = len(daemon.log_lines("login.success"))
    wait_for(f"{logins} records", lambda: len(daemon.entries()) == logins)


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_every_backend_down_gives_the_client_a_temporary_error_and_records_nothing(
    daemon: Daemon, protocol: str
) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    port = daemon.listener(protocol, protocol=protocol, backends=dead)
    daemon.start()
    for n in range(1, 4):
        assert received_until_closed(port, f"127.0.35.{n}") == TEMPORARY[protocol]
    if protocol == "pop3":
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] backend unavailable"):
            POP3From("127.0.0.1", port, "127.0.35.10")
    else:
        with pytest.raises(imaplib.IMAP4.error, match=r"BYE.*\[UNAVAILABLE\] backend"):
            IMAP4From("127.0.0.1", port, "127.0.35.10")
    line = daemon.wait_for_log("connection.refused", "client=127.0.35.10 ")
    assert 'reason="no backend answered"' in line
    unreachable = daemon.log_lines("backend.unreachable")
    assert sorted(line.split(" backend=")[1].split()[0] for line in unreachable) == sorted(dead)
    assert daemon.log_lines("login.success") == []
    assert daemon.entries() == {}


def test_a_reload_with_a_new_backend_list_serves_the_next_client(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    port = daemon.listener("pop3", protocol="pop3", backends=[dead])
    daemon.start()
    assert received_until_closed(port, "127.0.36.1") == TEMPORARY["pop3"]
    daemon.listeners[0].settings["backend"] = f"{dead}, 127.0.0.1:{dovecot.ports.pop3}"
    daemon.config_path.write_text(daemon.config_text())
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded")
    pop3_login(port, "127.0.36.2")
    daemon.wait_for_record("127.0.36.2")
    # The dead one is still down after the reload, not news.
    assert len(daemon.log_lines("backend.unreachable")) == 1


def test_backend_tls_verifies_the_name_of_the_backend_that_answered(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    # The certificate names localhost and 127.0.0.1; the first backend's
    # name is neither, and must not be the one checked.
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backends=[f"127.0.0.2:{free_port()}", f"localhost:{dovecot.ports.pop3s}"],
        backend_tls="implicit",
        backend_ca=str(dovecot.ca_certificate),
    )
    daemon.start()
    pop3_login(port, "127.0.37.1")
    daemon.wait_for_record("127.0.37.1")
    assert daemon.log_lines("tls.error") == []


def test_the_proxy_header_goes_to_the_backend_that_answered(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backends=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{dovecot.ports.pop3_haproxy}"],
        proxy_protocol_out="v2",
    )
    daemon.start()
    pop3_login(port, "127.0.38.1", "bob")
    daemon.wait_for_record("127.0.38.1")
    # Dovecot's haproxy listener names the client the header carried.
    dovecot.wait_for_log("rip=127.0.38.1,")
