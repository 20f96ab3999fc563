"""RedisStore: the relayer set of a fleet, on Redis (``[store] backend = redis``).

Owns every read and write of relayers on Redis and of the change stream
beside them. Never imports Twisted: the daemon calls it from its worker
thread, ``vsmtprelay`` directly.

Theory of operation
-------------------
A relayer is a Redis string: key ``redis_prefix`` + the same ASCII address
form as in relayers.db, value the decimal epoch seconds, expiring at
value + ttl (``SET ... EXAT``): Redis expires relayers itself, and a pinned
(future) entry lives until its time + ttl.

Every change is also appended, in the same script (so in the same atomic
step), to the stream ``redis_stream``: ``op put key K value V`` or ``op del
key K``, K the address *without* the prefix (what a mirror writes to its
file). Keys Redis expires itself write nothing there; a reader of the
stream expires its own copy at now - ttl.

A batch is one pipeline: one script call per chunk of keys (EVALSHA; the
script is loaded again when a restarted server lost it), then, with
``redis_min_replicas`` = N > 0, ``WAIT N``. Only when all of it answered
OK is the batch acknowledged, so the daemon's spool keeps a batch that a
failover may have lost, and replays it: with keep-newer, a replay changes
nothing that is already there.

Every failure (refused, timed out, a demoted primary answering READONLY,
a wrong password) is a ``StoreError`` naming the store by its address,
never by its password.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from relayproxy.config import StoreConfig
from relayproxy.store import Entry, StoreError, sorted_by_address

__all__ = ["RedisStore", "connect", "display_name"]

# Keys per script call: a call blocks the server while it runs (a few ms here).
_CHUNK: Final = 2000
_SCAN_COUNT: Final = 1000
# Redis refuses an EXAT whose milliseconds overflow a signed 64-bit integer;
# an entry pinned later than that simply never expires.
_MAX_EXAT: Final = (2**63 - 1) // 1000

# Timestamps are compared as digit strings: Lua's numbers are doubles, and
# vsmtprelay accepts ticks up to 2**63 - 1.
_LUA_COMPARE = """
local function number(s)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') then return nil end
  local digits = string.gsub(s, '^0+', '')
  return digits
end
local function at_or_after(a, b)
  if #a ~= #b then return #a > #b end
  return a >= b
end
"""

# KEYS[1] the stream, KEYS[2..] relayers; ARGV: keep-newer flag, prefix
# length, then a value and an EXAT ('' = none) per relayer.
_PUT = (
    _LUA_COMPARE
    + """
local keep = ARGV[1] == '1'
local skip = tonumber(ARGV[2]) + 1
local written = 0
for i = 2, #KEYS do
  local key, value, at = KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]
  local old = keep and number(redis.pcall('GET', key))
  if not (old and at_or_after(old, number(value))) then
    if at == '' then
      redis.call('SET', key, value)
    else
      redis.call('SET', key, value, 'EXAT', at)
    end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', '100000', '*',
               'op', 'put', 'key', string.sub(key, skip), 'value', value)
    written = written + 1
  end
end
return written
"""
)

# KEYS[1] the stream, KEYS[2..] relayers; ARGV[1] prefix length.
# Returns the positions (from 1) of the relayers that were absent.
_DELETE = """
local skip = tonumber(ARGV[1]) + 1
local absent = {}
for i = 2, #KEYS do
  if redis.call('DEL', KEYS[i]) == 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', '100000', '*',
               'op', 'del', 'key', string.sub(KEYS[i], skip))
  else
    absent[#absent + 1] = i - 1
  end
end
return absent
"""

# KEYS[1] the stream, KEYS[2..] candidates; ARGV: cutoff, prefix length.
# Only a decimal time expires: a hand-made value is left for a human.
_EXPIRE = (
    _LUA_COMPARE
    + """
local cutoff = number(ARGV[1])
local skip = tonumber(ARGV[2]) + 1
local removed = 0
for i = 2, #KEYS do
  local value = number(redis.pcall('GET', KEYS[i]))
  if value and at_or_after(cutoff, value) then
    redis.call('DEL', KEYS[i])
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', '100000', '*',
               'op', 'del', 'key', string.sub(KEYS[i], skip))
    removed = removed + 1
  end
