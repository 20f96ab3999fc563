"""The mirror daemon's loop: the sync's calls on one worker thread, timed by the reactor.

Owns *when* ``relayproxy-mirror`` works, never *what* it does (that is
``relayproxy.mirror``'s). Every Redis and file call, a blocking XREAD
included, runs on one worker thread, one at a time; the reactor only
schedules them, handles signals and logs.

* The loop: step after step (a resync when one is due, else one read of the
  stream, blocking up to ``block_seconds``).
* Failures (Redis down, failing over, the file's lock held past its
  deadline): the file stays as it is, so the MTAs keep relaying for the
  clients it holds; one error line per burst, a retry after a growing delay,
  a ``mirror.recovered`` line, and the resync that a gap asks for.
* Expiry: every ``[mirror] expire_interval``, on the same thread, whether
  Redis answers or not (Redis expires its copy on time too).
* A reload swaps in a new ``Mirror`` between two steps; its first step resyncs.
* Stopping waits for the call in flight (a read returns within ``block_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayproxy.config import Config
from relayproxy.mirror import Mirror, Resynced, follow_client
from relayproxy.redis_store import RedisStore
from relayproxy.store import RelayStore, StoreError

log = Logger(namespace="relayproxy")
T = TypeVar("T")

FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 5.0


def build_mirror(config: Config) -> Mirror:
    """The ``Mirror`` a configuration names; connects to Redis at its first call."""
    assert config.mirror.path is not None, "load() checks for a [mirror] path"
    redis_store = RedisStore.from_config(config.store)
    follow_client(redis_store)
    mirror: Mirror

    def notice(message: str) -> None:  # on the worker thread, during a write
        log.warn("mirror.notice message={message}", message=message)
        mirror.file_replaced()

    file = RelayStore(
        config.mirror.path,
        mode=config.mirror.mode,
        group=config.mirror.group,
        lock_timeout=config.store.lock_timeout,
        notice=notice,
    )
    # A read returns at least this often, for a reload or a stop; well within
    # the socket timeout, which would otherwise take a quiet stream for a dead server.
    mirror = Mirror(redis_store, file, block_seconds=min(0.5, config.store.redis_timeout / 2))
    return mirror


class MirrorLoop:
    """Runs a ``Mirror`` until stopped; see the module docstring."""

    def __init__(self, mirror: Mirror, reactor: Any, *, expire_interval: float) -> None:
        self.mirror = mirror
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="relayproxy-mirror")
        # Fires after the first step, done or failed: the file is as good as it gets.
        self.started: Deferred[None] = Deferred()
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = reactor
        self._expire_interval = expire_interval
        self._replacement: Mirror | None = None
        self._delay = 0.0
        self._failing_since: float | None = None
        self._step_began = 0.0
        self._waiting: IDelayedCall | None = None
        self._busy: list[Deferred[Any]] = []
        self._stopping = False

    def start(self) -> None:
        self.pool.start()
        self._next()
        self._expiry.start(self._expire_interval, now=True)

    def replace(self, mirror: Mirror) -> None:
        """A reload's mirror, for the next step (the one in flight finishes with the old)."""
        self._replacement = mirror
        if self._waiting is not None and self._waiting.active():  # no need to sit out a delay
            self._waiting.reset(0)

    def stop(self) -> Deferred[Any]:
        """No new step; fires once the calls in flight returned and the thread ended."""
        self._stopping = True
        if self._expiry.running:
            self._expiry.stop()
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        busy = DeferredList(list(self._busy)) if self._busy else succeed(None)
        return busy.addBoth(lambda _: self.pool.stop())

    # -- the loop --

    def _in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        done = deferToThreadPool(self.reactor, self.pool, function)
        self._busy.append(done)
        return done.addBoth(self._not_busy, done)

    def _not_busy(self, result: T, done: Deferred[Any]) -> T:
        self._busy.remove(done)
        return result

    def _next(self) -> None:
        self._waiting = None
        if self._stopping:
            return
        if self._replacement is not None:
            old, self.mirror, self._replacement = self.mirror, self._replacement, None
            old.redis.client.close()  # no call of its in flight: its sockets go
        self._step_began = time.monotonic()
        stepped = self._in_thread(self.mirror.step)
        stepped.addCallbacks(self._stepped, self._failed).addCallback(self._after)

    def _stepped(self, result: Resynced | int) -> float:
        if self._failing_since is not None:
            log.info(
                "mirror.recovered after={seconds:.1f}",
                seconds=time.monotonic() - self._failing_since,
            )
            self._failing_since, self._delay = None, 0.0
        if isinstance(result, Resynced):
            log.info(
                "mirror.resync reason={reason} relayers={relayers} written={written} "
                "deleted={deleted} seconds={seconds:.3f}",
                reason=result.reason,
                relayers=result.relayers,
                written=result.written,
                deleted=result.deleted,
                seconds=time.monotonic() - self._step_began,
            )
        return 0.0

    def _failed(self, failure: Failure) -> float:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            if isinstance(failure.value, StoreError):
                log.error(
                    "mirror.error error={error} (the file stays as it is; retrying)",
                    error=failure.getErrorMessage(),
                )
            else:
                log.failure("mirror.bug (retrying)", failure)
        self._delay = min(max(self._delay * 2, FIRST_RETRY_DELAY), MAX_RETRY_DELAY)
        return self._delay

    def _after(self, delay: float) -> None:
        if not self.started.called:
            self.started.callback(None)
        if not self._stopping:
            self._waiting = self.reactor.callLater(delay, self._next)

    # -- expiry --

    def _expire(self) -> Deferred[None]:
        now = int(time.time())
        expired = self._in_thread(lambda: self.mirror.expire(now))
        return expired.addCallbacks(self._expired, self._expire_failed)

    def _expired(self, removed: int) -> None:
        if removed:
            log.info("mirror.expired entries={entries}", entries=removed)

    def _expire_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, StoreError):
            log.error("mirror.expire_error error={error}", error=failure.getErrorMessage())
        else:
            log.failure("mirror.bug", failure)
