"""relayproxy-mirror: a local relayers.db kept in step with the relayer set on Redis.

Against real redis-server (and redis-sentinel) processes; records go to
Redis through the Redis store itself, and the mirrored file is read with
sendmail's own ``makemap -u hash`` (and, as root, by a running
``sendmail -bt``), as an MTA host would read it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.redis_servers import SERVICE_NAME, RedisGroup, RedisServer
from relayproxy.config import ConfigError, MirrorConfig, load_config, parse_config
from relayproxy.journal import replay
from relayproxy.mirror import Mirror, follow_client
from relayproxy.redis_store import RedisStore
from relayproxy.store import RelayStore
from tests.conftest import makemap
from tests.daemon import wait_for
from tests.test_manpages import groff, help_options, sections, subsections, tags
from tests.test_sendmail_reads_updates import SendmailTestMode
from tests.test_systemd import (
    SCRIPTS,
    exposure,
    needs_libseccomp,
    needs_systemd_analyze,
    under_mdwe,
    unit_value,
    verify_problems,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relayproxy-mirror.service"
PAGE = ROOT / "man" / "relayproxy-mirror.8"

NOW = int(time.time())


def file_entries(db: Path) -> dict[str, str]:
    """What sendmail's makemap reads from the mirrored file (none before it exists)."""
    if not db.exists():
        return {}
    result = makemap("-u", "hash", str(db)[: -len(".db")])
    assert result.returncode == 0, result.stderr
    return dict(line.split("\t", 1) for line in result.stdout.splitlines())


def wait_for_file(db: Path, expected: dict[str, int], timeout: float) -> None:
    wanted = {key: str(seconds) for key, seconds in expected.items()}
    try:
        wait_for(f"{db} to hold {wanted}", lambda: file_entries(db) == wanted, timeout)
    except AssertionError:
        raise AssertionError(f"{db} holds {file_entries(db)}, not {wanted}") from None


def store_section(**settings: str) -> str:
    return "[store]\nbackend = redis\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


class MirrorDaemon:
    """The real ``relayproxy-mirror`` as a subprocess, its config and log under ``directory``."""

    def __init__(self, directory: Path, store: str, mirror: str = "") -> None:
        self.directory = directory
        self.db = directory / "relayers.db"
        self.log_path = directory / "mirror.log"
        self.config_path = directory / "mirror.ini"
        self.config_path.write_text(
            store
            + f"path = {directory / 'spool'}\n"
            + f"\n[mirror]\npath = {self.db}\n{mirror}"
            + f"\n[log]\ntarget = file:{self.log_path}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relayproxy.cli.mirror", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.wait_for_log("mirror.start")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def lines(self, event: str) -> list[str]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if f" {event} " in f"{line} "]

    def wait_for_log(self, event: str, needle: str = "", count: int = 1) -> str:
        def probe() -> str | None:
            assert self.process is not None
            found = [line for line in self.lines(event) if needle in line]
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None:
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise AssertionError(f"the mirror exited {self.process.returncode}: {log}")
            return None

        return wait_for(f"a {event} line with {needle!r}", probe)


@pytest.fixture
def mirror_of(tmp_path: Path) -> Iterator[list[MirrorDaemon]]:
    """Mirror daemons a test starts; each is stopped, and must stop cleanly, at the end."""
    started: list[MirrorDaemon] = []
    yield started
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            assert daemon.stop() == 0


def start_mirror(
    started: list[MirrorDaemon], directory: Path, store: str, mirror: str = ""
) -> MirrorDaemon:
    daemon = MirrorDaemon(directory, store, mirror)
    started.append(daemon)
    daemon.start()
    return daemon


def redis_writer(server: RedisServer, **settings: str) -> RedisStore:
    config = parse_config(store_section(redis_url=server.url, **settings), "writer.ini")
    return RedisStore.from_config(config.store)


# --- following the stream --------------------------------------------------------------


