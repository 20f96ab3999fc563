"""The mirror's sync: a local relayers.db kept equal to the fleet's relayer set on Redis.

Owns how ``relayproxy-mirror`` reads Redis (the relayer keys and the change
stream that ``relayproxy.redis_store`` writes beside them) and what it
writes to its file, through ``RelayStore``: the file's locks, journal,
in-place writes and mtime rule are the file engine's own, so the MTAs read
a mirrored file exactly as they read the proxy's. Never imports Twisted:
the daemon (``relayproxy.mirror_service``) makes one call at a time from
one worker thread.

Theory of operation
-------------------
*Position.* The mirror has applied the stream up to an entry id, and knows
how many entries the stream had ever added up to it (``entries-added`` of
XINFO STREAM, Redis >= 7.0). The count tells a stream made anew from the one
that was read, which ids alone cannot: ids are times, and a new stream's
run on past the old one's.

*Resync* (at start, and after any gap). One XINFO STREAM gives the stream's
last id and its count together: that is the new position. Then the relayer
keys are scanned and the file made equal to that set in one locked batch
(``RelayStore.replace``). A change made while the keys were scanned is in
the stream after the position, and following applies it again: a put or a
delete applied twice ends the same.

*Follow.* XREAD BLOCK from the position; whatever one read returns becomes
one store batch (the last change to a key wins), so one mtime step for the
MTAs however fast logins come. Then one XINFO STREAM checks that nothing
was skipped. A *gap*, mended by a resync, is any of:

* the connection to Redis failed: a restarted server may have lost data,
  and a promoted replica may lack the last writes (redis-py must not
  reconnect silently: ``follow_client`` turns its retry off);
* the stream holds fewer entries than were added after the position: some
  that were never read are gone (XTRIM, XADD's MAXLEN: the mirror fell
  behind the trim; or an XDEL);
* the stream is gone, or was made anew (fewer entries than were read, or a
  last id behind the position).

*Expiry.* Redis expires a relayer at its time + ttl and writes no stream
entry for it, so the mirror expires its own file at now - ttl on a timer;
a pinned (future) entry lives until its time + ttl in both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from relayproxy.redis_store import RedisStore
from relayproxy.store import RelayStore, StoreError

__all__ = ["Mirror", "Position", "Resynced", "follow_client"]

# Entries per XREAD: one store batch; a backlog is read in several rounds.
_READ_COUNT: Final = 10_000
_NO_STREAM: Final = "no such key"


@dataclass(frozen=True, slots=True)
class Position:
    """Applied up to ``last_id``; the stream had added ``added`` entries up to it."""

    last_id: tuple[int, int]
    added: int

    @property
    def stream_id(self) -> str:
        return f"{self.last_id[0]}-{self.last_id[1]}"


@dataclass(frozen=True, slots=True)
class Resynced:
    """What a resync found on Redis and changed in the file."""

    reason: str
    relayers: int
    written: int
    deleted: int


def follow_client(store: RedisStore) -> None:
    """Make every failed connection an error the mirror sees: a reconnect is a gap."""
    store.client.set_retry(Retry(NoBackoff(), 0))


class Mirror:
    """Keeps ``file`` equal to the relayers in ``redis``; one call at a time.

    ``gap`` names why the next ``step`` resyncs (``start`` at first), or is
    None while the mirror follows the stream.
    """

    def __init__(
        self, redis_store: RedisStore, file: RelayStore, *, block_seconds: float = 1.0
    ) -> None:
        self.redis = redis_store
        self.file = file
        self.position: Position | None = None
        self.gap: str | None = "start"
        self.block_ms = max(1, int(block_seconds * 1000))

    def step(self) -> Resynced | int:
        """A resync if one is due, else one read of the stream (the entries applied)."""
        if self.gap is not None:
            return self.resync(self.gap)
        return self.follow()

    def file_replaced(self) -> None:
        """Another program rewrote the file (the store's notice): Redis must be copied again."""
        self.gap = "file_replaced"

    # -- the two ways of keeping up --

    def resync(self, reason: str) -> Resynced:
        """Note the stream's position, then copy every relayer into the file in one batch."""
        self.gap = reason  # until this succeeds
        with self._talking():
            position = self._stream_now() or Position((0, 0), 0)
            relayers: dict[str, int] = {}
            for entry in self.redis.entries():
                pair = _pair(entry.key, entry.value)
                if pair is not None:
                    relayers[pair[0]] = pair[1]
        written, deleted = self.file.replace(relayers.items())
        if self.gap == reason:  # the store's notice during the write asks for another
            self.gap = None
        self.position = position
        return Resynced(reason, len(relayers), written, deleted)

    def follow(self) -> int:
        """One XREAD (blocking up to ``block_seconds``) applied as one batch; then a gap check."""
        position = self.position
        assert position is not None, "follow() before a resync"
        with self._talking():
            reply: Any = self.redis.client.xread(
                {self.redis.stream: position.stream_id}, count=_READ_COUNT, block=self.block_ms
            )
        entries: list[tuple[Any, dict[bytes, bytes]]] = reply[0][1] if reply else []
        changes: list[tuple[str, int | None]] = []
        for _, fields in entries:
            change = _change(fields)
            if change is not None:
                changes.append(change)
        # A failed write leaves the position where it was: the next round reads it again.
        self.file.update(changes)
        if entries:
            position = Position(_parse_id(entries[-1][0]), position.added + len(entries))
        self.position = position
        with self._talking():
            gap = self._gap_after(position)
        if gap is not None and self.gap is None:
            self.gap = gap
        return len(entries)

    def expire(self, now: int) -> int:
        """Delete what Redis has expired by itself (time + ttl reached); returns the count."""
        return self.file.expire(now - self.redis.ttl_seconds)

    # -- the stream --

    def _stream_now(self) -> Position | None:
        info = self._stream_info()
        if info is None:
            return None
        return Position(_parse_id(info["last-generated-id"]), int(info["entries-added"]))

    def _stream_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.redis.client.xinfo_stream(self.redis.stream)
        except redis.ResponseError as exc:
            if _NO_STREAM in str(exc).lower():
                return None
            raise
        return info

    def _gap_after(self, position: Position) -> str | None:
        info = self._stream_info()
        if info is None:
            return "stream_deleted" if position.added else None
        last, added = _parse_id(info["last-generated-id"]), int(info["entries-added"])
        behind = last < position.last_id or (last == position.last_id and added != position.added)
        if behind or added < position.added:
            return "stream_recreated"  # or a promoted replica that lacks what was read
        if int(info["length"]) < added - position.added:
            return "stream_trimmed"  # fewer entries left than were added after ours
        return None

    @contextlib.contextmanager
    def _talking(self) -> Iterator[None]:
        """Any failure to talk to Redis is a gap, and a StoreError as the store words it."""
        try:
            with self.redis.talking():
                yield
        except StoreError:
            self.gap = self.gap or "redis_lost"
            raise


def _parse_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def _pair(key: bytes, value: bytes) -> tuple[str, int] | None:
    """An ASCII key and a decimal time, as the file holds; anything else is not a relayer."""
    if not key.isascii() or not value.isdigit():
        return None
    return key.decode("ascii"), int(value)


def _change(fields: dict[bytes, bytes]) -> tuple[str, int | None] | None:
    """A stream entry as a change: (key, seconds) for a put, (key, None) for a del."""
    op, key = fields.get(b"op"), fields.get(b"key")
    if key is None or not key.isascii():
        return None
    if op == b"del":
        return key.decode("ascii"), None
    if op == b"put":
        return _pair(key, fields.get(b"value", b""))
    return None
