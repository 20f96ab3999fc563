"""RedisStore against a real redis-server: what Redis holds after each call.

Keys, values, expiry (EXAT = time + ttl, read back with the server's own
EXPIRETIME), the change stream, keep-newer, and every failure an
administrator meets (refused, read-only replica, wrong password, too few
replicas) as one StoreError that names the store and never its password.
Also the ``[store]`` settings that choose Redis, and their errors.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from demo.redis_servers import RedisServer, client
from relayproxy.config import ConfigError, HostPort, StoreConfig, parse_config
from relayproxy.redis_store import RedisStore, display_name
from relayproxy.store import Entry, StoreError
from relayproxy.stores import open_store
from tests.daemon import wait_for

STREAM = "relayproxy:changes"


def store_on(server: RedisServer, **settings: Any) -> RedisStore:
    config = StoreConfig(backend="redis", redis_url=server.url, **settings)
    store = open_store(config)
    assert isinstance(store, RedisStore)
    return store


def stream(server: RedisServer, name: str = STREAM) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client(server.port).xrange(name)
    ]


def expiretime(server: RedisServer, key: str) -> int:
    return int(client(server.port).execute_command("EXPIRETIME", key))


def test_a_record_is_a_string_expiring_at_its_time_plus_ttl_and_a_put_in_the_stream(
    redis_server: RedisServer,
) -> None:
    store = store_on(redis_server, ttl=90)
    now = int(time.time())
    pinned = now + 86400 * 365
    assert store.record([("192.0.2.1", now), ("ipv6:2001:db8:0:0:0:0:0:1", pinned)]) == 2
    redis_client = client(redis_server.port)
    assert redis_client.get("192.0.2.1") == str(now).encode()
    assert expiretime(redis_server, "192.0.2.1") == now + 90 * 60
    assert expiretime(redis_server, "ipv6:2001:db8:0:0:0:0:0:1") == pinned + 90 * 60
    assert stream(redis_server) == [
        {"op": "put", "key": "192.0.2.1", "value": str(now)},
        {"op": "put", "key": "ipv6:2001:db8:0:0:0:0:0:1", "value": str(pinned)},
    ]
    assert store.get("192.0.2.1") == Entry(b"192.0.2.1", str(now).encode())
    assert store.get("192.0.2.9") is None


def test_keep_newer_leaves_a_later_time_and_writes_no_stream_entry_for_it(
    redis_server: RedisServer,
) -> None:
    store = store_on(redis_server)
    now = int(time.time())
    store.record([("192.0.2.1", now), ("192.0.2.2", now - 50)])
    store.record([("192.0.2.1", now - 10), ("192.0.2.2", now), ("192.0.2.3", now)], keep_newer=True)
    assert store.lookup(["192.0.2.1", "192.0.2.2", "192.0.2.3"]) == [str(now).encode()] * 3
    assert [e["key"] for e in stream(redis_server)] == [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.2",
        "192.0.2.3",
    ]
    # Without keep_newer (vsmtprelay add) the given time is the time.
    store.record([("192.0.2.1", now - 10)])
    assert store.lookup(["192.0.2.1"]) == [str(now - 10).encode()]


def test_a_time_older_than_the_ttl_is_expired_by_redis_at_once(redis_server: RedisServer) -> None:
    store = store_on(redis_server, ttl=1)
    now = int(time.time())
    store.record([("192.0.2.1", now - 61), ("192.0.2.2", now - 30)])
    assert store.lookup(["192.0.2.1", "192.0.2.2"]) == [None, b"%d" % (now - 30)]


def test_a_time_too_far_ahead_for_exat_never_expires(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    store.record([("192.0.2.1", 2**63 - 1)])
    assert client(redis_server.port).ttl("192.0.2.1") == -1
    assert store.lookup(["192.0.2.1"]) == [b"9223372036854775807"]
    store.record([("192.0.2.1", int(time.time()))], keep_newer=True)
    assert store.lookup(["192.0.2.1"]) == [b"9223372036854775807"]


def test_delete_reports_the_absent_and_streams_a_del_per_deleted_key(
    redis_server: RedisServer,
) -> None:
    store = store_on(redis_server, redis_prefix="rp:")
    now = int(time.time())
    store.record([("192.0.2.1", now), ("192.0.2.2", now)])
    assert store.delete(["192.0.2.1", "192.0.2.9", "192.0.2.1"]) == {"192.0.2.9"}
    assert client(redis_server.port).exists("rp:192.0.2.1", "rp:192.0.2.2") == 1
    assert stream(redis_server)[-1] == {"op": "del", "key": "192.0.2.1"}
    assert len(stream(redis_server)) == 3


def test_expire_deletes_decimal_times_up_to_the_cutoff_and_streams_each(
    redis_server: RedisServer,
) -> None:
    store = store_on(redis_server)
    now = int(time.time())
    store.record([("192.0.2.1", now - 600), ("192.0.2.2", now - 60), ("192.0.2.3", now + 600)])
    client(redis_server.port).set("192.0.2.4", "by hand")
    client(redis_server.port).set("192.0.2.5", "0000")
    assert store.expire(-1) == 0
    assert store.expire(now - 60) == 3
    assert {e.key for e in store.entries()} == {b"192.0.2.3", b"192.0.2.4"}
    dels = [e["key"] for e in stream(redis_server) if e["op"] == "del"]
    assert sorted(dels) == ["192.0.2.1", "192.0.2.2", "192.0.2.5"]


def test_entries_are_the_prefixed_strings_only_with_the_prefix_stripped(
    redis_server: RedisServer,
) -> None:
    # A prefix with glob characters: SCAN's MATCH must take them literally.
    store = store_on(redis_server, redis_prefix="rp[1]*:", redis_stream="rp[1]*:changes")
    other = client(redis_server.port)
    other.set("192.0.2.77", "1")  # another application's key, no prefix
    other.set("rp1x:192.0.2.78", "1")  # what an unescaped pattern would match
    other.hset("rp[1]*:a-hash", "f", "v")  # the prefix, but not a string
    now = int(time.time())
    keys = [f"10.0.{n // 250}.{n % 250 + 1}" for n in range(2500)]
    store.record((key, now + n) for n, key in enumerate(keys))
    entries = {e.key.decode(): e.value.decode() for e in store.entries()}
    assert entries == {key: str(now + n) for n, key in enumerate(keys)}
    listed = [e.key.decode() for e in store.sorted_entries(lambda e: e.key.endswith(b".1"))]
    assert listed == [f"10.0.{n}.1" for n in range(10)]


def test_lookup_is_in_order_with_none_for_the_absent(redis_server: RedisServer) -> None:
    store = store_on(redis_server, redis_prefix="p:")
    now = int(time.time())
    store.record([("192.0.2.1", now), ("2001:db8::1", now + 1)], keep_newer=True)
    assert store.lookup(["2001:db8::1", "192.0.2.9", "192.0.2.1", "é"]) == [
        b"%d" % (now + 1),
        None,
        b"%d" % now,
        None,
    ]
    assert store.lookup([]) == []


def test_a_restarted_server_gets_the_script_loaded_again(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    now = int(time.time())
    store.record([("192.0.2.1", now)])
    client(redis_server.port).script_flush()  # what a restart does to the script cache
    store.record([("192.0.2.2", now)])
    assert store.lookup(["192.0.2.2"]) == [b"%d" % now]


def test_an_unreachable_server_is_one_store_error_naming_it(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    redis_server.stop()
    for call in (
        store.recover,
        lambda: store.record([("192.0.2.1", 5)]),
        lambda: store.lookup(["192.0.2.1"]),
        lambda: list(store.entries()),
    ):
        with pytest.raises(StoreError) as error:
            call()
        assert str(error.value).startswith(f"{redis_server.url}: cannot reach Redis: ")
        assert "Connection refused" in str(error.value)


def test_a_demoted_primary_is_a_store_error_and_writes_nothing(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    # A replica of a primary that is not there: read-only, as after a failover.
    client(redis_server.port).execute_command("REPLICAOF", "127.0.0.1", "9")
    with pytest.raises(StoreError, match="read-only replica"):
        store.record([("192.0.2.1", 5)])
    assert store.lookup(["192.0.2.1"]) == [None]


def test_a_stream_key_holding_something_else_is_a_store_error(redis_server: RedisServer) -> None:
    store = store_on(redis_server)
    client(redis_server.port).set(STREAM, "not a stream")
    with pytest.raises(StoreError) as error:
        store.record([(f"10.0.0.{n}", int(time.time())) for n in range(1, 200)])
    assert str(error.value).startswith(f"{redis_server.url}: WRONGTYPE ")
    assert "pipeline" not in str(error.value)
    assert "10.0.0.1" not in str(error.value)


def test_a_wrong_password_fails_and_no_password_is_ever_shown(redis_server: RedisServer) -> None:
    client(redis_server.port).config_set("requirepass", "right-horse")
    wrong = f"redis://:wrong-battery@127.0.0.1:{redis_server.port}/0"
    store = open_store(StoreConfig(backend="redis", redis_url=wrong))
    assert store.path == f"redis://127.0.0.1:{redis_server.port}/0"
    with pytest.raises(StoreError) as error:
        store.record([("192.0.2.1", 5)])
    assert str(error.value) == f"{store.path}: authentication failed (check the password)"
    right = f"redis://:right-horse@127.0.0.1:{redis_server.port}/0"
    assert open_store(StoreConfig(backend="redis", redis_url=right)).record([("192.0.2.1", 5)])
    assert "right-horse" not in repr(StoreConfig(backend="redis", redis_url=right))


def test_a_batch_counts_only_once_a_replica_confirmed_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = store_on(redis_server, redis_min_replicas=1, redis_timeout=0.4)
    now = int(time.time())
    with pytest.raises(StoreError, match=r"0 of redis_min_replicas = 1 replicas confirmed"):
        store.record([("192.0.2.1", now)])
    # Redis waits 5 s for more replicas before a full sync otherwise.
    client(redis_server.port).config_set("repl-diskless-sync-delay", 0)
    with RedisServer(tmp_path / "replica", replica_of=redis_server.port) as replica:
        wait_for("the replica in sync", lambda: replica_in_sync(replica))
        assert store.record([("192.0.2.2", now)]) == 1
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)  # alive, but confirms nothing
        try:
            with pytest.raises(StoreError, match=r"0 of redis_min_replicas = 1"):
                store.record([("192.0.2.3", now)])
        finally:
            replica.process.send_signal(signal.SIGCONT)
        assert store.record([("192.0.2.3", now)], keep_newer=True) == 1
        assert client(replica.port).get("192.0.2.3") == b"%d" % now


def replica_in_sync(replica: RedisServer) -> bool:
    info = client(replica.port).info("replication")
    return info.get("master_link_status") == "up"


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        (StoreConfig(redis_url="redis://:pw@h:1/2"), "redis://h:1/2"),
        (StoreConfig(redis_url="rediss://u:pw@[::1]:7/0?password=x&ssl_cert_reqs=none"), None),
        (StoreConfig(redis_url="unix:///run/redis.sock?db=3"), "unix:///run/redis.sock?db=3"),
        (
            StoreConfig(sentinels=(HostPort("a", 1), HostPort("::1", 2)), service_name="relayers"),
            "sentinel:relayers@a:1,[::1]:2",
        ),
    ],
)
def test_the_store_is_named_without_its_password(config: StoreConfig, shown: str | None) -> None:
    name = display_name(config)
    assert "pw" not in name
    assert "password" not in name
    if shown is not None:
        assert name == shown
    else:
        assert name == "rediss://u@[::1]:7/0?ssl_cert_reqs=none"


def test_redis_settings_become_a_store_config() -> None:
    config = parse_config(
        "[store]\npath = /var/spool/relayproxy/relayers.db\nbackend = redis\n"
        "sentinels = 192.0.2.11:26379, [2001:db8::1]:26379\nservice_name = relayers\n"
        "redis_password = p1\nsentinel_password = p2\nredis_db = 3\nttl = 60\n"
        "redis_prefix = rp:\nredis_stream = rp:changes\nredis_min_replicas = 1\n"
        "redis_timeout = 0.5\n",
        "f.ini",
    ).store
    assert config.sentinels == (HostPort("192.0.2.11", 26379), HostPort("2001:db8::1", 26379))
    assert (config.service_name, config.redis_password, config.sentinel_password) == (
        "relayers",
        "p1",
        "p2",
    )
    assert (config.redis_db, config.ttl, config.redis_prefix, config.redis_stream) == (
        3,
        60,
        "rp:",
        "rp:changes",
    )
    assert (config.redis_min_replicas, config.redis_timeout) == (1, 0.5)
    assert "p1" not in repr(config)
    assert "p2" not in repr(config)
    default = parse_config("", "f.ini").store
    assert (default.backend, default.ttl, default.redis_stream) == ("file", 1440, STREAM)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend = redis\n", "[store] backend: redis needs redis_url, or sentinels and"),
        ("backend = memcached\n", "[store] backend: 'memcached' is not one of file, redis"),
        ("redis_url = redis://h:1/0\n", "[store] redis_url: is a Redis setting (backend = redis)"),
        ("backend = redis\nsentinels = h:1\n", "[store] service_name: missing (required with"),
        (
            "backend = redis\nredis_url = redis://h/0\nsentinels = h:1\nservice_name = s\n",
            "[store] sentinels: and redis_url both say where Redis is: pick one",
        ),
        (
            "backend = redis\nredis_url = redis://h/0\nredis_password = x\n",
            "[store] redis_password: is a sentinels setting",
        ),
        ("backend = redis\nredis_url = http://h/\n", "[store] redis_url: is not a Redis URL: "),
        (
            "backend = redis\nredis_url = redis://:hunter2@h:port/0\n",
            "[store] redis_url: is not a Redis URL: Port could not be cast",
        ),
        ("backend = redis\nsentinels = h\nservice_name = s\n", "[store] sentinels: 'h' is not"),
        ("backend = redis\nredis_url = redis://h\nttl = 0\n", "[store] ttl: 0 is outside"),
        (
            "backend = redis\nredis_url = redis://h\nredis_min_replicas = one\n",
            "[store] redis_min_replicas: 'one' is not a whole number",
        ),
        (
            "backend = redis\nredis_url = redis://h\nredis_timeout = 0\n",
            "[store] redis_timeout: '0' must be a positive number",
        ),
        (
            "backend = redis\nredis_url = redis://h\nredis_prefix = a b\n",
            "[store] redis_prefix: 'a b' is not one word",
        ),
    ],
)
def test_every_redis_setting_problem_names_file_section_key_and_what(
    text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("[store]\n" + text, "f.ini")
    assert any(line.startswith(f"f.ini: {expected}") for line in error.value.problems), (
        error.value.problems
    )
    assert not any("hunter2" in line for line in error.value.problems)


def test_the_redis_client_is_redis_py() -> None:
    # The mirror reads the stream through the store's own client.
    store = open_store(StoreConfig(backend="redis", redis_url="redis://127.0.0.1:9/0"))
    assert isinstance(store, RedisStore)
    assert isinstance(store.client, redis.Redis)
