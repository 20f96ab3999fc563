"""The proxy's Twisted glue driven by hand: a scripted watcher, in-memory transports.

For the glue's own decisions (what it does with each action, when a session
ends) without the watchers, which have their own tests, and without timing:
the reactor is a ``MemoryReactorClock``, the connections ``StringTransport``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from relayproxy.addresses import IPAddress
from relayproxy.config import HostPort, ListenerConfig
from relayproxy.logs import format_text_line
from relayproxy.protocols.common import Action, ClientOrigin
from relayproxy.proxy import FrontendProtocol, ListenerRuntime
from relayproxy.tls import ListenerTLS

CLIENT = "192.0.2.7"
BACKEND = HostPort("198.51.100.1", 110)
WATCHER_CALLS = ("client_data", "server_data", "client_tls_started", "client_closed")


class ScriptedWatcherForGlueTest:
    """Answers each call with the next actions the test queued for it; records its input."""

    def __init__(self) -> None:
        self.queued: dict[str, list[list[Action]]] = {call: [] for call in WATCHER_CALLS}
        self.fed: list[tuple[str, bytes]] = []

    def will(self, call: str, *actions: Action) -> None:
        self.queued[call].append(list(actions))

    def _answer(self, call: str, data: bytes = b"") -> list[Action]:
        self.fed.append((call, data))
        queue = self.queued[call]
        return queue.pop(0) if queue else []

    def client_data(self, data: bytes) -> list[Action]:
        return self._answer("client_data", data)

    def server_data(self, data: bytes) -> list[Action]:
        return self._answer("server_data", data)

    def client_tls_started(self) -> list[Action]:
        return self._answer("client_tls_started")

    def client_closed(self) -> list[Action]:
        return self._answer("client_closed")

    def refusal(self, reason: str) -> bytes:
        return b"-ERR " + reason.encode() + b"\r\n"


class RecorderForGlueTest:
    def __init__(self) -> None:
        self.logins: list[str] = []

    def login(self, address: IPAddress) -> str:
        self.logins.append(str(address))
        return "queued"


class Glue:
    """One session: the frontend, its client transport, and the backend once connected."""

    def __init__(
        self, *, usernames: bool = True, backend: tuple[HostPort, ...] = (BACKEND,), **settings: Any
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.watcher = ScriptedWatcherForGlueTest()
        self.recorder = RecorderForGlueTest()
        self.events: list[LogEvent] = []
        config = ListenerConfig(
            name="glue",
            protocol="pop3",
            listen=HostPort("192.0.2.1", 110),
            backend=backend,
            **settings,
        )

        def make_watcher(origin: ClientOrigin) -> Any:
            return self.watcher

        self.runtime = ListenerRuntime(
            config=config,
            tls=ListenerTLS(None, None),
            recorder=self.recorder,  # type: ignore[arg-type]
            make_watcher=make_watcher,
            reactor=self.reactor,
            usernames=usernames,
        )
        self.frontend = FrontendProtocol(self.runtime)
        self.client = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 110),
            peerAddress=IPv4Address("TCP", CLIENT, 40000),
            lenient=True,  # like a real TLS transport: may resume reading while it closes
        )
        self.backend_protocol: Any = None
        self.backend = StringTransport(lenient=True)
        globalLogPublisher.addObserver(self.events.append)
        self.frontend.makeConnection(self.client)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def connect_backend(self) -> None:
        """The backend accepts the connection the glue started."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        assert HostPort(host, port) in self.runtime.config.backend
        self.backend_protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.backend_protocol.makeConnection(self.backend)

    def refuse_backend(self) -> None:
        connector = self.reactor.connectors[-1]
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def client_leaves(self) -> None:
        self.client.connected = False
        self.frontend.connectionLost(Failure(ConnectionDone()))

    def backend_leaves(self) -> None:
        self.backend.connected = False
        self.backend_protocol.connectionLost(Failure(ConnectionDone()))

    def lines(self, name: str) -> list[str]:
        """The text log lines of the event ``name``, rendered as the daemon renders them."""
        return [
            format_text_line(event, usernames=self.runtime.usernames)
            for event in self.events
            if event.get("log_namespace") == "relayproxy"
            and str(event.get("log_format", "")).startswith(name + " ")
        ]