def test_logins_written_to_redis_reach_the_file_within_a_second(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=redis_server.url))
    daemon.wait_for_log("mirror.resync", "reason=start relayers=0")
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW), ("ipv6:2001:db8:0:0:0:0:0:1", NOW - 5)])
    expected = {"192.0.2.1": NOW, "ipv6:2001:db8:0:0:0:0:0:1": NOW - 5}
    wait_for_file(daemon.db, expected, timeout=1.0)
    writer.record([("192.0.2.2", NOW)])
    writer.delete(["192.0.2.1"])
    del expected["192.0.2.1"]
    wait_for_file(daemon.db, expected | {"192.0.2.2": NOW}, timeout=1.0)
    assert daemon.stop() == 0
    assert daemon.lines("mirror.stop")


def test_a_resync_at_start_removes_stale_entries_and_adds_missing_ones(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    stale = RelayStore(tmp_path / "relayers.db")
    stale.record([("192.0.2.9", NOW), ("192.0.2.1", NOW - 100), ("192.0.2.2", NOW)])
    writer = redis_writer(redis_server, redis_prefix="relayer:")
    writer.record([("192.0.2.1", NOW), ("192.0.2.2", NOW), ("192.0.2.3", NOW)])
    redis_server_client = redis.Redis.from_url(redis_server.url)
    redis_server_client.set("unrelated", "1")  # outside the prefix: not a relayer
    daemon = start_mirror(
        mirror_of, tmp_path, store_section(redis_url=redis_server.url, redis_prefix="relayer:")
    )
    # 192.0.2.2 was right already; .1 had an older time, .3 was missing, .9 is gone from Redis.
    line = daemon.wait_for_log("mirror.resync")
    assert "reason=start relayers=3 written=2 deleted=1 " in line
    wait_for_file(daemon.db, {"192.0.2.1": NOW, "192.0.2.2": NOW, "192.0.2.3": NOW}, 1.0)


@pytest.fixture
def mirror(redis_server: RedisServer, tmp_path: Path) -> Mirror:
    """The sync itself, in this process, one step at a time (no daemon, no timing)."""
    writer = redis_writer(redis_server)
    follow_client(writer)
    return Mirror(writer, RelayStore(tmp_path / "relayers.db"), block_seconds=0.05)


def test_a_stream_trimmed_past_the_position_resyncs(
    redis_server: RedisServer, mirror: Mirror, tmp_path: Path
) -> None:
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW)])
    assert mirror.step().reason == "start"  # type: ignore[union-attr]
    writer.record([("192.0.2.2", NOW)])
    writer.delete(["192.0.2.1"])
    # Both entries trimmed away unread, as MAXLEN does to a mirror too far behind.
    redis.Redis.from_url(redis_server.url).xtrim(writer.stream, maxlen=0, approximate=False)
    assert mirror.step() == 0
    assert mirror.gap == "stream_trimmed"
    resynced = mirror.step()
    assert resynced.reason == "stream_trimmed"  # type: ignore[union-attr]
    wait_for_file(tmp_path / "relayers.db", {"192.0.2.2": NOW}, timeout=0)
    writer.record([("192.0.2.3", NOW)])  # and following goes on from the new position
    assert mirror.step() == 1
    assert mirror.gap is None
    wait_for_file(tmp_path / "relayers.db", {"192.0.2.2": NOW, "192.0.2.3": NOW}, timeout=0)


def test_a_stream_deleted_and_made_anew_resyncs(
    redis_server: RedisServer, mirror: Mirror, tmp_path: Path
) -> None:
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW)])
    mirror.step()
    assert mirror.step() == 0
    writer.record([("192.0.2.2", NOW)])
    redis.Redis.from_url(redis_server.url).delete(writer.stream)  # .2's entry with it
    writer.record([("192.0.2.3", NOW)])  # a new stream, its ids later than the old one's
    assert mirror.step() == 1
    assert mirror.gap == "stream_recreated"
    mirror.step()
    wait_for_file(tmp_path / "relayers.db", {f"192.0.2.{n}": NOW for n in (1, 2, 3)}, timeout=0)
    redis.Redis.from_url(redis_server.url).delete(writer.stream)
    assert mirror.step() == 0
    assert mirror.gap == "stream_deleted"


