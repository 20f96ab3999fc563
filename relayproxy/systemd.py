"""Telling systemd how the daemon is doing: the sd_notify(3) protocol.

Owns the notification datagrams a ``Type=notify`` service sends its
manager: ``READY=1`` once every listener is bound and the store opened,
``RELOADING=1`` when a SIGHUP reload starts (``READY=1`` again when it is
done) and ``STOPPING=1`` at SIGTERM. Never imports Twisted, so the daemon, a test or a
one-shot tool can use it alike.

The protocol: ``$NOTIFY_SOCKET`` names a unix datagram socket, a path, or
with a leading ``@`` a name in the abstract namespace; each message is one
datagram of newline-separated ``VARIABLE=value`` assignments. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op that returns False,
so the same code runs under systemd, under a test runner and in a shell.
Unlike libsystemd's sd_notify(), ``$NOTIFY_SOCKET`` is not removed from the
environment of the process itself. With ``[daemon] workers`` only the
parent (systemd's main PID) notifies: its workers start without
``$NOTIFY_SOCKET`` and report to it over a pipe (relayproxy.workers), since
under the default ``NotifyAccess=main`` systemd would log and drop their
messages.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"

# A datagram to a unix socket blocks only when the receiver's queue is full;
# systemd reads its queue all the time, so a wait this long means PID 1 is
# wedged, and the reactor must not hang with it.
_SEND_TIMEOUT = 5.0


def _address(value: str) -> str:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    # systemd >= 254 may hand a VM's init "vsock:CID:PORT"; a service always
    # gets a unix socket, so anything else is a broken environment.
    raise OSError(errno.EAFNOSUPPORT, f"${NOTIFY_SOCKET} is not a unix socket: {value!r}")


def notify(state: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``"READY=1"``, or several lines of assignments) to systemd.

    Returns False when not started by systemd (``$NOTIFY_SOCKET`` unset or
    empty), True once the datagram is sent. Raises OSError when the socket
    named in ``$NOTIFY_SOCKET`` cannot be reached: under ``Type=notify``
    that means systemd will never see READY=1, which the caller should log.
    """
    value = environ.get(NOTIFY_SOCKET, "")
    if not value:
        return False
    address = _address(value)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(_SEND_TIMEOUT)
        sock.sendto(state.encode("utf-8"), address)
    return True


def ready(*, environ: Mapping[str, str] = os.environ) -> bool:
    """The service is up: listeners bound, store opened (also: a reload is done)."""
    return notify("READY=1", environ=environ)


def reloading(*, environ: Mapping[str, str] = os.environ) -> bool:
    """A reload has started; send ``ready()`` when it is finished.

    systemd >= 253 (``Type=notify-reload``) wants ``MONOTONIC_USEC`` in the
    same message, on CLOCK_MONOTONIC, to tell this reload from an older one;
    systemd 252 ignores the extra assignment.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ=environ)


def stopping(*, environ: Mapping[str, str] = os.environ) -> bool:
    """Shutdown has begun (SIGTERM): systemd shows "deactivating" meanwhile."""
    return notify("STOPPING=1", environ=environ)
