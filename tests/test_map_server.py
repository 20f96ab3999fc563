"""relayproxy-map: the socketmap server, run for real against the file store.

What is asserted is what an MTA or an administrator observes: answers on
a TCP connection, exit statuses, log lines. The batching of store reads is
shown on ``Lookups`` itself, with a clock and a thread stand-in the test
steps by hand; everything else runs the real program.
"""

from __future__ import annotations

import fcntl
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from demo.redis_servers import RedisServer
from demo.redis_servers import client as redis_client
from relayproxy.addresses import IPv6KeyStyle
from relayproxy.config import MapConfig
from relayproxy.mapserver import Answering, Lookups
from relayproxy.store import RelayStore
from tests.daemon import free_port, wait_for
from tests.map_daemon import MapClient, MapDaemon
from tests.test_manpages import groff, help_options, sections, tags
from tests.test_systemd import (
    MDWE_PRELUDE,
    SCRIPTS,
    exposure,
    needs_libseccomp,
    verify_problems,
)

DAY = 86400


@pytest.fixture
def map_daemon(tmp_path: Path) -> Iterator[MapDaemon]:
    server = MapDaemon(tmp_path)
    yield server
    if server.process is not None and server.process.poll() is None:
        assert server.stop() == 0, server.log()


def record(db: Path, *items: tuple[str, int]) -> None:
    RelayStore(db).record(items)


def test_recorded_addresses_are_ok_others_notfound(map_daemon: MapDaemon) -> None:
    now = int(time.time())
    record(
        map_daemon.db,
        ("192.0.2.7", now - 60),
        ("ipv6:2001:db8:0:0:0:0:0:7", now - 60),
        ("192.0.2.8", now - DAY - 60),  # older than max_age (1440 minutes)
        ("192.0.2.9", now + 3600),  # pinned
        ("192.0.2.10", 0),
    )
    map_daemon.start()
    client = map_daemon.client()
    assert client.ask(
        "192.0.2.7",
        "IPv6:2001:db8:0:0:0:0:0:7",  # sendmail's ${client_addr}
        "iPv6:2001:DB8:0:0:0:0:0:7",
        "2001:db8::7",  # Postfix's
        "::ffff:192.0.2.7",
        "192.0.2.8",
        "192.0.2.9",
        "192.0.2.10",
        "192.0.2.11",
        "mail.example",
        "",
    ) == [
        f"OK {now - 60}",
        f"OK {now - 60}",
        f"OK {now - 60}",
        f"OK {now - 60}",
        f"OK {now - 60}",
        "NOTFOUND ",
        f"OK {now + 3600}",
        "NOTFOUND ",
        "NOTFOUND ",
        "NOTFOUND ",
        "NOTFOUND ",
    ]
    # Any map name: sendmail's FEATURE(drac) asks for "drac".
    assert client.ask("192.0.2.7", name="drac") == [f"OK {now - 60}"]
    # A login after the connection was opened is seen on it.
    record(map_daemon.db, ("192.0.2.11", now))
    assert client.ask("192.0.2.11") == [f"OK {now}"]


def test_postfix_style_keys_are_found_with_ipv6_keys_postfix(map_daemon: MapDaemon) -> None:
    now = int(time.time())
    record(map_daemon.db, ("2001:db8::7", now), ("ipv6:2001:db8:0:0:0:0:0:8", now))
    map_daemon.store["ipv6_keys"] = "postfix"
    map_daemon.start()
    answers = map_daemon.client().ask("2001:db8::7", "IPv6:2001:db8:0:0:0:0:0:7", "2001:db8::8")
    assert answers == [f"OK {now}", f"OK {now}", "NOTFOUND "]


def test_with_ipv6_keys_both_either_form_answers(map_daemon: MapDaemon) -> None:
    now = int(time.time())
    record(map_daemon.db, ("2001:db8::7", now), ("ipv6:2001:db8:0:0:0:0:0:8", now - 5))
    map_daemon.store["ipv6_keys"] = "both"
    map_daemon.start()
    assert map_daemon.client().ask("IPv6:2001:db8::7", "2001:db8::8") == [
        f"OK {now}",
        f"OK {now - 5}",
    ]


