"""The journal beside relayers.db: what makes in-place Berkeley DB writes crash safe.

Owns ``relayers.db.journal``: its CRC-checked frames (``Z`` a snapshot
starts, ``B`` a batch of operations, ``C`` a commit carrying the file's
signature), and what a writer does with them under ``LOCK_EX`` (reconcile
the file with the journal, append a batch, commit, rebuild the file from
the journal, rewrite the journal as a snapshot). Never imports Twisted.
The theory of operation is ``relayproxy.store``'s docstring.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from berkeleydb import db

from relayproxy.mapfile import MapFile, StoreError, bdb_message, records

JOURNAL_SUFFIX: Final = ".journal"
Notice = Callable[[str], None]

_MAGIC: Final = b"RJ"
_HEAD = struct.Struct(">2scII")  # magic, kind, payload length, crc32 of payload
_SIGNATURE = struct.Struct(">QQQqq")  # dev, ino, size, mtime_ns, ctime_ns
_COMMIT_FRAME_SIZE: Final = _HEAD.size + _SIGNATURE.size
_KEYLEN = struct.Struct(">H")
_CUTOFF = struct.Struct(">q")
_FRAME_PAYLOAD_TARGET: Final = 64 * 1024

Signature = tuple[int, int, int, int, int]


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def commit_frame(signature: Signature) -> bytes:
    """``C``: the file was synced and equals the state replayed so far."""
    return frame(b"C", _SIGNATURE.pack(*signature))


def encode_put(key: bytes, value: bytes, op: bytes = b"P") -> bytes:
    return op + _KEYLEN.pack(len(key)) + key + _KEYLEN.pack(len(value)) + value


def is_newer(old: bytes | None, value: bytes) -> bool:
    """Whether ``value`` may replace ``old`` under keep-newer (op "N")."""
    return old is None or not old.isdigit() or int(old) < int(value)


def encode_delete(key: bytes) -> bytes:
    return b"D" + _KEYLEN.pack(len(key)) + key


def encode_expire(cutoff: int) -> bytes:
    return b"X" + _CUTOFF.pack(cutoff)


def is_expired(value: bytes, cutoff: int) -> bool:
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
            for key in [k for k, v in state.items() if is_expired(v, cutoff)]:
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
        if op == b"P" or is_newer(state.get(key), value):
            state[key] = value


@dataclass
class Replay:
    state: dict[bytes, bytes]
    torn: bool  # bytes after the last whole frame (never acknowledged)


def replay(data: bytes) -> Replay:
    """The state a journal's whole frames describe; a torn tail (never acknowledged) is dropped."""
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
    return Replay(state, torn=pos != len(data))


