"""RelayStore: relayers.db, the Berkeley DB hash file the MTAs read.

Owns every read and write of relayers.db and of its journal. Never imports
Twisted: the daemon calls it from a worker thread, the CLI directly.

Theory of operation
-------------------
The file is a plain ``DB_HASH`` database with no environment, keys and values
ASCII without a trailing NUL, values decimal epoch seconds: exactly what
``makemap hash`` writes and what sendmail, Postfix (``hash:``) and Exim
(``dbmnz``) read.

*Locking.* A writer holds ``flock(LOCK_EX)`` on the ``.db`` file from before
it opens the database until after it has synced and closed it; a reader
holds ``LOCK_SH``. That is what makemap, sendmail's map code and Postfix's
``dict_db`` (``INTERNAL_LOCK`` is flock on Linux) take, so none of them sees
a half-written file. Waiting for a lock has a deadline.

*In place.* sendmail and Postfix notice an updated map by the mtime of the
descriptor they hold open, so updates go into the same inode, as makemap's
do (it opens with ``O_TRUNC``); the ``.db`` file is never renamed over.

*Crash safety.* Berkeley DB without an environment is not crash safe: a
writer killed while ``DB->sync`` is writing pages leaves a file whose pages
disagree (measured: after SIGKILLs of a plain writer, ``db_verify`` failed
and later writers got ``DB_RUNRECOVERY``; a hash split can even lose keys
written by *earlier* batches). So each writer keeps a logical journal beside
the file, ``relayers.db.journal``, a sequence of CRC-checked frames:

    Z            the state is empty (starts a snapshot)
    B ops        a batch: put key value / put if newer / delete key / expire cutoff
    C signature  the .db file was synced and equals the state replayed so far;
                 signature = (dev, ino, size, mtime_ns, ctime_ns) of the file

A write, under ``LOCK_EX``: append ``B`` (fdatasync), apply it to the
database and sync, append ``C``. Every writer (and a reader that can) first
checks the journal's last frame:

* ``C`` matching the file: clean, nothing to do (the common case: one
  ``stat`` and one 51-byte read).
* ``C`` not matching: another program (makemap, an editor) rewrote the file
  after us, or it was deleted. The file (or a new empty one) is the truth;
  the journal is rebuilt as a snapshot of it, and a notice says how many
  entries the replacement or the deletion dropped.
* anything else: a writer died mid-write. The state is replayed from the
  journal (a torn last frame is dropped: it was never acknowledged) and the
  database rebuilt from it in place; the journal is rewritten compactly.

The journal is compacted (rewritten as a snapshot) once it outgrows the
database file, so it costs amortised O(1) per write.

*A full disk* costs a retry, never the file: a batch frame that does not
fit is taken back before the database is touched; a commit frame that
does not fit after a good sync is written by the next write; and a file
is rebuilt in place only when the disk has room for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

from berkeleydb import db

from relayproxy.journal import (
    JOURNAL_SUFFIX,
    Journal,
    Notice,
    encode_delete,
    encode_expire,
    encode_put,
    is_expired,
    is_newer,
    signature_of,
)
from relayproxy.mapfile import (
    DEFAULT_LOCK_TIMEOUT,
    MapFile,
    StoreError,
    StoreLockTimeoutError,
    StoreMissingError,
    advance_mtime,
    bdb_message,
    records,
)

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "JOURNAL_SUFFIX",
    "Entry",
    "RelayStore",
    "StoreError",
    "StoreLockTimeoutError",
    "StoreMissingError",
]

_MIN_COMPACT_BYTES: Final = 4 * 1024 * 1024
_SORT_CHUNK: Final = 50_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One key/value pair as stored: bytes, because hand-made files may hold anything."""

    key: bytes
    value: bytes

    @property
    def seconds(self) -> int | None:
        """The timestamp, or None when the value is not a decimal number."""
        if self.value.isdigit():
            return int(self.value)
        return None