def test_redis_restarted_with_its_data_lost_the_file_converges(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=redis_server.url))
    redis_writer(redis_server).record([("192.0.2.1", NOW), ("192.0.2.2", NOW)])
    wait_for_file(daemon.db, {"192.0.2.1": NOW, "192.0.2.2": NOW}, timeout=1.0)
    redis_server.stop()
    daemon.wait_for_log("mirror.error")
    # Redis away (its port held by a listener that hangs up, to count the
    # retries): the MTAs keep relaying for the clients the file holds.
    with socket.create_server(("127.0.0.1", redis_server.port)) as away:
        for _ in range(3):
            away.settimeout(20)
            away.accept()[0].close()
    assert file_entries(daemon.db) == {"192.0.2.1": str(NOW), "192.0.2.2": str(NOW)}
    redis_server.start()  # with `save ''`: empty again
    redis_writer(redis_server).record([("192.0.2.3", NOW)])
    wait_for_file(daemon.db, {"192.0.2.3": NOW}, timeout=10.0)
    daemon.wait_for_log("mirror.resync", "reason=redis_lost relayers=1 written=1 deleted=2 ")
    assert len(daemon.lines("mirror.error")) == 1  # one line for the whole outage
    assert daemon.lines("mirror.recovered")


def test_a_dropped_connection_is_a_gap_and_resyncs(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    """redis-py would reconnect silently; what it missed meanwhile would stay missed."""
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=redis_server.url))
    daemon.wait_for_log("mirror.resync", "reason=start")
    redis.Redis.from_url(redis_server.url).client_kill_filter(_type="normal")
    daemon.wait_for_log("mirror.resync", "reason=redis_lost relayers=0 ")
    redis_writer(redis_server).record([("192.0.2.1", NOW)])
    wait_for_file(daemon.db, {"192.0.2.1": NOW}, timeout=1.0)


def test_a_file_replaced_behind_its_back_is_copied_again(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=redis_server.url))
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW), ("192.0.2.2", NOW)])
    wait_for_file(daemon.db, {"192.0.2.1": NOW, "192.0.2.2": NOW}, timeout=1.0)
    # An administrator's makemap rewrites the file with one entry of its own.
    assert makemap("hash", str(daemon.db)[:-3], stdin="192.0.2.9\t9\n").returncode == 0
    writer.record([("192.0.2.3", NOW)])
    daemon.wait_for_log("mirror.notice", "replaced by another program")
    daemon.wait_for_log("mirror.resync", "reason=file_replaced relayers=3 written=2 deleted=1 ")
    wait_for_file(daemon.db, {f"192.0.2.{n}": NOW for n in (1, 2, 3)}, timeout=1.0)


