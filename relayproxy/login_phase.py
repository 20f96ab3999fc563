"""Before login: the session's bytes through its watcher, and the watcher's actions carried out.

Owns feeding the sans-I/O watcher (``relayproxy.protocols``) and doing what
it returns, in order; decides nothing itself. The session
(``proxy.FrontendProtocol``) owns the connections' lifetime: this phase asks
it to splice or to close. A watcher that meets an event its transition table
has no entry for raises ``ProtocolViolationError``, and the session closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from relayproxy.protocols.common import (
    Action,
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

if TYPE_CHECKING:
    from relayproxy.proxy import FrontendProtocol


class LoginPhase:
    def __init__(self, session: FrontendProtocol, watcher: Watcher) -> None:
        self.session = session
        self.watcher = watcher

    def client_data(self, data: bytes) -> None:
        self._consult(lambda: self.watcher.client_data(data))

    def server_data(self, data: bytes) -> None:
        self._consult(lambda: self.watcher.server_data(data))

    def client_closed(self) -> None:
        self._consult(self.watcher.client_closed)

    def refuse(self, reason: str) -> None:
        """Tell the client why it is closed, in its protocol."""
        self.session.links.to_client(self.watcher.refusal(reason))

    def _consult(self, decide: Callable[[], list[Action]]) -> None:
        try:
            actions = decide()
        except ProtocolViolationError as exc:
            self.session.log("protocol.error", error=str(exc))
            self.session.disconnect()
            return
        for action in actions:
            self._carry_out(action)

    def _carry_out(self, action: Action) -> None:
        session, links, log = self.session, self.session.links, self.session.log
        if isinstance(action, ToServer):
            if not session.closing:
                links.to_backend(action.data)
        elif isinstance(action, ToClient):
            links.to_client(action.data)
        elif isinstance(action, StartClientTLS):
            if links.client_open:
                session.tls.start_client(links.client)
                # Bytes that arrive from now on are the TLS layer's.
                self._consult(self.watcher.client_tls_started)
        elif isinstance(action, StartServerTLS):
            session.tls.start_backend(links.backend)
        elif isinstance(action, LoginSucceeded):
            record = session.logged_in(action.user)
            log("login.success", user=action.user, mechanism=action.mechanism, record=record)
        elif isinstance(action, LoginFailed):
            log("login.failure", user=action.user, mechanism=action.mechanism)
        elif isinstance(action, LoginRefused):
            log("login.refused", user=action.user, mechanism=action.mechanism, reason=action.reason)
        elif isinstance(action, Splice):
            session.splice()
        elif isinstance(action, Close):
            log("connection.closing", reason=action.reason)
            session.disconnect()
