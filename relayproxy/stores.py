"""The store layer's one face, and the choice of engine behind it.

Everything that reads or writes the relayer set goes through ``Store``: the
daemon's recorder (on its worker thread), ``vsmtprelay``, the map server and
the mirror. Two engines implement it:

* ``relayproxy.store.RelayStore``: relayers.db, the Berkeley DB hash file
  (``[store] backend = file``, the default).
* ``relayproxy.redis_store.RedisStore``: one relayer set on Redis, shared by
  a fleet (``[store] backend = redis``).

Calls block (disk or network); the daemons make them off the reactor.
Never imports Twisted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from relayproxy.config import StoreConfig
from relayproxy.journal import Notice
from relayproxy.store import Entry, RelayStore, StoreError

__all__ = ["Entry", "Store", "StoreError", "open_store"]


class Store(Protocol):
    """A relayer set: ASCII address keys -> epoch seconds. Failures raise ``StoreError``."""

    @property
    def path(self) -> str:
        """What logs and messages name it by: the file, or the Redis address (no password)."""
        ...

    def record(self, items: Iterable[tuple[str, int]], *, keep_newer: bool = False) -> int:
        """Write ``key -> seconds`` pairs as one batch; returns how many.

        ``keep_newer``: an entry already holding a later time keeps it.
        """
        ...

    def delete(self, keys: Iterable[str]) -> set[str]:
        """Delete keys; returns the ones that were absent."""
        ...

    def expire(self, cutoff: int) -> int:
        """Delete every entry whose time is at or before ``cutoff``; returns the count."""
        ...

    def recover(self) -> None:
        """Check the store once at start (and repair what a killed writer left)."""
        ...

    def get(self, key: str) -> Entry | None: ...

    def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of many keys in one round (None: absent), in order: the map server's read."""
        ...

    def entries(self) -> Iterator[Entry]:
        """Every entry, in no particular order, streamed."""
        ...

    def sorted_entries(self, keep: Callable[[Entry], bool] = ...) -> Iterator[Entry]:
        """The kept entries in address order (IPv4, IPv6, then the rest), in bounded memory."""
        ...


def open_store(config: StoreConfig, notice: Notice | None = None) -> Store:
    """The engine ``config`` names; ``notice`` hears of repairs and replaced files.

    Opening connects to nothing: a Redis store connects at its first call.
    """
    if config.backend == "redis":
        # Loaded only for a Redis store: a file-only host never imports redis-py.
        from relayproxy.redis_store import RedisStore  # noqa: PLC0415

        return RedisStore.from_config(config)
    return RelayStore(
        config.path,
        mode=config.mode,
        group=config.group,
        lock_timeout=config.lock_timeout,
        notice=notice,
    )
