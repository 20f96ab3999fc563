"""``[metrics] listen`` scraped by a real Prometheus, logins made through a real Dovecot.

The daemon runs as a subprocess (``tests.daemon``), Prometheus (Debian's
``prometheus``) scrapes it every second, and the assertions are answers of
Prometheus's HTTP query API: what an operator's dashboard would show. The
Grafana dashboard in ``config/grafana`` is checked against the same daemon:
every metric it queries is served, and Prometheus accepts every query.
"""

from __future__ import annotations

import contextlib
import json
import poplib
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo.dovecot import Dovecot
from tests.daemon import Daemon, free_port, wait_for
from tests.test_pop3_proxy import POP3From

DAEMON_COMMAND = [sys.executable, "-m", "relayproxy.cli.daemon"]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana" / "relayproxy.json"
# Grafana's variables, as a dashboard with "All" selected would send them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def http_get(url: str, accept: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, query: str) -> dict[str, Any]:
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        try:
            answer: dict[str, Any] = json.loads(http_get(address))
        except urllib.error.HTTPError as exc:  # 400: a query it cannot parse
            answer = json.loads(exc.read().decode())
        return answer

    def value(self, query: str) -> float | None:
        """The query's single value now, or None while it has no sample."""
        answer = self.api(query)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for_value(self, query: str, expected: float) -> None:
        seen: list[float | None] = []

        def probe() -> bool:
            self.check_alive()
            seen.append(self.value(query))
            return seen[-1] == expected

        try:
            wait_for(f"{query} == {expected}", probe, timeout=30)
        except AssertionError:
            raise AssertionError(
                f"{query}: {expected} expected, last answers {seen[-5:]}"
            ) from None

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-3000:]}")

    def ready(self) -> bool:
        self.check_alive()
        try:
            http_get(f"{self.url}/-/ready")
        except OSError:
            return False
        return True


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """``start(port)``: a Prometheus scraping 127.0.0.1:port/metrics every second."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (make test installs it)")
    started: list[Prometheus] = []

    def start(target: int) -> Prometheus:
        directory = tmp_path / "prometheus"
        directory.mkdir()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: relayproxy\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target}']\n"
        )
        port = free_port()
        log = directory / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )
        server = Prometheus(process, f"http://127.0.0.1:{port}", log)
        started.append(server)
        wait_for("prometheus to be ready", server.ready, timeout=60)
        return server

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def with_metrics(daemon: Daemon) -> int:
    port = free_port()
    daemon.extra = f"\n[metrics]\nlisten = 127.0.0.1:{port}\n"
    return port


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [
        v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"
    ]
    assert queries
    return queries


def promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def test_prometheus_scrapes_the_logins_made_through_the_daemon(
    daemon: Daemon, dovecot: Dovecot, prometheus: Callable[[int], Prometheus]
) -> None:
    daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{dovecot.ports.pop3}")
    dead_backend = f"127.0.0.1:{free_port()}"
    dead = daemon.listener("dead", protocol="pop3", backend=dead_backend)
    metrics_port = with_metrics(daemon)
    daemon.start()
    server = prometheus(metrics_port)
    server.wait_for_value('up{job="relayproxy"}', 1)
    pop3 = daemon.listeners[0].port

    # One address per login: each is one record (min_interval = 0 in tests).
    successes = ["127.0.0.51", "127.0.0.52", "127.0.0.53"]
    for source in successes:
        client = POP3From("127.0.0.1", pop3, source)
        client.user("alice")
        client.pass_("alice-secret")
        client.quit()
    apop = POP3From("127.0.0.1", pop3, "127.0.0.54")
    apop.apop("bob", "bob-secret")
    apop.quit()
    failures = ["127.0.0.55", "127.0.0.56"]
    for source in failures:
        bad = POP3From("127.0.0.1", pop3, source)
        bad.user("alice")
        with pytest.raises(poplib.error_proto):
            bad.pass_("wrong")
        bad.quit()
    with pytest.raises(poplib.error_proto, match="backend unavailable"):
        poplib.POP3("127.0.0.1", dead, timeout=30)
    # Still open after its login: a session in the relay phase.
    held = POP3From("127.0.0.1", pop3, "127.0.0.57")
    held.user("bob")
    held.pass_("bob-secret")

    logins = len(successes) + 2  # the APOP one and the held one
    server.wait_for_value('sum(relayproxy_logins_total{result="success",listener="pop3"})', logins)
    server.wait_for_value(
        'sum(relayproxy_logins_total{result="failure",listener="pop3"})', len(failures)
    )
    server.wait_for_value(
        'relayproxy_logins_total{listener="pop3",protocol="pop3",mechanism="APOP",'
        'result="success"}',
        1,
    )
    server.wait_for_value(
        'relayproxy_logins_total{listener="pop3",mechanism="USER",result="failure"}',
        len(failures),
    )
    server.wait_for_value('relayproxy_sessions{listener="pop3",phase="relay"}', 1)
    server.wait_for_value("relayproxy_records_written_total", logins)
    server.wait_for_value("relayproxy_records_pending", 0)
    # Daemon.start()'s probe of each listener counts too: as many as were logged.
    unreachable = len(daemon.log_lines("backend.unreachable"))
    assert unreachable >= 1
    server.wait_for_value(
        f'relayproxy_backend_connect_failures_total{{listener="dead",backend="{dead_backend}"}}',
        unreachable,
    )
    server.wait_for_value('sum(relayproxy_tls_handshake_failures_total{listener="pop3"})', 0)
    server.wait_for_value("relayproxy_store_errors_total", 0)
    store_writes = server.value("relayproxy_store_write_seconds_count")
    assert store_writes is not None and 1 <= store_writes <= logins
    assert len(daemon.entries()) == logins

    held.quit()
    server.wait_for_value('sum(relayproxy_sessions{listener="pop3"})', 0)

    # Every query of the Grafana dashboard is valid PromQL with an answer.
    for query in dashboard_queries():
        if query.startswith("label_values("):
            metric = query[len("label_values(") :].split(",")[0]
            assert server.value(f"count({metric})") == 1, query
            continue
        answer = server.api(promql(query))
        assert answer["status"] == "success", (query, answer)
        assert answer["data"]["result"], query


def test_the_grafana_dashboard_queries_only_metrics_the_daemon_serves(daemon: Daemon) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "relayproxy"
    assert {panel["id"] for panel in dashboard["panels"]} == set(
        range(1, len(dashboard["panels"]) + 1)
    )
    daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{free_port()}")
    metrics_port = with_metrics(daemon)
    daemon.start()
    text = wait_for(
        "the metrics endpoint", lambda: _get_or_none(f"http://127.0.0.1:{metrics_port}/metrics")
    )
    # Families with no sample yet (no login so far) still have their HELP line.
    served = set(re.findall(r"^(?:# HELP )?(relayproxy_\w+)", text, flags=re.M))
    queried = {
        name for query in dashboard_queries() for name in re.findall(r"relayproxy_\w+", query)
    }
    assert queried - served == set(), text
    assert queried >= {
        "relayproxy_logins_total",
        "relayproxy_records_written_total",
        "relayproxy_store_errors_total",
        "relayproxy_records_pending",
        "relayproxy_store_write_seconds_bucket",
        "relayproxy_sessions",
        "relayproxy_tls_handshake_failures_total",
        "relayproxy_backend_connect_failures_total",
    }


def test_the_endpoint_speaks_openmetrics_when_asked(daemon: Daemon) -> None:
    daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{free_port()}")
    metrics_port = with_metrics(daemon)
    daemon.start()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for("the metrics endpoint", lambda: _get_or_none(url))
    text = http_get(url, accept="application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    assert "# TYPE relayproxy_logins counter" in text
    assert 'relayproxy_sessions{listener="pop3",phase="login"} 0' in text


def test_a_metrics_address_in_use_stops_the_start_naming_it(daemon: Daemon) -> None:
    daemon.listener("pop3", protocol="pop3", backend=f"127.0.0.1:{free_port()}")
    port = with_metrics(daemon)
    with socket_bound(port):
        daemon.config_path.write_text(daemon.config_text())
        result = subprocess.run(
            [*DAEMON_COMMAND, "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"[metrics] listen 127.0.0.1:{port}:" in result.stderr


@contextlib.contextmanager
def socket_bound(port: int) -> Iterator[None]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        yield


def _get_or_none(url: str) -> str | None:
    try:
        return http_get(url)
    except OSError:
        return None