def last_commit(fd: int) -> Signature | None:
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


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Journal:
    """The journal of one map file; every method runs under the file's LOCK_EX."""

    def __init__(self, map_file: MapFile, notice: Notice, *, durable: bool = True) -> None:
        self.map = map_file
        self.path = map_file.path + JOURNAL_SUFFIX
        self.durable = durable
        self._notice = notice
        # Why this process's last write left no commit: the next repair says so.
        self.interrupted: str | None = None
        # A write synced the file but could not journal its commit (a full disk).
        self._uncommitted: Signature | None = None

    def clean(self) -> bool:
        """A commit last (or no journal): nothing to repair. Takes no lock."""
        try:
            jfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True  # never written by us (a makemap-made file): nothing to repair
        try:
            # A commit last means clean, even if another program changed the file since.
            return last_commit(jfd) is not None or os.fstat(jfd).st_size == 0
        finally:
            os.close(jfd)

    def append_batch(self, journal_fd: int, ops: bytes) -> None:
        end = os.fstat(journal_fd).st_size
        try:
            write_all(journal_fd, frame(b"B", ops))
            if self.durable:
                os.fdatasync(journal_fd)
        except OSError as exc:
            # Nothing reached the database yet: take the partial frame back, so
            # that a full disk costs a retry, not a rebuild of the whole file.
            with contextlib.suppress(OSError):
                os.ftruncate(journal_fd, end)
            raise StoreError(f"{self.path}: {exc.strerror}") from None

    def commit(self, journal_fd: int, signature: Signature) -> None:
        self._uncommitted = signature
        write_all(journal_fd, commit_frame(signature))
        self._uncommitted = None

    def reconcile(self, lock_fd: int) -> int:
        """Make the file and the journal agree; return the journal opened for appending.

        Runs under LOCK_EX. The three cases are in ``relayproxy.store``'s docstring.
        """
        if os.fstat(lock_fd).st_size == 0:
            # New (or truncated by hand): a valid empty database, as makemap would make.
            database = self.map.open_database(db.DB_CREATE)
            database.close()
        try:
            journal_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            self.snapshot(lock_fd, None)
            return self._open_for_append()
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None
        commit = last_commit(journal_fd)
        signature = signature_of(os.fstat(lock_fd))
        if commit is not None and commit == signature:
            return journal_fd
        if commit is None and self._uncommitted == signature:
            # Our own write reached the file; only its commit frame did not fit.
            try:
                self.commit(journal_fd, signature)
            except OSError as exc:
                os.close(journal_fd)
                raise StoreError(f"{self.path}: {exc.strerror}") from None
            return journal_fd
        os.close(journal_fd)
        if commit is not None:
            self._changed_behind_our_back(lock_fd)
            self.snapshot(lock_fd, None)
        else:
            self._rebuild(lock_fd)
        return self._open_for_append()

    def _changed_behind_our_back(self, lock_fd: int) -> None:
        """Say what the file's deletion or replacement cost; the file (or its absence) wins."""
        known = self._replayed().state
        if self.map.created:  # absent when we came to write: not replaced, deleted
            self._notice(
                f"{self.map.path}: deleted while in use; {_entries(len(known))} it held "
                "dropped with it and a new file is started"
            )
            return
        database = self.map.open_database(db.DB_RDONLY)
        try:
            dropped = sum(1 for key in known if database.get(key) is None)
        finally:
            database.close()
        self._notice(
            f"{self.map.path}: replaced by another program (makemap, an editor); the new file "
            f"wins: {_entries(dropped)} it does not have dropped"
        )

    def _replayed(self) -> Replay:
        with open(self.path, "rb") as journal:
            return replay(journal.read())

    def _open_for_append(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None

    def _rebuild(self, lock_fd: int) -> None:
        replayed = self._replayed()
        state = replayed.state
        _check_room(self.map.path, state)
        cause = (
            f"the last write failed ({self.interrupted})"
            if self.interrupted
            else "a write did not finish (its writer died or failed)"
        )
        self._notice(
            f"{self.map.path}: {cause}; rebuilt {len(state)} entries from the journal"
            + (" (dropped an unfinished batch)" if replayed.torn else "")
        )
        self.interrupted = None
        # DB_TRUNCATE opens with O_TRUNC: the same inode, as makemap rewrites it.
        database = self.map.open_database(db.DB_CREATE | db.DB_TRUNCATE)
        try:
            for key, value in state.items():
                database.put(key, value)
            database.sync()
        except db.DBError as exc:
            raise StoreError(f"{self.map.path}: {bdb_message(exc, self.map.path)}") from None
        finally:
            database.close()
        self.snapshot(lock_fd, state)

    def snapshot(self, lock_fd: int, state: dict[bytes, bytes] | None) -> None:
        """Atomically replace the journal by a snapshot of ``state`` (default: the file)."""
        directory = os.path.dirname(os.path.abspath(self.map.path))
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
                database = self.map.open_database(db.DB_RDONLY)
                pairs = (record for _, record in records(database))
            else:
                database = None
                pairs = state.items()
            try:
                with os.fdopen(handle, "wb", closefd=False) as out:
                    out.write(frame(b"Z", b""))
                    payload: list[bytes] = []
                    size = 0
                    for key, value in pairs:
                        op = encode_put(key, value)
                        payload.append(op)
                        size += len(op)
                        if size >= _FRAME_PAYLOAD_TARGET:
                            out.write(frame(b"B", b"".join(payload)))
                            payload, size = [], 0
                    if payload:
                        out.write(frame(b"B", b"".join(payload)))
                    out.write(commit_frame(signature_of(os.fstat(lock_fd))))
            finally:
                if database is not None:
                    database.close()
            os.fsync(handle)
            os.rename(temp_path, self.path)
            _fsync_directory(directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
        finally:
            os.close(handle)


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