def test_pipelined_requests_from_several_connections_are_answered_in_order(
    map_daemon: MapDaemon,
) -> None:
    now = int(time.time())
    record(map_daemon.db, *((f"192.0.2.{n}", now - n) for n in range(0, 256, 2)))
    map_daemon.start()
    clients = [map_daemon.client() for _ in range(4)]
    keys = [f"192.0.2.{(n * 7) % 256}" for n in range(2000)]
    for client in clients:
        client.send(*(f"relayers {key}".encode() for key in keys))
    expected = [
        f"OK {now - int(k.rsplit('.', 1)[1])}" if int(k.rsplit(".", 1)[1]) % 2 == 0 else "NOTFOUND "
        for k in keys
    ]
    for client in clients:
        assert [client.answer() for _ in keys] == expected


@pytest.mark.parametrize(
    ("garbage", "reply"),
    [
        (b"12x:", "PERM netstring length is not a decimal number"),
        (b"10001:" + b"x" * 100, "PERM netstring of 10001 bytes (at most 10000)"),
        (b"5:m 1.2;", "PERM netstring not ended by ','"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "PERM netstring length is not a decimal number"),
    ],
)
def test_a_bad_netstring_gets_perm_and_a_closed_connection(
    map_daemon: MapDaemon, garbage: bytes, reply: str
) -> None:
    record(map_daemon.db, ("192.0.2.7", int(time.time())))
    map_daemon.start()
    client = map_daemon.client()
    client.sock.sendall(b"18:relayers 192.0.2.7," + garbage)
    assert client.answer().startswith("OK ")  # the request before it is answered first
    assert client.answer() == reply
    assert client.answer() == ""  # closed
    assert map_daemon.log_lines("map.bad_request")
    # The server carries on.
    assert map_daemon.client().ask("192.0.2.7")[0].startswith("OK ")


def test_a_request_that_is_not_name_and_key_gets_perm_and_the_connection_goes_on(
    map_daemon: MapDaemon,
) -> None:
    map_daemon.start()
    client = map_daemon.client()
    client.send(b"no-space", b"relayers 192.0.2.7")
    assert client.answer() == "PERM request is not 'name key'"
    assert client.answer() == "NOTFOUND "


def test_a_locked_store_answers_temp_once_logged_then_recovers(map_daemon: MapDaemon) -> None:
    now = int(time.time())
    record(map_daemon.db, ("192.0.2.7", now))
    map_daemon.store["lock_timeout"] = "0.2"
    map_daemon.start()
    client = map_daemon.client()
    with map_daemon.db.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer stuck past the deadline
        for _ in range(3):
            assert client.ask("192.0.2.7", "192.0.2.8") == ["TEMP relayer store unavailable"] * 2
    assert client.ask("192.0.2.7") == [f"OK {now}"]
    [failed] = map_daemon.log_lines("map.store_failed")
    assert f"store={map_daemon.db}" in failed
    assert "lock" in failed
    [recovered] = map_daemon.log_lines("map.store_recovered")
    assert "failed_lookups=6" in recovered


def test_before_the_first_login_there_is_no_file_and_nobody_relays(
    map_daemon: MapDaemon,
) -> None:
    map_daemon.start()
    client = map_daemon.client()
    assert client.ask("192.0.2.7", "192.0.2.8") == ["NOTFOUND "] * 2
    assert len(map_daemon.log_lines("map.store_absent")) == 1
    assert not map_daemon.log_lines("map.store_failed")
    record(map_daemon.db, ("192.0.2.7", 2_000_000_000))
    assert client.ask("192.0.2.7") == ["OK 2000000000"]


def test_connections_over_the_limit_are_closed_and_logged_once(map_daemon: MapDaemon) -> None:
    map_daemon.settings["max_connections"] = "2"
    map_daemon.start()
    # start()'s probe connection may not be counted out yet: retry until served.
    first = wait_for("a first connection", lambda: _served(map_daemon))
    second = wait_for("a second connection", lambda: _served(map_daemon))
    for _ in range(3):
        refused = map_daemon.client()
        assert refused.answer() == ""
        refused.close()
    assert len(map_daemon.log_lines("map.connections_full")) == 1
    first.close()
    wait_for("a free connection", lambda: _answers(map_daemon))
    second.close()


