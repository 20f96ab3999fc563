"""A session's backend connection: connecting, what precedes its first byte, its bytes, its end.

The backend half of ``twisted.protocols.portforward`` (its ``ProxyClient``):
connected only once a client is admitted; the proxy's PROXY header and
implicit TLS go first (``tls_start``); before login its bytes go to the
login phase, after the splice to the client. A backend that cannot be
reached, or whose TLS handshake fails, is the same to the client: a refusal
in its protocol, then the close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from relayproxy.proxy_header import header_for_backend
from relayproxy.relay import no_delay
from relayproxy.tls import BackendIdentityError

if TYPE_CHECKING:
    from relayproxy.proxy import FrontendProtocol

UNAVAILABLE = "backend unavailable, try again later"


class BackendSide:
    def __init__(self, session: FrontendProtocol) -> None:
        self.session = session

    def connect(self) -> None:
        self.session.links.backend_connecting = True
        connecting = self.session.runtime.connect_backend(_BackendFactory(self))
        connecting.addErrback(self._unreachable)

    def connected(self, transport: Any) -> None:
        session, links = self.session, self.session.links
        links.backend, links.backend_open, links.backend_connecting = transport, True, False
        if session.closing:
            transport.loseConnection()
            return
        assert session.client is not None
        version = session.runtime.config.proxy_protocol_out
        header = header_for_backend(version, session.client, session.client_port, session.local)
        session.tls.backend_connected(transport, header)

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
            if session.login is not None and not session.closing:
                session.login.refuse(UNAVAILABLE)
        session.ended()

    def _unreachable(self, reason: Failure) -> None:
        session = self.session
        session.links.backend_connecting = False
        backend = str(session.runtime.config.backend)
        session.log("backend.unreachable", backend=backend, error=reason.getErrorMessage())
        if session.login is not None:
            session.login.refuse(UNAVAILABLE)
        session.ended()


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


class _BackendFactory(Factory):
    noisy = False  # connection.open/close say it, once per session

    def __init__(self, side: BackendSide) -> None:
        self.side = side

    def buildProtocol(self, addr: Any) -> _BackendProtocol:
        return _BackendProtocol(self.side)
