"""The Twisted glue: a listener's sessions, each a client connection, a watcher and a backend.

Owns admission (limits), the order of a session's steps and carrying out
the watcher's actions; makes no protocol decision of its own. Before login
every byte goes through the listener's sans-I/O watcher
(``relayproxy.protocols``) and the glue carries out the actions it returns,
in order. After ``Splice`` the watcher is dropped and ``relayproxy.relay``
relays, as ``twisted.protocols.portforward`` does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import address as twisted_address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IConnector
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from relayproxy.addresses import AddressError, IPAddress, peer_address
from relayproxy.backend import BackendSide
from relayproxy.backends import Backends
from relayproxy.config import HostPort, ListenerConfig, Network
from relayproxy.descriptors import SessionBudget
from relayproxy.login_phase import LoginPhase
from relayproxy.protocols.common import ClientOrigin, Watcher
from relayproxy.proxy_header import (
    ProxyHeaderRejectedError,
    TrustedHeaderReader,
    UntrustedHeaderCheck,
)
from relayproxy.recorder import Recorder
from relayproxy.relay import SessionLinks, no_delay
from relayproxy.session_log import SessionLog
from relayproxy.session_timer import SessionTimer
from relayproxy.tls import ListenerTLS
from relayproxy.tls_start import SessionTLS

# Seconds a closing connection may take to flush and finish its TLS close.
CLOSE_GRACE = 10.0
# Seconds a backend has to accept a connection before the next one is tried.
BACKEND_CONNECT_TIMEOUT = 10.0


class ConnectionLimits:
    """Open connections of one listener, overall and per client address.

    ``budget``: the sessions the process's descriptors allow, shared by
    every listener (``relayproxy.descriptors``).
    """

    def __init__(self, total: int, per_address: int, budget: SessionBudget | None = None) -> None:
        self.total = total
        self.per_address = per_address
        self.budget = budget
        self.open = 0
        # By the address's text (``str(IPAddress)``): hashing a str is cached, an IPAddress's not.
        self._by_address: Counter[str] = Counter()

    def admit(self, address: str) -> bool:
        if self.open >= self.total or self._by_address[address] >= self.per_address:
            return False
        if self.budget is not None and not self.budget.admit():
            return False
        self.open += 1
        self._by_address[address] += 1
        return True

    def release(self, address: str) -> None:
        if self.budget is not None:
            self.budget.release()
        self.open -= 1
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]


@dataclass
class ListenerRuntime:
    """Everything one listener's connections share."""

    config: ListenerConfig
    tls: ListenerTLS
    recorder: Recorder
    make_watcher: Callable[[ClientOrigin], Watcher]
    reactor: Any
    usernames: bool = True
    budget: SessionBudget | None = None

    def __post_init__(self) -> None:
        self.limits = ConnectionLimits(
            self.config.max_connections, self.config.max_connections_per_ip, self.budget
        )
        self.sessions: set[FrontendProtocol] = set()
        config = self.config
        self.backends = Backends(config.backend, config.backend_balance, config.backend_retry)
        self._backend_endpoints = {b: self._make_backend_endpoint(b) for b in config.backend}

    def _make_backend_endpoint(self, backend: HostPort) -> HostnameEndpoint | None:
        """A backend's host name resolved by an endpoint; None for an address literal."""
        try:
            peer_address(backend.host)
        except AddressError:
            timeout = BACKEND_CONNECT_TIMEOUT
            return HostnameEndpoint(self.reactor, backend.host, backend.port, timeout=timeout)
        return None

    def trusts_proxy_header_from(self, host: str) -> bool:
        if not self.config.proxy_protocol_in:
            return False
        try:
            address = peer_address(host)
        except AddressError:
            return False
        networks: tuple[Network, ...] = self.config.proxy_protocol_in
        return any(address in network for network in networks)

    def connect_backend(self, backend: HostPort, factory: ClientFactory) -> None:
        """Start connecting; ``factory`` builds the protocol or hears of the failure."""
        endpoint = self._backend_endpoints[backend]
        if endpoint is None:
            # An address: straight to the reactor, as portforward does. An endpoint
            # would add a Deferred and a wrapping protocol, a call more per chunk.
            timeout = BACKEND_CONNECT_TIMEOUT
            self.reactor.connectTCP(backend.host, backend.port, factory, timeout=timeout)
            return

        def failed(reason: Failure) -> None:
            # An endpoint keeps its connector to itself; the factory does not need it.
            factory.clientConnectionFailed(cast(IConnector, None), reason)

        endpoint.connect(factory).addErrback(failed)


