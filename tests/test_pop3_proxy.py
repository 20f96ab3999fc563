"""relayproxy in front of a real Dovecot, driven by clients nobody here wrote.

Each client logs in from its own loopback address (curl --interface,
poplib source_address), so relayers.db tells clients apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import poplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.dovecot import Dovecot
from relayproxy.store import RelayStore
from tests.daemon import Daemon, Listener, free_port, wait_for

CURL = ["curl", "--silent", "--show-error", "--max-time", "30"]


def pop3_listener(daemon: Daemon, dovecot: Dovecot, **settings: str) -> int:
    base = {"protocol": "pop3", "backend": f"127.0.0.1:{dovecot.ports.pop3}"}
    return daemon.listener("pop3", **{**base, **settings})


def tls_listener(dovecot: Dovecot) -> dict[str, str]:
    # The proxy's own certificate: the same test CA signed one for localhost.
    return {
        "certificate": str(dovecot.server_certificate),
        "private_key": str(dovecot.server_key),
    }


class POP3From(poplib.POP3):
    """poplib's client, from a chosen loopback address (it has no source_address)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


def curl(source: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CURL, "--interface", source, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("source", "options", "mechanism"),
    [
        ("127.0.0.21", ["--login-options", "AUTH=PLAIN"], "PLAIN"),
        ("127.0.0.22", ["--login-options", "AUTH=LOGIN"], "LOGIN"),
        ("127.0.0.23", ["--login-options", "AUTH=CRAM-MD5"], "CRAM-MD5"),
        ("127.0.0.24", ["--login-options", "AUTH=+APOP"], "APOP"),
        ("127.0.0.25", ["--sasl-ir", "--login-options", "AUTH=PLAIN"], "PLAIN"),
    ],
)
def test_curl_logins_are_recorded(
    daemon: Daemon, dovecot: Dovecot, source: str, options: list[str], mechanism: str
) -> None:
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    result = curl(source, *options, "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    seconds = int(daemon.wait_for_record(source))
    assert abs(seconds - time.time()) < 60
    line = daemon.wait_for_log("login.success", f"client={source}")
    assert f"user=alice mechanism={mechanism} listener=pop3 record=queued" in line
    # A wrong password from another address: refused, logged, not recorded.
    other = source[:-1] + str(int(source[-1]) + 5)
    failed = curl(other, *options, "-u", "alice:wrong", f"pop3://127.0.0.1:{port}/")
    assert failed.returncode != 0
    daemon.wait_for_log("login.failure", f"client={other} user=alice")
    assert other not in daemon.entries()
    assert "alice-secret" not in daemon.log()
    assert "wrong" not in daemon.log()


def test_poplib_user_pass_and_apop(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    client = POP3From("127.0.0.1", port, "127.0.0.31")
    client.user("bob")
    assert daemon.entries() == {}  # +OK to USER is not a login
    client.pass_("bob-secret")
    client.quit()
    apop = POP3From("127.0.0.1", port, "127.0.0.32")
    apop.apop("alice", "alice-secret")
    apop.quit()
    bad = POP3From("127.0.0.1", port, "127.0.0.33")
    bad.user("bob")
    with pytest.raises(poplib.error_proto):
        bad.pass_("nope")
    bad.quit()
    daemon.wait_for_record("127.0.0.31")
    daemon.wait_for_record("127.0.0.32")
    daemon.wait_for_log("login.failure", "client=127.0.0.33 user=bob mechanism=USER")
    assert "127.0.0.33" not in daemon.entries()
    assert daemon.wait_for_log("login.success", "client=127.0.0.31").count("user=bob") == 1


def test_stls_and_pop3s_are_terminated_by_the_proxy(daemon: Daemon, dovecot: Dovecot) -> None:
    starttls = pop3_listener(daemon, dovecot, tls="starttls", **tls_listener(dovecot))
    implicit = daemon.listener(
        "pop3s",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        tls="implicit",
        **tls_listener(dovecot),
    )
    daemon.start()
    ca = str(dovecot.ca_certificate)
    result = curl(
        "127.0.0.41",
        "--ssl-reqd",
        "--cacert",
        ca,
        "-u",
        "alice:alice-secret",
        f"pop3://localhost:{starttls}/",
    )
    assert result.returncode == 0, result.stderr
    result = curl(
        "127.0.0.42", "--cacert", ca, "-u", "bob:bob-secret", f"pop3s://localhost:{implicit}/"
    )
    assert result.returncode == 0, result.stderr
    context = ssl.create_default_context(cafile=ca)
    client = POP3From("localhost", starttls, "127.0.0.43")
    assert "STLS" in client.capa()
    client.stls(context)
    client.user("alice")
    client.pass_("alice-secret")
    client.quit()
    for source in ("127.0.0.41", "127.0.0.42", "127.0.0.43"):
        daemon.wait_for_record(source)


def test_backend_starttls_and_implicit_tls(daemon: Daemon, dovecot: Dovecot) -> None:
    ca = str(dovecot.ca_certificate)
    starttls = pop3_listener(daemon, dovecot, backend_tls="starttls", backend_ca=ca)
    implicit = daemon.listener(
        "backend-pop3s",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3s}",
        backend_tls="implicit",
        backend_ca=ca,
    )
    daemon.start()
    for source, port in (("127.0.0.51", starttls), ("127.0.0.52", implicit)):
        result = curl(source, "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/")
        assert result.returncode == 0, result.stderr
        daemon.wait_for_record(source)


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_a_proxy_header_goes_in_clear_before_the_backends_tls_handshake(
    daemon: Daemon, dovecot: Dovecot, protocol: str
) -> None:
    backend = dovecot.ports.pop3s_haproxy if protocol == "pop3" else dovecot.ports.imaps_haproxy
    port = daemon.listener(
        "backend-tls-header",
        protocol=protocol,
        backend=f"127.0.0.1:{backend}",
        backend_tls="implicit",
        backend_ca=str(dovecot.ca_certificate),
        proxy_protocol_out="v2",
    )
    daemon.start()
    source = "127.0.0.53" if protocol == "pop3" else "127.0.0.54"
    result = curl(source, "-u", "alice:alice-secret", f"{protocol}://127.0.0.1:{port}/")
    assert result.returncode == 0, result.stderr
    daemon.wait_for_record(source)
    # Dovecot (haproxy = yes, ssl = yes) read the header, then the handshake.
    assert f"rip={source}," in dovecot.wait_for_log(f"rip={source},")


def test_stls_injection_does_not_reach_the_backend(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot, tls="starttls", **tls_listener(dovecot))
    daemon.start()
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    raw.sendall(b"STLS\r\nUSER alice\r\n")  # one write: the USER rides along in the clear
    assert reader.readline() == b"+OK Begin TLS negotiation\r\n"
    context = ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls_reader = tls.makefile("rb")
    tls.sendall(b"PASS alice-secret\r\n")
    # Had "USER alice" reached Dovecot, this PASS would log alice in.
    assert tls_reader.readline().startswith(b"-ERR")
    tls.sendall(b"QUIT\r\n")
    assert tls_reader.readline().startswith(b"+OK")
    tls.close()
    assert daemon.entries() == {}
    assert daemon.log_lines("login.success") == []


def test_require_tls_refuses_and_hides_logins_before_tls(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(
        daemon, dovecot, tls="starttls", require_tls="yes", **tls_listener(dovecot)
    )
    daemon.start()
    client = POP3From("localhost", port, "127.0.0.61")
    capabilities = client.capa()
    assert "STLS" in capabilities
    assert "USER" not in capabilities
    assert "SASL" not in capabilities
    with pytest.raises(poplib.error_proto, match="TLS required"):
        client.user("alice")
    client.stls(ssl.create_default_context(cafile=str(dovecot.ca_certificate)))
    assert "USER" in client.capa()
    client.user("alice")
    client.pass_("alice-secret")
    client.quit()
    daemon.wait_for_record("127.0.0.61")
    # curl asked to require TLS on this listener works as well.
    result = curl(
        "127.0.0.62",
        "--ssl-reqd",
        "--cacert",
        str(dovecot.ca_certificate),
        "-u",
        "bob:bob-secret",
        f"pop3://localhost:{port}/",
    )
    assert result.returncode == 0, result.stderr
    daemon.wait_for_record("127.0.0.62")


def test_a_20_mb_retr_is_byte_identical_through_the_proxy(
    daemon: Daemon, dovecot: Dovecot, tmp_path: Path
) -> None:
    line = b"x" * 998 + b"\r\n"
    body = b"".join(
        (b".dot-stuffed " if i % 997 == 0 else b"") + line for i in range(21 * 1024 * 1024 // 1000)
    )
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + body
    dovecot.deliver("bob", message)
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    through = tmp_path / "through"
    direct = tmp_path / "direct"
    for target, url in (
        (through, f"127.0.0.1:{port}"),
        (direct, f"127.0.0.1:{dovecot.ports.pop3}"),
    ):
        listing = curl("127.0.0.71", "-u", "bob:bob-secret", f"pop3://{url}/")
        number = listing.stdout.split()[-2]  # the newest message
        result = curl(
            "127.0.0.71", "-u", "bob:bob-secret", "-o", str(target), f"pop3://{url}/{number}"
        )
        assert result.returncode == 0, result.stderr
    assert through.stat().st_size >= 20 * 1024 * 1024
    assert (
        hashlib.sha256(through.read_bytes()).digest()
        == hashlib.sha256(direct.read_bytes()).digest()
    )
    assert through.read_bytes().replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))


def test_a_backend_that_is_down_gets_an_error_not_a_hang(daemon: Daemon) -> None:
    dead = free_port()
    port = daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dead}")
    daemon.start()
    with pytest.raises(poplib.error_proto, match="backend unavailable"):
        poplib.POP3("127.0.0.1", port, timeout=30)
    daemon.wait_for_log("backend.unreachable", f"backend=127.0.0.1:{dead}")