def test_sighup_reloads_and_systemd_hears_of_each_state(
    redis_server: RedisServer,
    tmp_path: Path,
    mirror_of: list[MirrorDaemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        # Two relayer sets on one server, each with its prefix and stream.
        fleet_a = {"redis_prefix": "a:", "redis_stream": "a"}
        fleet_b = {"redis_prefix": "b:", "redis_stream": "b"}
        redis_writer(redis_server, **fleet_a).record([("192.0.2.1", NOW)])
        redis_writer(redis_server, **fleet_b).record([("192.0.2.2", NOW)])
        a_section = store_section(redis_url=redis_server.url, **fleet_a)
        daemon = start_mirror(mirror_of, tmp_path, a_section)
        assert notify.recv(4096) == b"READY=1"
        wait_for_file(daemon.db, {"192.0.2.1": NOW}, timeout=1.0)
        assert daemon.process is not None
        # The other set: the file follows it, after one resync.
        text = daemon.config_path.read_text()
        b_section = store_section(redis_url=redis_server.url, **fleet_b)
        daemon.config_path.write_text(text.replace(a_section, b_section))
        daemon.process.send_signal(signal.SIGHUP)
        assert notify.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert notify.recv(4096) == b"READY=1"
        daemon.wait_for_log("mirror.resync", "reason=reload relayers=1 written=1 deleted=1 ")
        wait_for_file(daemon.db, {"192.0.2.2": NOW}, timeout=1.0)
        # A broken file: logged, and the running configuration goes on.
        daemon.config_path.write_text(text + "bogus = 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        assert notify.recv(4096).startswith(b"RELOADING=1\n")
        assert notify.recv(4096) == b"READY=1"
        assert "[log] bogus: unknown key" in daemon.wait_for_log("config.reload.failed")
        redis_writer(redis_server, **fleet_b).record([("192.0.2.3", NOW)])
        wait_for_file(daemon.db, {"192.0.2.2": NOW, "192.0.2.3": NOW}, timeout=1.0)
        assert daemon.stop() == 0
        assert notify.recv(4096) == b"STOPPING=1"


def test_a_refused_password_is_logged_once_and_never_shown(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    redis.Redis.from_url(redis_server.url).config_set("requirepass", "the-right-one")
    url = redis_server.url.replace("redis://", "redis://:s3cret-pw@")
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=url))
    assert "authentication failed" in daemon.wait_for_log("mirror.error")
    assert daemon.stop() == 0
    log = daemon.log_path.read_text()
    assert "s3cret-pw" not in log
    assert f"redis=redis://127.0.0.1:{redis_server.port}/0 " in log
    assert len(daemon.lines("mirror.error")) == 1


def test_a_sentinel_failover_is_followed(
    redis_group: RedisGroup, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    settings = {"sentinels": redis_group.sentinels_setting, "service_name": SERVICE_NAME}
    daemon = start_mirror(mirror_of, tmp_path, store_section(**settings))
    # The replica has it before the primary is killed: it is the new primary's too.
    replicated = parse_config(store_section(**settings, redis_min_replicas="1"), "writer.ini")
    RedisStore.from_config(replicated.store).record([("192.0.2.1", NOW)])
    wait_for_file(daemon.db, {"192.0.2.1": NOW}, timeout=1.0)
    redis_group.failover_by_kill()
    config = parse_config(store_section(**settings), "writer.ini")  # no replica left
    wait_for(
        "a write to the new primary",
        lambda: _try_record(RedisStore.from_config(config.store), "192.0.2.2"),
        timeout=20,
    )
    wait_for_file(daemon.db, {"192.0.2.1": NOW, "192.0.2.2": NOW}, timeout=10.0)
    daemon.wait_for_log("mirror.resync", "reason=redis_lost")


def _try_record(store: RedisStore, key: str) -> bool:
    try:
        store.record([(key, NOW)])
    except Exception:
        return False
    return True


# --- expiry -------------------------------------------------------------------------


def test_the_file_expires_what_redis_expires_pinned_entries_included(
    redis_server: RedisServer, mirror: Mirror, tmp_path: Path
) -> None:
    ttl = mirror.redis.ttl_seconds
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW), ("192.0.2.2", NOW + 3600)])  # .2 pinned an hour ahead
    mirror.step()
    assert mirror.expire(NOW + ttl - 1) == 0
    assert mirror.expire(NOW + ttl) == 1
    assert file_entries(tmp_path / "relayers.db") == {"192.0.2.2": str(NOW + 3600)}
    assert mirror.expire(NOW + 3600 + ttl) == 1
    assert file_entries(tmp_path / "relayers.db") == {}


