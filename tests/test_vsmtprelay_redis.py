"""vsmtprelay on a Redis store: the real command, a real redis-server.

``--config`` with ``[store] backend = redis`` picks Redis; the commands,
their output and their exit statuses are the file's. ``--db`` still names
a file. The spool a stopped daemon left beside ``[store] path`` goes to
Redis.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from demo.redis_servers import RedisServer, client
from relayproxy.spool import spool_line
from tests.conftest import Run, makemap_entries


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Path:
    path = tmp_path / "relayproxy.ini"
    path.write_text(
        f"[store]\npath = {tmp_path / 'relayers.db'}\nbackend = redis\n"
        f"redis_url = {redis_server.url}\nredis_prefix = rp:\nipv6_keys = both\n"
    )
    return path


def in_redis(server: RedisServer) -> dict[str, str]:
    redis_client = client(server.port)
    return {key.decode()[3:]: redis_client.get(key).decode() for key in redis_client.keys("rp:*")}


def test_add_list_dump_delete_and_expire_work_on_redis(
    vsmtprelay: Run, config: Path, redis_server: RedisServer
) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        result = vsmtprelay("--config", str(config), *args)
        return result.returncode, result.stdout, result.stderr

    now = int(time.time())
    assert run("add", "192.0.2.10") == (0, "", "")
    stamp = int(in_redis(redis_server)["192.0.2.10"])
    assert now <= stamp <= int(time.time())
    assert run("add", "192.0.2.9", str(now - 600))[0] == 0
    assert run("add", "2001:db8::1", str(now + 3600))[0] == 0
    assert set(in_redis(redis_server)) == {
        "192.0.2.9",
        "192.0.2.10",
        "ipv6:2001:db8:0:0:0:0:0:1",
        "2001:db8::1",
    }
    # Sorted by address; the pinned (future) entry only in dump.
    assert run("list") == (0, f"192.0.2.9\t{now - 600}\n192.0.2.10\t{stamp}\n", "")
    assert run("list", "5") == (0, f"192.0.2.9\t{now - 600}\n", "")
    assert run("dump")[1] == (
        f"192.0.2.9\t{now - 600}\n192.0.2.10\t{stamp}\n"
        f"2001:db8::1\t{now + 3600}\nipv6:2001:db8:0:0:0:0:0:1\t{now + 3600}\n"
    )
    assert run("expire", "5") == (0, "", "vsmtprelay: expired 1 entry\n")
    assert run("delete", "192.0.2.10", "198.51.100.1") == (
        1,
        "",
        f"vsmtprelay: 198.51.100.1: not in {redis_server.url}\n",
    )
    assert run("delete", "2001:db8::1") == (0, "", "")
    assert in_redis(redis_server) == {}
    assert run("expire") == (0, "", "vsmtprelay: expired 0 entries\n")


def test_a_bad_address_exits_2_and_touches_nothing(
    vsmtprelay: Run, config: Path, redis_server: RedisServer
) -> None:
    now = int(time.time())
    assert vsmtprelay("--config", str(config), "add", "192.0.2.1", str(now)).returncode == 0
    before = client(redis_server.port).xlen("relayproxy:changes")
    for args in (["add", "192.0.2.300"], ["delete", "192.0.2.1", "nonsense"], ["list", "x"]):
        result = vsmtprelay("--config", str(config), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
    assert in_redis(redis_server) == {"192.0.2.1": str(now)}
    assert client(redis_server.port).xlen("relayproxy:changes") == before
    redis_server.stop()  # checked before Redis is even asked
    assert vsmtprelay("--config", str(config), "add", "192.0.2.300").returncode == 2


def test_redis_out_of_reach_is_one_clear_line_and_exit_1(
    vsmtprelay: Run, config: Path, redis_server: RedisServer
) -> None:
    redis_server.stop()
    for command in ("add 192.0.2.1", "list", "dump", "delete 192.0.2.1", "expire"):
        result = vsmtprelay("--config", str(config), *command.split())
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith(f"vsmtprelay: {redis_server.url}: cannot reach Redis: ")
        assert "Connection refused" in result.stderr
        assert "Traceback" not in result.stderr


def test_the_spool_a_stopped_daemon_left_goes_to_redis(
    vsmtprelay: Run, config: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    now = int(time.time())
    spool = tmp_path / "relayers.db.spool-a"
    spool.write_bytes(spool_line("192.0.2.7", now))
    (tmp_path / "relayers.db.spool-b").write_bytes(spool_line("192.0.2.8", now - 1))
    result = vsmtprelay("--config", str(config), "list")
    assert result.returncode == 0
    assert result.stdout == f"192.0.2.7\t{now}\n192.0.2.8\t{now - 1}\n"
    assert "applied 2 entries left in the spool" in result.stderr
    assert spool.read_bytes() == (tmp_path / "relayers.db.spool-b").read_bytes() == b""
    assert in_redis(redis_server) == {"192.0.2.7": str(now), "192.0.2.8": str(now - 1)}
    assert not (tmp_path / "relayers.db").exists()


def test_db_names_a_file_even_beside_a_redis_config(
    vsmtprelay: Run, config: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    db = tmp_path / "other.db"
    result = vsmtprelay("--config", str(config), "--db", str(db), "add", "192.0.2.1", "100")
    assert result.returncode == 0, result.stderr
    assert makemap_entries(db) == {"192.0.2.1": "100"}
    assert in_redis(redis_server) == {}
