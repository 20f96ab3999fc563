"""Before login: the session's bytes through its watcher, and the watcher's actions carried out.

Owns feeding the sans-I/O watcher (``relayproxy.protocols``) and doing what
it returns, in order; decides nothing itself. The session
(``proxy.FrontendProtocol``) owns the connections' lifetime: this phase asks
it to splice or to close. A watcher that meets an event its transition table
has no entry for raises ``ProtocolViolationError``, and the session closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
        # A login recorded whose line is not logged yet: (user, mechanism, record).
        self._success: tuple[str | None, str, str] | None = None

    def client_data(self, data: bytes) -> None:
        self._consult(self.watcher.client_data, data)

    def server_data(self, data: bytes) -> None:
        self._consult(self.watcher.server_data, data)

    def client_closed(self) -> None:
        self._consult(self.watcher.client_closed)

    def refuse(self, reason: str) -> None:
        """Tell the client why it is closed, in its protocol."""
        self.session.links.to_client(self.watcher.refusal(reason))

    def _consult(self, decide: Callable[..., list[Action]], *data: bytes) -> None:
        try:
            actions = decide(*data)
        except ProtocolViolationError as exc:
            self.session.log("protocol.error", error=str(exc))
            self.session.disconnect()
            return
        for action in actions:
            kind = type(action)
            if self._success is not None and kind is not ToClient:
                self._log_success()
            # The action classes are final: one look-up instead of a chain of isinstance.
            _CARRY_OUT[kind](self, action)
        if self._success is not None:
            self._log_success()

    def _to_server(self, action: ToServer) -> None:
        if not self.session.closing:
            self.session.links.to_backend(action.data)

    def _to_client(self, action: ToClient) -> None:
        links = self.session.links
        links.to_client(action.data)
        if self._success is not None:
            links.send_to_client_now()  # the success line: before its log line, not after

    def _start_client_tls(self, action: StartClientTLS) -> None:
        links = self.session.links
        if links.client_open:
            self.session.tls.start_client(links.client)
            # Bytes that arrive from now on are the TLS layer's.
            self._consult(self.watcher.client_tls_started)

    def _start_server_tls(self, action: StartServerTLS) -> None:
        self.session.tls.start_backend(self.session.links.backend)

    def _login_succeeded(self, action: LoginSucceeded) -> None:
        # Recorded (on disk) before the client can read the backend's success
        # line, which comes next; logged once that line is on its way, so the
        # client does not wait for the log.
        record = self.session.logged_in(action.user)
        self._success = (action.user, action.mechanism, record)

    def _log_success(self) -> None:
        assert self._success is not None
        (user, mechanism, record), self._success = self._success, None
        self.session.log("login.success", user=user, mechanism=mechanism, record=record)

    def _login_failed(self, action: LoginFailed) -> None:
        self.session.log("login.failure", user=action.user, mechanism=action.mechanism)

    def _login_refused(self, action: LoginRefused) -> None:
        user, mechanism, reason = action.user, action.mechanism, action.reason
        self.session.log("login.refused", user=user, mechanism=mechanism, reason=reason)

    def _splice(self, action: Splice) -> None:
        self.session.splice()

    def _close(self, action: Close) -> None:
        self.session.log("connection.closing", reason=action.reason)
        self.session.disconnect()


_CARRY_OUT: dict[type, Callable[[LoginPhase, Any], None]] = {
    ToServer: LoginPhase._to_server,
    ToClient: LoginPhase._to_client,
    StartClientTLS: LoginPhase._start_client_tls,
    StartServerTLS: LoginPhase._start_server_tls,
    LoginSucceeded: LoginPhase._login_succeeded,
    LoginFailed: LoginPhase._login_failed,
    LoginRefused: LoginPhase._login_refused,
    Splice: LoginPhase._splice,
    Close: LoginPhase._close,
}