def test_with_redis_down_the_file_stays_but_old_entries_expire(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    # Its own clock, not the module's NOW: with ttl = 1 minute, a long suite run
    # would make NOW itself old enough to expire.
    now = int(time.time())
    RelayStore(tmp_path / "relayers.db").record([("192.0.2.1", now), ("192.0.2.2", now - 61)])
    redis_server.stop()
    store = store_section(redis_url=redis_server.url, ttl="1")
    daemon = start_mirror(mirror_of, tmp_path, store, mirror="expire_interval = 0.1\n")
    assert "Connection refused" in daemon.wait_for_log("mirror.error")
    daemon.wait_for_log("mirror.expired", "entries=1")
    assert file_entries(daemon.db) == {"192.0.2.1": str(now)}
    assert len(daemon.lines("mirror.error")) == 1


# --- the store's batches ----------------------------------------------------------------


def test_replace_and_update_journal_what_they_write(tmp_path: Path) -> None:
    """A crash after either would be repaired from the journal to the same file."""
    db = tmp_path / "relayers.db"
    store = RelayStore(db)

    def journal() -> dict[str, str]:
        state = replay((tmp_path / "relayers.db.journal").read_bytes()).state
        return {key.decode(): value.decode() for key, value in state.items()}

    store.record([("192.0.2.1", 1), ("192.0.2.2", 2)])
    changes = [("192.0.2.1", None), ("192.0.2.3", 3), ("192.0.2.4", 4), ("192.0.2.4", None)]
    assert store.update(changes) == 3
    assert file_entries(db) == journal() == {"192.0.2.2": "2", "192.0.2.3": "3"}
    assert store.replace([("192.0.2.3", 3), ("192.0.2.5", 5)]) == (1, 1)
    assert file_entries(db) == journal() == {"192.0.2.3": "3", "192.0.2.5": "5"}


def test_replace_leaves_a_hand_made_value_for_a_human(tmp_path: Path) -> None:
    db = tmp_path / "relayers"
    assert makemap("hash", str(db), stdin="192.0.2.7\tpermanent\n192.0.2.8\t8\n").returncode == 0
    assert RelayStore(f"{db}.db").replace([("192.0.2.9", 9)]) == (1, 1)
    assert file_entries(Path(f"{db}.db")) == {"192.0.2.7": "permanent", "192.0.2.9": "9"}


# --- sendmail reads the mirrored file --------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("sendmail") is None,
    reason="needs root (a private UTS namespace) and sendmail-bin",
)
def test_a_running_sendmail_sees_the_mirror_s_updates(
    redis_server: RedisServer, tmp_path: Path, mirror_of: list[MirrorDaemon]
) -> None:
    cf = tmp_path / "test.cf"
    # Debian's FEATURE(`drac') map declaration: hash, -o, no -f.
    cf.write_text(
        f"V10/Berkeley\nO DontBlameSendmail=MapInUnsafeDirPath\nKdrac hash -o {tmp_path}/relayers\n"
    )
    daemon = start_mirror(mirror_of, tmp_path, store_section(redis_url=redis_server.url))
    writer = redis_writer(redis_server)
    writer.record([("192.0.2.1", NOW)])
    wait_for_file(daemon.db, {"192.0.2.1": NOW}, timeout=1.0)
    sendmail = SendmailTestMode(cf)
    try:
        assert sendmail.lookup("drac", "192.0.2.1") == f"drac (192.0.2.1) returns {NOW} (0)"
        writer.record([("192.0.2.2", NOW)])
        writer.delete(["192.0.2.1"])
        wait_for_file(daemon.db, {"192.0.2.2": NOW}, timeout=1.0)
        # The same process, its map open since the first lookup: the mtime told it.
        assert sendmail.lookup("drac", "192.0.2.2") == f"drac (192.0.2.2) returns {NOW} (0)"
        assert sendmail.lookup("drac", "192.0.2.1") == "drac (192.0.2.1) no match (0)"
    finally:
        sendmail.close()


# --- configuration ---------------------------------------------------------------------


def run_mirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayproxy.cli.mirror", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_accepts_a_mirror_and_names_redis_without_its_password(
    tmp_path: Path,
) -> None:
    ini = tmp_path / "mirror.ini"
    ini.write_text(
        store_section(redis_url="redis://:s3cret@127.0.0.1:6379/0")
        + f"[mirror]\npath = {tmp_path / 'relayers.db'}\nmode = 0640\nexpire_interval = 30\n"
    )
    result = run_mirror("--config", str(ini), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "redis://127.0.0.1:6379/0 -> " in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    mirror = load_config(str(ini)).mirror
    assert (mirror.mode, mirror.expire_interval) == (0o640, 30.0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[store]\npath = /var/lib/r/relayers.db\n", "no [mirror] section"),
        (
            "[mirror]\npath = /var/lib/r/relayers.db\n",
            "[mirror]: copies the set on Redis: needs [store] backend = redis",
        ),
        (store_section(redis_url="redis://127.0.0.1/0") + "[mirror]\nmode = 0644\n", "path"),
        (
            store_section(redis_url="redis://127.0.0.1/0")
            + "[mirror]\npath = relative.db\nexpire_interval = -1\n",
            "[mirror] expire_interval:",
        ),
    ],
)
def test_a_bad_mirror_configuration_exits_2_naming_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    ini = tmp_path / "mirror.ini"
    ini.write_text(text)
    result = run_mirror("--config", str(ini), "--check-config")
    assert result.returncode == 2
    assert problem in result.stderr


