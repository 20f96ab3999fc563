"""The real Dovecot of demo/dovecot.py, talked to directly (no proxy): the fixture the
integration tests and benchmarks stand on must itself be proven to behave like a server."""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.dovecot import DEMO_USERS, DOVECOT, Dovecot, DovecotUser, running_dovecot

pytestmark = [
    pytest.mark.skipif(not Path(DOVECOT).exists(), reason="dovecot is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot as configured here starts as root"),
]

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

ALICE = DEMO_USERS[0]
# Users of their own for the tests that change a mailbox, so the others see a fixed INBOX.
CAROL = DovecotUser("carol", "carol-secret")
DAVE = DovecotUser("dave", "dave-secret")
WRONG = "not-the-password"
HOST = "127.0.0.1"
CURLE_LOGIN_DENIED = 67

MESSAGE = (
    b"From: fixture@example.org\r\nTo: alice@example.org\r\nSubject: hello\r\n\r\nHello, Alice.\r\n"
)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    users = (*DEMO_USERS, CAROL, DAVE)
    with running_dovecot(tmp_path_factory.mktemp("dovecot"), users) as server:
        server.deliver(ALICE.name, MESSAGE)
        yield server


def tls_context(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.ca_certificate))


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """curl, output as bytes (messages keep their CRLF)."""
    assert CURL is not None
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "30", *args],
        capture_output=True,
        timeout=60,
    )


def pop3_count(dovecot: Dovecot, user: DovecotUser) -> int:
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    try:
        client.user(user.name)
        client.pass_(user.password)
        return client.stat()[0]
    finally:
        client.quit()


# -- POP3 ---------------------------------------------------------------------------------


