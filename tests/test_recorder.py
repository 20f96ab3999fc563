"""The recorder's batching, coalescing and retry, on a Clock and a real store."""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayproxy.addresses import IPv6KeyStyle, parse_client_address
from relayproxy.recorder import EXCLUDED, QUEUED, RECENT, Recorder, run_synchronously
from relayproxy.spool import Spool
from relayproxy.store import RelayStore


class Calls:
    """run_in_thread that runs synchronously and counts the store calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, function: Callable[[], Any]) -> Deferred[Any]:
        self.count += 1
        return run_synchronously(function)


@pytest.fixture
def store(tmp_path: Path) -> RelayStore:
    return RelayStore(tmp_path / "relayers.db", lock_timeout=0.05)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


def recorder(store: RelayStore, clock: Clock, calls: Calls, **kw: Any) -> Recorder:
    return Recorder(store, reactor=clock, run_in_thread=calls, **kw)


def keys(store: RelayStore) -> dict[str, str]:
    return {e.key.decode(): e.value.decode() for e in store.entries()}


def test_a_login_is_written_at_once_then_batched(store: RelayStore, clock: Clock) -> None:
    calls = Calls()
    rec = recorder(store, clock, calls, batch_interval=1.0)
    assert rec.login(parse_client_address("192.0.2.1")) == QUEUED
    clock.advance(0)
    assert keys(store) == {"192.0.2.1": "1800000000"}
    for n in range(2, 12):
        rec.login(parse_client_address(f"192.0.2.{n}"))
    clock.advance(0.5)
    assert len(keys(store)) == 1  # the next batch waits for the interval
    clock.advance(0.5)
    assert len(keys(store)) == 11
    assert calls.count == 2  # ten logins, one write


def test_an_address_written_within_min_interval_is_not_rewritten(
    store: RelayStore, clock: Clock
) -> None:
    calls = Calls()
    rec = recorder(store, clock, calls, min_interval=60)
    address = parse_client_address("192.0.2.1")
    assert rec.login(address) == QUEUED
    clock.advance(0)
    clock.advance(1)
    assert rec.login(address) == RECENT
    clock.advance(58)
    assert rec.login(address) == RECENT
    clock.advance(1)
    assert rec.login(address) == QUEUED
    clock.advance(0)
    assert calls.count == 2
    assert keys(store) == {"192.0.2.1": "1800000060"}


def test_excluded_networks_are_never_written(store: RelayStore, clock: Clock) -> None:
    calls = Calls()
    rec = recorder(store, clock, calls, exclude=[ipaddress.ip_network("10.0.0.0/8")])
    assert rec.login(parse_client_address("10.1.2.3")) == EXCLUDED
    assert rec.login(parse_client_address("::ffff:10.1.2.4")) == EXCLUDED
    clock.advance(5)
    assert calls.count == 0


def test_ipv6_keys_follow_the_style(store: RelayStore, clock: Clock) -> None:
    rec = recorder(store, clock, Calls(), ipv6_keys=IPv6KeyStyle.BOTH)
    rec.login(parse_client_address("2001:db8::1"))
    clock.advance(0)
    assert set(keys(store)) == {"ipv6:2001:db8:0:0:0:0:0:1", "2001:db8::1"}


@pytest.fixture
def locked(store: RelayStore) -> Iterator[Callable[[], None]]:
    store.record([("198.51.100.1", 1)])
    fd = os.open(store.path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            os.close(fd)
            released = True

    yield release
    release()


def test_a_locked_store_is_retried_and_loses_nothing(
    store: RelayStore, clock: Clock, locked: Callable[[], None]
) -> None:
    calls = Calls()
    rec = recorder(store, clock, calls, max_retry_delay=4)
    for n in range(1, 4):
        rec.login(parse_client_address(f"192.0.2.{n}"))
    clock.advance(0)  # fails: locked
    assert rec.pending == 3
    for n in range(4, 6):
        rec.login(parse_client_address(f"192.0.2.{n}"))
    for _ in range(6):
        clock.advance(4)  # retries keep failing, delays grow to the cap
    assert calls.count == 1 + 6
    locked()
    clock.advance(4)
    assert set(keys(store)) == {"198.51.100.1"} | {f"192.0.2.{n}" for n in range(1, 6)}
    assert rec.pending == 0


def test_drain_writes_what_is_pending(store: RelayStore, clock: Clock) -> None:
    rec = recorder(store, clock, Calls(), batch_interval=3600)
    rec.login(parse_client_address("192.0.2.1"))
    clock.advance(0)
    rec.login(parse_client_address("192.0.2.2"))  # would wait an hour
    done = rec.drain()
    assert done.called
    assert set(keys(store)) == {"192.0.2.1", "192.0.2.2"}


def test_drain_of_a_locked_store_fires_and_reports_pending(
    store: RelayStore, clock: Clock, locked: Callable[[], None]
) -> None:
    rec = recorder(store, clock, Calls())
    rec.login(parse_client_address("192.0.2.1"))
    clock.advance(0)
    done = rec.drain()
    assert done.called
    assert rec.pending == 1
    assert clock.getDelayedCalls() == []  # no retry timer left behind at shutdown


def test_reloads_that_move_the_store_hand_every_old_spool_over(
    tmp_path: Path, clock: Clock
) -> None:
    """Two moves of ``[store] path`` before a batch lands: both old spools are emptied."""
    paths = [str(tmp_path / f"relayers{n}.db") for n in range(3)]
    spools = [Spool(path) for path in paths]
    rec = recorder(RelayStore(paths[0]), clock, Calls(), spool=spools[0])
    rec.open_spool()
    rec.login(parse_client_address("192.0.2.1"))
    for n in (1, 2):
        rec.switch_store(RelayStore(paths[n]), spools[n])
        rec.open_spool()
        rec.login(parse_client_address(f"192.0.2.{n + 1}"))
    clock.advance(1)
    assert keys(RelayStore(paths[2])) == {f"192.0.2.{n}": "1800000000" for n in (1, 2, 3)}
    for old in spools[:2]:
        assert not old.is_open
        assert all(os.path.getsize(path) == 0 for path in old.paths)
