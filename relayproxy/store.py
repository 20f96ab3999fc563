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
import errno
import fcntl
import grp
import heapq
import os
import socket
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Final

from berkeleydb import db

DEFAULT_LOCK_TIMEOUT: Final = 10.0
JOURNAL_SUFFIX: Final = ".journal"
_CACHE_BYTES: Final = 8 * 1024 * 1024
_MIN_COMPACT_BYTES: Final = 4 * 1024 * 1024
_SORT_CHUNK: Final = 50_000
_MTIME_MAX_LEAD: Final = 60

Notice = Callable[[str], None]


class StoreError(Exception):
    """A store operation failed; the message names the file and the cause."""


class StoreMissingError(StoreError):
    """The database file does not exist (reading never creates it)."""


class StoreLockTimeoutError(StoreError):
    """Another process held the lock past the deadline."""


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


# --- journal frames -----------------------------------------------------------

_MAGIC: Final = b"RJ"
_HEAD = struct.Struct(">2scII")  # magic, kind, payload length, crc32 of payload
_SIGNATURE = struct.Struct(">QQQqq")  # dev, ino, size, mtime_ns, ctime_ns
_COMMIT_FRAME_SIZE: Final = _HEAD.size + _SIGNATURE.size
_KEYLEN = struct.Struct(">H")
_CUTOFF = struct.Struct(">q")
_FRAME_PAYLOAD_TARGET: Final = 64 * 1024

Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def _encode_put(key: bytes, value: bytes, op: bytes = b"P") -> bytes:
    return op + _KEYLEN.pack(len(key)) + key + _KEYLEN.pack(len(value)) + value


def _is_newer(old: bytes | None, value: bytes) -> bool:
    """Whether ``value`` may replace ``old`` under keep-newer (op "N")."""
    return old is None or not old.isdigit() or int(old) < int(value)


def _encode_delete(key: bytes) -> bytes:
    return b"D" + _KEYLEN.pack(len(key)) + key


def _encode_expire(cutoff: int) -> bytes:
    return b"X" + _CUTOFF.pack(cutoff)


def _is_expired(value: bytes, cutoff: int) -> bool:
    # Only decimal timestamps expire: a hand-made value is left for a human.
    return value.isdigit() and int(value) <= cutoff


def _apply_ops(state: dict[bytes, bytes], payload: bytes) -> None:
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        op = bytes(view[pos : pos + 1])
        pos += 1
        if op == b"X":
            (cutoff,) = _CUTOFF.unpack_from(view, pos)
            pos += _CUTOFF.size
            for key in [k for k, v in state.items() if _is_expired(v, cutoff)]:
                del state[key]
            continue
        (klen,) = _KEYLEN.unpack_from(view, pos)
        pos += _KEYLEN.size
        key = bytes(view[pos : pos + klen])
        pos += klen
        if op == b"D":
            state.pop(key, None)
            continue
        if op not in (b"P", b"N"):
            raise ValueError(f"unknown journal operation {op!r}")
        (vlen,) = _KEYLEN.unpack_from(view, pos)
        pos += _KEYLEN.size
        value = bytes(view[pos : pos + vlen])
        pos += vlen
        if op == b"P" or _is_newer(state.get(key), value):
            state[key] = value


@dataclass
class _Replay:
    state: dict[bytes, bytes]
    torn: bool  # bytes after the last whole frame (never acknowledged)


def _replay(data: bytes) -> _Replay:
    state: dict[bytes, bytes] = {}
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, kind, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        payload = data[pos + _HEAD.size : end]
        if magic != _MAGIC or end > len(data) or zlib.crc32(payload) != crc:
            break
        if kind == b"Z":
            state.clear()
        elif kind == b"B":
            _apply_ops(state, payload)
        # "C" frames change no state: only the last one matters, read by _last_commit.
        pos = end
    return _Replay(state, torn=pos != len(data))


