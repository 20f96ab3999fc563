"""Prometheus metrics (``[metrics] listen``), derived from the log events.

Owns the metric names and how each is computed; never changes what is
logged. Counters and the write-latency histogram come from one observer on
Twisted's global log publisher: every ``log.info(...)`` the daemon makes is
an event dict whose ``log_format`` starts with the event name
(``login.success client={client} ...``) and whose fields are its keys. The
observer sees every event, whatever ``[log] level`` filters out and however
the log is rendered, so the log and the metrics cannot disagree and no
code path needs a second call to count something.

The observer runs for every event on the reactor thread, so it is cheap:
the event name (and any field written literally in the format, such as
``side=client``) is parsed once per distinct format string and cached with
the handler it selects; an event no metric wants costs two dict look-ups.

Gauges that are state, not events (records pending, open sessions by
phase), are read from the service when Prometheus scrapes. The scrape runs
on a worker thread (``prometheus_client.twisted.MetricsResource`` is a WSGI
resource), so what it reads are copies the service hands out.

Label values are bounded: listener, protocol and backend come from the
configuration, and a SASL mechanism a client may name freely is reported
as ``other`` unless it is a registered one (a client must not be able to
grow the series without limit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, LogEvent, LogPublisher, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from relayproxy.config import Config, HostPort

PREFIX = "relayproxy_"

# Mechanisms a login event may carry: the watchers' USER and APOP, and the
# SASL mechanisms of the IANA registry that mail servers offer. Any other
# name a client sends (the backend then refuses it) counts as "other".
KNOWN_MECHANISMS = frozenset(
    {
        "USER",
        "APOP",
        "LOGIN",
        "PLAIN",
        "CRAM-MD5",
        "DIGEST-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-256-PLUS",
        "OAUTHBEARER",
        "XOAUTH2",
        "EXTERNAL",
        "ANONYMOUS",
        "GSSAPI",
        "GS2-KRB5",
        "NTLM",
        "OTP",
    }
)
LOGIN_RESULTS = {"login.success": "success", "login.failure": "failure", "login.refused": "refused"}
TLS_SIDES = ("client", "backend")
# Seconds: a batch is one lock, a few puts and a sync (milliseconds), or a
# wait for a lock another process holds, up to [store] lock_timeout (10 s).
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Format strings are constants in the code; the bound only guards against a
# caller that formats its message itself (each such event is parsed anew).
MAX_FORMATS = 1024

Handler = Callable[[LogEvent], None]


def _literal_fields(rest: str) -> dict[str, str]:
    """``key=value`` words written into a format (``side=backend``), not ``{...}`` fields."""
    found: dict[str, str] = {}
    for word in rest.split():
        key, equals, value = word.partition("=")
        if equals and value and "{" not in value:
            found[key] = value
    return found


def _text(event: LogEvent, key: str) -> str:
    value = event.get(key)
    return value if isinstance(value, str) else "-"


@implementer(ILogObserver)
class EventMetrics:
    """The log observer: events -> counters and the store-write histogram."""

    def __init__(self, registry: CollectorRegistry, config: Callable[[], Config]) -> None:
        # A callable, not a Config: after a reload, logins name the new listeners.
        self._current_config = config
        self._config: Config | None = None
        self._protocols: dict[str, str] = {}
        self._login_series: dict[tuple[str, str, str], Counter] = {}
        self._by_format: dict[Any, Handler | None] = {}
        self.logins = Counter(
            PREFIX + "logins",
            "Login attempts the backend answered (success, failure) or the proxy refused",
            ["listener", "protocol", "mechanism", "result"],
            registry=registry,
        )
        self.records_written = Counter(
            PREFIX + "records_written",
            "Records (client addresses) written to the store, from store.batch",
            registry=registry,
        )
        self.store_errors = Counter(
            PREFIX + "store_errors",
            "store.error events: the first failed write of a burst (retries of the same "
            "records are not counted again), or a failed check at start-up",
            registry=registry,
        )
        self.store_write_seconds = Histogram(
            PREFIX + "store_write_seconds",
            "Time to write one batch of records to the store",
            buckets=WRITE_BUCKETS,
            registry=registry,
        )
        self.tls_failures = Counter(
            PREFIX + "tls_handshake_failures",
            "TLS failures (tls.error) with the client or with the backend",
            ["listener", "side"],
            registry=registry,
        )
        self.backend_failures = Counter(
            PREFIX + "backend_connect_failures",
            "Times a backend stopped answering connects (backend.unreachable)",
            ["listener", "backend"],
            registry=registry,
        )
        self._handlers: Mapping[str, Callable[[str, dict[str, str]], Handler]] = {
            **dict.fromkeys(LOGIN_RESULTS, self._login),
            "store.batch": lambda name, literal: self._store_batch,
            "store.error": lambda name, literal: self._store_error,
            "tls.error": self._tls_error,
            "backend.unreachable": lambda name, literal: self._backend_unreachable,
        }
        self._refresh()

    def __call__(self, event: LogEvent) -> None:
        log_format = event.get("log_format")
        try:
            handler = self._by_format[log_format]
        except (KeyError, TypeError):
            handler = self._learn(log_format)
        if handler is not None:
            handler(event)

    def _learn(self, log_format: object) -> Handler | None:
        handler: Handler | None = None
        if isinstance(log_format, str):
            name, _, rest = log_format.partition(" ")
            make = self._handlers.get(name)
            if make is not None:
                handler = make(name, _literal_fields(rest))
            if len(self._by_format) < MAX_FORMATS:
                self._by_format[log_format] = handler
        return handler

    def _refresh(self) -> None:
        """Follow the configuration: listener -> protocol, and zero series for the new names."""
        config = self._current_config()
        if config is self._config:
            return
        self._config = config
        self._protocols = {listener.name: listener.protocol for listener in config.listeners}
        self._login_series = {}  # a listener's protocol may have changed
        # Zeros before the first failure: rate() and alerts need the series to exist.
        for listener in config.listeners:
            for side in TLS_SIDES:
                self.tls_failures.labels(listener.name, side)
            for backend in listener.backend:
                self.backend_failures.labels(listener.name, str(backend))

    # -- one handler per event; the factories run once per format string --

    def _login(self, name: str, literal: dict[str, str]) -> Handler:
        result = LOGIN_RESULTS[name]

        def count(event: LogEvent) -> None:
            self._refresh()
            listener = _text(event, "listener")
            mechanism = _text(event, "mechanism").upper()
            if mechanism not in KNOWN_MECHANISMS:
                mechanism = "other"
            key = (listener, mechanism, result)
            child = self._login_series.get(key)
            if child is None:  # labels() validates and locks: half the cost of a login event
                protocol = self._protocols.get(listener, "unknown")
                child = self._login_series[key] = self.logins.labels(
                    listener, protocol, mechanism, result
                )
            child.inc()

        return count

    def _store_batch(self, event: LogEvent) -> None:
        entries = event.get("entries")
        if isinstance(entries, int) and entries > 0:
            self.records_written.inc(entries)
        duration = event.get("duration")
        if isinstance(duration, int | float):
            self.store_write_seconds.observe(duration)

    def _store_error(self, event: LogEvent) -> None:
        self.store_errors.inc()

    def _tls_error(self, name: str, literal: dict[str, str]) -> Handler:
        fixed_side = literal.get("side")

        def count(event: LogEvent) -> None:
            side = fixed_side or _text(event, "side")
            self.tls_failures.labels(
                _text(event, "listener"), side if side in TLS_SIDES else "-"
            ).inc()

        return count

    def _backend_unreachable(self, event: LogEvent) -> None:
        self.backend_failures.labels(_text(event, "listener"), _text(event, "backend")).inc()


@dataclass(frozen=True)
class SessionView:
    """What the scrape reads from the daemon; each call returns a copy or a number."""

    pending: Callable[[], int]
    # (listener, in_login) of every open session.
    sessions: Callable[[], Iterable[tuple[str, bool]]]
    # The configured listeners' names: their series exist at zero.
    listeners: Callable[[], Iterable[str]]


class StateCollector(Collector):
    """Gauges read at scrape time: records pending, open sessions by listener and phase."""

    def __init__(self, view: SessionView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        # Lets the registry learn the names without a collect() at registration.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        pending, sessions = self._families()
        pending.add_metric([], self.view.pending())
        counts = {
            (name, phase): 0 for name in self.view.listeners() for phase in ("login", "relay")
        }
        for listener, in_login in self.view.sessions():
            key = (listener, "login" if in_login else "relay")
            counts[key] = counts.get(key, 0) + 1
        for (listener, phase), count in sorted(counts.items()):
            sessions.add_metric([listener, phase], count)
        return (pending, sessions)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                PREFIX + "records_pending",
                "Records waiting for the next store write (or for the store to come back)",
            ),
            GaugeMetricFamily(
                PREFIX + "sessions",
                "Open client sessions: login (before or during the login), relay (after it)",
                labels=["listener", "phase"],
            ),
        )


class MetricsSite(Site):
    """No access-log line per scrape (one every scrape_interval) and no "Starting factory"."""

    noisy = False

    def log(self, request: object) -> None:
        pass


class Metrics:
    """A registry of relayproxy's metrics, fed by the log observer and the state collector."""

    def __init__(
        self,
        config: Callable[[], Config],
        view: SessionView,
        publisher: LogPublisher = globalLogPublisher,
    ) -> None:
        # Its own registry: the process's default one would add Python's GC
        # and process metrics, and tests in one process would collide on names.
        self.registry = CollectorRegistry()
        # A *_created gauge beside every counter doubles the text format for a
        # timestamp Prometheus does not use; process-wide, as this is the daemon.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.observer = EventMetrics(self.registry, config)
        self.registry.register(StateCollector(view))
        self._publisher = publisher
        self.port: IListeningPort | None = None

    def start(self) -> None:
        self._publisher.addObserver(self.observer)

    def site(self) -> Site:
        """``/metrics``: the OpenMetrics or Prometheus text, as the scraper's Accept asks."""
        # twisted.web and prometheus_client.twisted carry no type hints.
        root = Resource()  # type: ignore[no-untyped-call]
        root.putChild(b"metrics", MetricsResource(self.registry))  # type: ignore[no-untyped-call]
        return MetricsSite(root)  # type: ignore[no-untyped-call]

    def listen(self, reactor: Any, address: HostPort) -> None:
        """Bind ``address`` (raises CannotListenError), then observe the events."""
        self.port = reactor.listenTCP(address.port, self.site(), interface=address.host)
        self.start()

    def stop(self) -> None:
        self._publisher.removeObserver(self.observer)
        if self.port is not None:
            self.port.stopListening()
            self.port = None
