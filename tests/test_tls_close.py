"""A TLS session ends when the backend ends it, not at the close grace abort.

After a login the two transports are each other's producer, and Twisted's
TLS layer sends close_notify only once no producer is registered: before
the fix a client that sent QUIT/LOGOUT got neither close_notify nor FIN
until ``CLOSE_GRACE`` (10 s) had passed (mbsync: 10 s per sync). Real
Dovecot, the real daemon, Python's ``ssl`` and ``openssl s_client``.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from demo.dovecot import Dovecot
from relayproxy.proxy import CLOSE_GRACE
from tests.conftest import s_client
from tests.daemon import Daemon, wait_for

# Well below CLOSE_GRACE, and far above a loopback round trip.
PROMPT = 3.0

LOGIN = {"pop3": b"USER alice\r\nPASS alice-secret\r\n", "imap": b"a1 LOGIN alice alice-secret\r\n"}
LOGGED_IN = {"pop3": b"+OK Logged in", "imap": b"a1 OK"}
GOODBYE = {"pop3": b"QUIT\r\n", "imap": b"a2 LOGOUT\r\n"}
GOODBYE_ANSWER = {"pop3": b"+OK Logging out", "imap": b"a2 OK"}
STARTTLS = {"pop3": (b"STLS\r\n", b"+OK"), "imap": (b"a0 STARTTLS\r\n", b"a0 OK")}


def listener(daemon: Daemon, dovecot: Dovecot, protocol: str, tls: str) -> int:
    plain = dovecot.ports.pop3 if protocol == "pop3" else dovecot.ports.imap
    return daemon.listener(
        f"{protocol}-{tls}",
        protocol=protocol,
        backend=f"127.0.0.1:{plain}",
        tls=tls,
        certificate=str(dovecot.server_certificate),
        private_key=str(dovecot.server_key),
    )


def read_until(stream: ssl.SSLSocket | socket.socket, marker: bytes) -> bytes:
    """Bytes up to and including the line that starts with ``marker``."""
    received = b""
    while not any(line.startswith(marker) for line in received.split(b"\r\n")[:-1]):
        chunk = stream.recv(65536)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk
    return received


def tls_client(
    port: int, source: str, protocol: str, tls: str, context: ssl.SSLContext
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    if tls == "starttls":
        read_until(raw, b"+OK" if protocol == "pop3" else b"* OK")
        command, answer = STARTTLS[protocol]
        raw.sendall(command)
        read_until(raw, answer)
    client = context.wrap_socket(raw, server_hostname="localhost")
    if tls == "implicit":
        read_until(client, b"+OK" if protocol == "pop3" else b"* OK")
    return client


def close_line(daemon: Daemon, source: str) -> str | None:
    return next(
        (line for line in daemon.log_lines("connection.close") if f"client={source} " in line), None
    )


def seconds_until_eof(stream: ssl.SSLSocket | socket.socket) -> float:
    """How long until ``stream`` reads its end; fails if that takes CLOSE_GRACE."""
    stream.settimeout(CLOSE_GRACE)
    started = time.monotonic()
    try:
        rest = stream.recv(65536)
    except TimeoutError:
        pytest.fail(f"no end of stream within {CLOSE_GRACE} s")
    assert rest == b"", rest
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("protocol", "tls", "source"),
    [
        ("pop3", "implicit", "127.0.4.1"),
        ("imap", "implicit", "127.0.4.2"),
        ("pop3", "starttls", "127.0.4.3"),
        ("imap", "starttls", "127.0.4.4"),
    ],
)
def test_quit_after_login_closes_the_tls_session_at_once(
    daemon: Daemon, dovecot: Dovecot, protocol: str, tls: str, source: str
) -> None:
    port = listener(daemon, dovecot, protocol, tls)
    daemon.start()
    context = ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    client = tls_client(port, source, protocol, tls, context)
    client.sendall(LOGIN[protocol])
    read_until(client, LOGGED_IN[protocol])
    client.sendall(GOODBYE[protocol])
    read_until(client, GOODBYE_ANSWER[protocol])
    # close_notify from the proxy: the TLS layer reads its end.
    assert seconds_until_eof(client) < PROMPT
    # Our close_notify back (the proxy's is in already), then the proxy's FIN.
    raw = client.unwrap()
    assert seconds_until_eof(raw) < PROMPT
    raw.close()
    line = wait_for("connection.close", lambda: close_line(daemon, source))
    duration = float(line.rsplit("duration=", 1)[1])
    assert duration < PROMPT, line
    daemon.wait_for_record(source)


def test_openssl_s_client_leaves_when_imaps_logs_out(daemon: Daemon, dovecot: Dovecot) -> None:
    """s_client's input stays open: only the server's close can end it, as for mbsync."""
    port = listener(daemon, dovecot, "imap", "implicit")
    daemon.start()
    client = s_client(port, dovecot.ca_certificate, "-quiet")
    assert client.stdin is not None and client.stdout is not None
    try:
        assert client.stdout.readline().startswith(b"* OK")
        client.stdin.write(b"a1 LOGIN bob bob-secret\r\na2 LOGOUT\r\n")
        client.stdin.flush()
        seen = []
        for line in client.stdout:
            seen.append(line)
            if line.startswith(b"a2 "):
                break
        assert any(line.startswith(b"a1 OK") for line in seen), seen
        started = time.monotonic()
        client.wait(timeout=CLOSE_GRACE + 5)
        elapsed = time.monotonic() - started
        assert elapsed < PROMPT
    finally:
        client.kill()
        client.wait()
        client.stdin.close()
        client.stdout.close()
    daemon.wait_for_log("login.success", "user=bob mechanism=LOGIN listener=imap-implicit")


def test_the_close_grace_abort_leaves_no_traceback(daemon: Daemon, dovecot: Dovecot) -> None:
    """A client that never answers close_notify is aborted; the backend is long gone.

    The backend is TLS too (Dovecot's POP3S): before the fix the abort also
    aborted the closed backend transport, whose TLS state Twisted had
    already dropped, and logged ``critical ... AttributeError``.
    """
    port = daemon.listener(
        "pop3s-both",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3s}",
        backend_tls="implicit",
        backend_ca=str(dovecot.ca_certificate),
        tls="implicit",
        certificate=str(dovecot.server_certificate),
        private_key=str(dovecot.server_key),
    )
    daemon.start()
    context = ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    client = tls_client(port, "127.0.4.10", "pop3", "implicit", context)
    client.sendall(LOGIN["pop3"])
    read_until(client, LOGGED_IN["pop3"])
    client.sendall(GOODBYE["pop3"])  # and then never read again, never close
    try:
        line = wait_for(
            "the session to be aborted",
            lambda: close_line(daemon, "127.0.4.10"),
            timeout=CLOSE_GRACE + 10,
        )
    finally:
        client.close()
    assert float(line.rsplit("duration=", 1)[1]) >= CLOSE_GRACE  # it did reach the abort
    log = daemon.log()
    assert " critical " not in log
    assert "Traceback" not in log
    daemon.wait_for_record("127.0.4.10")