def test_logins_go_on_while_the_store_is_locked_and_are_all_recorded_after(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    RelayStore(daemon.db).record([("192.0.2.1", 1)])
    holder = os.open(daemon.db, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as makemap would while rebuilding
    try:
        sources = [f"127.0.0.{n}" for n in range(81, 86)]
        for source in sources[:2]:
            assert (
                curl(source, "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/").returncode
                == 0
            )
        # The first write waits out its lock deadline (10 s) and fails; the proxy goes on.
        daemon.wait_for_log("store.error", "could not get the exclusive lock")
        for source in sources[2:]:
            assert curl(source, "-u", "bob:bob-secret", f"pop3://127.0.0.1:{port}/").returncode == 0
    finally:
        os.close(holder)
    for source in sources:
        daemon.wait_for_record(source)
    daemon.wait_for_log("store.recovered")
    assert len(daemon.log_lines("store.error")) == 1  # once per burst, not once per retry


def test_pending_records_are_written_at_sigterm(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot)
    daemon.store_settings["lock_timeout"] = "30"
    daemon.start()
    RelayStore(daemon.db).record([("192.0.2.1", 1)])
    holder = os.open(daemon.db, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert (
            curl("127.0.0.91", "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/").returncode
            == 0
        )
        daemon.wait_for_log("login.success", "client=127.0.0.91")
        assert daemon.process is not None
        daemon.process.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.process.wait(timeout=1)  # still waiting to write, not gone
    finally:
        os.close(holder)
    assert daemon.stop() == 0
    assert "127.0.0.91" in daemon.entries()


def test_proxy_protocol_from_a_trusted_peer_gives_the_client_address(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3_listener(daemon, dovecot, proxy_protocol_in="127.0.0.0/8")
    daemon.start()
    for header in (
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 110\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + bytes([198, 51, 100, 8, 127, 0, 0, 1])
        + (40000).to_bytes(2, "big")
        + (110).to_bytes(2, "big"),
    ):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        for byte in header:  # a header cut at every byte still parses
            raw.sendall(bytes([byte]))
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        raw.sendall(b"USER alice\r\nPASS alice-secret\r\nQUIT\r\n")
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"+OK")
        raw.close()
    daemon.wait_for_record("198.51.100.7")
    daemon.wait_for_record("198.51.100.8")
    assert "127.0.0.1" not in daemon.entries()


def test_a_proxy_header_from_an_untrusted_peer_closes_the_connection(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    port = pop3_listener(daemon, dovecot, proxy_protocol_in="192.0.2.0/24")
    daemon.start()
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(
        b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 110\r\nUSER alice\r\nPASS alice-secret\r\n"
    )
    received = b""
    while chunk := raw.recv(4096):
        received += chunk
    raw.close()
    assert b"+OK Logged in" not in received
    daemon.wait_for_log("connection.rejected", "PROXY header from an untrusted peer")
    assert daemon.entries() == {}


def test_proxy_protocol_out_shows_dovecot_the_real_client(daemon: Daemon, dovecot: Dovecot) -> None:
    sources = {"v1": "127.0.0.101", "v2": "127.0.0.102"}
    ports = {
        version: daemon.listener(
            f"pop3-{version}",
            protocol="pop3",
            backend=f"127.0.0.1:{dovecot.ports.pop3_haproxy}",
            proxy_protocol_out=version,
        )
        for version in sources
    }
    daemon.start()
    for version, source in sources.items():
        port = ports[version]
        result = curl(source, "-u", "bob:bob-secret", f"pop3://127.0.0.1:{port}/")
        assert result.returncode == 0, result.stderr
        daemon.wait_for_record(source)
        assert f"rip={source}" in dovecot.wait_for_log(f"rip={source}")


def test_excluded_networks_are_relayed_but_not_recorded(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot)
    daemon.extra = "[record]\nexclude = 127.0.0.110/31\n"
    daemon.start()
    assert (
        curl("127.0.0.111", "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/").returncode == 0
    )
    assert (
        curl("127.0.0.112", "-u", "alice:alice-secret", f"pop3://127.0.0.1:{port}/").returncode == 0
    )
    daemon.wait_for_record("127.0.0.112")
    line = daemon.wait_for_log("login.success", "client=127.0.0.111")
    assert "record=excluded" in line
    assert "127.0.0.111" not in daemon.entries()


def test_check_config_names_file_section_key_and_problem(tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_text(
        "[listener:pop3]\nprotocol = pop3\nlisten = 127.0.0.1:1\nbackend = 127.0.0.1:2\n"
        f"tls = starttls\ncertificate = {tmp_path}/missing.pem\nprivate_key = {tmp_path}/k.pem\n"
        "colour = blue\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--check-config", "--config", str(ini)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"{ini}: [listener:pop3] colour: unknown key" in result.stderr
    ini.write_text(ini.read_text().replace("colour = blue\n", ""))
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--check-config", "--config", str(ini)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"[listener:pop3] certificate: cannot read {tmp_path}/missing.pem" in result.stderr


def test_a_listen_address_in_use_is_one_clear_line_and_exit_1(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    daemon.listeners.append(
        Listener("pop3", port, {"protocol": "pop3", "backend": f"127.0.0.1:{dovecot.ports.pop3}"})
    )
    daemon.config_path.write_text(daemon.config_text())
    result = subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    busy.close()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"relayproxy: [listener:pop3] listen 127.0.0.1:{port}: [Errno 98] Address already in use"
    ]


def test_wait_for_helper_fails_loudly() -> None:
    with pytest.raises(AssertionError, match="timed out waiting for nothing"):
        wait_for("nothing", lambda: None, timeout=0.05)


class GluedTLS:
    """TLS over memory BIOs, so the ClientHello can share a segment with the header."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, header: bytes) -> None:
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        raw.sendall(header + self.outgoing.read())
        while True:
            self.incoming.write(raw.recv(65536))
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(self.outgoing.read())
        raw.sendall(self.outgoing.read())

    def exchange(self, line: bytes) -> bytes:
        if line:
            self.tls.write(line)
            self.raw.sendall(self.outgoing.read())
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.incoming.write(self.raw.recv(65536))


def test_proxy_protocol_before_implicit_tls(daemon: Daemon, dovecot: Dovecot) -> None:
    """A TCP load balancer in front of POP3S: header in clear, then the TLS handshake."""
    port = pop3_listener(
        daemon, dovecot, tls="implicit", proxy_protocol_in="127.0.0.0/8", **tls_listener(dovecot)
    )
    daemon.start()
    context = ssl.create_default_context(cafile=str(dovecot.ca_certificate))
    header = b"PROXY TCP4 198.51.100.20 127.0.0.1 40000 995\r\n"
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(header)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    reader = tls.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    tls.sendall(b"USER alice\r\nPASS alice-secret\r\n")
    assert reader.readline().startswith(b"+OK")
    assert reader.readline().startswith(b"+OK")
    tls.close()
    # The ClientHello in the same segment as the header.
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    glued = GluedTLS(raw, context, header.replace(b".20 ", b".21 "))
    assert glued.exchange(b"").startswith(b"+OK")
    assert glued.exchange(b"USER alice\r\n").startswith(b"+OK")
    assert glued.exchange(b"PASS alice-secret\r\n").startswith(b"+OK")
    raw.close()
    daemon.wait_for_record("198.51.100.20")
    daemon.wait_for_record("198.51.100.21")


def test_connection_limits_answer_in_protocol_and_close(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot, max_connections_per_ip="2", max_connections="3")
    daemon.start()
    held = [POP3From("127.0.0.1", port, "127.0.2.1") for _ in range(2)]
    with pytest.raises(poplib.error_proto, match="too many connections"):
        POP3From("127.0.0.1", port, "127.0.2.1")  # a third from the same address
    held.append(POP3From("127.0.0.1", port, "127.0.2.2"))  # another address: fine
    with pytest.raises(poplib.error_proto, match="too many connections"):
        POP3From("127.0.0.1", port, "127.0.2.3")  # over the listener's total
    for client in held:
        client.quit()
    daemon.wait_for_log("connection.refused", "client=127.0.2.3")
    # Closed connections are counted out again.
    POP3From("127.0.0.1", port, "127.0.2.1").quit()


def test_the_login_timeout_answers_and_closes(daemon: Daemon, dovecot: Dovecot) -> None:
    port = pop3_listener(daemon, dovecot, preauth_timeout="0.5", idle_timeout="0.5")
    daemon.start()
    idle = POP3From("127.0.0.1", port, "127.0.2.10")
    assert idle.file.readline() == b"-ERR timeout waiting for login\r\n"
    assert idle.file.readline() == b""  # closed
    daemon.wait_for_log("connection.timeout", "phase=login")
    # After login the idle timeout applies instead, and ends a silent session.
    session = POP3From("127.0.0.1", port, "127.0.2.11")
    session.user("alice")
    session.pass_("alice-secret")
    assert session.file.readline() == b""
    daemon.wait_for_log("connection.timeout", "phase=idle")
