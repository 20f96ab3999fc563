"""relayproxy's IMAP listeners in front of a real Dovecot, with real clients."""

from __future__ import annotations

import hashlib
import imaplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from demo.dovecot import Dovecot, running_dovecot
from tests.conftest import s_client
from tests.daemon import Daemon

CURL = ["curl", "--silent", "--show-error", "--max-time", "60"]


def imap_listener(daemon: Daemon, dovecot: Dovecot, name: str = "imap", **settings: str) -> int:
    base = {"protocol": "imap", "backend": f"127.0.0.1:{dovecot.ports.imap}"}
    return daemon.listener(name, **{**base, **settings})


def with_tls(dovecot: Dovecot, mode: str = "starttls") -> dict[str, str]:
    return {
        "tls": mode,
        "certificate": str(dovecot.server_certificate),
        "private_key": str(dovecot.server_key),
    }


def curl(source: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CURL, "--interface", source, *args], capture_output=True, text=True, timeout=90
    )


class IMAP4From(imaplib.IMAP4):
    """imaplib's client from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class Raw:
    """A hand-driven IMAP connection, for what no client library sends."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        )
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reader.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.reader.readline()
            assert line, f"connection closed before {tag!r}: {lines}"
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("source", "options", "mechanism"),
    [
        ("127.0.1.21", ["--login-options", "AUTH=PLAIN"], "PLAIN"),
        ("127.0.1.22", ["--login-options", "AUTH=LOGIN"], "LOGIN"),
        ("127.0.1.23", ["--login-options", "AUTH=CRAM-MD5"], "CRAM-MD5"),
        ("127.0.1.24", ["--login-options", "AUTH=PLAIN", "--sasl-ir"], "PLAIN"),
    ],
)
def test_curl_imap_logins_are_recorded(
    daemon: Daemon, dovecot: Dovecot, source: str, options: list[str], mechanism: str
) -> None:
    port = imap_listener(daemon, dovecot)
    daemon.start()
    result = curl(source, *options, "-u", "alice:alice-secret", f"imap://127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    daemon.wait_for_record(source)
    line = daemon.wait_for_log("login.success", f"client={source}")
    assert f"mechanism={mechanism} listener=imap" in line
    other = source[:-2] + str(int(source[-2:]) + 10)
    failed = curl(other, *options, "-u", "alice:wrong", f"imap://127.0.0.1:{port}/")
    assert failed.returncode != 0
    daemon.wait_for_log("login.failure", f"client={other} user=alice")
    assert other not in daemon.entries()
    assert "alice-secret" not in daemon.log()


def test_curl_imaps(daemon: Daemon, dovecot: Dovecot) -> None:
    # (curl 7.88 cannot be made to send LOGIN: its AUTH=+LOGIN option fails
    # with "URL using bad/illegal format" even against Dovecot directly; the
    # LOGIN command is covered by imaplib, openssl s_client and raw literals.)
    imaps = imap_listener(daemon, dovecot, "imaps", **with_tls(dovecot, "implicit"))
    daemon.start()
    result = curl(
        "127.0.1.42",
        "--cacert",
        str(dovecot.ca_certificate),
        "-u",
        "alice:alice-secret",
        f"imaps://localhost:{imaps}/",
    )
    assert result.returncode == 0, result.stderr
    daemon.wait_for_record("127.0.1.42")


def test_imaplib_login_authenticate_cram_md5_and_starttls(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot, **with_tls(dovecot))
    daemon.start()
    client = IMAP4From("localhost", port, "127.0.1.51")
    client.login("alice", "alice-secret")
    client.logout()
    client = IMAP4From("localhost", port, "127.0.1.52")
    client.authenticate("PLAIN", lambda _: b"\x00bob\x00bob-secret")
    client.logout()
    client = IMAP4From("localhost", port, "127.0.1.53")
    client.login_cram_md5("alice", "alice-secret")
    client.logout()
    client = IMAP4From("localhost", port, "127.0.1.54")
    assert "STARTTLS" in client.capabilities
    client.starttls(ssl.create_default_context(cafile=str(dovecot.ca_certificate)))
    assert "STARTTLS" not in client.capabilities
    client.login("bob", "bob-secret")
    client.logout()
    for source in ("127.0.1.51", "127.0.1.52", "127.0.1.53", "127.0.1.54"):
        daemon.wait_for_record(source)


def test_login_with_synchronising_and_non_synchronising_literals(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = imap_listener(daemon, dovecot)
    daemon.start()
    sync = Raw(port, "127.0.1.61")
    sync.send(b"a1 LOGIN {5}\r\n")
    assert sync.reader.readline().startswith(b"+")
    sync.send(b"alice {12}\r\n")
    assert sync.reader.readline().startswith(b"+")
    sync.send(b"alice-secret\r\n")
    assert sync.until(b"a1")[-1].startswith(b"a1 OK")
    sync.close()
    nonsync = Raw(port, "127.0.1.62")
    nonsync.send(b"a1 LOGIN {3+}\r\nbob {10+}\r\nbob-secret\r\n")
    assert nonsync.until(b"a1")[-1].startswith(b"a1 OK")
    nonsync.close()
    daemon.wait_for_record("127.0.1.61")
    daemon.wait_for_record("127.0.1.62")
    assert "user=bob mechanism=LOGIN" in daemon.wait_for_log("login.success", "127.0.1.62")


def test_openssl_s_client_starttls(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot, **with_tls(dovecot))
    daemon.start()
    client = s_client(port, dovecot.ca_certificate, "-starttls", "imap")
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"a1 LOGIN alice alice-secret\r\na2 LOGOUT\r\n")
    client.stdin.flush()
    seen = []
    for line in client.stdout:
        seen.append(line)
        if line.startswith(b"a2 OK"):
            break
    client.stdin.close()  # s_client leaves at the end of its input
    assert client.wait(timeout=30) == 0
    assert any(line.startswith(b"a1 OK") for line in seen), seen
    daemon.wait_for_log("login.success", "user=alice mechanism=LOGIN")
    assert "127.0.0.1" in daemon.entries()


def test_starttls_injection_is_dropped(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot, **with_tls(dovecot))
    daemon.start()
    raw = Raw(port, "127.0.1.71")
    raw.send(b"a0 STARTTLS\r\na1 LOGIN alice alice-secret\r\n")
    assert raw.reader.readline() == b"a0 OK Begin TLS negotiation now\r\n"
    context = ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    tls = context.wrap_socket(raw.sock, server_hostname="localhost")
    tls.sendall(b"a2 NOOP\r\n")
    answer = tls.makefile("rb").readline()
    assert answer.startswith(b"a2 OK"), answer  # never an answer to the injected a1
    tls.close()
    assert daemon.entries() == {}


def test_require_tls_says_logindisabled_and_refuses(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot, require_tls="yes", **with_tls(dovecot))
    daemon.start()
    client = IMAP4From("localhost", port, "127.0.1.81")
    assert "LOGINDISABLED" in client.capabilities
    assert not any(c.startswith("AUTH=") for c in client.capabilities)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login("alice", "alice-secret")
    client.starttls(ssl.create_default_context(cafile=str(dovecot.ca_certificate)))
    assert "LOGINDISABLED" not in client.capabilities
    client.login("alice", "alice-secret")
    client.logout()
    daemon.wait_for_record("127.0.1.81")


def test_false_records_never_happen(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot)
    daemon.start()
    sessions = {
        "127.0.1.91": b"a LOGIN alice bad\r\na NOOP\r\n",  # pipelined, same tag
        "127.0.1.92": b"a1 OK LOGIN\r\na2 NOOP\r\n",  # the client says OK itself
        "127.0.1.93": b"a1 AUTHENTICATE PLAIN\r\n*\r\na2 NOOP\r\n",  # cancelled
        "127.0.1.94": b"a1 LOGIN alice wrong\r\na2 NOOP\r\n",
    }
    for source, script in sessions.items():
        raw = Raw(port, source)
        raw.send(script)
        raw.until(b"a2" if b"a2" in script else b"a")
        if b"a NOOP" in script:
            raw.until(b"a")  # the NOOP's own OK
        raw.send(b"z LOGOUT\r\n")
        raw.until(b"z")
        raw.close()
    assert daemon.log_lines("login.success") == []
    daemon.wait_for_log("login.failure", "client=127.0.1.94")
    assert daemon.entries() == {}


def test_logout_before_login_closes_cleanly(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot)
    daemon.start()
    raw = Raw(port, "127.0.1.95")
    raw.send(b"a1 ID NIL\r\na2 LOGOUT\r\n")
    lines = raw.until(b"a2")
    assert any(line.startswith(b"* BYE") for line in lines)
    assert raw.reader.readline() == b""  # closed
    raw.close()


def test_a_20_mb_fetch_is_byte_identical_through_the_proxy(
    daemon: Daemon, dovecot: Dovecot, tmp_path: Path
) -> None:
    body = b"".join(b"%07d " % i + b"y" * 90 + b"\r\n" for i in range(21 * 1024 * 1024 // 100))
    dovecot.deliver("alice", b"From: a@example.test\r\nSubject: big imap\r\n\r\n" + body)
    port = imap_listener(daemon, dovecot)
    daemon.start()
    digests = []
    for target in (port, dovecot.ports.imap):
        client = IMAP4From("127.0.0.1", target, "127.0.1.99")
        client.login("alice", "alice-secret")
        _, data = client.select("INBOX")
        newest = data[0]
        _, fetched = client.fetch(newest, "(BODY.PEEK[])")
        message = fetched[0][1]
        assert len(message) > 20 * 1024 * 1024
        digests.append(hashlib.sha256(message).hexdigest())
        client.logout()
    assert digests[0] == digests[1]


def test_idle_is_held_open_and_woken_by_a_delivery(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(daemon, dovecot)
    daemon.start()
    raw = Raw(port, "127.0.1.100")
    raw.send(b"a1 LOGIN bob bob-secret\r\na2 SELECT INBOX\r\n")
    raw.until(b"a2")
    raw.send(b"a3 IDLE\r\n")
    assert raw.reader.readline().startswith(b"+ idling")
    dovecot.deliver("bob", b"Subject: wake up\r\n\r\nhello\r\n")
    deadline = time.monotonic() + 30
    while True:
        line = raw.reader.readline()
        if line.endswith(b" EXISTS\r\n"):
            break
        assert line and time.monotonic() < deadline, line
    raw.send(b"DONE\r\n")
    assert raw.until(b"a3")[-1].startswith(b"a3 OK")
    raw.close()
    daemon.wait_for_record("127.0.1.100")


def test_proxy_protocol_out_to_dovecot_imap(daemon: Daemon, dovecot: Dovecot) -> None:
    port = daemon.listener(
        "imap-pp",
        protocol="imap",
        backend=f"127.0.0.1:{dovecot.ports.imap_haproxy}",
        proxy_protocol_out="v2",
    )
    daemon.start()
    result = curl("127.0.1.110", "-u", "alice:alice-secret", f"imap://127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    assert "rip=127.0.1.110" in dovecot.wait_for_log("rip=127.0.1.110")
    daemon.wait_for_record("127.0.1.110")


def test_backend_starttls_for_imap(daemon: Daemon, dovecot: Dovecot) -> None:
    port = imap_listener(
        daemon, dovecot, backend_tls="starttls", backend_ca=str(dovecot.ca_certificate)
    )
    daemon.start()
    client = IMAP4From("127.0.0.1", port, "127.0.1.120")
    client.login("bob", "bob-secret")
    client.logout()
    daemon.wait_for_record("127.0.1.120")


def test_forward_id_tells_dovecot_the_real_client(daemon: Daemon, tmp_path: Path) -> None:
    """With forward_id, Dovecot (trusting the proxy) logs the client, not the proxy."""
    with running_dovecot(tmp_path / "dovecot", login_trusted="127.0.0.1/32") as trusting:
        port = daemon.listener(
            "imap-id",
            protocol="imap",
            backend=f"127.0.0.1:{trusting.ports.imap}",
            forward_id="yes",
        )
        daemon.start()
        client = IMAP4From("127.0.0.1", port, "127.0.1.130")
        client.login("alice", "alice-secret")
        client.logout()
        assert "rip=127.0.1.130" in trusting.wait_for_log("rip=127.0.1.130")
        daemon.wait_for_record("127.0.1.130")
        assert daemon.stop() == 0
