"""The Twisted glue: two transports, a watcher between them, then a plain relay.

Owns sockets, timers, TLS start-up and back-pressure; makes no protocol
decision of its own. Before login every byte goes through the listener's
sans-I/O watcher (``relayproxy.protocols``) and the glue carries out the
actions it returns, in order. After ``Splice`` the watcher is dropped and
the relay is ``twisted.protocols.portforward``'s: each side writes to the
other and each transport is the other's producer, so a slow reader
throttles a fast writer instead of filling memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import address as twisted_address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure

from relayproxy.addresses import AddressError, IPAddress, peer_address
from relayproxy.config import ListenerConfig, Network
from relayproxy.descriptors import SessionBudget
from relayproxy.protocols.common import (
    Action,
    ClientOrigin,
    Close,
    LoginFailed,
    LoginRefused,
    LoginSucceeded,
    ProtocolViolationError,
    Splice,
    StartClientTLS,
    StartServerTLS,
    ToClient,
    ToServer,
    Watcher,
)
from relayproxy.proxy_header import (
    V2_SIGNATURE,
    looks_like_proxy_header,
    proxy_header_v1,
    proxy_header_v2,
)
from relayproxy.recorder import Recorder
from relayproxy.tls import BackendIdentityError, ListenerTLS

log = Logger(namespace="relayproxy")

# Seconds a closing connection may take to flush and finish its TLS close.
CLOSE_GRACE = 10.0


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
        self._by_address: Counter[IPAddress] = Counter()

    def admit(self, address: IPAddress) -> bool:
        if self.open >= self.total or self._by_address[address] >= self.per_address:
            return False
        if self.budget is not None and not self.budget.admit():
            return False
        self.open += 1
        self._by_address[address] += 1
        return True

    def release(self, address: IPAddress) -> None:
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
        self._backend_endpoint = self._make_backend_endpoint()

    def _make_backend_endpoint(self) -> Any:
        # Built once: a HostnameEndpoint per connection costs a resolver
        # round trip through a thread even for an address literal.
        backend = self.config.backend
        endpoint: Any
        try:
            address = peer_address(backend.host)
        except AddressError:
            endpoint = HostnameEndpoint(self.reactor, backend.host, backend.port, timeout=10)
        else:
            kind = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
            endpoint = kind(self.reactor, backend.host, backend.port, timeout=10)
        return endpoint

    def trusts_proxy_header_from(self, host: str) -> bool:
        if not self.config.proxy_protocol_in:
            return False
        try:
            address = peer_address(host)
        except AddressError:
            return False
        networks: tuple[Network, ...] = self.config.proxy_protocol_in
        return any(address in network for network in networks)

    def connect_backend(self, frontend: FrontendProtocol) -> Deferred[Any]:
        return self._backend_endpoint.connect(_BackendFactory(frontend))  # type: ignore[no-any-return]


class ProxyFactory(Factory):
    noisy = False  # connection.open/close say it, once per connection

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime

    def buildProtocol(self, addr: Any) -> FrontendProtocol:
        return FrontendProtocol(self.runtime)


def _no_delay(transport: Any) -> None:
    """Small command/response lines go out at once instead of waiting on Nagle."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def _address_of(address: Any) -> tuple[str, int] | None:
    if isinstance(address, twisted_address.IPv4Address | twisted_address.IPv6Address):
        return address.host, address.port
    return None


