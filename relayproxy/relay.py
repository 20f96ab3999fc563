"""A session's two connections, and the plain relay between them after login.

Owns the transports' state (open, connecting, lost), the byte counts, and
splicing and closing; decides nothing about the protocol. After the watcher's
``Splice`` this is ``twisted.protocols.portforward``: each side writes to the
other and each transport is the other's producer, so a slow reader throttles
a fast writer instead of filling memory.
"""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> None:
    """Small command/response lines go out at once instead of waiting on Nagle."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class SessionLinks:
    """The client and backend transports: which are open, what they carried, splice and close.

    Twisted's TLS ``loseConnection`` sends close_notify only once no producer
    is registered (``twisted.protocols.tls``), and after the splice each
    transport is the other's producer: so every close unregisters first, or
    a TLS side would stay open until the close grace's abort (a client
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
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
        self._paired = False  # each transport registered as the other's producer

    def carried(self) -> int:
        """Bytes either way so far: what the idle check compares."""
        return self.bytes_in + self.bytes_out

    @property
    def done(self) -> bool:
        return not (self.client_open or self.backend_connecting or self.backend_open)

    def to_client(self, data: bytes) -> None:
        if not self.client_open:
            return  # the client has gone; a login in flight may still be seen through
        self.bytes_out += len(data)
        self.client.write(data)

    def send_to_client_now(self) -> None:
        """What was written to the client, sent now rather than at the reactor's next turn.

        Twisted sends a transport's writes when its poll next finds the socket
        writable, after the rest of this turn's work; ``doWrite`` is that send
        (``IWriteDescriptor``). A transport without one (a TLS wrapper
        protocol) sends at the next turn as usual.
        """
        send = getattr(self.client, "doWrite", None)
        # Not while closing: doWrite would then finish the close and return its
        # reason, which only the reactor's own call passes on to connectionLost.
        if self.client_open and send is not None and not self.client.disconnecting:
            send()

    def to_backend(self, data: bytes) -> None:
        if self.backend_open:
            self.backend.write(data)

    def splice(self) -> None:
        if not (self.client_open and self.backend_open):
            return
        self._paired = True
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
