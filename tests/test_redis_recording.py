"""The daemon recording to Redis: real relayproxy, real Dovecot, real redis-server and Sentinel.

A login whose client was told it succeeded is in Redis sooner or later,
whatever Redis did meanwhile: stopped and started again on the same port
while logins went on (they wait in the spool), or its primary killed and a
replica promoted by the sentinels (with ``redis_min_replicas = 1`` a batch
counts only once a replica has it, so the promoted replica lacks nothing
the spool let go of).
"""

from __future__ import annotations

import signal
import threading
import time

from demo.dovecot import Dovecot
from demo.redis_servers import RedisGroup, RedisServer, client
from tests.daemon import Daemon, told_pop3_login, wait_for


def pop3_listener(daemon: Daemon, dovecot: Dovecot) -> int:
    return daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")


def missing_from(port: int, addresses: list[str]) -> list[str]:
    values = client(port).mget(addresses)
    return [address for address, value in zip(addresses, values, strict=True) if value is None]


def all_in_redis(port: int, addresses: list[str], timeout: float = 30.0) -> None:
    wait_for(
        f"{len(addresses)} logins in Redis",
        lambda: not missing_from(port, addresses),
        timeout=timeout,
    )


def test_logins_through_the_daemon_land_in_redis(
    daemon: Daemon, dovecot: Dovecot, redis_server: RedisServer
) -> None:
    daemon.store_settings = {"backend": "redis", "redis_url": redis_server.url, "ttl": "30"}
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    before = int(time.time())
    assert told_pop3_login(port, "127.11.0.1")
    value = int(wait_for("the login in Redis", lambda: client(redis_server.port).get("127.11.0.1")))
    assert before <= value <= time.time()
    expires = client(redis_server.port).execute_command("EXPIRETIME", "127.11.0.1")
    assert expires == value + 30 * 60
    _, fields = client(redis_server.port).xrange("relayproxy:changes")[-1]
    assert fields == {b"op": b"put", b"key": b"127.11.0.1", b"value": str(value).encode()}
    assert f"path={redis_server.url}" in daemon.wait_for_log("store.batch")
    assert not daemon.db.exists()  # Redis is the store; the file is not written


def test_no_login_is_lost_while_redis_restarts(
    daemon: Daemon, dovecot: Dovecot, redis_server: RedisServer
) -> None:
    daemon.store_settings = {"backend": "redis", "redis_url": redis_server.url}
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    assert told_pop3_login(port, "127.12.0.1")
    all_in_redis(redis_server.port, ["127.12.0.1"])
    redis_server.stop()
    # Redis down: the proxy keeps serving, the logins wait in the spool.
    during = [f"127.12.1.{n}" for n in range(1, 41)]
    for source in during[:20]:
        assert told_pop3_login(port, source)
    error = daemon.wait_for_log("store.error")
    assert "cannot reach Redis" in error
    for source in during[20:]:
        assert told_pop3_login(port, source)
    assert len(daemon.log_lines("store.error")) == 1  # once per burst
    redis_server.start()  # same port, empty: nothing was saved
    all_in_redis(redis_server.port, during)
    assert "entries=" in daemon.wait_for_log("store.recovered")
    assert daemon.stop() == 0
    assert " store.unwritten " not in daemon.log()


def test_a_reload_moves_recording_between_the_file_and_redis(
    daemon: Daemon, dovecot: Dovecot, redis_server: RedisServer
) -> None:
    daemon.store_settings = {"backend": "redis", "redis_url": redis_server.url}
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    redis_server.stop()
    assert told_pop3_login(port, "127.14.0.1")  # waits in the spool: Redis is down
    daemon.wait_for_log("store.error")
    reload(daemon, {"backend": "file"})
    assert told_pop3_login(port, "127.14.0.2")
    # What was pending for Redis goes to the store the reload named.
    daemon.wait_for_record("127.14.0.1")
    daemon.wait_for_record("127.14.0.2")
    redis_server.start()
    reload(daemon, {"backend": "redis", "redis_url": redis_server.url})
    assert told_pop3_login(port, "127.14.0.3")
    all_in_redis(redis_server.port, ["127.14.0.3"])
    assert "127.14.0.3" not in daemon.entries()
    assert missing_from(redis_server.port, ["127.14.0.1"]) == ["127.14.0.1"]


def reload(daemon: Daemon, store_settings: dict[str, str]) -> None:
    daemon.store_settings = store_settings
    daemon.config_path.write_text(daemon.config_text())
    before = len(daemon.log_lines("config.reloaded"))
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: len(daemon.log_lines("config.reloaded")) > before)


def test_no_login_told_success_is_lost_across_a_sentinel_failover(
    daemon: Daemon, dovecot: Dovecot, redis_group: RedisGroup
) -> None:
    daemon.store_settings = {
        "backend": "redis",
        "sentinels": redis_group.sentinels_setting,
        "service_name": "relayers",
        "redis_min_replicas": "1",
        "redis_timeout": "1",
    }
    port = pop3_listener(daemon, dovecot)
    daemon.start()
    told: list[str] = []
    stopping = threading.Event()

    def logins() -> None:
        n = 0
        while not stopping.is_set():
            n += 1
            source = f"127.13.{n // 250}.{n % 250 + 1}"
            if told_pop3_login(port, source):
                told.append(source)

    loop = threading.Thread(target=logins, daemon=True)
    loop.start()
    try:
        wait_for("logins before the failover", lambda: len(told) >= 20)
        old = redis_group.primary()
        new = redis_group.failover_by_kill()
        at_failover = len(told)
        wait_for("logins after the failover", lambda: len(told) >= at_failover + 20)
        # The killed primary comes back as the new one's replica, so that
        # WAIT 1 can be answered again (a full sync without Redis's 5 s wait
        # for more replicas).
        client(new.port).config_set("repl-diskless-sync-delay", 0)
        old.replica_of = new.port
        old.start()
    finally:
        stopping.set()
        loop.join(timeout=30)
    assert not loop.is_alive()
    all_in_redis(new.port, told)
    assert daemon.stop() == 0
    assert " store.unwritten " not in daemon.log()
