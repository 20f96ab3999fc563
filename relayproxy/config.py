"""The INI file: parsed into frozen dataclasses, validated as a whole.

Owns the configuration's names, defaults and checks. Every problem is
reported, not just the first, and each message names the file, the
section, the key and what is wrong with it. Unknown sections and keys are
errors: a misspelt key silently ignored is a security hole in a relay
policy. Never imports Twisted.
"""

from __future__ import annotations

import configparser
import grp
import ipaddress
import os
import pwd
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relayproxy.addresses import IPv6KeyStyle

DEFAULT_CONFIG_PATH = "/etc/relayproxy/relayproxy.ini"
CONFIG_ENV = "RELAYPROXY_CONFIG"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """One or more problems; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreConfig:
    path: str = "/var/lib/relayproxy/relayers.db"
    mode: int = 0o644
    group: str | None = None
    ipv6_keys: IPv6KeyStyle = IPv6KeyStyle.SENDMAIL
    min_interval: int = 60
    lock_timeout: float = 10.0
    # The window a power failure can lose; 0 syncs every login (on the reactor).
    sync_interval: float = 1.0
    # backend = redis: the relayer set lives on Redis, ``path`` only names the spool.
    backend: str = "file"
    ttl: int = 1440  # minutes: Redis expires an entry at its time + ttl
    # Passwords may be in these: never in a repr that could reach a log.
    redis_url: str | None = field(default=None, repr=False)
    sentinels: tuple[HostPort, ...] = ()
    service_name: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    redis_db: int = 0
    redis_prefix: str = ""
    redis_stream: str = "relayproxy:changes"
    redis_min_replicas: int = 0
    redis_timeout: float = 2.0


@dataclass(frozen=True)
class RecordConfig:
    exclude: tuple[Network, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    target: str = "stderr"
    usernames: bool = True
    level: str = "info"


@dataclass(frozen=True)
class DaemonConfig:
    user: str | None = None  # started as root: bind, then become this user
    group: str | None = None  # default: the user's primary group
    allow_root: bool = False  # keep running as root (not recommended)
    shutdown_timeout: float = 10.0  # SIGTERM: how long sessions in login may finish
    # Reactor processes sharing the listening sockets (relayproxy.workers); 1 is
    # the single process of old, with no supervisor.
    workers: int = 1


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None = None  # no [metrics] section: no metrics server


@dataclass(frozen=True)
class MapConfig:
    """relayproxy-map, the socketmap server: read by that program only."""

    listen: HostPort | None = None  # required by relayproxy-map
    # Minutes, like [store] ttl and `vsmtprelay expire`: older entries are NOTFOUND.
    max_age: int = 1440
    max_connections: int = 1000


@dataclass(frozen=True)
class MirrorConfig:
    """``relayproxy-mirror``: the local hash file it keeps equal to the set on Redis."""

    path: str | None = None  # no [mirror] section: relayproxy-mirror has nothing to write
    mode: int = 0o644
    group: str | None = None
    # Redis expires relayers itself, silently: the file is expired this often.
    expire_interval: float = 60.0


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    protocol: str
    listen: HostPort
    # One or more, tried in the order ``backend_balance`` says.
    backend: tuple[HostPort, ...]
    tls: str = "none"
    certificate: str | None = None
    private_key: str | None = None
    require_tls: bool = False
    backend_tls: str = "none"
    backend_ca: str | None = None
    backend_verify: bool = True
    # first: every client to the first backend that answers (failover), the
    # default because Dovecot backends sharing mail storage want each user on
    # one of them; roundrobin: each client to the next.
    backend_balance: str = "first"
    # Seconds a backend that failed to answer is tried only after the others.
    backend_retry: float = 30.0
    proxy_protocol_in: tuple[Network, ...] = ()
    proxy_protocol_out: str = "none"
    preauth_timeout: float = 60.0
    idle_timeout: float = 1800.0
    max_connections: int = 10000
    max_connections_per_ip: int = 50
    max_line_length: int = 8192
    record_preauth: bool = False
    forward_id: bool = False


@dataclass(frozen=True)
class Config:
    source: str
    store: StoreConfig = field(default_factory=StoreConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    log: LogConfig = field(default_factory=LogConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    map: MapConfig = field(default_factory=MapConfig)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    listeners: tuple[ListenerConfig, ...] = ()


# --- value parsers: each returns the value or raises ValueError with the reason ---


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"{text!r} is not a whole number")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _workers(text: str) -> int:
    """A number of processes, or ``auto``: one per CPU this process may run on.

    The affinity mask rather than ``os.cpu_count()``: a ``taskset``, a
    container's cpuset or systemd's ``CPUAffinity=`` leave fewer CPUs than
    the machine has, and a worker per missing CPU would only compete.
    """
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    try:
        return _integer(1, 1024)(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (a number of processes, or auto)") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 10**7:
        raise ValueError(f"{text!r} must be a positive number of seconds")
    return value


def _seconds_or_zero(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _seconds(text)


def _mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f"{text!r} is not an octal mode such as 0644")
    mode = int(text, 8)
    if mode & 0o111:
        raise ValueError(f"{text} makes a database file executable")
    if not mode & 0o600 == 0o600:
        raise ValueError(f"{text} does not let the owner read and write the file")
    return mode


def _group(text: str) -> str:
    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError(f"no group named {text!r} on this system") from None
    return text


def _user(text: str) -> str:
    try:
        pwd.getpwnam(text)
    except KeyError:
        raise ValueError(f"no user named {text!r} on this system") from None
    return text


def _path(text: str) -> str:
    if not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def _networks(text: str) -> tuple[Network, ...]:
    networks: list[Network] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        try:
            networks.append(ipaddress.ip_network(word, strict=True))
        except ValueError as exc:
            raise ValueError(f"{word!r} is not a network ({exc})") from None
    return tuple(networks)


def _host_port(text: str) -> HostPort:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", text)
    if not match:
        raise ValueError(f"{text!r} is not host:port or [ipv6]:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1..65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    return HostPort(host, port)


def _backend_list(text: str) -> tuple[HostPort, ...]:
    backends: list[HostPort] = []
    seen: set[tuple[str, int]] = set()
    if not text:
        raise ValueError("is empty (one or more host:port, comma-separated)")
    for word in (w.strip() for w in text.split(",")):
        if not word:
            raise ValueError(f"{text!r} has an empty entry (host:port, host:port, ...)")
        backend = _host_port(word)
        try:
            host = str(ipaddress.ip_address(backend.host))  # ::1 and 0::1 are one backend
        except ValueError:
            host = backend.host.lower()
        if (host, backend.port) in seen:
            raise ValueError(f"{word} is listed twice")
        seen.add((host, backend.port))
        backends.append(backend)
    return tuple(backends)


def _log_target(text: str) -> str:
    if text in ("stderr", "syslog", "journald"):
        return text
    if text.startswith("file:") and os.path.isabs(text[5:]):
        return text
    raise ValueError(f"{text!r} is not stderr, syslog, journald or file:/absolute/path")


def _ipv6_keys(text: str) -> IPv6KeyStyle:
    try:
        return IPv6KeyStyle(text)
    except ValueError:
        raise ValueError(f"{text!r} is not one of sendmail, postfix, both") from None


def _redis_url(text: str) -> str:
    # Loaded only for a Redis store: a file-only host never imports redis-py.
    from redis.connection import parse_url  # noqa: PLC0415

    try:
        parse_url(text)
    except ValueError as exc:
        message = str(exc).rstrip(".")
        try:
            password = urllib.parse.urlsplit(text).password
        except ValueError:
            password = None
        if password:  # the message never quotes the password
            message = message.replace(password, "***")
        raise ValueError(f"is not a Redis URL: {message}") from None
    return text


def _host_ports(text: str) -> tuple[HostPort, ...]:
    hosts = tuple(_host_port(word.strip()) for word in text.split(",") if word.strip())
    if not hosts:
        raise ValueError("names no host:port")
    return hosts


def _word(text: str) -> str:
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError(f"{text!r} is not one word of printable ASCII")
    return text


def _prefix(text: str) -> str:
    return _word(text) if text else text


def _secret(text: str) -> str:
    if not text:
        raise ValueError("is empty")
    return text


Parsers = Mapping[str, Callable[[str], Any]]

_STORE_KEYS: Parsers = {
    "path": _path,
    "mode": _mode,
    "group": _group,
    "ipv6_keys": _ipv6_keys,
    "min_interval": _integer(0, 86400 * 365),
    "lock_timeout": _seconds,
    "sync_interval": _seconds_or_zero,
    "backend": _choice("file", "redis"),
    "ttl": _integer(1, 10**9),
    "redis_url": _redis_url,
    "sentinels": _host_ports,
    "service_name": _word,
    "redis_password": _secret,
    "sentinel_password": _secret,
    "redis_db": _integer(0, 1_000_000),
    "redis_prefix": _prefix,
    "redis_stream": _word,
    "redis_min_replicas": _integer(0, 1000),
    "redis_timeout": _seconds,
}
# Meaningful only with backend = redis; the first two are where Redis is.
_REDIS_ONLY_KEYS = (
    "redis_url",
    "sentinels",
    "service_name",
    "redis_password",
    "sentinel_password",
    "redis_db",
    "redis_prefix",
    "redis_stream",
    "redis_min_replicas",
    "redis_timeout",
)
_SENTINEL_ONLY_KEYS = ("service_name", "redis_password", "sentinel_password", "redis_db")
_RECORD_KEYS: Parsers = {"exclude": _networks}
_LOG_KEYS: Parsers = {
    "format": _choice("text", "json"),
    "target": _log_target,
    "usernames": parse_bool,
    "level": _choice("debug", "info", "warn", "error"),
}
_DAEMON_KEYS: Parsers = {
    "user": _user,
    "group": _group,
    "allow_root": parse_bool,
    "shutdown_timeout": _seconds,
    "workers": _workers,
}
_METRICS_KEYS: Parsers = {"listen": _host_port}
_MAP_KEYS: Parsers = {
    "listen": _host_port,
    "max_age": _integer(1, 10 * 366 * 1440),
    "max_connections": _integer(1, 1_000_000),
}
_MIRROR_KEYS: Parsers = {
    "path": _path,
    "mode": _mode,
    "group": _group,
    "expire_interval": _seconds,
}
_LISTENER_KEYS: Parsers = {
    "protocol": _choice("pop3", "imap"),
    "listen": _host_port,
    "backend": _backend_list,
    "backend_balance": _choice("first", "roundrobin"),
    "backend_retry": _seconds,
    "tls": _choice("none", "starttls", "implicit"),
    "certificate": _path,
    "private_key": _path,
    "require_tls": parse_bool,
    "backend_tls": _choice("none", "starttls", "implicit"),
    "backend_ca": _path,
    "backend_verify": parse_bool,
    "proxy_protocol_in": _networks,
    "proxy_protocol_out": _choice("none", "v1", "v2"),
    "preauth_timeout": _seconds,
    "idle_timeout": _seconds,
    "max_connections": _integer(1, 1_000_000),
    "max_connections_per_ip": _integer(1, 1_000_000),
    "max_line_length": _integer(512, 1_048_576),
    "record_preauth": parse_bool,
    "forward_id": parse_bool,
}
_REQUIRED_LISTENER_KEYS = ("protocol", "listen", "backend")


class _Reader:
    """Collects problems while turning one section's strings into values."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, section: str, key: str | None, message: str) -> None:
        where = f"[{section}]" + (f" {key}" if key else "")
        self.problems.append(f"{self.source}: {where}: {message}")

    def section(self, name: str, raw: Mapping[str, str], parsers: Parsers) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, text in raw.items():
            parser = parsers.get(key)
            if parser is None:
                known = ", ".join(sorted(parsers))
                self.problem(name, key, f"unknown key (known keys: {known})")
                continue
            try:
                values[key] = parser(text.strip())
            except ValueError as exc:
                self.problem(name, key, str(exc))
        return values