def _served(server: MapDaemon) -> MapClient | None:
    client = server.client()
    try:
        if client.ask("192.0.2.7") == ["NOTFOUND "]:
            return client
    except OSError:
        pass
    client.close()
    return None


def _answers(server: MapDaemon) -> bool:
    client = server.client()
    try:
        return client.ask("192.0.2.7") == ["NOTFOUND "]
    except OSError:
        return False
    finally:
        client.close()


def test_sighup_applies_a_new_max_age(map_daemon: MapDaemon) -> None:
    now = int(time.time())
    record(map_daemon.db, ("192.0.2.7", now - 300))
    map_daemon.start()
    client = map_daemon.client()
    assert client.ask("192.0.2.7") == [f"OK {now - 300}"]
    map_daemon.settings["max_age"] = "4"
    map_daemon.config_path.write_text(map_daemon.config_text())
    map_daemon.signal(signal.SIGHUP)
    wait_for("config.reloaded", lambda: map_daemon.log_lines("config.reloaded"))
    assert client.ask("192.0.2.7") == ["NOTFOUND "]


def test_sigterm_stops_with_status_0_and_one_line(map_daemon: MapDaemon) -> None:
    map_daemon.start()
    assert map_daemon.stop() == 0
    [start] = map_daemon.log_lines("map.start")
    assert f"listen=127.0.0.1:{map_daemon.port}" in start
    assert len(map_daemon.log_lines("map.stop")) == 1


def test_lookups_are_logged_only_at_debug_level(map_daemon: MapDaemon) -> None:
    map_daemon.start()
    map_daemon.client().ask("192.0.2.7")
    assert map_daemon.stop() == 0
    assert not map_daemon.log_lines("map.lookup")
    map_daemon.log_settings["level"] = "debug"
    map_daemon.start()
    map_daemon.client().ask("IPv6:2001:db8::7")
    [line] = map_daemon.log_lines("map.lookup")
    assert line.endswith(' map.lookup key=ipv6:2001:db8:0:0:0:0:0:7 answer="NOTFOUND "')