def _last_commit(fd: int) -> Signature | None:
    """The signature in the journal's last frame, when that frame is a commit."""
    size = os.fstat(fd).st_size
    if size < _COMMIT_FRAME_SIZE:
        return None
    tail = os.pread(fd, _COMMIT_FRAME_SIZE, size - _COMMIT_FRAME_SIZE)
    magic, kind, length, crc = _HEAD.unpack_from(tail)
    payload = tail[_HEAD.size :]
    if magic != _MAGIC or kind != b"C" or length != _SIGNATURE.size:
        return None
    if zlib.crc32(payload) != crc:
        return None
    return _SIGNATURE.unpack(payload)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- the store ------------------------------------------------------------------


class RelayStore:
    """relayers.db: batched, locked, crash-safe, in-place updates and streamed reads.

    One instance may be used by one thread at a time; separate processes
    (the daemon, ``vsmtprelay``, makemap, the MTA) coordinate through flock.
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
        self.journal_path = self.path + JOURNAL_SUFFIX
        self.mode = mode
        self.group = group
        self.lock_timeout = lock_timeout
        self.durable = durable
        self._notice = notice or (lambda message: None)
        self._created = False  # the last lock taken created the file
        # Why this instance's last write left no commit: the next repair says so.
        self._interrupted: str | None = None
        # A write synced the file but could not journal its commit (a full disk).
        self._uncommitted: Signature | None = None

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
                if not keep_newer or _is_newer(database.get(key), value):
                    database.put(key, value)

        op = b"N" if keep_newer else b"P"
        self._write(b"".join(_encode_put(k, v, op) for k, v in pairs), apply, create=True)
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
            self._write(b"".join(_encode_delete(k) for k in wanted), apply, create=False)
        except StoreMissingError:
            return set(wanted.values())
        return absent

    def expire(self, cutoff: int) -> int:
        """Delete every entry whose timestamp is at or before ``cutoff``; returns the count."""
        removed = 0

        def apply(database: Any) -> None:
            nonlocal removed
            for cursor, (_, value) in _records(database):
                if _is_expired(value, cutoff):
                    cursor.delete()
                    removed += 1

        try:
            self._write(_encode_expire(cutoff), apply, create=False)
        except StoreMissingError:
            return 0
        return removed

    def recover(self) -> None:
        """Take the write lock and repair the file from the journal if a writer died."""
        with self._locked(fcntl.LOCK_EX, create=False) as lock_fd:
            self._reconcile(lock_fd)

    # -- public reads --

    def get(self, key: str) -> Entry | None:
        with self._reading() as database:
            value = None if database is None else database.get(key.encode("ascii"))
        return None if value is None else Entry(key.encode("ascii"), value)

    def entries(self) -> Iterator[Entry]:
        """Every entry in hash order, streamed; the shared lock is held until exhausted."""
        with self._reading() as database:
            if database is None:
                return
            for _, (key, value) in _records(database):
                yield Entry(key, value)

    def sorted_entries(self, keep: Callable[[Entry], bool] = lambda e: True) -> Iterator[Entry]:
        """Kept entries sorted by address, in memory bounded by a chunk, not the file.

        The shared lock is held only while the file is read into sorted runs;
        larger listings spill runs to temporary files and merge them.
        """
        runs: list[IO[bytes]] = []
        chunk: list[Entry] = []
        try:
            for entry in self.entries():
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

    # -- locking --

    @contextlib.contextmanager
    def _locked(self, operation: int, *, create: bool) -> Iterator[int]:
        fd = self._open_lock_fd(operation, create=create)
        try:
            yield fd
        finally:
            os.close(fd)  # releases the flock

    def _open_lock_fd(self, operation: int, *, create: bool) -> int:
        deadline = time.monotonic() + self.lock_timeout
        self._created = False
        flags = os.O_RDWR if operation == fcntl.LOCK_EX else os.O_RDONLY
        while True:
            fd = self._open_db_file(flags, create=create)
            try:
                self._flock(fd, operation, deadline)
                # The name may have been replaced while we waited (a rename
                # by some other tool): lock the file the name now refers to.
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _open_db_file(self, flags: int, *, create: bool) -> int:
        try:
            return os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise StoreMissingError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
        except FileExistsError:
            return self._open_db_file(flags, create=False)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror}") from None
        self._created = True
        try:
            os.fchmod(fd, self.mode)  # the umask must not decide what the MTA may read
            if self.group is not None:
                os.fchown(fd, -1, _group_id(self.group))
        except (OSError, StoreError) as exc:
            os.close(fd)
            os.unlink(self.path)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot set mode/group of {self.path}: {exc.strerror}") from None
        return fd

    def _flock(self, fd: int, operation: int, deadline: float) -> None:
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kind = "exclusive" if operation == fcntl.LOCK_EX else "shared"
                raise StoreLockTimeoutError(
                    f"{self.path}: could not get the {kind} lock within "
                    f"{self.lock_timeout:g} s (another process holds it)"
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)

    # -- database handles --

    def _open_database(self, flags: int) -> Any:
        database = db.DB()
        try:
            database.set_cachesize(0, _CACHE_BYTES)
            database.open(self.path, dbtype=db.DB_HASH, flags=flags, mode=self.mode)
        except db.DBError as exc:
            database.close()
            raise StoreError(f"{self.path}: {_bdb_message(exc)}") from None
        return database

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any | None]:
        """The database opened for reading under LOCK_SH, or None for an empty file."""
        lock_fd = self._open_lock_fd(fcntl.LOCK_SH, create=False)
        try:
            if not self._journal_clean() and self._may_repair():
                # flock cannot be upgraded atomically: drop the shared lock,
                # repair under the exclusive one, then read under a new one.
                os.close(lock_fd)
                lock_fd = -1
                try:
                    self.recover()
                except StoreError as exc:
                    self._notice(f"{exc}; reading it unrepaired")
                lock_fd = self._open_lock_fd(fcntl.LOCK_SH, create=False)
            if os.fstat(lock_fd).st_size == 0:
                # What a zero-length file means (makemap interrupted): no entries.
                yield None
                return
            database = self._open_database(db.DB_RDONLY)
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

    def _journal_clean(self) -> bool:
        try:
            jfd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True  # never written by us (a makemap-made file): nothing to repair
        try:
            # A commit last means clean, even if another program changed the file since.
            return _last_commit(jfd) is not None or os.fstat(jfd).st_size == 0
        finally:
            os.close(jfd)

    def _write(self, ops: bytes, apply: Callable[[Any], None], *, create: bool) -> None:
        with self._locked(fcntl.LOCK_EX, create=create) as lock_fd:
            journal_fd = self._reconcile(lock_fd)
            previous_mtime = os.fstat(lock_fd).st_mtime_ns
            try:
                self._append_batch(journal_fd, ops)
                self._apply(apply)
                _advance_mtime(lock_fd, previous_mtime)
                signature = _signature(os.fstat(lock_fd))
                self._uncommitted = signature
                _write_all(journal_fd, _frame(b"C", _SIGNATURE.pack(*signature)))
                self._uncommitted = None
                journal_size = os.fstat(journal_fd).st_size
            except OSError as exc:
                raise StoreError(f"{self.journal_path}: {exc.strerror}") from None
            finally:
                os.close(journal_fd)
            if journal_size > max(_MIN_COMPACT_BYTES, signature[2]):
                self._snapshot_journal(lock_fd, None)

    def _append_batch(self, journal_fd: int, ops: bytes) -> None:
        end = os.fstat(journal_fd).st_size
        try:
            _write_all(journal_fd, _frame(b"B", ops))
            if self.durable:
                os.fdatasync(journal_fd)
        except OSError as exc:
            # Nothing reached the database yet: take the partial frame back, so
            # that a full disk costs a retry, not a rebuild of the whole file.
            with contextlib.suppress(OSError):
                os.ftruncate(journal_fd, end)
            raise StoreError(f"{self.journal_path}: {exc.strerror}") from None

    def _apply(self, apply: Callable[[Any], None]) -> None:
        database = self._open_database(0)
        try:
            try:
                apply(database)
                database.sync()
            finally:
                database.close()  # flushes too, and can fail as sync can
        except db.DBError as exc:
            self._interrupted = _bdb_message(exc)
            raise StoreError(f"{self.path}: {self._interrupted}") from None

    # -- recovery --

    def _reconcile(self, lock_fd: int) -> int:
        """Make the file and the journal agree; return the journal opened for appending.

        Runs under LOCK_EX. See the module docstring for the three cases.
        """
        if os.fstat(lock_fd).st_size == 0:
            # New (or truncated by hand): a valid empty database, as makemap would make.
            database = self._open_database(db.DB_CREATE)
            database.close()
        try:
            journal_fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            self._snapshot_journal(lock_fd, None)
            return self._open_journal_for_append()
        except OSError as exc:
            raise StoreError(f"cannot open {self.journal_path}: {exc.strerror}") from None
        commit = _last_commit(journal_fd)
        signature = _signature(os.fstat(lock_fd))
        if commit is not None and commit == signature:
            return journal_fd
        if commit is None and self._uncommitted == signature:
            # Our own write reached the file; only its commit frame did not fit.
            try:
                _write_all(journal_fd, _frame(b"C", _SIGNATURE.pack(*signature)))
            except OSError as exc:
                os.close(journal_fd)
                raise StoreError(f"{self.journal_path}: {exc.strerror}") from None
            self._uncommitted = None
            return journal_fd
        os.close(journal_fd)
        if commit is not None:
            self._changed_behind_our_back(lock_fd)
            self._snapshot_journal(lock_fd, None)
        else:
            self._rebuild_from_journal(lock_fd)
        return self._open_journal_for_append()

    def _changed_behind_our_back(self, lock_fd: int) -> None:
        """Say what the file's deletion or replacement cost; the file (or its absence) wins."""
        with open(self.journal_path, "rb") as journal:
            known = _replay(journal.read()).state
        if self._created:  # absent when we came to write: not replaced, deleted
            self._notice(
                f"{self.path}: deleted while in use; {_entries(len(known))} it held "
                "dropped with it and a new file is started"
            )
            return
        database = self._open_database(db.DB_RDONLY)
        try:
            dropped = sum(1 for key in known if database.get(key) is None)
        finally:
            database.close()
        self._notice(
            f"{self.path}: replaced by another program (makemap, an editor); the new file "
            f"wins: {_entries(dropped)} it does not have dropped"
        )

    def _open_journal_for_append(self) -> int:
        try:
            return os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open {self.journal_path}: {exc.strerror}") from None

    def _rebuild_from_journal(self, lock_fd: int) -> None:
        with open(self.journal_path, "rb") as journal:
            replay = _replay(journal.read())
        state = replay.state
        _check_room(self.path, state)
        cause = (
            f"the last write failed ({self._interrupted})"
            if self._interrupted
            else "a write did not finish (its writer died or failed)"
        )
        self._notice(
            f"{self.path}: {cause}; rebuilt {len(state)} entries from the journal"
            + (" (dropped an unfinished batch)" if replay.torn else "")
        )
        self._interrupted = None
        # DB_TRUNCATE opens with O_TRUNC: the same inode, as makemap rewrites it.
        database = self._open_database(db.DB_CREATE | db.DB_TRUNCATE)
        try:
            for key, value in state.items():
                database.put(key, value)
            database.sync()
        except db.DBError as exc:
            raise StoreError(f"{self.path}: {_bdb_message(exc)}") from None
        finally:
            database.close()
        self._snapshot_journal(lock_fd, state)

    def _snapshot_journal(self, lock_fd: int, state: dict[bytes, bytes] | None) -> None:
        """Atomically replace the journal by a snapshot of ``state`` (default: the file)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        st = os.fstat(lock_fd)
        try:
            handle, temp_path = tempfile.mkstemp(prefix=".relayers-journal.", dir=directory)
        except OSError as exc:
            raise StoreError(f"cannot create a journal in {directory}: {exc.strerror}") from None
        try:
            os.fchmod(handle, stat.S_IMODE(st.st_mode) & 0o666)
            with contextlib.suppress(PermissionError):
                # Root running vsmtprelay must not leave a journal the daemon cannot write.
                os.fchown(handle, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
            pairs: Iterable[tuple[bytes, bytes]]
            if state is None:
                database = self._open_database(db.DB_RDONLY)
                pairs = (record for _, record in _records(database))
            else:
                database = None
                pairs = state.items()
            try:
                with os.fdopen(handle, "wb", closefd=False) as out:
                    out.write(_frame(b"Z", b""))
                    payload: list[bytes] = []
                    size = 0
                    for key, value in pairs:
                        op = _encode_put(key, value)
                        payload.append(op)
                        size += len(op)
                        if size >= _FRAME_PAYLOAD_TARGET:
                            out.write(_frame(b"B", b"".join(payload)))
                            payload, size = [], 0
                    if payload:
                        out.write(_frame(b"B", b"".join(payload)))
                    out.write(_frame(b"C", _SIGNATURE.pack(*_signature(os.fstat(lock_fd)))))
            finally:
                if database is not None:
                    database.close()
            os.fsync(handle)
            os.rename(temp_path, self.journal_path)
            _fsync_directory(directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
        finally:
            os.close(handle)


def _records(database: Any) -> Iterator[tuple[Any, tuple[bytes, bytes]]]:
    """Every (key, value) in hash order, with the cursor on it (to delete it)."""
    cursor = database.cursor()
    try:
        record = cursor.first()
        while record is not None:
            yield cursor, record
            record = cursor.next()
    finally:
        cursor.close()


def _advance_mtime(fd: int, previous_ns: int) -> None:
    """Make the file's mtime move to a later whole second than before this write.

    sendmail reopens a map only when ``fstat().st_mtime > map_mtime``, in
    whole seconds (``db_map_lookup`` in sendmail/map.c): a second write
    within the same second would stay invisible to a sendmail that opened
    the map after the first. So a write in the same second as the previous
    one dates the file a second later; a burst of writes may run the mtime
    ahead of the clock, by at most ``_MTIME_MAX_LEAD`` seconds (the daemon
    batches its writes, so in practice the lead stays near zero).
    """
    second = 1_000_000_000
    st = os.fstat(fd)
    if st.st_mtime_ns // second > previous_ns // second:
        return
    limit = time.time_ns() // second + _MTIME_MAX_LEAD
    target = min(previous_ns // second + 1, limit) * second
    if target // second <= st.st_mtime_ns // second:
        return
    with contextlib.suppress(PermissionError):  # only the owner may set times
        os.utime(fd, ns=(st.st_atime_ns, target))


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StoreError(f"unknown group {group!r}") from None


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def _check_room(path: str, state: dict[bytes, bytes]) -> None:
    """Refuse to rebuild a file in place on a disk that cannot hold it.

    A rebuild truncates the file first: on a full disk it would leave the
    MTA a partial map. Until there is room, the file stays as it is and
    the caller retries.
    """
    # A hash page holds its pairs with some slack; twice the payload plus a
    # journal snapshot is ample.
    needed = 3 * sum(len(k) + len(v) + 16 for k, v in state.items()) + (64 << 10)
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise StoreError(
            f"{path}: No space left on device (a rebuild needs about {needed} bytes, "
            f"{free} are free)"
        )


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some filesystems cannot sync a directory
            raise
    finally:
        os.close(fd)


def _bdb_message(exc: Exception) -> str:
    args = exc.args
    text = str(args[1] if len(args) > 1 else exc)
    cause, _, detail = text.partition(" -- ")
    if detail.endswith(": " + cause):
        text = cause  # libdb's "Is a directory -- PATH: Is a directory": the path is ours to add
    if "unexpected file type or format" in text or "Invalid argument" in text:
        return "not a Berkeley DB hash file (" + text + ")"
    return text


# --- sorting ----------------------------------------------------------------------


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
