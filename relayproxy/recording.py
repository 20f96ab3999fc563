"""Recording, the daemon's side of it: the recorder, its store thread, spool and store checks.

Owns the worker thread every store call runs on, the recorder fed by the
sessions, taking the spool at start, checking (and repairing) the store
once, following a reload's ``[store]`` and ``[record]`` changes, and the
last write at shutdown. ``relayproxy.service`` holds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relayproxy.config import Config
from relayproxy.recorder import Recorder
from relayproxy.spool import Spool, SpoolError
from relayproxy.store import StoreMissingError
from relayproxy.stores import Store, open_store

log = Logger(namespace="relayproxy")
T = TypeVar("T")


def _store(config: Config) -> Store:
    return open_store(
        config.store,
        lambda message: log.warn("store.notice message={message}", message=message),
    )


def _batch_interval(config: Config) -> float:
    """Seconds between batch starts: the file's is a second so that its mtime, which
    sendmail compares in whole seconds, moves with every batch; Redis has no such
    clock, and a fleet's MTAs should see a login within a second of it."""
    return 1.0 if config.store.backend == "file" else 0.05


class Recording:
    """The recorder with its store thread; see the module docstring."""

    def __init__(
        self, config: Config, reactor: Any, worker: int | None = None, workers: int = 1
    ) -> None:
        self.reactor = reactor
        # Worker ``worker`` of ``workers`` has a spool of its own (relayproxy.spool).
        self._worker, self._workers = worker, workers
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="relayproxy-store")
        self.recorder = Recorder(
            _store(config),
            reactor=reactor,
            run_in_thread=self._in_store_thread,
            ipv6_keys=config.store.ipv6_keys,
            exclude=config.record.exclude,
            min_interval=config.store.min_interval,
            batch_interval=_batch_interval(config),
            spool=self._spool_of(config.store.path),
            sync_interval=config.store.sync_interval,
            # Not the store's thread: a sync must not wait behind a batch stuck on a lock.
            run_sync_in_thread=lambda function: deferToThreadPool(
                reactor, reactor.getThreadPool(), function
            ),
        )

    def _spool_of(self, db_path: str) -> Spool:
        return Spool(db_path, self._worker, self._workers)

    @property
    def store(self) -> Store:
        return self.recorder.store

    def _in_store_thread(self, function: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, function)

    def start(self) -> None:
        self.pool.start()

    def open_spool(self) -> None:
        """Take the spool and queue what a killed predecessor left in it (before listening)."""
        try:
            leftovers = self.recorder.open_spool()
        except SpoolError as exc:
            log.error(
                "spool.error error={error} (logins are not durable before they are stored)",
                error=str(exc),
            )
            return
        spool = self.recorder.spool
        for problem in spool.adoption_problems if spool is not None else ():
            log.error("spool.error error={error} (left for vsmtprelay)", error=problem)
        if leftovers:
            log.warn(
                "spool.replay path={path} entries={entries} (not yet stored when it stopped)",
                path=self.store.path,
                entries=leftovers,
            )

    def open_store(self) -> Deferred[None]:
        """Check (and repair) the store once, off the reactor: fires when done."""
        checked = self._in_store_thread(self._check_store)
        return checked.addErrback(
            lambda failure: log.error(
                "store.error path={path} error={error}",
                path=self.store.path,
                error=failure.getErrorMessage(),
            )
        )

    def _check_store(self) -> None:
        try:
            self.store.recover()
        except StoreMissingError:
            log.info("store.absent path={path} (created at the first login)", path=self.store.path)

    def reconfigure(self, config: Config, old: Config) -> None:
        """A reload: new settings for the logins from now on (``old``: the running ones)."""
        recorder = self.recorder
        if config.store.path != old.store.path:
            # The next batch goes to the new store, and so do the old spool's logins.
            recorder.switch_store(_store(config), self._spool_of(config.store.path))
            self.open_spool()
        elif config.store != old.store:
            # Another engine, Redis server or setting: the same spool, a new store
            # for the next batch (and for what is pending).
            recorder.store = _store(config)
        recorder.reconfigure(
            ipv6_keys=config.store.ipv6_keys,
            exclude=config.record.exclude,
            min_interval=config.store.min_interval,
            batch_interval=_batch_interval(config),
        )

    def stop(self) -> None:
        """After the last write: say what is left unwritten, end the store's thread."""
        pending = self.recorder.pending
        if pending:
            log.error(
                "store.unwritten path={path} entries={entries}",
                path=self.store.path,
                entries=pending,
            )
        self.pool.stop()
