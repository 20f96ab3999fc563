"""The daemon assembled from a Config: store, recorder, listeners, shutdown.

Owns start-up order and shutdown order: listeners bind (or the start fails
with a line naming the listener); on stop they close first, then pending
records are written, then the store's thread ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relayproxy.config import Config, ListenerConfig
from relayproxy.protocols.common import ClientOrigin, TLSMode, Watcher, WatcherSettings
from relayproxy.protocols.imap import ImapWatcher
from relayproxy.protocols.pop3 import Pop3Watcher
from relayproxy.proxy import ListenerRuntime, ProxyFactory
from relayproxy.recorder import Recorder
from relayproxy.store import RelayStore, StoreMissingError
from relayproxy.tls import ListenerTLS, TLSConfigError, load_listener_tls

log = Logger(namespace="relayproxy")
T = TypeVar("T")


class ListenError(Exception):
    """A listener could not bind; the message names it and the address."""


def watcher_settings(listener: ListenerConfig) -> WatcherSettings:
    return WatcherSettings(
        client_tls=TLSMode(listener.tls),
        require_tls=listener.require_tls,
        backend_tls=TLSMode(listener.backend_tls),
        max_line_length=listener.max_line_length,
        record_preauth=listener.record_preauth,
    )


def watcher_factory(listener: ListenerConfig) -> Callable[[ClientOrigin], Watcher]:
    settings = watcher_settings(listener)
    if listener.protocol == "pop3":
        return lambda origin: Pop3Watcher(settings)
    if listener.forward_id:
        return lambda origin: ImapWatcher(settings, forward_id=origin)
    return lambda origin: ImapWatcher(settings)


def load_tls(config: Config) -> dict[str, ListenerTLS]:
    """Every listener's TLS options; raises TLSConfigError listing every bad file."""
    loaded: dict[str, ListenerTLS] = {}
    problems: list[str] = []
    for listener in config.listeners:
        try:
            loaded[listener.name] = load_listener_tls(listener, config.source)
        except TLSConfigError as exc:
            problems += exc.problems
    if problems:
        raise TLSConfigError(problems)
    return loaded


class RelayProxyService(Service):
    def __init__(self, config: Config, reactor: Any, tls: dict[str, ListenerTLS]) -> None:
        self.config = config
        self.reactor = reactor
        self.store = RelayStore(
            config.store.path,
            mode=config.store.mode,
            group=config.store.group,
            lock_timeout=config.store.lock_timeout,
            notice=lambda message: log.warn("store.notice message={message}", message=message),
        )
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="relayproxy-store")
        self.recorder = Recorder(
            self.store,
            reactor=reactor,
            run_in_thread=self._in_store_thread,
            ipv6_keys=config.store.ipv6_keys,
            exclude=config.record.exclude,
            min_interval=config.store.min_interval,
        )
        self.runtimes = [
            ListenerRuntime(
                config=listener,
                tls=tls[listener.name],
                recorder=self.recorder,
                make_watcher=watcher_factory(listener),
                reactor=reactor,
                usernames=config.log.usernames,
            )
            for listener in config.listeners
        ]
        self.ports: list[IListeningPort] = []

    def _in_store_thread(self, function: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, function)

    def listen(self) -> None:
        """Bind every listener now; raises ListenError naming the first that fails."""
        for runtime in self.runtimes:
            listener = runtime.config
            factory = ProxyFactory(runtime)
            host, port = listener.listen.host, listener.listen.port
            try:
                if listener.tls == "implicit":
                    assert runtime.tls.server is not None
                    bound = self.reactor.listenSSL(
                        port, factory, runtime.tls.server, interface=host
                    )
                else:
                    bound = self.reactor.listenTCP(port, factory, interface=host)
            except CannotListenError as exc:
                for already in self.ports:
                    already.stopListening()
                self.ports = []
                raise ListenError(
                    f"[listener:{listener.name}] listen {listener.listen}: {exc.socketError}"
                ) from None
            self.ports.append(bound)
            log.info(
                "listener.ready listener={listener} protocol={protocol} address={address} "
                "tls={tls} backend={backend}",
                listener=listener.name,
                protocol=listener.protocol,
                address=str(listener.listen),
                tls=listener.tls,
                backend=str(listener.backend),
            )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()
        self._in_store_thread(self._check_store).addErrback(
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

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopped = DeferredList([port.stopListening() for port in self.ports])  # type: ignore[misc]
        self.ports = []
        stopped.addCallback(lambda _: self.recorder.drain())
        stopped.addBoth(self._stop_pool)
        return stopped

    def _stop_pool(self, result: object) -> object:
        pending = self.recorder.pending
        if pending:
            log.error(
                "store.unwritten path={path} entries={entries}",
                path=self.store.path,
                entries=pending,
            )
        self.pool.stop()
        return result