def run_map(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.mapserver", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config(tmp_path: Path) -> None:
    config = tmp_path / "map.ini"
    config.write_text(f"[store]\npath = {tmp_path}/relayers.db\n[map]\nlisten = 127.0.0.1:8\n")
    good = run_map("--check-config", "--config", str(config))
    assert (good.returncode, good.stdout) == (
        0,
        f"relayproxy-map: {config}: OK, answering on 127.0.0.1:8\n",
    )
    config.write_text(f"[store]\npath = {tmp_path}/relayers.db\n")
    missing = run_map("--check-config", "--config", str(config))
    assert missing.returncode == 2
    problem = "[map] listen: missing (where relayproxy-map answers the MTAs)"
    assert missing.stderr == f"relayproxy-map: {config}: {problem}\n"
    config.write_text("[map]\nlisten = 127.0.0.1:8\nmax_age = soon\nmax_conections = 5\n")
    bad = run_map("--check-config", "--config", str(config))
    assert bad.returncode == 2
    assert "[map] max_age: 'soon' is not a whole number" in bad.stderr
    assert "[map] max_conections: unknown key" in bad.stderr


def test_an_address_in_use_is_exit_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "map.ini"
        config.write_text(f"[map]\nlisten = 127.0.0.1:{port}\n[daemon]\nallow_root = yes\n")
        result = run_map("--config", str(config))
    assert result.returncode == 1
    assert f"[map] listen 127.0.0.1:{port}:" in result.stderr


# --- Lookups: the batching, stepped by hand --------------------------------------------


class HeldReads:
    """A RunInThread whose reads run only when the test says: the reads in flight."""

    def __init__(self) -> None:
        self.reads: list[tuple[Callable[[], list[bytes | None]], Deferred[list[bytes | None]]]] = []

    def __call__(self, read: Callable[[], list[bytes | None]]) -> Deferred[list[bytes | None]]:
        done: Deferred[list[bytes | None]] = Deferred()
        self.reads.append((read, done))
        return done

    def finish_one(self) -> None:
        read, done = self.reads.pop(0)
        done.callback(read())


class KeysRead(RelayStore):
    """The real file store, noting the keys of each read (a spy, not a stand-in)."""

    batches: list[list[str]]

    def lookup(self, keys: list[str]) -> list[bytes | None]:  # type: ignore[override]
        self.batches.append(list(keys))
        return super().lookup(keys)


def test_lookups_arriving_during_a_read_share_the_next_one(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    store = KeysRead(tmp_path / "relayers.db")
    store.batches = []
    store.record([("192.0.2.1", 1_800_000_000 - 60), ("192.0.2.2", 1_800_000_000 - DAY)])
    held = HeldReads()
    lookups = Lookups(store, Answering(IPv6KeyStyle.BOTH, DAY, False), clock, held)
    answers: list[bytes] = []
    lookups.submit(("192.0.2.1",), answers.append)
    for key in ("192.0.2.2", "192.0.2.3", "ipv6:2001:db8:0:0:0:0:0:1"):
        lookups.submit((key,), answers.append)
    assert len(held.reads) == 1  # one read at a time
    held.finish_one()
    assert answers == [b"13:OK 1799999940,"]
    assert len(held.reads) == 1
    held.finish_one()
    assert store.batches == [["192.0.2.1"], ["192.0.2.2", "192.0.2.3", "ipv6:2001:db8:0:0:0:0:0:1"]]
    # 192.0.2.2 is exactly max_age old: no longer younger than it.
    assert answers[1:] == [b"9:NOTFOUND ,"] * 3
    assert held.reads == []


# --- the systemd unit and the man page ---------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relayproxy-map.service"
PAGE = ROOT / "man" / "relayproxy-map.8"


def test_the_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode:
        pytest.skip("needs systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    copy = units / UNIT.name
    text = UNIT.read_text()
    assert "\nExecStart=/usr/bin/relayproxy-map --config /etc/relayproxy/relayproxy.ini\n" in text
    copy.write_text(text.replace("=/usr/bin/relayproxy-map ", f"={SCRIPTS}/relayproxy-map "))
    assert verify_problems([copy], tmp_path) == []
    assert exposure(UNIT) <= 2.0


@needs_libseccomp
def test_the_server_answers_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the server must run under that filter."""
    assert re.search(r"^MemoryDenyWriteExecute=yes$", UNIT.read_text(), re.M)
    server = MapDaemon(tmp_path)
    record(server.db, ("192.0.2.7", 2_000_000_000))
    server.config_path.write_text(server.config_text())
    run = "import runpy\nrunpy.run_module('relayproxy.cli.mapserver', run_name='__main__')\n"
    server.process = subprocess.Popen(
        [sys.executable, "-c", MDWE_PRELUDE + run, "--config", str(server.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for("relayproxy-map to accept", server.accepts)
        assert server.client().ask("192.0.2.7") == ["OK 2000000000"]
    finally:
        assert server.stop() == 0, server.log()


def test_the_unit_command_line_is_one_the_program_accepts(tmp_path: Path) -> None:
    argv = re.findall(r"^ExecStart=(.*)$", UNIT.read_text(), re.M)[0].split()
    config = tmp_path / "relayproxy.ini"
    config.write_text(
        f"[store]\npath = {tmp_path}/relayers.db\n[map]\nlisten = 127.0.0.1:{free_port()}\n"
    )
    assert argv[1:] == ["--config", "/etc/relayproxy/relayproxy.ini"]
    result = run_map("--config", str(config), "--check-config")
    assert result.returncode == 0, result.stderr


def test_the_man_page_renders_cleanly_and_describes_every_option_and_key() -> None:
    if subprocess.run(["which", "groff"], capture_output=True).returncode:
        pytest.skip("needs groff")
    result = groff(PAGE, "-z")
    assert (result.returncode, result.stderr) == (0, "")
    page = sections(PAGE)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONFIGURATION", "EXIT STATUS"):
        assert heading in page
    assert help_options("relayproxy-map") - tags(page["OPTIONS"]) == set()
    keys = {field for field in MapConfig.__dataclass_fields__}
    assert keys - tags(page["CONFIGURATION"]) == set()
    assert {"SIGHUP", "SIGTERM"} <= tags(page["SIGNALS"])
    assert {"0", "1", "2"} <= tags(page["EXIT STATUS"])


# --- on Redis: keys seeded as the data contract lays them out -----------------------------


def seed(server: RedisServer, *items: tuple[str, int], ttl_minutes: int = 1440) -> None:
    """Relayers written per the contract: a STRING of epoch seconds expiring at time + ttl."""
    with redis_client(server.port) as client:
        for key, seconds in items:
            client.set(key, str(seconds), exat=seconds + ttl_minutes * 60)


def test_on_redis_recorded_addresses_are_ok_and_a_stopped_redis_is_temp(
    map_daemon: MapDaemon, redis_server: RedisServer
) -> None:
    now = int(time.time())
    seed(
        redis_server,
        ("fleet:192.0.2.7", now - 60),
        ("fleet:ipv6:2001:db8:0:0:0:0:0:7", now - 60),
        ("fleet:192.0.2.8", now - DAY - 60),
        ("192.0.2.9", now),  # another prefix's
    )
    map_daemon.store.update(
        {"backend": "redis", "redis_url": redis_server.url, "redis_prefix": "fleet:"}
    )
    map_daemon.start()
    client = map_daemon.client()
    keys = ("192.0.2.7", "IPv6:2001:DB8::7", "192.0.2.8", "192.0.2.9", "x")
    assert client.ask(*keys) == [f"OK {now - 60}"] * 2 + ["NOTFOUND "] * 3
    [start] = map_daemon.log_lines("map.start")
    assert f"store={redis_server.url}" in start

    redis_server.stop()
    for _ in range(3):
        assert client.ask("192.0.2.7") == ["TEMP relayer store unavailable"]
    [failed] = map_daemon.log_lines("map.store_failed")
    assert "cannot reach Redis" in failed
    redis_server.start()  # its data came back from disk, or it is seeded again
    seed(redis_server, ("fleet:192.0.2.7", now - 60))
    assert client.ask("192.0.2.7") == [f"OK {now - 60}"]
    [recovered] = map_daemon.log_lines("map.store_recovered")
    assert "failed_lookups=3" in recovered


def test_a_redis_down_at_start_is_logged_at_start(
    map_daemon: MapDaemon, redis_server: RedisServer
) -> None:
    map_daemon.store.update({"backend": "redis", "redis_url": redis_server.url})
    redis_server.stop()
    map_daemon.start()
    wait_for("map.store_failed", lambda: map_daemon.log_lines("map.store_failed"))
    assert map_daemon.client().ask("192.0.2.7") == ["TEMP relayer store unavailable"]


def test_a_client_that_sends_without_reading_is_stopped_not_buffered(
    map_daemon: MapDaemon,
) -> None:
    """Its answers fill the server's write buffer: the server stops reading, so the client's
    sends block, where a server that read on would buffer every answer in memory."""
    map_daemon.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect(("127.0.0.1", map_daemon.port))
    sock.settimeout(1)
    request = b"18:relayers 192.0.2.7,"
    # 24 MB of requests: the kernel's buffers took ~4 MB before the sends blocked.
    stream = request * 1_100_000
    sent = 0
    with pytest.raises(TimeoutError):
        while sent < len(stream):
            sent += sock.send(stream[sent : sent + 65536])
    # Every request the server did read is answered, in order, once the client reads.
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(20)
    answers = b""
    while chunk := sock.recv(1 << 20):
        answers += chunk
    sock.close()
    assert answers == b"9:NOTFOUND ," * (len(answers) // 12)
    assert 0 < len(answers) // 12 < sent // len(request)
