"""Where each side of a session starts TLS, and what must come before it.

Client side: implicit TLS starts on each connection as it is accepted, after
the PROXY header when a trusted load balancer sends one, rather than once per
port, so that a reload's new certificate serves the next connection; STARTTLS
starts when the watcher says so. Backend side: implicit TLS starts after the
proxy's own PROXY header, which a backend (Dovecot's ``haproxy = yes``) reads
in clear before its handshake; STARTTLS when the watcher says so. The options
(certificates, verification) are ``relayproxy.tls``'s.
"""

from __future__ import annotations

from typing import Any

from relayproxy.config import HostPort, ListenerConfig
from relayproxy.tls import ListenerTLS
from relayproxy.twisted_private import feed_tls_layer


class SessionTLS:
    """A listener's TLS settings, as one session's transports start them."""

    def __init__(self, config: ListenerConfig, tls: ListenerTLS) -> None:
        self.client_implicit = config.tls == "implicit"
        self._backend_implicit = config.backend_tls == "implicit"
        self._tls = tls
        self._backend: HostPort | None = None  # the one connected: its name is verified

    def client_accepted(self, transport: Any) -> None:
        if self.client_implicit:
            self.start_client(transport)

    def client_handshake(self, transport: Any, data: bytes) -> None:
        """Handshake bytes that came behind the PROXY header, read before TLS started."""
        feed_tls_layer(transport, data)

    def start_client(self, transport: Any) -> None:
        assert self._tls.server is not None  # config checked: a TLS listener has a certificate
        transport.startTLS(self._tls.server)

    def backend_connected(self, transport: Any, header: bytes, backend: HostPort) -> None:
        self._backend = backend
        if header:
            transport.write(header)
        if self._backend_implicit:
            self.start_backend(transport)

    def start_backend(self, transport: Any) -> None:
        assert self._tls.backend is not None and self._backend is not None
        transport.startTLS(self._tls.backend[self._backend])
