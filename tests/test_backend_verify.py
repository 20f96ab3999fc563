"""backend_verify fails closed: a backend whose certificate does not name it gets no login.

A second real Dovecot serves a self-signed certificate made by ``openssl
req`` for CN=localhost with no subjectAltName, and the proxy trusts exactly
that certificate (``backend_ca``). Before the fix Twisted's name check
raised service_identity's ``CertificateError`` (not the
``VerificationError`` it handles), logged it as critical and let the
handshake finish: logins went through and were recorded.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from demo.dovecot import Dovecot, running_dovecot
from tests.daemon import Daemon
from tests.test_imap_proxy import IMAP4From
from tests.test_pop3_proxy import POP3From

REFUSAL = {
    "pop3": b"-ERR [SYS/TEMP] backend unavailable, try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] backend unavailable, try again later\r\n",
}
# Sent at once on connecting, before any greeting: whatever reaches the
# backend, reaches it before the proxy could know better.
LOGIN = {"pop3": b"USER alice\r\nPASS alice-secret\r\n", "imap": b"a1 LOGIN alice alice-secret\r\n"}


@pytest.fixture(scope="module")
def nameless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A Dovecot whose certificate is self-signed, CN=localhost, without subjectAltName."""
    if shutil.which("dovecot") is None:
        pytest.skip("dovecot is not installed (make test installs it)")
    directory = tmp_path_factory.mktemp("nameless-dovecot")
    tls = directory / "tls"
    tls.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
            "-keyout",
            str(tls / "server.key"),
            "-out",
            str(tls / "server.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    shutil.copy(tls / "server.pem", tls / "ca.pem")  # Dovecot's demo wants a CA file too
    shutil.copy(tls / "server.key", tls / "ca.key")
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tls / "server.pem")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Subject Alternative Name" not in text
    with running_dovecot(directory) as server:
        yield server


def backend_port(dovecot: Dovecot, protocol: str, backend_tls: str) -> int:
    ports = dovecot.ports
    if protocol == "pop3":
        return ports.pop3s if backend_tls == "implicit" else ports.pop3
    return ports.imaps if backend_tls == "implicit" else ports.imap


def everything_until_closed(port: int, source: str, data: bytes) -> bytes:
    """What the proxy sends until it closes (or, if it never does, for 10 s)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    client.sendall(data)
    received = b""
    try:
        while chunk := client.recv(65536):
            received += chunk
    except TimeoutError:
        received += b"<still open>"
    client.close()
    return received


class Case(NamedTuple):
    protocol: str
    backend_tls: str
    host: str
    source: str


@pytest.mark.parametrize(
    "case",
    [
        Case("pop3", "implicit", "127.0.0.1", "127.0.5.1"),
        Case("pop3", "starttls", "127.0.0.1", "127.0.5.2"),
        Case("imap", "implicit", "localhost", "127.0.5.3"),
        Case("imap", "starttls", "localhost", "127.0.5.4"),
    ],
    ids=lambda case: f"{case.protocol}-{case.backend_tls}-{case.host}",
)
def test_a_certificate_that_does_not_name_the_backend_is_refused(
    daemon: Daemon, nameless: Dovecot, case: Case
) -> None:
    protocol, backend_tls, host, source = case
    port = daemon.listener(
        protocol,
        protocol=protocol,
        backend=f"{host}:{backend_port(nameless, protocol, backend_tls)}",
        backend_tls=backend_tls,
        backend_ca=str(nameless.server_certificate),
    )
    daemon.start()
    received = everything_until_closed(port, source, LOGIN[protocol])
    assert received.endswith(REFUSAL[protocol]), received
    assert b"Logged in" not in received and b"a1 OK" not in received
    errors = [line for line in daemon.log_lines("tls.error") if f"client={source} " in line]
    assert len(errors) == 1, daemon.log()
    assert "side=backend" in errors[0]
    assert f"certificate is not for {host}" in errors[0]
    assert "subjectAltName" in errors[0]
    assert daemon.log_lines("login.success") == []
    assert source not in daemon.entries()
    assert daemon.entries() == {}
    # Not a byte of the client's reached Dovecot: no login, not even the user name.
    dovecot_log = nameless.log_text()
    assert "Login:" not in dovecot_log
    assert "user=<alice>" not in dovecot_log
    assert " critical " not in daemon.log()


def test_a_backend_ca_that_did_not_sign_the_certificate_is_refused(
    daemon: Daemon, dovecot: Dovecot, nameless: Dovecot
) -> None:
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backend=f"127.0.0.1:{nameless.ports.pop3s}",
        backend_tls="implicit",
        backend_ca=str(dovecot.ca_certificate),  # another CA
    )
    daemon.start()
    received = everything_until_closed(port, "127.0.5.10", LOGIN["pop3"])
    assert received == REFUSAL["pop3"]
    line = daemon.wait_for_log("tls.error", "client=127.0.5.10 ")
    assert "side=backend" in line and "certificate verify failed" in line
    assert daemon.entries() == {}
    assert "user=<alice>" not in nameless.log_text()


@pytest.mark.parametrize(
    "case",
    [
        Case("pop3", "implicit", "localhost", "127.0.5.21"),  # subjectAltName DNS:localhost
        Case("imap", "starttls", "localhost", "127.0.5.22"),
        Case("pop3", "starttls", "127.0.0.1", "127.0.5.23"),  # subjectAltName IP:127.0.0.1
        Case("imap", "implicit", "127.0.0.1", "127.0.5.24"),
    ],
    ids=lambda case: f"{case.protocol}-{case.backend_tls}-{case.host}",
)
def test_a_certificate_that_names_the_backend_is_accepted(
    daemon: Daemon, dovecot: Dovecot, case: Case
) -> None:
    protocol, backend_tls, host, source = case
    port = daemon.listener(
        protocol,
        protocol=protocol,
        backend=f"{host}:{backend_port(dovecot, protocol, backend_tls)}",
        backend_tls=backend_tls,
        backend_ca=str(dovecot.ca_certificate),
    )
    daemon.start()
    if protocol == "pop3":
        pop = POP3From("127.0.0.1", port, source)
        pop.user("bob")
        pop.pass_("bob-secret")
        pop.quit()
    else:
        imap = IMAP4From("127.0.0.1", port, source)
        imap.login("bob", "bob-secret")
        imap.logout()
    daemon.wait_for_record(source)
    assert daemon.log_lines("tls.error") == []


def test_the_nameless_dovecot_serves_that_certificate(nameless: Dovecot) -> None:
    """The refusals above mean something only if it does."""
    served = ssl.get_server_certificate(("127.0.0.1", nameless.ports.pop3s))
    expected = nameless.server_certificate.read_text()
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(expected)
