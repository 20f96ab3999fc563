"""A session's backend connection: connecting, what precedes its first byte, its bytes, its end.

The backend half of ``twisted.protocols.portforward`` (its ``ProxyClient``):
connected only once a client is admitted; the proxy's PROXY header and
implicit TLS go first (``tls_start``); before login its bytes go to the
login phase, after the splice to the client. The listener's backends are
tried in the order ``relayproxy.backends`` gives, one connect at a time,
until one answers; the client, which has not been greeted yet, sees none
of it. When none answers, or the one that did fails its TLS handshake, the
client gets a temporary refusal in its protocol, then the close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from relayproxy.backends import Attempt
from relayproxy.config import HostPort
from relayproxy.proxy_header import header_for_backend
from relayproxy.relay import no_delay
from relayproxy.tls import BackendIdentityError

if TYPE_CHECKING:
    from relayproxy.proxy import FrontendProtocol

# Temporary failures a client may retry, not a login refused: POP3's
# SYS/TEMP (RFC 3206) and IMAP's UNAVAILABLE (RFC 5530) say so to clients
# that read response codes; the text says it to people.
UNAVAILABLE = {
    "pop3": "[SYS/TEMP] backend unavailable, try again later",
    "imap": "[UNAVAILABLE] backend unavailable, try again later",
}


class BackendSide:
    def __init__(self, session: FrontendProtocol) -> None:
        self.session = session
        self.backend: HostPort | None = None  # the one that answered
        self._untried: list[HostPort] = []
        self._attempt: Attempt | None = None

    def connect(self) -> None:
        runtime = self.session.runtime
        self.session.links.backend_connecting = True
        self._untried = runtime.backends.order(runtime.reactor.seconds())
        self._try_next()

    def _try_next(self) -> None:
        runtime = self.session.runtime
        backend = self._untried.pop(0)
        self._attempt = attempt = runtime.backends.attempt(backend)
        runtime.connect_backend(backend, _BackendFactory(self, attempt))

    def connected(self, transport: Any) -> None:
        session, links = self.session, self.session.links
        links.backend, links.backend_open, links.backend_connecting = transport, True, False
        assert self._attempt is not None
        self.backend = self._attempt.backend
        if session.runtime.backends.answered(self._attempt):
            session.log("backend.recovered", backend=str(self.backend))
        if session.closing:
            transport.loseConnection()
            return
        assert session.client is not None
        version = session.runtime.config.proxy_protocol_out
        header = header_for_backend(version, session.client, session.client_port, session.local)
        session.tls.backend_connected(transport, header, self.backend)

    def data(self, data: bytes) -> None:
        session = self.session
        if session.spliced:
            session.links.to_client(data)
        elif session.login is not None and not session.closing:
            session.login.server_data(data)

    def lost(self, reason: Failure) -> None:
        session = self.session
        session.links.backend_open = False
        if isinstance(reason.value, SSL.Error | BackendIdentityError):
            session.log("tls.error side=backend", error=reason.getErrorMessage())
            # A certificate not for the backend, among other reasons: as far
            # as the client can tell, the backend is unreachable.
            self._refuse()
        session.ended()

    def failed(self, reason: Failure, attempt: Attempt) -> None:
        """The connect ``attempt`` failed: the next backend, or the client is refused."""
        session, backends = self.session, self.session.runtime.backends
        if backends.failed(attempt, session.runtime.reactor.seconds()):
            error = reason.getErrorMessage()
            session.log("backend.unreachable", backend=str(attempt.backend), error=error)
        if self._untried and not session.closing:
            self._try_next()
            return
        session.links.backend_connecting = False
        if not session.closing:
            session.log("connection.refused", reason="no backend answered")
        self._refuse()
        session.ended()

    def _refuse(self) -> None:
        session = self.session
        if session.login is not None and not session.closing:
            session.login.refuse(UNAVAILABLE[session.runtime.config.protocol])


class _BackendProtocol(Protocol):
    def __init__(self, side: BackendSide) -> None:
        self.side = side

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.side.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.side.data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.side.lost(reason)


class _BackendFactory(ClientFactory):
    noisy = False  # connection.open/close say it, once per session

    def __init__(self, side: BackendSide, attempt: Attempt) -> None:
        self.side = side
        self.attempt = attempt

    def buildProtocol(self, addr: Any) -> _BackendProtocol:
        return _BackendProtocol(self.side)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.side.failed(reason, self.attempt)