class LoginLog:
    """The login events of a listener's sessions; the user name only if ``[log] usernames``."""

    def __init__(self, listener: str, usernames: bool) -> None:
        self.listener = listener
        self.usernames = usernames

    def user_field(self, user: str | None) -> str:
        return (user or "-") if self.usernames else "-"

    def succeeded(self, client: IPAddress, event: LoginSucceeded, record: str) -> None:
        log.info(
            "login.success client={client} user={user} mechanism={mechanism} "
            "listener={listener} record={record}",
            client=str(client),
            user=self.user_field(event.user),
            mechanism=event.mechanism,
            listener=self.listener,
            record=record,
        )

    def failed(self, client: IPAddress | None, event: LoginFailed) -> None:
        log.warn(
            "login.failure client={client} user={user} mechanism={mechanism} listener={listener}",
            client=str(client),
            user=self.user_field(event.user),
            mechanism=event.mechanism,
            listener=self.listener,
        )

    def refused(self, client: IPAddress | None, event: LoginRefused) -> None:
        # Its own event, not login.failure: the proxy refused before any
        # password was tried (a client set up without TLS, not a guesser),
        # so the fail2ban filter must not count it.
        log.warn(
            "login.refused client={client} user={user} mechanism={mechanism} "
            "listener={listener} reason={reason}",
            client=str(client),
            user=self.user_field(event.user),
            mechanism=event.mechanism,
            listener=self.listener,
            reason=event.reason,
        )


class SessionLinks:
    """A session's two connections: which are still open, splicing and closing them.

    Twisted's TLS ``loseConnection`` sends close_notify only once no producer
    is registered (``twisted.protocols.tls``), and after the splice each
    transport is the other's producer: so every close unregisters first, or
    a TLS side would stay open until the ``CLOSE_GRACE`` abort (a client
    waiting for the server to close after LOGOUT would wait that long).
    A transport already lost is never touched again: Twisted's TLS layer has
    dropped its state by then, and a late call raises.
    """

    def __init__(self) -> None:
        self.client: Any = None
        self.backend: Any = None
        self.client_open = False
        self.backend_connecting = False
        self.backend_open = False
        self._paired = False  # each transport registered as the other's producer

    @property
    def done(self) -> bool:
        return not (self.client_open or self.backend_connecting or self.backend_open)

    def splice(self) -> None:
        if not (self.client_open and self.backend_open):
            return
        self._paired = True
        # portforward's back-pressure: each transport throttles the other.
        self.client.registerProducer(self.backend, True)
        self.backend.registerProducer(self.client, True)

    def close(self) -> None:
        self._unsplice()
        if self.client_open:
            self.client.loseConnection()
        if self.backend_open:
            self.backend.loseConnection()

    def abort(self) -> None:
        if self.client_open:
            self.client.abortConnection()
        if self.backend_open:
            self.backend.abortConnection()

    def _unsplice(self) -> None:
        if not self._paired:
            return
        self._paired = False
        # Reading resumes too: a side the other had paused must still read
        # its peer's close_notify, or its TLS close waits for the abort.
        for transport, still_open in (
            (self.client, self.client_open),
            (self.backend, self.backend_open),
        ):
            if still_open:
                transport.unregisterProducer()
                transport.resumeProducing()