def load_config(path: str) -> Config:
    """Read and validate ``path``; raises ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason})"]) from None
    return parse_config(text, path)


def parse_config(text: str, source: str) -> Config:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        empty_lines_in_values=False,
        default_section="\x00no default section",
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError([f"{source}: {message}"]) from None
    reader = _Reader(source)
    store: dict[str, Any] = {}
    record: dict[str, Any] = {}
    log: dict[str, Any] = {}
    daemon: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    map_: dict[str, Any] = {}
    mirror: dict[str, Any] = {}
    listeners: list[ListenerConfig] = []
    for name in parser.sections():
        raw = dict(parser.items(name))
        if name == "store":
            store = reader.section(name, raw, _STORE_KEYS)
        elif name == "record":
            record = reader.section(name, raw, _RECORD_KEYS)
        elif name == "log":
            log = reader.section(name, raw, _LOG_KEYS)
        elif name == "daemon":
            daemon = reader.section(name, raw, _DAEMON_KEYS)
        elif name == "metrics":
            metrics = reader.section(name, raw, _METRICS_KEYS)
            if "listen" not in raw:
                reader.problem(name, "listen", "missing (the section serves nothing without it)")
        elif name == "map":
            map_ = reader.section(name, raw, _MAP_KEYS)
            if "listen" not in raw:
                reader.problem(name, "listen", "missing (relayproxy-map listens there)")
        elif name == "mirror":
            mirror = reader.section(name, raw, _MIRROR_KEYS)
            if "path" not in raw:
                reader.problem(name, "path", "missing (the file the mirror writes)")
        elif name.startswith("listener:") and name[len("listener:") :]:
            listener = _listener(reader, name, raw)
            if listener is not None:
                listeners.append(listener)
        else:
            reader.problem(
                name,
                None,
                "unknown section (known: store, record, log, daemon, metrics, mirror, map, "
                "listener:NAME)",
            )
    _check_store(reader, store, dict(parser.items("store")) if "store" in parser else {})
    _check_listeners(reader, listeners)
    _check_metrics(reader, metrics.get("listen"), listeners, daemon.get("workers", 1))
    _check_mirror(reader, mirror, store)
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        source=source,
        store=StoreConfig(**store),
        record=RecordConfig(**record),
        log=LogConfig(**log),
        daemon=DaemonConfig(**daemon),
        metrics=MetricsConfig(**metrics),
        map=MapConfig(**map_),
        mirror=MirrorConfig(**mirror),
        listeners=tuple(listeners),
    )


def _listener(reader: _Reader, section: str, raw: Mapping[str, str]) -> ListenerConfig | None:
    before = len(reader.problems)
    values = reader.section(section, raw, _LISTENER_KEYS)
    for key in _REQUIRED_LISTENER_KEYS:
        if key not in raw:
            reader.problem(section, key, "missing (required in every listener)")
    tls = values.get("tls", "none")
    if tls != "none":
        for key in ("certificate", "private_key"):
            if key not in values and key not in raw:
                reader.problem(section, key, f"missing (required with tls = {tls})")
    if values.get("require_tls") and tls == "none":
        reader.problem(section, "require_tls", "yes needs tls = starttls or implicit")
    protocol = values.get("protocol")
    for key in ("record_preauth", "forward_id"):
        if values.get(key) and protocol != "imap":
            reader.problem(section, key, "is an IMAP setting (protocol = imap)")
    if values.get("forward_id") and values.get("proxy_protocol_out", "none") != "none":
        reader.problem(
            section, "forward_id", "and proxy_protocol_out both tell the backend: pick one"
        )
    if len(reader.problems) != before:
        return None
    return ListenerConfig(name=section[len("listener:") :], **values)


def _check_store(reader: _Reader, values: Mapping[str, Any], raw: Mapping[str, str]) -> None:
    """Where Redis is must be said once, one way, and only with backend = redis."""
    if values.get("backend", "file") != "redis":
        for key in _REDIS_ONLY_KEYS:
            if key in raw:
                reader.problem("store", key, "is a Redis setting (backend = redis)")
        return
    has_url, has_sentinels = "redis_url" in raw, "sentinels" in raw
    if has_url and has_sentinels:
        reader.problem("store", "sentinels", "and redis_url both say where Redis is: pick one")
    elif not has_url and not has_sentinels:
        reader.problem("store", "backend", "redis needs redis_url, or sentinels and service_name")
    if has_sentinels and "service_name" not in raw:
        reader.problem("store", "service_name", "missing (required with sentinels)")
    if has_url:
        for key in _SENTINEL_ONLY_KEYS:
            if key in raw:
                reader.problem(
                    "store", key, "is a sentinels setting (with redis_url, put it in the URL)"
                )


def _check_listeners(reader: _Reader, listeners: list[ListenerConfig]) -> None:
    seen: dict[HostPort, str] = {}
    for listener in listeners:
        other = seen.setdefault(listener.listen, listener.name)
        if other != listener.name:
            reader.problem(
                f"listener:{listener.name}",
                "listen",
                f"{listener.listen} is also [listener:{other}]",
            )


def _check_metrics(
    reader: _Reader, listen: HostPort | None, listeners: list[ListenerConfig], workers: int
) -> None:
    for listener in listeners:
        if listener.listen == listen:
            reader.problem("metrics", "listen", f"{listen} is also [listener:{listener.name}]")
    if workers > 1 and listen is not None:
        # Each worker counts only its own logins: one worker's page would be a
        # partial count that looks whole.
        reader.problem(
            "daemon",
            "workers",
            f"{workers} workers with [metrics] listen: the metrics server needs "
            "workers = 1 (remove [metrics] or set workers = 1)",
        )


def _check_mirror(reader: _Reader, mirror: Mapping[str, Any], store: Mapping[str, Any]) -> None:
    # With backend = redis, [store] path names only the proxy's spool files
    # (PATH.spool-a/-b): the mirror may write PATH itself, where MTAs look.
    if mirror and store.get("backend", "file") != "redis":
        reader.problem("mirror", None, "copies the set on Redis: needs [store] backend = redis")


def find_config_path(explicit: str | None) -> str | None:
    """``--config``, else ``$RELAYPROXY_CONFIG``, else the default file when it exists."""
    if explicit:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return from_env
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None
