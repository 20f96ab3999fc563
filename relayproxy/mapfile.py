"""The map file itself: opening, creating and locking relayers.db, and its handles.

Owns how the ``.db`` file is opened (created with ``[store] mode`` and
``group``, never left behind half-made), locked the way makemap and the
MTAs lock it (``flock``, with a deadline), opened as a Berkeley DB hash and
walked. Never imports Twisted. ``relayproxy.store`` builds on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import time
from collections.abc import Iterator
from typing import Any, Final

from berkeleydb import db

DEFAULT_LOCK_TIMEOUT: Final = 10.0
_CACHE_BYTES: Final = 8 * 1024 * 1024
_MTIME_MAX_LEAD: Final = 60


class StoreError(Exception):
    """A store operation failed; the message names the file and the cause."""


class StoreMissingError(StoreError):
    """The database file does not exist (reading never creates it)."""


class StoreLockTimeoutError(StoreError):
    """Another process held the lock past the deadline."""


class MapFile:
    """relayers.db as a file: locks, creation, database handles.

    ``created`` says whether the last lock taken had to create the file
    (the journal tells a deleted file from a replaced one by it).
    """

    def __init__(
        self,
        path: str,
        *,
        mode: int = 0o644,
        group: str | int | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.lock_timeout = lock_timeout
        self.created = False

    @contextlib.contextmanager
    def locked(self, operation: int, *, create: bool) -> Iterator[int]:
        fd = self.open_locked(operation, create=create)
        try:
            yield fd
        finally:
            os.close(fd)  # releases the flock

    def open_locked(self, operation: int, *, create: bool) -> int:
        """A descriptor of the file holding ``operation`` (LOCK_SH or LOCK_EX)."""
        deadline = time.monotonic() + self.lock_timeout
        self.created = False
        flags = os.O_RDWR if operation == fcntl.LOCK_EX else os.O_RDONLY
        while True:
            fd = self._open(flags, create=create)
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

    def open_database(self, flags: int) -> Any:
        database = db.DB()
        try:
            database.set_cachesize(0, _CACHE_BYTES)
            database.open(self.path, dbtype=db.DB_HASH, flags=flags, mode=self.mode)
        except db.DBError as exc:
            database.close()
            raise StoreError(f"{self.path}: {bdb_message(exc, self.path)}") from None
        return database

    def _open(self, flags: int, *, create: bool) -> int:
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
            return self._open(flags, create=False)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror}") from None
        self.created = True
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


def records(database: Any) -> Iterator[tuple[Any, tuple[bytes, bytes]]]:
    """Every (key, value) in hash order, with the cursor on it (to delete it)."""
    cursor = database.cursor()
    try:
        record = cursor.first()
        while record is not None:
            yield cursor, record
            record = cursor.next()
    finally:
        cursor.close()


def advance_mtime(fd: int, previous_ns: int) -> None:
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


def bdb_message(exc: Exception, path: str) -> str:
    """Berkeley DB's error text, without its own copy of ``path`` (the caller names it).

    libdb writes ``<errno text> -- [BDBnnnn function: ]<path>: <reason>``,
    e.g. ``Is a directory -- PATH: Is a directory``: the errno text and
    the reason are the news, once each.
    """
    args = exc.args
    text = str(args[1] if len(args) > 1 else exc)
    cause, sep, detail = text.partition(" -- ")
    reason = detail.rpartition(f"{path}: ")[2] if sep and f"{path}: " in detail else ""
    if "unexpected file type or format" in text or "Invalid argument" in text:
        return f"not a Berkeley DB hash file ({reason or text})"
    if reason:
        return cause if reason == cause else f"{cause}: {reason}"
    return text