class ProxyFactory(Factory):
    noisy = False  # connection.open/close say it, once per connection

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime

    def buildProtocol(self, addr: Any) -> FrontendProtocol:
        return FrontendProtocol(self.runtime)


def kernel_peer_address(host: str) -> IPAddress:
    """A socket's peer as the kernel spelled it; ``peer_address`` parses text from outside.

    The kernel's dotted quad is canonical, so the strict parse is not needed for IPv4.
    """
    if ":" not in host:
        with contextlib.suppress(OSError):
            return ipaddress.IPv4Address(socket.inet_aton(host))
    return peer_address(host)


def host_and_port(address: IAddress | None) -> tuple[str, int] | None:
    if isinstance(address, twisted_address.IPv4Address | twisted_address.IPv6Address):
        return address.host, address.port
    return None


class FrontendProtocol(Protocol):
    """The client's connection: one session, from accept to close.

    In order: ``connectionMade`` (a trusted peer's PROXY header first), then
    ``_admit`` (limits, watcher, ``backend`` connection); until login both
    sides' bytes go through ``login_phase``; its ``Splice`` hands the
    connections to ``relay``; ``_finish_if_done`` once both are closed. The
    other parts: ``proxy_header``, ``tls_start``, ``session_timer``,
    ``session_log``.
    """

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.login: LoginPhase | None = None  # from admission until the splice
        self.backend = BackendSide(self)
        self.client: IPAddress | None = None
        self.client_port = 0
        self.local: tuple[str, int] | None = None
        self.user: str | None = None
        self.spliced = False
        self.closing = False
        self.links = SessionLinks()
        self.log = SessionLog(runtime.config.name, runtime.usernames)
        self.tls = SessionTLS(runtime.config, runtime.tls)
        self.timer = SessionTimer(runtime.reactor)
        self._header: TrustedHeaderReader | None = None
        self._untrusted = UntrustedHeaderCheck()
        self._admitted = False
        self._finished = False
        self._opened = 0.0
        self._client_text = ""  # the client's address as logged and counted

    # -- accepting the client --

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.links.client, self.links.client_open = self.transport, True
        self.runtime.sessions.add(self)
        self._opened = self.runtime.reactor.seconds()
        self.timer.after(self.runtime.config.preauth_timeout, self._login_timed_out)
        peer = host_and_port(self.transport.getPeer())  # type: ignore[union-attr]
        self.local = host_and_port(self.transport.getHost())  # type: ignore[union-attr]
        if peer is None:
            self._reject("not a TCP peer")
        elif self.runtime.trusts_proxy_header_from(peer[0]):
            self._header = TrustedHeaderReader()  # in clear, before any TLS handshake
        else:
            self.tls.client_accepted(self.transport)
            self._admit(*peer, from_kernel=True)

    def _header_received(self, data: bytes) -> None:
        assert self._header is not None
        try:
            header = self._header.feed(data)
        except ProxyHeaderRejectedError as exc:
            self._reject(str(exc))
            return
        if header is None:
            return
        self._header = None
        self.local = host_and_port(header.destination) or self.local
        # "PROXY UNKNOWN" and LOCAL (a load balancer's health check): the peer itself.
        peer = host_and_port(header.source) or host_and_port(self.transport.getPeer())  # type: ignore[union-attr]
        assert peer is not None
        self.tls.client_accepted(self.transport)
        self._admit(*peer)
        if not header.rest or self.login is None:
            return
        if self.tls.client_implicit:
            self.tls.client_handshake(self.transport, header.rest)
        else:
            self._from_client(header.rest)

    def _admit(self, host: str, port: int, *, from_kernel: bool = False) -> None:
        try:
            client = kernel_peer_address(host) if from_kernel else peer_address(host)
        except AddressError as exc:
            self._reject(f"unusable peer address: {exc}")
            return
        self.client, self.client_port = client, port
        # The kernel spells an IPv4 peer as str() does: no second formatting.
        text = host if from_kernel and ":" not in host else str(client)
        self.log.client = self._client_text = text
        local = self.local or ("0.0.0.0", 0)  # noqa: S104 (an address to report, not to bind)
        login = LoginPhase(self, self.runtime.make_watcher(ClientOrigin(text, port, *local)))
        if not self.runtime.limits.admit(text):
            self.log("connection.refused", reason="too many connections")
            login.refuse("too many connections")
            self.disconnect()
            return
        self._admitted = True
        self.log("connection.open")
        self.login = login
        self.backend.connect()

    # -- bytes from either side --

    def dataReceived(self, data: bytes) -> None:
        self.links.bytes_in += len(data)
        if self.spliced:
            self.links.to_backend(data)
        elif self._header is not None:
            self._header_received(data)
        else:
            self._from_client(data)

    def _from_client(self, data: bytes) -> None:
        if self.login is None or self.closing:
            return
        if self._untrusted.forged(data):
            self._reject("PROXY header from an untrusted peer")
            return
        self.login.client_data(data)

    # -- what the login phase and the backend ask for --

    def logged_in(self, user: str | None) -> str:
        """Record the client's address; what became of the record, for the log."""
        assert self.client is not None
        self.user = user
        return self.runtime.recorder.login(self.client)

    def splice(self) -> None:
        if not self.links.client_open:
            return  # never after client_closed(); a client gone cannot be relayed to
        self.spliced = True
        self.login = None
        self.links.splice()
        idle = self.runtime.config.idle_timeout
        self.timer.when_idle(idle, self.links.carried, lambda: self._timed_out("idle"))

    def ended(self) -> None:
        """The backend connection has ended, or never began."""
        self.disconnect()
        self._finish_if_done()

    def disconnect(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.links.close()
        # A TLS close waits for the peer's close_notify, which some clients
        # (openssl s_client among them) never send: do not wait forever.
        self.timer.after(CLOSE_GRACE, self.links.abort)

    # -- endings --

    def _login_timed_out(self) -> None:
        self._timed_out("login")

    def _timed_out(self, phase: str) -> None:
        self.log(f"connection.timeout phase={phase}")
        if self.login is not None:
            self.login.refuse("timeout waiting for login")
        self.disconnect()

    def _reject(self, reason: str) -> None:
        peer = host_and_port(self.transport.getPeer())  # type: ignore[union-attr]
        self.log("connection.rejected", peer=peer[0] if peer else "-", reason=reason)
        self._header = None  # nothing more is read as a header
        self.disconnect()

    @property
    def in_login(self) -> bool:
        """Still before login (what a graceful shutdown waits for)."""
        return not self.spliced and not self.closing

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A half-close (client FIN) ends up here too: this protocol is not an
        # IHalfCloseableProtocol, and a POP3/IMAP client that stops sending
        # has nothing more to say that matters before login.
        self.links.client_open = False
        if isinstance(reason.value, SSL.Error):
            self.log("tls.error side=client", error=reason.getErrorMessage())
        backend_alive = self.links.backend_open or self.links.backend_connecting
        if self.login is not None and backend_alive and not self.closing:
            # A login the client sent must be seen to its end: the backend
            # logs the user in whether or not the client waits for the
            # answer. The watcher says when nothing is left in flight; the
            # pre-auth timer, still running, bounds the wait.
            self.login.client_closed()
        else:
            self.disconnect()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """Once both sides are closed: count the session out and log it, once."""
        if self._finished or not self.links.done:
            return
        self._finished = self.closing = True
        self.runtime.sessions.discard(self)
        self.timer.cancel()
        if not self._admitted:
            return
        self.runtime.limits.release(self._client_text)
        self.log(
            "connection.close",
            user=self.user,
            bytes_in=self.links.bytes_in,
            bytes_out=self.links.bytes_out,
            duration=self.runtime.reactor.seconds() - self._opened,
        )
