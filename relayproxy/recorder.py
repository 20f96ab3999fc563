"""Recorder: successful logins -> batched store writes, off the reactor.

Owns when and what is written, never how (that is the store's: relayers.db
or Redis, ``relayproxy.stores``). Every
store call runs on one worker thread, so the reactor never waits on the
disk, on a lock another process holds, or on Redis.

* Coalescing: an address written less than ``min_interval`` seconds ago, or
  already waiting, is not written again (a mail client polling every
  minute must not rewrite relayers.db every minute per user).
* Batching: at most one write is in flight; logins arriving meanwhile
  form the next batch, one lock and one sync for all of them. Writes start
  at least ``batch_interval`` apart, which also keeps the file's mtime, that
  sendmail compares in whole seconds, in step with the clock.
* Failures (lock held past its deadline, a missing directory, permissions,
  Redis down or failing over) are logged once per burst; the records stay
  pending and are retried with a growing delay, so a store that comes back
  gets every login that happened while it was away.
* ``drain()`` writes what is pending before the process exits.
* Durability: with a spool (``relayproxy.spool``), ``login`` appends the
  login to it before returning, so before the glue forwards the backend's
  success line; a batch empties the spool files it covered once it is in
  the store, and ``open_spool`` queues what a killed daemon left there.
  A group ``fdatasync`` of the spool runs every ``sync_interval`` seconds
  (0: after every login, on the reactor thread).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayproxy.addresses import IPAddress, IPv6KeyStyle, relayer_keys
from relayproxy.spool import Spool, SpoolError
from relayproxy.stores import Store

T = TypeVar("T")
RunInThread = Callable[[Callable[[], T]], "Deferred[T]"]

EXCLUDED = "excluded"
RECENT = "recent"
QUEUED = "queued"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def run_synchronously(function: Callable[[], T]) -> Deferred[T]:
    """A RunInThread for tests and tools that have no reactor thread pool."""
    return maybeDeferred(function)


class Recorder:
    log = Logger()

    def __init__(
        self,
        store: Store,
        *,
        reactor: IReactorTime,
        run_in_thread: RunInThread[Any],
        ipv6_keys: IPv6KeyStyle = IPv6KeyStyle.SENDMAIL,
        exclude: Sequence[Network] = (),
        min_interval: float = 60.0,
        batch_interval: float = 1.0,
        max_retry_delay: float = 30.0,
        spool: Spool | None = None,
        sync_interval: float = 1.0,
        run_sync_in_thread: RunInThread[Any] | None = None,
    ) -> None:
        self.store = store
        self.spooler = Spooler(
            spool,
            reactor=reactor,
            sync_interval=sync_interval,
            run_sync_in_thread=run_sync_in_thread or run_in_thread,
        )
        self._retired_spools: list[Spool] = []
        self._reactor = reactor
        self._run_in_thread = run_in_thread
        self._ipv6_keys = ipv6_keys
        self._exclude = tuple(exclude)
        self._min_interval = min_interval
        self._batch_interval = batch_interval
        self._max_retry_delay = max_retry_delay
        self._pending: dict[str, int] = {}
        self._written: dict[str, float] = {}  # key -> when it was last written
        self._in_flight: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._last_start = float("-inf")
        self._retry_delay = 0.0
        self._failing = False
        self._draining = False

    # -- the proxy's side --

    def login(self, address: IPAddress) -> str:
        """Note a successful login from ``address``; says whether it will be written."""
        if self._exclude and any(address in network for network in self._exclude):
            return EXCLUDED
        now = self._reactor.seconds()
        keys = [
            key
            for key in relayer_keys(address, self._ipv6_keys)
            if key not in self._pending
            and now - self._written.get(key, -1e18) >= self._min_interval
        ]
        if not keys:
            return RECENT
        for key in keys:
            self._pending[key] = int(now)
            self.spooler.append(key, int(now))
        self._schedule()
        return QUEUED

    def open_spool(self) -> int:
        """Take the spool and queue what a previous run left in it; returns how many."""
        if self.spool is None:
            return 0
        leftovers = self.spool.open()
        for key, seconds in leftovers.items():
            self._pending[key] = max(seconds, self._pending.get(key, 0))
        self._schedule()
        return len(leftovers)

    def switch_store(self, store: Store, spool: Spool | None) -> None:
        """Send logins from now on to another file (a reload that moved ``[store] path``).

        The old spool's logins are all pending or in flight: it is emptied and
        closed after the next batch that lands.
        """
        self.store = store
        if self.spool is not None and self.spool.is_open:
            self._retired_spools.append(self.spool)
        self.spooler.spool = spool

    @property
    def spool(self) -> Spool | None:
        return self.spooler.spool

    def reconfigure(
        self,
        *,
        ipv6_keys: IPv6KeyStyle,
        exclude: Sequence[Network],
        min_interval: float,
        batch_interval: float = 1.0,
    ) -> None:
        """New settings (a reload) for the logins from now on."""
        self._ipv6_keys = ipv6_keys
        self._exclude = tuple(exclude)
        self._min_interval = min_interval
        self._batch_interval = batch_interval

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> Deferred[None]:
        """Write everything pending now (shutdown); fires when done or failed once more."""
        self._draining = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is None:
            return self._final_write()
        waiting: Deferred[None] = Deferred()
        # The in-flight write's own callbacks never fail: they log and re-queue.
        self._in_flight.addBoth(waiting.callback)
        return waiting.addCallback(lambda _: self._final_write())

    # -- batching --

    def _schedule(self) -> None:
        if self._draining or self._in_flight is not None or self._timer is not None:
            return
        if not self._pending:
            return
        now = self._reactor.seconds()
        delay = max(0.0, self._last_start + self._batch_interval - now, self._retry_delay)
        self._timer = self._reactor.callLater(delay, self._write)

    def _write(self) -> Deferred[None]:
        self._timer = None
        batch, self._pending = self._pending, {}
        # A copy: a reload may retire another spool while this batch is in flight.
        spool, retired = self.spool, list(self._retired_spools)
        files = spool.rotate() if spool is not None and spool.is_open else ()
        self._last_start = self._reactor.seconds()
        started = time.monotonic()
        self.log.debug("store.batch.start entries={entries}", entries=len(batch))
        store = self.store

        def record() -> None:
            store.record(batch.items(), keep_newer=True)
            if spool is not None and files:
                spool.release(files)
            for old in retired:
                old.release((0, 1))

        in_flight: Deferred[None] = self._run_in_thread(record)
        # Before the callbacks: they clear it, and may run at once.
        self._in_flight = in_flight
        in_flight.addCallbacks(
            self._written_ok,
            self._write_failed,
            callbackArgs=(batch, started, spool, files, retired),
            errbackArgs=(batch,),
        )
        return in_flight

    def _written_ok(
        self,
        _: None,
        batch: dict[str, int],
        started: float,
        spool: Spool | None,
        files: tuple[int, ...],
        retired: list[Spool],
    ) -> None:
        self._in_flight = None
        if spool is not None:
            spool.released(files)
        for old in retired:
            old.close()
            self._retired_spools.remove(old)
        now = self._reactor.seconds()
        for key in batch:
            self._written[key] = now
        if len(self._written) > 4 * len(batch) + 10000:
            self._forget_old(now)
        if self._failing:
            self.log.info(
                "store.recovered path={path} entries={entries}",
                path=self.store.path,
                entries=len(batch),
            )
        self._failing = False
        self._retry_delay = 0.0
        self.log.info(
            "store.batch path={path} entries={entries} duration={duration:.3f}",
            path=self.store.path,
            entries=len(batch),
            duration=time.monotonic() - started,
        )
        self._schedule()

    def _write_failed(self, failure: Failure, batch: dict[str, int]) -> None:
        self._in_flight = None
        for key, seconds in batch.items():
            self._pending.setdefault(key, seconds)  # a newer login's time wins
        if not self._failing:
            self.log.error(
                "store.error path={path} error={error} pending={pending}",
                path=self.store.path,
                error=failure.getErrorMessage(),
                pending=len(self._pending),
            )
        self._failing = True
        self._retry_delay = min(self._max_retry_delay, max(1.0, self._retry_delay * 2))
        self._schedule()

    def _forget_old(self, now: float) -> None:
        self._written = {k: t for k, t in self._written.items() if now - t < self._min_interval}

    def _final_write(self) -> Deferred[None]:
        if not self._pending:
            return succeed(None)
        return self._write()


class Spooler:
    """The reactor's side of the spool: one append per login, a group sync per interval.

    The sync runs in a thread of its own (``run_sync_in_thread``), not the
    store's: it must not wait behind a batch stuck on a lock.
    """

    log = Logger()

    def __init__(
        self,
        spool: Spool | None,
        *,
        reactor: IReactorTime,
        sync_interval: float,
        run_sync_in_thread: RunInThread[Any],
    ) -> None:
        self.spool = spool
        self._reactor = reactor
        self._sync_interval = sync_interval
        self._run_sync = run_sync_in_thread
        self._sync_timer: IDelayedCall | None = None
        self._unsynced = False
        self._spool_failing = False

    def append(self, key: str, seconds: int) -> None:
        """One login on disk before the client hears of it (reactor thread); errors logged."""
        if self.spool is None or not self.spool.is_open:
            return
        try:
            self.spool.append(key, seconds)
            if self._sync_interval <= 0:
                self.spool.sync()
        except SpoolError as exc:
            if not self._spool_failing:
                self.log.error(
                    "spool.error error={error} (logins stay queued in memory only)",
                    error=str(exc),
                )
            self._spool_failing = True
            return
        if self._spool_failing:
            self.log.info("spool.recovered path={path}", path=self.spool.paths[0])
        self._spool_failing = False
        self._unsynced = True
        if self._sync_interval > 0 and self._sync_timer is None:
            self._sync_timer = self._reactor.callLater(self._sync_interval, self._sync)

    def _sync(self) -> None:
        self._sync_timer = None
        spool = self.spool
        if spool is None or not self._unsynced or not spool.is_open:
            return
        self._unsynced = False
        synced = self._run_sync(spool.sync)
        synced.addErrback(
            lambda failure: self.log.error(
                "spool.error error={error}", error=failure.getErrorMessage()
            )
        )
