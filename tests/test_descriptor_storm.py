"""Descriptors run short: the daemon says so, caps sessions, and recording keeps working.

The daemon starts under a hard RLIMIT_NOFILE far below what its
``max_connections`` would need, as under a tight ``ulimit -n``. Idle
sessions are opened until the daemon refuses more; then one is closed and
a client logs in. Its record must land: without the cap the idle sessions
took every descriptor, and the store's batch failed with ``Too many open
files`` for as long as they stayed.
"""

from __future__ import annotations

import socket

from demo.dovecot import Dovecot
from relayproxy.descriptors import RESERVE
from tests.daemon import Daemon
from tests.test_daemon_store_faults import pop3_login

LIMIT = 320


def idle_session(port: int, source: str) -> socket.socket | None:
    """A connected client that read its greeting, or None if the daemon refused it."""
    connection = socket.create_connection(
        ("127.0.0.1", port), timeout=3, source_address=(source, 0)
    )
    try:
        greeting = connection.makefile("rb").readline()
    except OSError:
        greeting = b""
    if greeting.startswith(b"+OK"):
        return connection
    connection.close()
    return None


def test_sessions_are_capped_so_that_logins_are_still_recorded(
    daemon: Daemon, dovecot: Dovecot
) -> None:
    daemon.descriptor_limit = LIMIT
    port = daemon.listener(
        "pop3",
        protocol="pop3",
        backend=f"127.0.0.1:{dovecot.ports.pop3}",
        max_connections="10000",
        max_connections_per_ip="10000",
    )
    daemon.start()
    sessions = (LIMIT - RESERVE) // 2
    warning = daemon.wait_for_log("daemon.descriptors")
    assert f"needed={2 * 10000 + RESERVE} limit={LIMIT} hard_limit={LIMIT}" in warning
    assert f"sessions={sessions} " in warning
    idle: list[socket.socket] = []
    try:
        for n in range(LIMIT):
            connection = idle_session(port, f"127.40.{n // 250}.{n % 250 + 1}")
            if connection is None:
                break
            idle.append(connection)
        assert len(idle) == sessions
        daemon.wait_for_log("connection.refused", "too many connections")
        closed = idle.pop()
        source = closed.getsockname()[0]
        closed.close()
        daemon.wait_for_log("connection.close", f"client={source} ")
        pop3_login(port, "127.41.0.1")
        daemon.wait_for_record("127.41.0.1")
        assert "Too many open files" not in daemon.log()
    finally:
        for connection in idle:
            connection.close()
