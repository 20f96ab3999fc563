"""The daemon assembled from a Config: store, recorder, listeners, shutdown.

Owns start-up order and shutdown order: listeners bind (or the start fails
with a line naming the listener); on stop they close first, then pending
records are written, then the store's thread ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from relayproxy.config import Config, HostPort, ListenerConfig
from relayproxy.descriptors import SessionBudget
from relayproxy.metrics import Metrics, SessionView
from relayproxy.protocols.common import ClientOrigin, TLSMode, Watcher, WatcherSettings
from relayproxy.protocols.imap import ImapWatcher
from relayproxy.protocols.pop3 import Pop3Watcher
from relayproxy.proxy import ListenerRuntime, ProxyFactory
from relayproxy.recorder import Recorder
from relayproxy.recording import Recording
from relayproxy.tls import ListenerTLS, TLSConfigError, load_listener_tls
from relayproxy.workers import Worker

log = Logger(namespace="relayproxy")


# Twisted's default is 50: a burst of connects (mail clients after a network
# outage, a load balancer's reconnects) overflowed it and cost each client a
# 1 s SYN retry (measured: 48 overflows in 100 simultaneous connects). The
# kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


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


@dataclass
class _Listening:
    """A bound listener: its port, and the factory whose runtime a reload replaces."""

    port: IListeningPort
    factory: ProxyFactory


class RelayProxyService(Service):
    """Listeners, recorder and store thread; reloadable; stops gracefully."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        tls: dict[str, ListenerTLS],
        budget: SessionBudget | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.reactor = reactor
        # [daemon] workers > 1: this process is one of them (relayproxy.workers).
        self.worker = worker
        if worker is None:
            self.recording = Recording(config, reactor)
        else:
            self.recording = Recording(config, reactor, worker.number, worker.count)
        self._tls = tls
        self.listening: dict[str, _Listening] = {}
        self.retired: list[ListenerRuntime] = []  # replaced runtimes with sessions left
        self.metrics: Metrics | None = None  # [metrics] listen: bound by listen()

    @property
    def recorder(self) -> Recorder:
        return self.recording.recorder

    def _runtime(self, listener: ListenerConfig, tls: ListenerTLS) -> ListenerRuntime:
        return ListenerRuntime(
            config=listener,
            tls=tls,
            recorder=self.recorder,
            make_watcher=watcher_factory(listener),
            reactor=self.reactor,
            usernames=self.config.log.usernames,
            budget=self.budget,
        )

    def _bind(self, runtime: ListenerRuntime) -> _Listening:
        listener = runtime.config
        factory = ProxyFactory(runtime)
        try:
            if self.worker is not None:
                port = self.worker.listen(self.reactor, listener.listen, factory, LISTEN_BACKLOG)
            else:
                port = self.reactor.listenTCP(
                    listener.listen.port,
                    factory,
                    backlog=LISTEN_BACKLOG,
                    interface=listener.listen.host,
                )
        except CannotListenError as exc:
            raise ListenError(
                f"[listener:{listener.name}] listen {listener.listen}: {exc.socketError}"
            ) from None
        log.info(
            "listener.ready listener={listener} protocol={protocol} address={address} "
            "tls={tls} backend={backend} balance={balance}",
            listener=listener.name,
            protocol=listener.protocol,
            address=str(listener.listen),
            tls=listener.tls,
            backend=",".join(str(backend) for backend in listener.backend),
            balance=listener.backend_balance,
        )
        return _Listening(port, factory)

    def listen(self) -> None:
        """Bind every listener now; raises ListenError naming the first that fails."""
        for listener in self.config.listeners:
            try:
                bound = self._bind(self._runtime(listener, self._tls[listener.name]))
            except ListenError:
                for already in self.listening.values():
                    already.port.stopListening()
                self.listening = {}
                raise
            self.listening[listener.name] = bound
        if self.worker is not None:
            self.worker.close_unused()
        if self.config.metrics.listen is not None:
            self._listen_metrics(self.config.metrics.listen)

    def _listen_metrics(self, address: HostPort) -> None:
        view = SessionView(
            pending=lambda: self.recorder.pending,
            sessions=self.open_sessions,
            listeners=lambda: [listener.name for listener in self.config.listeners],
        )
        metrics = Metrics(lambda: self.config, view)
        try:
            metrics.listen(self.reactor, address)
        except CannotListenError as exc:
            for already in self.listening.values():
                already.port.stopListening()
            self.listening = {}
            raise ListenError(f"[metrics] listen {address}: {exc.socketError}") from None
        log.info("metrics.ready address={address}", address=str(address))
        self.metrics = metrics

    # -- reload --

    def reload(self, config: Config, tls: dict[str, ListenerTLS]) -> list[str]:
        """Apply a new, already validated configuration to new connections.

        Open sessions keep the runtime (settings, certificate) they started
        with. Returns the problems met (a listener that could not bind); the
        rest of the new configuration is applied regardless.
        """
        problems: list[str] = []
        old = self.listening
        self.recording.reconfigure(
            config, self.config
        )  # compares with self.config: before replacing it
        self.config, self._tls = config, tls
        current: dict[str, _Listening] = {}
        for listener in config.listeners:
            runtime = self._runtime(listener, tls[listener.name])
            before = old.pop(listener.name, None)
            if before is not None and before.factory.runtime.config.listen == listener.listen:
                self._retire(before.factory.runtime, runtime)
                before.factory.runtime = runtime
                current[listener.name] = before
                continue
            if before is not None:
                self._retire(before.factory.runtime, None)
                before.port.stopListening()
            try:
                current[listener.name] = self._bind(runtime)
            except ListenError as exc:
                problems.append(str(exc))
        for name, gone in old.items():
            log.info("listener.removed listener={listener}", listener=name)
            self._retire(gone.factory.runtime, None)
            gone.port.stopListening()
        self.listening = current
        if self.worker is not None:
            self.worker.close_unused()
        return problems

    def _retire(self, runtime: ListenerRuntime, successor: ListenerRuntime | None) -> None:
        if successor is not None:
            # One count of open connections per listener, across reloads, and
            # one record of each backend's health: one backend.unreachable.
            successor.backends.carry_over(runtime.backends)
            successor.limits = runtime.limits
            successor.limits.total = successor.config.max_connections
            successor.limits.per_address = successor.config.max_connections_per_ip
        self.retired = [r for r in self.retired if r.sessions]
        if runtime.sessions:
            self.retired.append(runtime)

    # -- start and stop --

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.recording.start()

    def open_spool(self) -> None:
        """Take the spool and queue what a killed predecessor left in it (before listening)."""
        self.recording.open_spool()

    def open_store(self) -> Deferred[None]:
        """Check (and repair) the store once, off the reactor: fires when done."""
        return self.recording.open_store()

    def open_sessions(self) -> list[tuple[str, bool]]:
        """``(listener, in_login)`` of every open session, for the metrics scrape.

        The scrape runs on a worker thread while the reactor adds and removes
        sessions: each container is copied (``list()`` of a dict or set is one
        step under the GIL) before it is walked.
        """
        runtimes = [bound.factory.runtime for bound in list(self.listening.values())]
        runtimes += list(self.retired)
        return [
            (runtime.config.name, session.in_login)
            for runtime in runtimes
            for session in list(runtime.sessions)
        ]

    def sessions_in_login(self) -> int:
        runtimes = [bound.factory.runtime for bound in self.listening.values()] + self.retired
        return sum(1 for runtime in runtimes for session in runtime.sessions if session.in_login)

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopped = DeferredList([bound.port.stopListening() for bound in self.listening.values()])  # type: ignore[misc]
        stopping_runtimes = [bound.factory.runtime for bound in self.listening.values()]
        self.retired += stopping_runtimes
        self.listening = {}
        stopped.addCallback(lambda _: self._wait_for_logins())
        stopped.addCallback(lambda _: self.recorder.drain())
        stopped.addBoth(self._stop_pool)
        return stopped

    def _wait_for_logins(self) -> Deferred[None]:
        """Let sessions still logging in finish, up to ``shutdown_timeout`` seconds."""
        deadline = self.reactor.seconds() + self.config.daemon.shutdown_timeout
        waiting = self.sessions_in_login()
        if waiting:
            log.info("shutdown.waiting sessions={sessions}", sessions=waiting)
        done: Deferred[None] = Deferred()

        def check() -> None:
            left = self.sessions_in_login()
            if not left or self.reactor.seconds() >= deadline:
                if left:
                    log.warn("shutdown.timeout sessions={sessions}", sessions=left)
                done.callback(None)
                return
            self.reactor.callLater(0.05, check)

        check()
        return done

    def _stop_pool(self, result: object) -> object:
        self.recording.stop()
        if self.metrics is not None:
            self.metrics.stop()  # after the last write, so that its store.batch is counted
        return result
