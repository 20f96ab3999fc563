"""relayproxy.metrics without a daemon: the observer fed hand-made events, the gauges, [metrics].

The events are the ones the daemon's modules log (same format strings), sent
through a private LogPublisher by a real ``twisted.logger.Logger``, plus raw
dicts for the odd cases a Logger never makes.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry
from twisted.logger import Logger, LogPublisher

from relayproxy.config import Config, ConfigError, HostPort, MetricsConfig, parse_config
from relayproxy.metrics import EventMetrics, Metrics, SessionView, StateCollector

LISTENERS = """\
[listener:pop3]
protocol = pop3
listen = 127.0.0.1:110
backend = 127.0.0.1:1110

[listener:imap]
protocol = imap
listen = 127.0.0.1:143
backend = 127.0.0.1:1143
"""


def config(text: str = LISTENERS) -> Config:
    return parse_config(text, "f.ini")


class Fixture:
    """An observer on its own publisher, and a Logger that emits into it."""

    def __init__(self, current: Config | None = None) -> None:
        self.config = current or config()
        self.registry = CollectorRegistry()
        self.observer = EventMetrics(self.registry, lambda: self.config)
        self.publisher = LogPublisher(self.observer)
        self.log = Logger(namespace="relayproxy", observer=self.publisher)

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def login(self, event: str, listener: str, mechanism: str) -> None:
        # The three formats of relayproxy.proxy.LoginLog.
        formats = {
            "success": "login.success client={client} user={user} mechanism={mechanism} "
            "listener={listener} record={record}",
            "failure": "login.failure client={client} user={user} mechanism={mechanism} "
            "listener={listener}",
            "refused": "login.refused client={client} user={user} mechanism={mechanism} "
            "listener={listener} reason={reason}",
        }
        self.log.info(
            formats[event],
            client="192.0.2.1",
            user="alice",
            mechanism=mechanism,
            listener=listener,
            record="192.0.2.1",
            reason="tls-required",
        )


def test_logins_are_counted_by_listener_protocol_mechanism_and_result() -> None:
    metrics = Fixture()
    for _ in range(3):
        metrics.login("success", "pop3", "USER")
    metrics.login("success", "imap", "PLAIN")
    metrics.login("failure", "pop3", "USER")
    metrics.login("failure", "pop3", "APOP")
    metrics.login("refused", "imap", "LOGIN")
    value = metrics.value
    total = "relayproxy_logins_total"
    assert value(total, listener="pop3", protocol="pop3", mechanism="USER", result="success") == 3
    assert value(total, listener="imap", protocol="imap", mechanism="PLAIN", result="success") == 1
    assert value(total, listener="pop3", protocol="pop3", mechanism="USER", result="failure") == 1
    assert value(total, listener="pop3", protocol="pop3", mechanism="APOP", result="failure") == 1
    assert value(total, listener="imap", protocol="imap", mechanism="LOGIN", result="refused") == 1


def test_a_mechanism_a_client_invents_is_counted_as_other() -> None:
    # AUTH X-RANDOM-1, X-RANDOM-2...: the backend refuses each, one series in all.
    metrics = Fixture()
    for n in range(50):
        metrics.login("failure", "pop3", f"X-RANDOM-{n}")
    metrics.login("failure", "pop3", "scram-sha-256")  # the watcher upper-cases; so do we
    labels = {"listener": "pop3", "protocol": "pop3", "result": "failure"}
    assert metrics.value("relayproxy_logins_total", mechanism="other", **labels) == 50
    assert metrics.value("relayproxy_logins_total", mechanism="SCRAM-SHA-256", **labels) == 1
    series = [s for f in metrics.registry.collect() for s in f.samples if s.name.endswith("_total")]
    assert len([s for s in series if s.name == "relayproxy_logins_total"]) == 2


def test_a_listener_added_by_a_reload_gets_its_protocol() -> None:
    metrics = Fixture()
    metrics.login("success", "pop3s", "USER")  # not configured (yet): protocol unknown
    metrics.config = config(
        LISTENERS + "[listener:pop3s]\nprotocol=pop3\nlisten=127.0.0.1:995\nbackend=h:1\n"
    )
    metrics.login("success", "pop3s", "USER")
    labels = {"listener": "pop3s", "mechanism": "USER", "result": "success"}
    assert metrics.value("relayproxy_logins_total", protocol="unknown", **labels) == 1
    assert metrics.value("relayproxy_logins_total", protocol="pop3", **labels) == 1


def test_store_batches_count_records_and_time_the_write() -> None:
    metrics = Fixture()
    batch = "store.batch path={path} entries={entries} duration={duration:.3f}"
    metrics.log.info(batch, path="/x.db", entries=3, duration=0.004)
    metrics.log.info(batch, path="/x.db", entries=2, duration=0.2)
    metrics.log.debug("store.batch.start entries={entries}", entries=7)  # not a write
    assert metrics.value("relayproxy_records_written_total") == 5
    assert metrics.value("relayproxy_store_write_seconds_count") == 2
    assert metrics.value("relayproxy_store_write_seconds_sum") == pytest.approx(0.204)
    assert metrics.value("relayproxy_store_write_seconds_bucket", le="0.005") == 1
    assert metrics.value("relayproxy_store_write_seconds_bucket", le="0.25") == 2


def test_store_errors_are_counted() -> None:
    metrics = Fixture()
    metrics.log.error(
        "store.error path={path} error={error} pending={pending}", path="/x", error="e", pending=4
    )
    metrics.log.error("store.error path={path} error={error}", path="/x", error="at start")
    assert metrics.value("relayproxy_store_errors_total") == 2
    assert metrics.value("relayproxy_records_written_total") == 0


def test_tls_failures_by_side_whether_the_side_is_written_in_the_format_or_a_field() -> None:
    metrics = Fixture()
    # Today's proxy.py writes the side into the format string.
    for side in ("client", "client", "backend"):
        metrics.log.warn(
            f"tls.error side={side} client={{client}} listener={{listener}} error={{error}}",
            client="192.0.2.1",
            listener="pop3",
            error="bad record mac",
        )
    # A rewrite may pass it as a field: the same event.
    metrics.log.warn(
        "tls.error side={side} client={client} listener={listener} error={error}",
        side="backend",
        client="192.0.2.1",
        listener="imap",
        error="certificate verify failed",
    )
    value = metrics.value
    assert value("relayproxy_tls_handshake_failures_total", listener="pop3", side="client") == 2
    assert value("relayproxy_tls_handshake_failures_total", listener="pop3", side="backend") == 1
    assert value("relayproxy_tls_handshake_failures_total", listener="imap", side="backend") == 1


def test_backend_connect_failures_by_backend() -> None:
    metrics = Fixture()
    for _ in range(2):
        metrics.log.error(
            "backend.unreachable client={client} listener={listener} backend={backend} "
            "error={error}",
            client="192.0.2.1",
            listener="imap",
            backend="127.0.0.1:1143",
            error="Connection refused",
        )
    labels = {"listener": "imap", "backend": "127.0.0.1:1143"}
    assert metrics.value("relayproxy_backend_connect_failures_total", **labels) == 2


def test_failure_series_exist_at_zero_for_every_configured_listener() -> None:
    # rate() and "increase > 0" alerts need the series before the first failure.
    metrics = Fixture()
    for listener, backend in (("pop3", "127.0.0.1:1110"), ("imap", "127.0.0.1:1143")):
        for side in ("client", "backend"):
            labels = {"listener": listener, "side": side}
            assert (
                metrics.registry.get_sample_value("relayproxy_tls_handshake_failures_total", labels)
                == 0
            )
        labels = {"listener": listener, "backend": backend}
        assert (
            metrics.registry.get_sample_value("relayproxy_backend_connect_failures_total", labels)
            == 0
        )


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"log_format": None},
        {"log_format": ["not", "hashable"]},
        {"log_format": "{log_text}", "log_text": "login.success from the legacy log"},
        {"log_format": "connection.open client={client} listener={listener}"},
        {"log_format": "login.success client={client}"},  # fields missing
        {"log_format": "store.batch entries={entries}", "entries": "3", "duration": "slow"},
        {"log_format": "tls.error side=sideways listener={listener}", "listener": 7},
        {"log_format": ""},
    ],
)
def test_odd_events_never_raise(event: dict[str, object]) -> None:
    # An observer that raises makes Twisted log the traceback, for every event.
    metrics = Fixture()
    metrics.observer(event)
    metrics.observer(event)  # the second time from the cache


def test_odd_events_count_nothing_they_do_not_say() -> None:
    metrics = Fixture()
    metrics.observer({"log_format": "login.success client={client}"})
    metrics.observer({"log_format": "store.batch entries={entries}", "entries": "3"})
    labels = {"listener": "-", "protocol": "unknown", "mechanism": "other", "result": "success"}
    assert metrics.value("relayproxy_logins_total", **labels) == 1
    assert metrics.value("relayproxy_records_written_total") == 0
    assert metrics.value("relayproxy_store_write_seconds_count") == 0


def test_each_format_string_is_parsed_once() -> None:
    metrics = Fixture()
    for _ in range(100):
        metrics.login("success", "pop3", "USER")
        metrics.log.info("connection.open client={client} listener={listener}", client="c")
    assert len(metrics.observer._by_format) == 2


def view(
    pending: int, sessions: Iterable[tuple[str, bool]], listeners: Iterable[str] = ()
) -> SessionView:
    return SessionView(
        pending=lambda: pending, sessions=lambda: list(sessions), listeners=lambda: listeners
    )


def test_the_gauges_are_read_from_the_service_at_scrape_time() -> None:
    registry = CollectorRegistry()
    sessions = [("pop3", True), ("pop3", False), ("pop3", False), ("imap", True)]
    registry.register(StateCollector(view(7, sessions, ["pop3", "imap", "idle"])))
    value = registry.get_sample_value
    assert value("relayproxy_records_pending") == 7
    assert value("relayproxy_sessions", {"listener": "pop3", "phase": "login"}) == 1
    assert value("relayproxy_sessions", {"listener": "pop3", "phase": "relay"}) == 2
    assert value("relayproxy_sessions", {"listener": "imap", "phase": "login"}) == 1
    assert value("relayproxy_sessions", {"listener": "imap", "phase": "relay"}) == 0
    assert value("relayproxy_sessions", {"listener": "idle", "phase": "login"}) == 0
    sessions.clear()
    assert value("relayproxy_sessions", {"listener": "pop3", "phase": "relay"}) == 0


def test_metrics_observe_only_between_start_and_stop() -> None:
    publisher = LogPublisher()
    log = Logger(observer=publisher)
    metrics = Metrics(config, view(0, []), publisher=publisher)
    metrics.start()
    log.error("store.error path={path} error={error}", path="/x", error="e")
    metrics.stop()
    log.error("store.error path={path} error={error}", path="/x", error="e")
    assert metrics.registry.get_sample_value("relayproxy_store_errors_total") == 1
    # Its own registry: nothing of the process's default one (GC, process).
    names = {family.name for family in metrics.registry.collect()}
    assert all(name.startswith("relayproxy_") for name in names), names


# -- [metrics] in the configuration --


def test_without_a_metrics_section_there_is_no_metrics_server() -> None:
    assert config().metrics == MetricsConfig(listen=None)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("listen = 127.0.0.1:9465", HostPort("127.0.0.1", 9465)),
        ("listen = [::1]:9465", HostPort("::1", 9465)),
    ],
)
def test_metrics_listen_is_an_address(text: str, address: HostPort) -> None:
    assert config(f"[metrics]\n{text}\n" + LISTENERS).metrics.listen == address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[metrics]\nlisten = 9465\n", "f.ini: [metrics] listen: '9465' is not host:port"),
        ("[metrics]\nlisten = h:0\n", "f.ini: [metrics] listen: port 0 is outside 1..65535"),
        ("[metrics]\nport = 9465\n", "f.ini: [metrics] port: unknown key (known keys: listen)"),
        ("[metrics]\n", "f.ini: [metrics] listen: missing"),
        (
            "[metrics]\nlisten = 127.0.0.1:110\n",
            "f.ini: [metrics] listen: 127.0.0.1:110 is also [listener:pop3]",
        ),
    ],
)
def test_a_bad_metrics_section_names_file_section_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text + LISTENERS, "f.ini")
    assert any(line.startswith(expected) for line in error.value.problems), error.value.problems