end
return removed
"""
)


class RedisStore:
    """The relayer set on one Redis primary (found directly or through Sentinel).

    One instance may be used by one thread at a time. ``client`` is the
    redis-py client, for readers of the stream (the mirror).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        path: str,
        ttl: int = 1440,
        prefix: str = "",
        stream: str = "relayproxy:changes",
        min_replicas: int = 0,
        timeout: float = 2.0,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.client = client
        self._path = path
        self.ttl_seconds = ttl * 60
        self.prefix = prefix
        self.stream = stream
        self.min_replicas = min_replicas
        self.timeout = timeout
        self._secrets = tuple(secret for secret in secrets if secret)
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._expire = client.register_script(_EXPIRE)

    @classmethod
    def from_config(cls, config: StoreConfig) -> RedisStore:
        return cls(
            connect(config),
            path=display_name(config),
            ttl=config.ttl,
            prefix=config.redis_prefix,
            stream=config.redis_stream,
            min_replicas=config.redis_min_replicas,
            timeout=config.redis_timeout,
            secrets=_secrets_of(config),
        )

    @property
    def path(self) -> str:
        """The Redis URL, or ``sentinel:NAME@host:port,...``, without any password."""
        return self._path

    # -- writes --

    def record(self, items: Iterable[tuple[str, int]], *, keep_newer: bool = False) -> int:
        """Write ``key -> seconds`` pairs in one pipeline of scripts; returns how many."""
        pairs = list(items)
        flag = "1" if keep_newer else "0"

        def add(pipe: Any, chunk: Sequence[tuple[str, int]]) -> None:
            args: list[str | int] = [flag, len(self.prefix)]
            for _, seconds in chunk:
                at = seconds + self.ttl_seconds
                args += [str(seconds), str(at) if at <= _MAX_EXAT else ""]
            self._put(keys=self._keys(k for k, _ in chunk), args=args, client=pipe)

        self._batch(pairs, add)
        return len(pairs)

    def delete(self, keys: Iterable[str]) -> set[str]:
        """Delete keys in one pipeline; returns the ones that were absent."""
        wanted = list(dict.fromkeys(keys))

        def add(pipe: Any, chunk: Sequence[str]) -> None:
            self._delete(keys=self._keys(chunk), args=[len(self.prefix)], client=pipe)

        results = self._batch(wanted, add)
        absent: set[str] = set()
        for start, positions in zip(range(0, len(wanted), _CHUNK), results, strict=False):
            absent.update(wanted[start + int(p) - 1] for p in positions)
        return absent

    def expire(self, cutoff: int) -> int:
        """Delete every decimal entry at or before ``cutoff`` (a ``del`` each); returns the count.

        Redis expires entries itself at their time + ttl; this is for an
        administrator's shorter cutoff (``vsmtprelay expire n``).
        """
        if cutoff < 0:
            return 0  # no decimal time is before 0
        with self.talking():
            candidates = list(self._scan())

        def add(pipe: Any, chunk: Sequence[bytes]) -> None:
            keys: list[bytes | str] = [self.stream, *chunk]
            self._expire(keys=keys, args=[str(cutoff), len(self.prefix)], client=pipe)

        return sum(int(removed) for removed in self._batch(candidates, add))

    def recover(self) -> None:
        """Nothing to repair on Redis: check once that it answers."""
        with self.talking():
            self.client.ping()

    # -- reads --

    def get(self, key: str) -> Entry | None:
        with self.talking():
            value = self.client.get(self.prefix + key)
        return None if value is None else Entry(key.encode("ascii"), _raw(value))

    def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """Many keys in one MGET (the map server's batch)."""
        if not keys:
            return []
        names = [(self.prefix + key).encode("ascii", "replace") for key in keys]
        with self.talking():
            values = self.client.mget(names)
        return [None if value is None else _raw(value) for value in values]

    def entries(self) -> Iterator[Entry]:
        """Every relayer (SCAN, then MGET per page), prefix stripped, in no particular order."""
        skip = len(self.prefix.encode("ascii"))
        with self.talking():
            page: list[bytes] = []
            for key in self._scan():
                page.append(key)
                if len(page) >= _SCAN_COUNT:
                    yield from self._page(page, skip)
                    page = []
            yield from self._page(page, skip)

    def _page(self, keys: list[bytes], skip: int) -> Iterator[Entry]:
        if not keys:
            return
        for key, value in zip(keys, self.client.mget(keys), strict=True):
            if value is not None:  # expired since the SCAN
                yield Entry(key[skip:], _raw(value))

    def sorted_entries(self, keep: Callable[[Entry], bool] = lambda e: True) -> Iterator[Entry]:
        """Kept entries sorted by address, in memory bounded by a chunk (as the file's)."""
        return sorted_by_address(self.entries(), keep)

    # -- talking to Redis --

    def _keys(self, keys: Iterable[str]) -> list[str]:
        return [self.stream, *(self.prefix + key for key in keys)]

    def _scan(self) -> Iterator[bytes]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        stream = self.stream.encode("ascii")
        for key in self.client.scan_iter(match=pattern, count=_SCAN_COUNT, _type="string"):
            if _raw(key) != stream:
                yield _raw(key)

    def _batch(self, items: Sequence[Any], add: Callable[[Any, Sequence[Any]], None]) -> list[Any]:
        """One pipeline: a script call per chunk of ``items``, then WAIT; the calls' results."""
        if not items:
            return []
        with self.talking():
            pipe = self.client.pipeline(transaction=False)
            for start in range(0, len(items), _CHUNK):
                add(pipe, items[start : start + _CHUNK])
            if self.min_replicas:
                pipe.wait(self.min_replicas, self._wait_ms)
            results: list[Any] = pipe.execute()
        if self.min_replicas:
            self._check_replicas(int(results.pop()))
        return results

    @property
    def _wait_ms(self) -> int:
        # Half the socket timeout: WAIT's own answer must arrive within it.
        return max(1, int(self.timeout * 500))

    def _check_replicas(self, acknowledged: int) -> None:
        if acknowledged < self.min_replicas:
            raise StoreError(
                f"{self.path}: {acknowledged} of redis_min_replicas = {self.min_replicas}"
                f" replicas confirmed the write within {self._wait_ms / 1000:g} s"
            )

    @contextlib.contextmanager
    def talking(self) -> Iterator[None]:
        """redis-py's errors as StoreError, with what an administrator can act on."""
        try:
            yield
        except redis.AuthenticationError:
            raise StoreError(f"{self.path}: authentication failed (check the password)") from None
        except redis.ReadOnlyError:
            raise StoreError(
                f"{self.path}: the server is a read-only replica (a failover under way?)"
            ) from None
        except redis.TimeoutError:
            raise StoreError(f"{self.path}: no answer within {self.timeout:g} s") from None
        except redis.ConnectionError as exc:
            raise StoreError(f"{self.path}: cannot reach Redis: {self._said(exc)}") from None
        except redis.RedisError as exc:
            raise StoreError(f"{self.path}: {self._said(exc)}") from None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot reach Redis: {exc.strerror}") from None

    def _said(self, exc: Exception) -> str:
        """The error's own words, on one line, with no password in them."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        # redis-py quotes the pipelined command first: thousands of keys, cut short.
        text = re.sub(r"^Command # \d+ \(.*?\) of pipeline caused error: ", "", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# --- connecting -----------------------------------------------------------------------


def connect(config: StoreConfig) -> redis.Redis:
    """A client of the primary ``config`` names; connects at its first command.

    Through Sentinel, every new connection asks the sentinels for the
    primary, so a failover is followed once the old connection fails.
    """
    options: dict[str, Any] = {
        "socket_timeout": config.redis_timeout,
        "socket_connect_timeout": config.redis_timeout,
        # One immediate retry on a fresh connection: a server restarted since
        # the pooled one was opened. Longer waits are the recorder's to make.
        "retry": Retry(NoBackoff(), 1),
    }
    if config.redis_url is not None:
        return redis.Redis.from_url(config.redis_url, **options)
    sentinel = Sentinel(
        [(host.host, host.port) for host in config.sentinels],
        sentinel_kwargs={**options, "password": config.sentinel_password},
        password=config.redis_password,
        db=config.redis_db,
        **options,
    )
    primary: redis.Redis = sentinel.master_for(config.service_name or "")
    return primary


def _raw(value: bytes | str) -> bytes:
    """What Redis holds, as bytes even when the URL asked for decoded replies."""
    return value if isinstance(value, bytes) else value.encode()


def display_name(config: StoreConfig) -> str:
    """How logs and messages name the store: no password, ever."""
    if config.redis_url is None:
        hosts = ",".join(str(host) for host in config.sentinels)
        return f"sentinel:{config.service_name}@{hosts}"
    return _url_without_password(config.redis_url)


def _url_without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # the configuration refuses such a URL: a message, not a crash
        return parts.scheme + "://(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host
    if port is not None:
        netloc += f":{port}"
    query = [
        (name, value)
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if "password" not in name.lower()
    ]
    # Not urlunsplit: it spells unix:///path as unix:/path.
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{urllib.parse.urlencode(query)}" if query else "")


def _secrets_of(config: StoreConfig) -> list[str | None]:
    secrets = [config.redis_password, config.sentinel_password]
    if config.redis_url is not None:
        with contextlib.suppress(ValueError):
            parts = urllib.parse.urlsplit(config.redis_url)
            secrets.append(parts.password)
            secrets += [
                value
                for name, value in urllib.parse.parse_qsl(parts.query)
                if "password" in name.lower()
            ]
    return secrets