def test_parse_config_refuses_an_unknown_mirror_key() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(
            store_section(redis_url="redis://127.0.0.1/0") + "[mirror]\npath = /r.db\nttl = 5\n",
            "x.ini",
        )
    assert raised.value.problems == [
        "x.ini: [mirror] ttl: unknown key (known keys: expire_interval, group, mode, path)"
    ]


# --- the man page and the unit -----------------------------------------------------------


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_the_man_page_is_clean_and_describes_every_option_and_mirror_key() -> None:
    rendered = groff(PAGE, "-z")
    assert (rendered.returncode, rendered.stderr) == (0, "")
    page = sections(PAGE)
    headings = list(page)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES"):
        assert heading in headings
    assert headings.index("SEE ALSO") == len(headings) - 2  # then the footer line
    assert help_options("relayproxy-mirror") - tags(page["OPTIONS"]) == set()
    keys = {field.name for field in dataclasses.fields(MirrorConfig)}
    assert keys - tags(subsections(page["CONFIGURATION"])["[mirror]"]) == set()
    assert {"0", "1", "2"} <= tags(page["EXIT STATUS"])
    assert {"SIGHUP", "SIGTERM", "SIGUSR1"} <= tags(page["SIGNALS"])


def checkable_unit(directory: Path) -> Path:
    """The unit with this venv's script for /usr/bin's (systemd-analyze checks it exists)."""
    copy = directory / UNIT.name
    text = UNIT.read_text()
    assert "=/usr/bin/relayproxy-mirror " in text
    copy.write_text(text.replace("=/usr/bin/relayproxy-mirror ", f"={SCRIPTS}/relayproxy-mirror "))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_unit_and_its_sandbox(tmp_path: Path) -> None:
    assert verify_problems([checkable_unit(tmp_path)], tmp_path) == []
    assert exposure(UNIT) <= 1.5  # 1.4 with systemd 252: the network, the host's users


def test_the_unit_s_command_line_is_one_the_mirror_accepts(tmp_path: Path) -> None:
    ini = tmp_path / "relayproxy.ini"
    ini.write_text(
        store_section(redis_url="redis://127.0.0.1:6379/0") + f"[mirror]\npath = {tmp_path}/r.db\n"
    )
    argv = unit_value(UNIT, "ExecStart").split()
    argv = [str(ini) if arg == "/etc/relayproxy/relayproxy.ini" else arg for arg in argv[1:]]
    result = run_mirror(*argv, "--check-config")
    assert result.returncode == 0, result.stderr


@needs_libseccomp
def test_the_mirror_works_under_memory_deny_write_execute(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: a whole resync under the same filter."""
    assert unit_value(UNIT, "MemoryDenyWriteExecute") == "yes"
    redis_writer(redis_server).record([("192.0.2.1", NOW)])
    ini = tmp_path / "relayproxy.ini"
    ini.write_text(
        store_section(redis_url=redis_server.url) + f"[mirror]\npath = {tmp_path}/relayers.db\n"
    )
    resync = (
        "import sys\n"
        "from relayproxy.config import load_config\n"
        "from relayproxy.mirror_service import build_mirror\n"
        "print(build_mirror(load_config(sys.argv[1])).step())\n"
    )
    result = under_mdwe(resync, str(ini))
    assert result.returncode == 0, result.stderr
    assert "relayers=1, written=1" in result.stdout
    assert file_entries(tmp_path / "relayers.db") == {"192.0.2.1": str(NOW)}