class RelayStore:
    """relayers.db: batched, locked, crash-safe, in-place updates and streamed reads.

    One instance may be used by one thread at a time; separate processes
    (the daemon, ``vsmtprelay``, makemap, the MTA) coordinate through flock.
    The file and its lock are ``self.file``; the journal that makes writes
    crash safe is ``self.journal``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o644,
        group: str | int | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        durable: bool = True,
        notice: Notice | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._notice = notice or (lambda message: None)
        self.file = MapFile(self.path, mode=mode, group=group, lock_timeout=lock_timeout)
        self.journal = Journal(self.file, self._notice, durable=durable)

    # -- public writes --

    def record(self, items: Iterable[tuple[str, int]], *, keep_newer: bool = False) -> int:
        """Write ``key -> seconds`` pairs in one locked batch; returns how many.

        ``keep_newer``: an entry already holding a later time keeps it (a login
        replayed from the spool, or one older than a pin set by hand).
        """
        pairs = [(key.encode("ascii"), b"%d" % seconds) for key, seconds in items]
        if not pairs:
            return 0

        def apply(database: Any) -> None:
            for key, value in pairs:
                if not keep_newer or is_newer(database.get(key), value):
                    database.put(key, value)

        op = b"N" if keep_newer else b"P"
        self._write(b"".join(encode_put(k, v, op) for k, v in pairs), apply, create=True)
        return len(pairs)

    def delete(self, keys: Iterable[str]) -> set[str]:
        """Delete keys in one locked batch; returns the keys that were absent."""
        wanted = {key.encode("ascii"): key for key in keys}
        absent: set[str] = set()
        if not wanted:
            return absent

        def apply(database: Any) -> None:
            for raw, key in wanted.items():
                try:
                    database.delete(raw)
                except db.DBNotFoundError:
                    absent.add(key)

        try:
            self._write(b"".join(encode_delete(k) for k in wanted), apply, create=False)
        except StoreMissingError:
            return set(wanted.values())
        return absent

    def expire(self, cutoff: int) -> int:
        """Delete every entry whose timestamp is at or before ``cutoff``; returns the count."""
        removed = 0

        def apply(database: Any) -> None:
            nonlocal removed
            for cursor, (_, value) in records(database):
                if is_expired(value, cutoff):
                    cursor.delete()
                    removed += 1

        try:
            self._write(encode_expire(cutoff), apply, create=False)
        except StoreMissingError:
            return 0
        return removed

    def update(self, changes: Iterable[tuple[str, int | None]]) -> int:
        """Puts (``key -> seconds``) and deletes (``key -> None``) in one locked batch.

        The last change to a key wins; returns how many keys were changed.
        One batch is one mtime step: the mirror's round of a change stream.
        """
        last = {key.encode("ascii"): seconds for key, seconds in changes}
        if not last:
            return 0
        ops = [(k, None if s is None else b"%d" % s) for k, s in last.items()]

        def apply(database: Any) -> None:
            for key, value in ops:
                if value is not None:
                    database.put(key, value)
                elif database.get(key) is not None:
                    database.delete(key)

        journal = (encode_delete(k) if v is None else encode_put(k, v) for k, v in ops)
        self._write(b"".join(journal), apply, create=True)
        return len(ops)

    def replace(self, items: Iterable[tuple[str, int]]) -> tuple[int, int]:
        """Make the file hold exactly ``items``, in one locked batch; returns (written, deleted).

        Only entries that differ are touched. As ``expire`` does, an entry
        whose value is not a decimal time is left for a human. The journal
        says "expire everything, then put these": the same end state.
        """
        wanted = {key.encode("ascii"): b"%d" % seconds for key, seconds in items}
        everything = 2**63 - 1  # the journal's largest cutoff
        counts = [0, 0]

        def apply(database: Any) -> None:
            counts[:] = [0, 0]
            present: set[bytes] = set()
            for cursor, (key, value) in records(database):
                if key not in wanted and is_expired(value, everything):
                    cursor.delete()
                    counts[1] += 1
                elif wanted.get(key) == value:
                    present.add(key)
            for key, value in wanted.items():
                if key not in present:
                    database.put(key, value)
                    counts[0] += 1

        journal = encode_expire(everything) + b"".join(encode_put(k, v) for k, v in wanted.items())
        self._write(journal, apply, create=True)
        return counts[0], counts[1]

    def recover(self) -> None:
        """Take the write lock and repair the file from the journal if a writer died."""
        with self.file.locked(fcntl.LOCK_EX, create=False) as lock_fd:
            self.journal.reconcile(lock_fd)

    # -- public reads --

    def get(self, key: str) -> Entry | None:
        with self._reading() as database:
            value = None if database is None else database.get(key.encode("ascii"))
        return None if value is None else Entry(key.encode("ascii"), value)

    def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """Many keys under one shared lock and one open (the map server's batch)."""
        with self._reading() as database:
            if database is None:
                return [None] * len(keys)
            return [database.get(key.encode("ascii", "replace")) for key in keys]

    def entries(self) -> Iterator[Entry]:
        """Every entry in hash order, streamed; the shared lock is held until exhausted."""
        with self._reading() as database:
            if database is None:
                return
            for _, (key, value) in records(database):
                yield Entry(key, value)

    def sorted_entries(self, keep: Callable[[Entry], bool] = lambda e: True) -> Iterator[Entry]:
        """Kept entries sorted by address, in memory bounded by a chunk, not the file.

        The shared lock is held only while the file is read into sorted runs.
        """
        return sorted_by_address(self.entries(), keep)

    # -- reading and writing under the lock --

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any | None]:
        """The database opened for reading under LOCK_SH, or None for an empty file."""
        lock_fd = self.file.open_locked(fcntl.LOCK_SH, create=False)
        try:
            if not self.journal.clean() and self._may_repair():
                # flock cannot be upgraded atomically: drop the shared lock,
                # repair under the exclusive one, then read under a new one.
                os.close(lock_fd)
                lock_fd = -1
                try:
                    self.recover()
                except StoreError as exc:
                    self._notice(f"{exc}; reading it unrepaired")
                lock_fd = self.file.open_locked(fcntl.LOCK_SH, create=False)
            if os.fstat(lock_fd).st_size == 0:
                # What a zero-length file means (makemap interrupted): no entries.
                yield None
                return
            database = self.file.open_database(db.DB_RDONLY)
            try:
                yield database
            finally:
                database.close()
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

    def _may_repair(self) -> bool:
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.access(self.path, os.W_OK) and os.access(directory, os.W_OK):
            return True
        self._notice(f"{self.path}: a write did not finish; reading it unrepaired")
        return False

    def _write(self, ops: bytes, apply: Callable[[Any], None], *, create: bool) -> None:
        with self.file.locked(fcntl.LOCK_EX, create=create) as lock_fd:
            journal_fd = self.journal.reconcile(lock_fd)
            previous_mtime = os.fstat(lock_fd).st_mtime_ns
            try:
                self.journal.append_batch(journal_fd, ops)
                self._apply(apply)
                advance_mtime(lock_fd, previous_mtime)
                signature = signature_of(os.fstat(lock_fd))
                self.journal.commit(journal_fd, signature)
                journal_size = os.fstat(journal_fd).st_size
            except OSError as exc:
                raise StoreError(f"{self.journal.path}: {exc.strerror}") from None
            finally:
                os.close(journal_fd)
            if journal_size > max(_MIN_COMPACT_BYTES, signature[2]):
                self.journal.snapshot(lock_fd, None)

    def _apply(self, apply: Callable[[Any], None]) -> None:
        database = self.file.open_database(0)
        try:
            try:
                apply(database)
                database.sync()
            finally:
                database.close()  # flushes too, and can fail as sync can
        except db.DBError as exc:
            self.journal.interrupted = bdb_message(exc, self.path)
            raise StoreError(f"{self.path}: {self.journal.interrupted}") from None


