"""A session's log events: each one's level and line in one table, client and listener filled in.

Owns which events a session logs and the order of their fields. The order
is an interface: fail2ban's filter (config/fail2ban/filter.d/relayproxy.conf)
reads ``login.failure`` token by token, and log readers parse the rest. A
call names the event and its own fields; the session's client and listener,
and the user name only if ``[log] usernames``, are filled in here. Rendering
and quoting are ``relayproxy.logs``'s; observers (metrics) read the same
fields from the event dict, in the order of the line.
"""

from __future__ import annotations

from string import Formatter
from time import time

from twisted.logger import Logger, LogLevel

log = Logger(namespace="relayproxy")

# The call's name -> (level, format). A word written out in a format (side=,
# phase=) is part of the event's name for whoever reads it, not a field.
SESSION_EVENTS: dict[str, tuple[LogLevel, str]] = {
    "connection.open": (LogLevel.info, "connection.open client={client} listener={listener}"),
    "connection.refused": (
        LogLevel.warn,
        "connection.refused client={client} listener={listener} reason={reason}",
    ),
    # Before a client address is known (or believed): the peer is named instead.
    "connection.rejected": (
        LogLevel.warn,
        "connection.rejected peer={peer} listener={listener} reason={reason}",
    ),
    "connection.closing": (
        LogLevel.info,
        "connection.closing client={client} listener={listener} reason={reason}",
    ),
    "connection.timeout phase=login": (
        LogLevel.info,
        "connection.timeout client={client} listener={listener} phase=login",
    ),
    "connection.timeout phase=idle": (
        LogLevel.info,
        "connection.timeout client={client} listener={listener} phase=idle",
    ),
    "connection.close": (
        LogLevel.info,
        "connection.close client={client} listener={listener} user={user} "
        "bytes_in={bytes_in} bytes_out={bytes_out} duration={duration:.3f}",
    ),
    "tls.error side=client": (
        LogLevel.warn,
        "tls.error side=client client={client} listener={listener} error={error}",
    ),
    "tls.error side=backend": (
        LogLevel.warn,
        "tls.error side=backend client={client} listener={listener} error={error}",
    ),
    # A backend's changes, not a session's: said once by the session that
    # saw the change (``relayproxy.backends``), so no client is named.
    "backend.unreachable": (
        LogLevel.error,
        "backend.unreachable listener={listener} backend={backend} error={error}",
    ),
    "backend.recovered": (
        LogLevel.info,
        "backend.recovered listener={listener} backend={backend}",
    ),
    "protocol.error": (
        LogLevel.warn,
        "protocol.error client={client} listener={listener} error={error}",
    ),
    "login.success": (
        LogLevel.info,
        "login.success client={client} user={user} mechanism={mechanism} "
        "listener={listener} record={record}",
    ),
    # fail2ban bans on this line.
    "login.failure": (
        LogLevel.warn,
        "login.failure client={client} user={user} mechanism={mechanism} listener={listener}",
    ),
    # Not login.failure: the proxy refused before any password was tried (a
    # client set up without TLS, not a guesser), so fail2ban must not count it.
    "login.refused": (
        LogLevel.warn,
        "login.refused client={client} user={user} mechanism={mechanism} "
        "listener={listener} reason={reason}",
    ),
}

# The call's name -> (level, format, its fields in the line's order).
_EVENTS = {
    name: (level, line, tuple(field for _, field, _, _ in Formatter().parse(line) if field))
    for name, (level, line) in SESSION_EVENTS.items()
}


class SessionLog:
    """One session's events; ``client`` is set once the session knows who it serves."""

    def __init__(self, listener: str, usernames: bool) -> None:
        self.listener = listener
        self.usernames = usernames
        # The fields every event may name; the address as logged, formatted once, not per event.
        self._own = {"client": str(None), "listener": listener}

    @property
    def client(self) -> str:
        return self._own["client"]

    @client.setter
    def client(self, address: str) -> None:
        self._own["client"] = address

    def __call__(self, name: str, **fields: object) -> None:
        level, line, names = _EVENTS[name]
        if "user" in fields:
            user = fields["user"]
            fields["user"] = (user or "-") if self.usernames else "-"
        own = self._own
        # In the line's order: the event dict is what JSON lines and metrics read.
        event = {field: fields.pop(field) if field in fields else own[field] for field in names}
        if fields:
            raise TypeError(f"{name} has no field {', '.join(sorted(fields))}")
        # What ``Logger.emit`` adds, without its check of a level that this table fixes
        # (a walk of every LogLevel per event).
        event.update(
            log_logger=log,
            log_level=level,
            log_namespace=log.namespace,
            log_source=None,
            log_format=line,
            log_time=time(),
        )
        log.observer(event)
