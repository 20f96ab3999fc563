"""The fleet end to end, on loopback, with every part real.

Three relayproxy front ends, each with two Dovecot backends (round robin),
record into one redis-server (append-only, as a fleet's should run). The
MTAs read that set two ways: sendmail's FEATURE(drac) and Postfix's
``postmap -q`` ask relayproxy-map over the socketmap protocol, and a second
sendmail reads the hash file relayproxy-mirror keeps. Clients are curl, each
login from an address of its own (127.0.x.y), so each is a new relayer.

The story a mail administrator cares about:

1. a login through any front end is visible to every MTA within a second;
2. a backend stopped midway costs no login;
3. Redis killed for 10 s while users log in: the logins succeed meanwhile,
   the map answers TEMP (the MTA defers, it does not relay), and once Redis
   is back every one of them is recorded and reaches every MTA.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.dovecot import Dovecot, running_dovecot
from demo.redis_servers import RedisServer
from tests.daemon import Daemon, wait_for
from tests.map_daemon import MapDaemon
from tests.test_map_mtas import DEFERRED, postmap_socketmap, socketmap_recipe
from tests.test_mirror import MirrorDaemon, file_entries, start_mirror, store_section
from tests.test_mta_recipes import (
    RELAY_DENIED,
    build_sendmail_cf,
    check_rcpt,
    minimal_postfix_config,
    mta_root,
    open_tmp,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (sendmail -bt reads its maps as root)"
)

# Fixtures of other modules, imported rather than copied.
__all__ = ["mta_root", "open_tmp"]

PROXIES = 3
OUTAGE = 10.0  # seconds Redis stays killed while users log in
VISIBLE_WITHIN = 1.0  # seconds from a login to every MTA's view of it


class Fleet:
    """The running parts, and what one login and one look from each MTA take."""

    def __init__(  # noqa: PLR0917 (the parts, in the order the fixture starts them)
        self,
        redis: RedisServer,
        proxies: list[Daemon],
        map_server: MapDaemon,
        mirror: MirrorDaemon,
        map_cf: Path,
        mirror_cf: Path,
        postfix: tuple[Path, Path],
    ) -> None:
        self.redis = redis
        self.proxies = proxies
        self.map_server = map_server
        self.mirror = mirror
        self.map_cf = map_cf
        self.mirror_cf = mirror_cf
        self.postfix = postfix
        self.logged_in: list[str] = []

    def login(self, proxy: int, source: str) -> None:
        """curl logs in as alice from ``source`` through front end ``proxy``; must succeed."""
        port = self.proxies[proxy].listeners[0].port
        result = subprocess.run(
            [
                *("curl", "-sS", "--max-time", "20", "--interface", source),
                f"pop3://alice:alice-secret@127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, f"login from {source} via fe{proxy}: {result.stderr}"
        self.logged_in.append(source)

    def map_answers(self, *keys: str) -> list[str]:
        client = self.map_server.client()
        try:
            return client.ask(*keys)
        finally:
            client.close()

    def seen_by_map_and_mirror(self, sources: list[str]) -> bool:
        answers = self.map_answers(*sources)
        in_file = file_entries(self.mirror.db)
        return all(a.startswith("OK ") for a in answers) and all(s in in_file for s in sources)

    def postmap(self, source: str) -> tuple[int, str]:
        root, confdir = self.postfix
        status, out, _ = postmap_socketmap(root, confdir, source, self.map_server.port)
        return status, out.strip()


@pytest.fixture
def second_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with running_dovecot(tmp_path / "dovecot-2") as server:
        yield server


@pytest.fixture
def fleet(
    dovecot: Dovecot,
    second_dovecot: Dovecot,
    tmp_path: Path,
    open_tmp: Path,
    mta_root: Path,
) -> Iterator[Fleet]:
    redis = RedisServer(tmp_path / "redis", persistent=True)
    redis.start()
    store = {"backend": "redis", "redis_url": redis.url}
    # Dovecot's haproxy listeners: each backend logs the real client (rip=).
    backends = [f"127.0.0.1:{d.ports.pop3_haproxy}" for d in (dovecot, second_dovecot)]
    proxies = [Daemon(tmp_path / f"fe{n}", store_settings=dict(store)) for n in range(PROXIES)]
    map_server = MapDaemon(tmp_path / "map", store=dict(store))
    mirror_dir = open_tmp / "mirror"
    mirror_dir.mkdir()
    mirrors: list[MirrorDaemon] = []
    try:
        for proxy in proxies:
            proxy.directory.mkdir()
            proxy.listener(
                "pop3",
                protocol="pop3",
                backends=backends,
                backend_balance="roundrobin",
                proxy_protocol_out="v2",
            )
            proxy.start()
        map_server.directory.mkdir()
        map_server.start()
        mirror = start_mirror(mirrors, mirror_dir, store_section(redis_url=redis.url))
        map_cf_dir, mirror_cf_dir = open_tmp / "sendmail-map", open_tmp / "sendmail-mirror"
        map_cf_dir.mkdir()
        mirror_cf_dir.mkdir()
        recipe = socketmap_recipe("sendmail/relayproxy-socketmap.mc", map_server.port)
        map_cf = build_sendmail_cf(map_cf_dir, map_cf_dir / "unused", lines=recipe)
        mirror_cf = build_sendmail_cf(mirror_cf_dir, mirror.db.with_suffix(""))
        postfix = (mta_root, minimal_postfix_config(tmp_path))
        yield Fleet(redis, proxies, map_server, mirror, map_cf, mirror_cf, postfix)
    finally:
        for proxy in proxies:
            if proxy.process is not None and proxy.process.poll() is None:
                proxy.stop()
        for mirror_daemon in mirrors:
            mirror_daemon.stop()
        if map_server.process is not None:
            map_server.stop()
        redis.stop()


def test_a_fleet_records_every_login_for_every_mta_through_a_backend_stop_and_a_redis_outage(
    fleet: Fleet, second_dovecot: Dovecot
) -> None:
    # 1. A login through each front end: every MTA sees it within a second.
    lags = []
    for proxy in range(PROXIES):
        source = f"127.0.1.{proxy + 1}"
        fleet.login(proxy, source)
        done = time.monotonic()
        wait_for(
            f"{source} at the map server and in the mirrored file",
            lambda s=source: fleet.seen_by_map_and_mirror([s]),
            timeout=VISIBLE_WITHIN,
        )
        lags.append(time.monotonic() - done)
    first = fleet.logged_in[:]
    unknown = "127.0.9.9"
    assert check_rcpt(fleet.map_cf, *first, unknown) == ["RELAY"] * PROXIES + [RELAY_DENIED]
    assert check_rcpt(fleet.mirror_cf, *first, unknown) == ["RELAY"] * PROXIES + [RELAY_DENIED]
    for source in first:
        status, value = fleet.postmap(source)
        assert status == 0 and value.isdigit(), (source, status, value)
    assert fleet.postmap(unknown)[0] == 1  # postmap -q: 1 is "not found"

    # 2. One backend stopped midway: the round robin skips it, no client notices.
    second_dovecot.stop()
    for n in range(2 * PROXIES):
        fleet.login(n % PROXIES, f"127.0.2.{n + 1}")
    wait_for("the logins past the stop", lambda: fleet.seen_by_map_and_mirror(fleet.logged_in))
    assert any(p.log_lines("backend.unreachable") for p in fleet.proxies)

    # 3. Redis killed for OUTAGE seconds while users log in.
    fleet.redis.kill()
    during: list[str] = []
    outage_ends = time.monotonic() + OUTAGE
    while time.monotonic() < outage_ends:
        n = len(during)
        source = f"127.3.{n // 250}.{n % 250 + 1}"
        fleet.login(n % PROXIES, source)
        during.append(source)
    # The map server cannot answer, so it says so: the MTA defers, and relays nobody.
    assert fleet.map_answers(during[0])[0].startswith("TEMP "), fleet.map_answers(during[0])
    assert check_rcpt(fleet.map_cf, first[0]) == [DEFERRED]
    # The mirrored file keeps what it had: its MTA keeps relaying the recorded users.
    assert check_rcpt(fleet.mirror_cf, first[0]) == ["RELAY"]
    fleet.redis.start()

    # Every login of the outage, and every one before it, reaches every MTA.
    wait_for(
        f"all {len(fleet.logged_in)} logins at the map and in the mirror",
        lambda: fleet.seen_by_map_and_mirror(fleet.logged_in),
        timeout=60,
    )
    assert check_rcpt(fleet.map_cf, during[0], during[-1]) == ["RELAY", "RELAY"]
    assert check_rcpt(fleet.mirror_cf, during[0], during[-1]) == ["RELAY", "RELAY"]
    assert fleet.postmap(during[-1])[0] == 0
    assert len(during) >= 5, during  # logins kept being served through the outage
    errors = sum(len(p.log_lines("store.error")) for p in fleet.proxies)
    assert 1 <= errors <= PROXIES, "one store.error per front end and outage"
    print(f"fleet: lag to every MTA {max(lags) * 1000:.0f} ms; {len(during)} logins in the outage")