# --- sorting ----------------------------------------------------------------------


def sorted_by_address(entries: Iterable[Entry], keep: Callable[[Entry], bool]) -> Iterator[Entry]:
    """The kept ``entries`` sorted by address, in memory bounded by a chunk (every engine's).

    ``entries`` is read to its end first, into sorted runs; larger listings
    spill runs to temporary files and merge them.
    """
    runs: list[IO[bytes]] = []
    chunk: list[Entry] = []
    try:
        for entry in entries:
            if keep(entry):
                chunk.append(entry)
                if len(chunk) >= _SORT_CHUNK:
                    runs.append(_spill(chunk))
                    chunk = []
        chunk.sort(key=_entry_order)
        if not runs:
            yield from chunk
            return
        runs.append(_spill(chunk))
        chunk = []
        yield from heapq.merge(*(_read_run(run) for run in runs), key=_entry_order)
    finally:
        for run in runs:
            run.close()


def _entry_order(entry: Entry) -> tuple[int, bytes, bytes]:
    """Addresses in numeric order: IPv4, then IPv6 (both spellings together), then the rest."""
    key = entry.key
    try:
        text = key.decode("ascii")
        if ":" not in text:
            return (0, socket.inet_pton(socket.AF_INET, text), key)
        if text[:5].lower() == "ipv6:":
            text = text[5:]
        return (1, socket.inet_pton(socket.AF_INET6, text), key)
    except (UnicodeDecodeError, OSError):
        return (2, key, key)


_RUN_HEAD = struct.Struct(">HH")


def _spill(chunk: list[Entry]) -> IO[bytes]:
    chunk.sort(key=_entry_order)
    run = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes the merged runs)
    run.write(b"".join(_RUN_HEAD.pack(len(e.key), len(e.value)) + e.key + e.value for e in chunk))
    run.seek(0)
    return run


def _read_run(run: IO[bytes]) -> Iterator[Entry]:
    while head := run.read(_RUN_HEAD.size):
        klen, vlen = _RUN_HEAD.unpack(head)
        body = run.read(klen + vlen)
        yield Entry(body[:klen], body[klen:])
