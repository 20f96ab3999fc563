"""relayproxy-map's Twisted side: socketmap connections, batched store reads, the service.

Owns the path from an MTA's request to its answer: the bytes go through
``relayproxy.protocols.socketmap`` (sans-I/O), the key is folded to the
store's key forms (``relayproxy.addresses.lookup_keys``), the store is read
on one worker thread, and the answers go back in request order.

* Batching: at most one store read is in flight; every lookup arriving
  meanwhile, from any connection, joins the next one, a single
  ``Store.lookup(keys)`` (one MGET on Redis, one lock and open of the
  file). Under load a read serves hundreds of lookups; idle, a lookup is
  read at once.
* Answers: ``OK seconds`` for an entry younger than ``[map] max_age``
  (and a pinned one, dated in the future), ``NOTFOUND`` otherwise or for a
  key that is not an address, ``TEMP`` when the store fails: the MTA then
  defers the mail rather than relaying or refusing it.
* Logs: a start and a stop line, one line per store failure burst and one
  when it ends; a lookup only at ``[log] level = debug``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayproxy.addresses import IPv6KeyStyle, lookup_keys
from relayproxy.config import Config
from relayproxy.protocols import socketmap
from relayproxy.relay import no_delay
from relayproxy.service import LISTEN_BACKLOG, ListenError
from relayproxy.store import StoreMissingError
from relayproxy.stores import Store, StoreError, open_store

log = Logger(namespace="relayproxy")

Deliver = Callable[[bytes], None]
_Queued = tuple[tuple[str, ...], Deliver]  # one address's key forms, where its answer goes
RunInThread = Callable[[Callable[[], list[bytes | None]]], "Deferred[list[bytes | None]]"]

# A pipelining client may queue this many unanswered requests before we
# stop reading from it: its memory on our side stays bounded.
_PIPELINE_HIGH = 1024
_PIPELINE_LOW = 256
# One store read serves at most this many lookups; the rest wait for the next.
_MAX_BATCH = 4096
_TEMP_REASON = "relayer store unavailable"
_PROBE_KEY = "0.0.0.0"  # noqa: S104 (a key no MTA asks for, not an address to bind)


@dataclass(frozen=True)
class Answering:
    """What an answer depends on besides the store: reloadable as a whole."""

    ipv6_keys: IPv6KeyStyle
    max_age: int  # seconds
    debug: bool  # log every lookup


def answering(config: Config) -> Answering:
    return Answering(config.store.ipv6_keys, config.map.max_age * 60, config.log.level == "debug")


class Lookups:
    """Every connection's lookups, batched into store reads on one worker thread."""

    def __init__(
        self, store: Store, settings: Answering, clock: IReactorTime, run_in_thread: RunInThread
    ) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._queue: list[_Queued] = []
        self._reading = False
        self._failing = False
        self._failed_lookups = 0  # in the current store failure burst
        self._absent = False

    def submit(self, keys: tuple[str, ...], deliver: Deliver) -> None:
        """Look ``keys`` (one address's forms) up; ``deliver`` gets the reply netstring.

        No keys: just read the store (a failure is logged as for a lookup).
        """
        self._queue.append((keys, deliver))
        if not self._reading:
            self._read()

    def _read(self) -> None:
        batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        # A batch of store checks alone still reaches the store (Redis answers an
        # empty MGET without a round trip): with a key no MTA asks for.
        flat = [key for keys, _ in batch for key in keys] or [_PROBE_KEY]
        self._reading = True
        store = self.store
        read = self._run_in_thread(lambda: store.lookup(flat))
        read.addCallbacks(self._answer, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        read.addErrback(lambda failure: log.failure("map.bug", failure))
        read.addBoth(self._next)

    def _next(self, _: object) -> None:
        self._reading = False
        if self._queue:
            self._read()

    def _answer(self, values: list[bytes | None], batch: Sequence[_Queued]) -> None:
        if self._failing:
            self._failing = False
            log.info(
                "map.store_recovered store={store} failed_lookups={failed}",
                store=self.store.path,
                failed=self._failed_lookups,
            )
            self._failed_lookups = 0
        self._absent = False
        cutoff = int(self._clock.seconds()) - self.settings.max_age
        position = 0
        for keys, deliver in batch:
            found = [v for v in values[position : position + len(keys)] if v is not None]
            position += len(keys)
            seconds = max((int(v) for v in found if v.isdigit()), default=None)
            reply = socketmap.NOTFOUND
            if seconds is not None and seconds > cutoff:
                reply = socketmap.ok(str(seconds))
            if self.settings.debug and keys:
                log_lookup(keys[0], reply)
            deliver(reply)

    def _failed(self, failure: Failure, batch: Sequence[_Queued]) -> None:
        if isinstance(failure.value, StoreMissingError):
            # No file yet: nobody has logged in since it was set up.
            if not self._absent:
                log.info("map.store_absent store={store}", store=self.store.path)
                self._absent = True
            reply = socketmap.NOTFOUND
        else:
            if not self._failing:
                self._failing = True
                # A StoreError's message names the store and the cause; anything
                # else is a bug, and its traceback goes to the debug log line.
                known = isinstance(failure.value, StoreError)
                log.error(
                    "map.store_failed store={store} error={error} (answering TEMP)",
                    store=self.store.path,
                    error=failure.getErrorMessage(),
                    log_failure=None if known else failure,
                )
            self._failed_lookups += sum(1 for keys, _ in batch if keys)
            reply = socketmap.temp(_TEMP_REASON)
        for keys, deliver in batch:
            if self.settings.debug and keys:
                log_lookup(keys[0], reply)
            deliver(reply)


def log_lookup(key: str, reply: bytes) -> None:
    """The debug line of one lookup: the key as the store holds it, the netstring's body."""
    answer = reply[reply.index(b":") + 1 : -1].decode("ascii")
    log.debug("map.lookup key={key} answer={answer}", key=key, answer=answer)


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply


@implementer(IPushProducer)
class SocketmapServer(Protocol):
    """One MTA connection: requests in, answers out in the same order.

    Reading stops while the answers wait for the client (the transport
    pauses us as its producer) or too many lookups are unanswered: a client
    that pipelines without reading costs a bounded buffer, not memory.
    """

    def __init__(self, factory: MapFactory) -> None:
        self.factory = factory
        self._reader = socketmap.SocketmapReader()
        self._slots: collections.deque[_Slot] = collections.deque()
        self._closing = False
        self._pipeline_full = False
        self._writes_full = False
        self._reading_paused = False
        self._lost = False

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections += 1
        if factory.connections > factory.max_connections:
            factory.refused(self.transport.getPeer())  # type: ignore[union-attr]
            self._lost = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        # An MTA keeps its connection for as long as it runs: keepalive finds
        # the ones whose host went away; answers are small and must not wait.
        self.transport.setTcpKeepAlive(True)  # type: ignore[union-attr]
        no_delay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.factory.released()

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._lost:
            return
        lookups = self.factory.lookups
        for event in self._reader.feed(data):
            if isinstance(event, socketmap.Request):
                keys = lookup_keys(event.key, lookups.settings.ipv6_keys)
                if not keys:
                    if lookups.settings.debug:
                        log.debug("map.lookup key={key} answer=NOTFOUND", key=event.key)
                    self._slots.append(_Slot(socketmap.NOTFOUND))
                    continue
                slot = _Slot()
                self._slots.append(slot)
                lookups.submit(keys, lambda reply, slot=slot: self._deliver(slot, reply))
            else:
                self._slots.append(_Slot(socketmap.perm(event.reason)))
                if isinstance(event, socketmap.FramingError):
                    peer = self.transport.getPeer()  # type: ignore[union-attr]
                    log.info(
                        "map.bad_request client={client} reason={reason} (closed)",
                        client=getattr(peer, "host", str(peer)),
                        reason=event.reason,
                    )
                    self._closing = True
        self._flush()
        if len(self._slots) >= _PIPELINE_HIGH:
            self._pipeline_full = True
            self._follow_limits()

    def _deliver(self, slot: _Slot, reply: bytes) -> None:
        slot.reply = reply
        if not self._lost:
            self._flush()

    def _flush(self) -> None:
        slots = self._slots
        ready = []
        while slots and slots[0].reply is not None:
            ready.append(slots.popleft().reply)
        if ready:
            self.transport.writeSequence(ready)  # type: ignore[union-attr, arg-type]
        if self._closing and not slots:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self._pipeline_full and len(slots) <= _PIPELINE_LOW:
            self._pipeline_full = False
            self._follow_limits()

    # -- IPushProducer: the transport's write buffer is full, or has room again --

    def pauseProducing(self) -> None:
        self._writes_full = True
        self._follow_limits()

    def resumeProducing(self) -> None:
        self._writes_full = False
        self._follow_limits()

    def stopProducing(self) -> None:
        self._lost = True

    def _follow_limits(self) -> None:
        """Read from the client only while neither limit is reached."""
        pause = self._pipeline_full or self._writes_full
        if pause != self._reading_paused and not self._lost:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            else:
                self.transport.resumeProducing()  # type: ignore[union-attr]


class MapFactory(Factory):
    noisy = False  # map.start says it

    def __init__(self, lookups: Lookups, max_connections: int) -> None:
        self.lookups = lookups
        self.max_connections = max_connections
        self.connections = 0
        self._refusing = False

    def refused(self, peer: IAddress) -> None:
        """A connection over ``max_connections``: logged once per burst."""
        if not self._refusing:
            log.warn(
                "map.connections_full limit={limit} client={client} (closing new connections)",
                limit=self.max_connections,
                client=getattr(peer, "host", str(peer)),
            )
        self._refusing = True

    def released(self) -> None:
        self.connections -= 1
        if self.connections < self.max_connections:
            self._refusing = False

    def buildProtocol(self, addr: IAddress | None) -> SocketmapServer:
        return SocketmapServer(self)


def _notice(message: str) -> None:
    log.warn("store.notice message={message}", message=message)


class MapService(Service):
    """The listening socket, the store's worker thread, reload and stop."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="relayproxy-map-store")
        store = open_store(config.store, _notice)
        self.lookups = Lookups(
            store,
            answering(config),
            reactor,
            lambda read: deferToThreadPool(reactor, self.pool, read),
        )
        self.factory = MapFactory(self.lookups, config.map.max_connections)
        self.port: IListeningPort | None = None

    def listen(self) -> None:
        """Bind ``[map] listen`` now (before dropping privileges); raises ListenError."""
        address = self.config.map.listen
        assert address is not None  # the command line refuses a config without it
        try:
            self.port = self.reactor.listenTCP(
                address.port, self.factory, backlog=LISTEN_BACKLOG, interface=address.host
            )
        except CannotListenError as exc:
            raise ListenError(f"[map] listen {address}: {exc.socketError}") from None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()
        log.info(
            "map.start listen={listen} store={store} max_age={max_age} ipv6_keys={ipv6_keys}",
            listen=str(self.config.map.listen),
            store=self.lookups.store.path,
            max_age=self.config.map.max_age,
            ipv6_keys=self.config.store.ipv6_keys.value,
        )

    def check_store(self) -> Deferred[None]:
        """One empty read, so that a store that is down is logged at start: fires when done."""
        done: Deferred[None] = Deferred()
        self.lookups.submit((), lambda reply: done.callback(None))
        return done

    def reload(self, config: Config) -> None:
        """SIGHUP: new answers, store and limit now; a new address needs a restart."""
        if config.map.listen != self.config.map.listen:
            log.warn("config.reload.restart_needed section={section}", section="map listen")
        if config.store != self.config.store:
            self.lookups.store = open_store(config.store, _notice)
        self.lookups.settings = answering(config)
        self.factory.max_connections = config.map.max_connections
        self.config = config

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        stopped = maybeDeferred(port.stopListening if port else lambda: None)

        def stop_pool(_: object) -> None:
            self.pool.stop()
            log.info("map.stop listen={listen}", listen=str(self.config.map.listen))

        return stopped.addBoth(stop_pool)