@needs_curl
def test_curl_pop3_lists_messages(dovecot: Dovecot) -> None:
    result = curl(f"pop3://{HOST}:{dovecot.ports.pop3}/", "-u", f"{ALICE.name}:{ALICE.password}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"1 {len(MESSAGE)}".encode()


@needs_curl
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_pop3_sasl(dovecot: Dovecot, mechanism: str) -> None:
    result = curl(
        f"pop3://{HOST}:{dovecot.ports.pop3}/1",
        "-u",
        f"{ALICE.name}:{ALICE.password}",
        "--login-options",
        f"AUTH={mechanism}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == MESSAGE
    dovecot.wait_for_log(f"pop3-login: Info: Login: user=<{ALICE.name}>, method={mechanism},")


@needs_curl
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_imap_sasl(dovecot: Dovecot, mechanism: str) -> None:
    result = curl(
        f"imap://{HOST}:{dovecot.ports.imap}/INBOX;UID=1",
        "-u",
        f"{ALICE.name}:{ALICE.password}",
        "--login-options",
        f"AUTH={mechanism}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == MESSAGE
    dovecot.wait_for_log(f"imap-login: Info: Login: user=<{ALICE.name}>, method={mechanism},")


@needs_curl
@pytest.mark.parametrize("mechanism", ["", "PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("scheme", ["pop3", "imap"])
def test_curl_wrong_password_is_denied(dovecot: Dovecot, scheme: str, mechanism: str) -> None:
    port = dovecot.ports.pop3 if scheme == "pop3" else dovecot.ports.imap
    options = ["--login-options", f"AUTH={mechanism}"] if mechanism else []
    result = curl(f"{scheme}://{HOST}:{port}/", "-u", f"{ALICE.name}:{WRONG}", *options)
    assert result.returncode == CURLE_LOGIN_DENIED, (result.returncode, result.stderr)


def test_poplib_user_pass(dovecot: Dovecot) -> None:
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    assert "STLS" in client.capa()
    client.user(ALICE.name)
    assert client.pass_(ALICE.password).startswith(b"+OK")
    assert client.stat() == (1, len(MESSAGE))
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
    client.quit()


def test_poplib_apop(dovecot: Dovecot) -> None:
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    assert client.apop(ALICE.name, ALICE.password).startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()
    dovecot.wait_for_log(f"Login: user=<{ALICE.name}>, method=APOP,")


def test_poplib_wrong_password(dovecot: Dovecot) -> None:
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    client.user(ALICE.name)
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        client.pass_(WRONG)
    client.quit()
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        client.apop(ALICE.name, WRONG)
    client.close()
    dovecot.wait_for_log(f"passwd-file({ALICE.name},{HOST},")  # auth_verbose: the failure


def test_poplib_implicit_tls_with_ca(dovecot: Dovecot) -> None:
    client = poplib.POP3_SSL(HOST, dovecot.ports.pop3s, context=tls_context(dovecot), timeout=10)
    client.user(ALICE.name)
    client.pass_(ALICE.password)
    assert client.stat()[0] == 1
    client.quit()


def test_poplib_stls_with_ca(dovecot: Dovecot) -> None:
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
    client.stls(tls_context(dovecot))
    client.user(ALICE.name)
    client.pass_(ALICE.password)
    assert client.stat()[0] == 1
    client.quit()


def test_tls_verification_fails_without_the_ca(dovecot: Dovecot) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(HOST, dovecot.ports.pop3s, context=ssl.create_default_context())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(dovecot: Dovecot) -> None:
    def handshake(maximum: ssl.TLSVersion) -> str | None:
        context = tls_context(dovecot)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
        with (
            socket.create_connection((HOST, dovecot.ports.pop3s), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=HOST) as tls,
        ):
            return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(ssl.TLSVersion.TLSv1_1)


# -- IMAP ---------------------------------------------------------------------------------


@needs_curl
def test_curl_imap_and_imaps_with_ca(dovecot: Dovecot) -> None:
    credentials = ["-u", f"{ALICE.name}:{ALICE.password}"]
    plain = curl(f"imap://{HOST}:{dovecot.ports.imap}/", *credentials)
    assert plain.returncode == 0, plain.stderr
    assert b"INBOX" in plain.stdout
    starttls = curl(
        f"imap://{HOST}:{dovecot.ports.imap}/",
        "--ssl-reqd",
        "--cacert",
        str(dovecot.ca_certificate),
        *credentials,
    )
    assert starttls.returncode == 0, starttls.stderr
    for name in ("localhost", HOST):
        implicit = curl(
            f"imaps://{name}:{dovecot.ports.imaps}/INBOX;UID=1",
            "--cacert",
            str(dovecot.ca_certificate),
            *credentials,
        )
        assert implicit.returncode == 0, implicit.stderr
        assert implicit.stdout == MESSAGE
    pop3s = curl(
        f"pop3s://{HOST}:{dovecot.ports.pop3s}/",
        "--cacert",
        str(dovecot.ca_certificate),
        *credentials,
    )
    assert pop3s.returncode == 0, pop3s.stderr


def test_imaplib_login_and_authenticate(dovecot: Dovecot) -> None:
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    assert "STARTTLS" in client.capabilities
    assert client.login(ALICE.name, ALICE.password)[0] == "OK"
    assert client.select("INBOX") == ("OK", [b"1"])
    client.logout()
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    assert client.login_cram_md5(ALICE.name, ALICE.password)[0] == "OK"
    client.logout()
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    response = f"\0{ALICE.name}\0{ALICE.password}".encode()
    assert client.authenticate("PLAIN", lambda _challenge: response)[0] == "OK"
    client.logout()


def test_imaplib_tls_with_ca(dovecot: Dovecot) -> None:
    implicit = imaplib.IMAP4_SSL(
        HOST, dovecot.ports.imaps, ssl_context=tls_context(dovecot), timeout=10
    )
    assert implicit.login(ALICE.name, ALICE.password)[0] == "OK"
    implicit.logout()
    starttls = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    starttls.starttls(tls_context(dovecot))
    assert starttls.login(ALICE.name, ALICE.password)[0] == "OK"
    starttls.logout()


def test_imaplib_wrong_password(dovecot: Dovecot) -> None:
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(ALICE.name, WRONG)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login_cram_md5(ALICE.name, WRONG)
    client.logout()


def test_failures_do_not_slow_down_later_logins(dovecot: Dovecot) -> None:
    """Auth penalties are off: failed logins from 127.0.0.1 do not delay the next ones."""
    started = time.monotonic()
    for _ in range(4):
        client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=10)
        client.user(ALICE.name)
        with pytest.raises(poplib.error_proto):
            client.pass_(WRONG)
        client.quit()
    assert pop3_count(dovecot, ALICE) == 1
    assert time.monotonic() - started < 5  # with penalties: 2 + 4 + 8 + 15 s


# -- delivery -----------------------------------------------------------------------------


def test_deliver_is_seen_by_pop3_and_imap(dovecot: Dovecot) -> None:
    before = pop3_count(dovecot, CAROL)
    message = b"Subject: delivered\n\nbody line\n"
    dovecot.deliver(CAROL.name, message)
    assert pop3_count(dovecot, CAROL) == before + 1
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    client.login(CAROL.name, CAROL.password)
    status, data = client.select("INBOX", readonly=True)
    assert (status, data) == ("OK", [str(before + 1).encode()])
    status, fetched = client.fetch(str(before + 1), "(BODY.PEEK[])")
    assert status == "OK"
    first = fetched[0]
    assert isinstance(first, tuple)
    assert first[1] == message.replace(b"\n", b"\r\n")
    client.logout()


def test_deliver_wakes_imap_idle(dovecot: Dovecot) -> None:
    client = imaplib.IMAP4(HOST, dovecot.ports.imap, timeout=10)
    client.login(CAROL.name, CAROL.password)
    exists = int(client.select("INBOX")[1][0] or b"0")
    assert "IDLE" in client.capabilities
    client.send(b"i1 IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    dovecot.deliver(CAROL.name, b"Subject: wake up\r\n\r\nidle\r\n")
    deadline = time.monotonic() + 10
    while True:
        line = client.readline()  # socket timeout 10 s: a missed wake-up fails, not hangs
        if line == f"* {exists + 1} EXISTS\r\n".encode():
            break
        assert time.monotonic() < deadline, "IDLE saw no new message"
    client.send(b"DONE\r\n")
    while not client.readline().startswith(b"i1 OK"):
        pass
    client.logout()


def test_retr_of_a_20_megabyte_message(dovecot: Dovecot) -> None:
    body = b"".join(b"%07d " % n + b"x" * 70 + b"\r\n" for n in range(20 * 1024 * 1024 // 80))
    message = b"Subject: big\r\n\r\n" + body
    dovecot.deliver(DAVE.name, message)
    client = poplib.POP3(HOST, dovecot.ports.pop3, timeout=30)
    client.user(DAVE.name)
    client.pass_(DAVE.password)
    count, size = client.stat()
    assert size >= len(message) >= 20 * 1024 * 1024
    lines = client.retr(count)[1]
    assert b"\r\n".join(lines) + b"\r\n" == message
    client.quit()


# -- PROXY protocol -----------------------------------------------------------------------


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {line!r}"
        line += chunk
    return line


def test_proxy_v1_header_shows_the_real_client_in_the_log(dovecot: Dovecot) -> None:
    with socket.create_connection((HOST, dovecot.ports.pop3_haproxy), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.99 127.0.0.1 5555 110\r\n")
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(f"USER {ALICE.name}\r\n".encode())
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(f"PASS {ALICE.password}\r\n".encode())
        assert read_line(sock).startswith(b"+OK Logged in")
        sock.sendall(b"QUIT\r\n")
        assert read_line(sock).startswith(b"+OK")
    line = dovecot.wait_for_log("rip=192.0.2.99")
    assert f"Login: user=<{ALICE.name}>" in line


def test_proxy_v2_header_to_imap(dovecot: Dovecot) -> None:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton("198.51.100.7") + socket.inet_aton(HOST)
    addresses += struct.pack("!HH", 40000, 143)
    header = signature + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses
    with socket.create_connection((HOST, dovecot.ports.imap_haproxy), timeout=10) as sock:
        sock.sendall(header)
        assert read_line(sock).startswith(b"* OK")
        sock.sendall(f"a LOGIN {ALICE.name} {ALICE.password}\r\n".encode())
        while not (reply := read_line(sock)).startswith(b"a "):
            pass
        assert reply.startswith(b"a OK")
        sock.sendall(b"b LOGOUT\r\n")
    logged = dovecot.wait_for_log("rip=198.51.100.7")
    assert "imap-login: Info: Login:" in logged


def test_haproxy_listener_refuses_a_connection_without_header(dovecot: Dovecot) -> None:
    with socket.create_connection((HOST, dovecot.ports.pop3_haproxy), timeout=10) as sock:
        sock.sendall(b"USER alice\r\n")
        try:
            received = sock.recv(100)
        except ConnectionResetError:
            received = b""
        assert received == b""  # Dovecot hangs up on a missing/invalid header


# -- instances ----------------------------------------------------------------------------


def test_second_instance_with_a_long_path_starts_and_stops(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    directory = tmp_path.joinpath(*["a-rather-long-directory-name"] * 3)
    second = Dovecot(directory, [DovecotUser("erin", "erin-secret")])
    with second:
        assert set(vars(second.ports).values()).isdisjoint(vars(dovecot.ports).values())
        assert second.base_dir != dovecot.base_dir
        assert pop3_count(second, DovecotUser("erin", "erin-secret")) == 0
        private = second.base_dir
        assert not private.is_relative_to(directory)  # sun_path is too short for it
    assert not second.running
    assert not private.exists()
    assert pop3_count(dovecot, ALICE) == 1  # the first instance is untouched