class FrontendProtocol(Protocol):
    """The client's connection; owns the session and its backend connection."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.listener = runtime.config.name
        self.watcher: Watcher | None = None
        self.backend: BackendProtocol | None = None
        self.client: IPAddress | None = None
        self.client_port = 0
        self.local: tuple[str, int] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.user: str | None = None
        self.spliced = False
        self.closing = False
        self.links = SessionLinks()
        self.logins = LoginLog(self.listener, runtime.usernames)
        self._admitted = False
        self._finished = False
        self._opened = 0.0
        self._head = b""  # first bytes, to spot a PROXY header from an untrusted peer
        self._header_parser: V1Parser | V2Parser | None = None
        self._awaiting_header = False
        self._header_buffer = b""
        self._timer: IDelayedCall | None = None
        self._idle_mark = -1

    # -- connection set-up --

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self.links.client, self.links.client_open = self.transport, True
        self.runtime.sessions.add(self)
        reactor = self.runtime.reactor
        self._opened = reactor.seconds()
        self._timer = reactor.callLater(self.runtime.config.preauth_timeout, self._timed_out)
        peer = _address_of(self.transport.getPeer())  # type: ignore[union-attr]
        self.local = _address_of(self.transport.getHost())  # type: ignore[union-attr]
        if peer is None:
            self._reject("not a TCP peer")
            return
        if self.runtime.trusts_proxy_header_from(peer[0]):
            self._awaiting_header = True  # in clear, before any TLS handshake
            return
        self._start_implicit_tls()
        self._start(*peer)

    def _start_implicit_tls(self) -> None:
        if self.runtime.config.tls != "implicit":
            return
        # Per connection rather than per port, so that a reload's new
        # certificate is used from the next connection on.
        assert self.runtime.tls.server is not None
        self.transport.startTLS(self.runtime.tls.server)  # type: ignore[union-attr]

    def _start(self, host: str, port: int) -> None:
        try:
            client = peer_address(host)
        except AddressError as exc:
            self._reject(f"unusable peer address: {exc}")
            return
        self.client, self.client_port = client, port
        if not self.runtime.limits.admit(client):
            log.warn(
                "connection.refused client={client} listener={listener} reason={reason}",
                client=str(client),
                listener=self.listener,
                reason="too many connections",
            )
            watcher = self.runtime.make_watcher(self._origin())
            self._write_client(watcher.refusal("too many connections"))
            self._disconnect()
            return
        self._admitted = True
        log.info(
            "connection.open client={client} listener={listener}",
            client=str(client),
            listener=self.listener,
        )
        self.watcher = self.runtime.make_watcher(self._origin())
        self.links.backend_connecting = True
        self.runtime.connect_backend(self).addErrback(self._backend_unreachable)

    def _origin(self) -> ClientOrigin:
        local = self.local or ("0.0.0.0", 0)  # noqa: S104 (an address to report, not to bind)
        return ClientOrigin(str(self.client), self.client_port, local[0], local[1])

    # -- bytes from the client --

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.spliced:
            assert self.backend is not None
            self.backend.transport.write(data)  # type: ignore[union-attr]
            return
        self._from_client(data)

    def _from_client(self, data: bytes) -> None:
        if self._awaiting_header:
            self._proxy_header(data)
            return
        if self.watcher is None or self.closing:
            return
        if len(self._head) < len(V2_SIGNATURE):
            self._head += data[:12]
            if looks_like_proxy_header(self._head):
                self._reject("PROXY header from an untrusted peer")
                return
        watcher = self.watcher
        self._consult(lambda: watcher.client_data(data))

    def _proxy_header(self, data: bytes) -> None:
        self._header_buffer += data
        buffered = self._header_buffer
        parser = self._header_parser
        if parser is None:
            if len(buffered) >= 16 and buffered.startswith(V2Parser.PREFIX):
                parser = V2Parser()
            elif buffered.startswith(V1Parser.PROXYSTR + b" "):
                parser = V1Parser()
            elif V2Parser.PREFIX.startswith(buffered[:12]) or (V1Parser.PROXYSTR + b" ").startswith(
                buffered[:6]
            ):
                return  # too short to tell yet
            else:
                self._reject("a trusted peer sent no PROXY header")
                return
            self._header_parser = parser
            data = buffered
        try:
            info, rest = parser.feed(data)
        except InvalidProxyHeader:
            self._reject("invalid PROXY header")
            return
        if info is None:
            return
        self._awaiting_header = False
        self._header_buffer = b""
        source = _address_of(info.source)
        destination = _address_of(info.destination)
        if destination is not None:
            self.local = destination
        peer = source or _address_of(self.transport.getPeer())  # type: ignore[union-attr]
        assert peer is not None
        self._start_implicit_tls()
        self._start(*peer)  # "PROXY UNKNOWN"/LOCAL (health checks): the peer itself
        if not rest or self.watcher is None:
            return
        if self.runtime.config.tls == "implicit":
            # Handshake bytes that came behind the header: startTLS made the
            # transport's protocol the TLS layer (as twisted.internet._newtls
            # documents), so they are fed in there, not to the watcher.
            self.transport.protocol.dataReceived(rest)  # type: ignore[union-attr]
        else:
            self._from_client(rest)

    # -- bytes from the backend --

    def backend_connected(self, backend: BackendProtocol) -> None:
        self.backend = backend
        self.links.backend, self.links.backend_open = backend.transport, True
        self.links.backend_connecting = False
        if self.closing:
            backend.transport.loseConnection()  # type: ignore[union-attr]
            return
        header = self._proxy_header_out()
        if header:
            backend.transport.write(header)  # type: ignore[union-attr]
        if self.runtime.config.backend_tls == "implicit":
            # After the PROXY header, which a backend (Dovecot's `haproxy =
            # yes`) reads in clear before its TLS handshake.
            assert self.runtime.tls.backend is not None
            backend.transport.startTLS(self.runtime.tls.backend)  # type: ignore[union-attr]

    def server_data(self, data: bytes) -> None:
        if self.spliced:
            self.bytes_out += len(data)
            self.transport.write(data)  # type: ignore[union-attr]
            return
        if self.watcher is not None and not self.closing:
            watcher = self.watcher
            self._consult(lambda: watcher.server_data(data))

    def backend_lost(self, reason: Failure) -> None:
        self.links.backend_open = False
        if isinstance(reason.value, SSL.Error | BackendIdentityError):
            log.warn(
                "tls.error side=backend client={client} listener={listener} error={error}",
                client=str(self.client),
                listener=self.listener,
                error=reason.getErrorMessage(),
            )
            # A handshake that failed (a certificate not for the backend among
            # reasons) is an unreachable backend, as far as the client can tell.
            if self.watcher is not None and not self.closing:
                self._write_client(self.watcher.refusal("backend unavailable, try again later"))
        self._disconnect()
        self._finish_if_done()

    def _backend_unreachable(self, reason: Failure) -> None:
        self.links.backend_connecting = False
        log.error(
            "backend.unreachable client={client} listener={listener} backend={backend} "
            "error={error}",
            client=str(self.client),
            listener=self.listener,
            backend=str(self.runtime.config.backend),
            error=reason.getErrorMessage(),
        )
        if self.watcher is not None:
            self._write_client(self.watcher.refusal("backend unavailable, try again later"))
        self._disconnect()
        self._finish_if_done()

    def _proxy_header_out(self) -> bytes:
        version = self.runtime.config.proxy_protocol_out
        if version == "none" or self.client is None or self.local is None:
            return b""
        local = peer_address(self.local[0])
        build = proxy_header_v1 if version == "v1" else proxy_header_v2
        return build(self.client, self.client_port, local, self.local[1])

    # -- carrying out the watcher's decisions --

    def _consult(self, decide: Callable[[], list[Action]]) -> None:
        try:
            actions = decide()
        except ProtocolViolationError as exc:
            log.warn(
                "protocol.error client={client} listener={listener} error={error}",
                client=str(self.client),
                listener=self.listener,
                error=str(exc),
            )
            self._disconnect()
            return
        self._run(actions)

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToServer):
                if self.links.backend_open and not self.closing:
                    self.links.backend.write(action.data)
            elif isinstance(action, ToClient):
                self._write_client(action.data)
            elif isinstance(action, StartClientTLS):
                self._start_client_tls()
            elif isinstance(action, StartServerTLS):
                assert self.backend is not None and self.runtime.tls.backend is not None
                self.backend.transport.startTLS(self.runtime.tls.backend)  # type: ignore[union-attr]
            elif isinstance(action, LoginSucceeded):
                self._login_succeeded(action)
            elif isinstance(action, LoginFailed):
                self.logins.failed(self.client, action)
            elif isinstance(action, LoginRefused):
                self.logins.refused(self.client, action)
            elif isinstance(action, Splice):
                self._splice()
            elif isinstance(action, Close):
                log.info(
                    "connection.closing client={client} listener={listener} reason={reason}",
                    client=str(self.client),
                    listener=self.listener,
                    reason=action.reason,
                )
                self._disconnect()

    def _write_client(self, data: bytes) -> None:
        if not self.links.client_open:
            return  # the client has gone; the watcher may still be seeing a login through
        self.bytes_out += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def _start_client_tls(self) -> None:
        assert self.watcher is not None and self.runtime.tls.server is not None
        if not self.links.client_open:
            return
        self.transport.startTLS(self.runtime.tls.server)  # type: ignore[union-attr]
        # Bytes that arrive from now on are decrypted by the TLS layer.
        watcher = self.watcher
        self._consult(watcher.client_tls_started)

    def _login_succeeded(self, event: LoginSucceeded) -> None:
        assert self.client is not None
        self.user = event.user
        self.logins.succeeded(self.client, event, self.runtime.recorder.login(self.client))

    def _splice(self) -> None:
        if not self.links.client_open:
            return  # never after client_closed(); a client gone cannot be relayed to
        self.spliced = True
        self.watcher = None
        self.links.splice()
        self._rearm(self.runtime.config.idle_timeout, self._idle_check)

    # -- timers and teardown --

    def _rearm(self, delay: float, call: Callable[[], None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.runtime.reactor.callLater(delay, call)

    def _idle_check(self) -> None:
        # A counter compared once per period, instead of a timer reset per chunk.
        mark = self.bytes_in + self.bytes_out
        if mark != self._idle_mark:
            self._idle_mark = mark
            self._rearm(self.runtime.config.idle_timeout, self._idle_check)
            return
        log.info(
            "connection.timeout client={client} listener={listener} phase=idle",
            client=str(self.client),
            listener=self.listener,
        )
        self._disconnect()

    def _timed_out(self) -> None:
        self._timer = None
        log.info(
            "connection.timeout client={client} listener={listener} phase=login",
            client=str(self.client),
            listener=self.listener,
        )
        if self.watcher is not None:
            self._write_client(self.watcher.refusal("timeout waiting for login"))
        self._disconnect()

    def _reject(self, reason: str) -> None:
        peer = _address_of(self.transport.getPeer())  # type: ignore[union-attr]
        log.warn(
            "connection.rejected peer={peer} listener={listener} reason={reason}",
            peer=peer[0] if peer else "-",
            listener=self.listener,
            reason=reason,
        )
        self._disconnect()

    def _disconnect(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.links.close()
        # A TLS close waits for the peer's close_notify, which some clients
        # (openssl s_client among them) never send: do not wait forever.
        self._rearm(CLOSE_GRACE, self._abort_lingering)

    def _abort_lingering(self) -> None:
        self._timer = None
        self.links.abort()

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
            log.warn(
                "tls.error side=client client={client} listener={listener} error={error}",
                client=str(self.client),
                listener=self.listener,
                error=reason.getErrorMessage(),
            )
        backend_alive = self.links.backend_open or self.links.backend_connecting
        if self.watcher is not None and backend_alive and not self.closing:
            # A login the client sent must be seen to its end: the
            # backend logs the user in whether or not the client waits for
            # the answer. The watcher says when nothing is left in flight;
            # the pre-auth timer, still running, bounds the wait.
            watcher = self.watcher
            self._consult(watcher.client_closed)
        else:
            self._disconnect()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """Once both sides are closed: count the session out and log it, once."""
        if self._finished or not self.links.done:
            return
        self._finished = True
        self.closing = True
        self.runtime.sessions.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._admitted:
            return
        assert self.client is not None
        self.runtime.limits.release(self.client)
        log.info(
            "connection.close client={client} listener={listener} user={user} "
            "bytes_in={bytes_in} bytes_out={bytes_out} duration={duration:.3f}",
            client=str(self.client),
            listener=self.listener,
            user=self.logins.user_field(self.user),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=self.runtime.reactor.seconds() - self._opened,
        )


class BackendProtocol(Protocol):
    def __init__(self, frontend: FrontendProtocol) -> None:
        self.frontend = frontend

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self.frontend.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.frontend.server_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.frontend.backend_lost(reason)


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, frontend: FrontendProtocol) -> None:
        self.frontend = frontend

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self.frontend)
