"""The spool: every login the client is told succeeded, on disk before it is told.

Owns two append-only files beside relayers.db, ``relayers.db.spool-a`` and
``relayers.db.spool-b``. Never imports Twisted.

Theory of operation
-------------------
The reactor appends one line per recorded login (``key seconds crc32``) to
the *current* file with a single ``write(2)`` before the backend's success
line is forwarded: the page cache outlives the process, so no kill of the
daemon loses it. A group ``fdatasync`` (``sync``) narrows what a power
failure can lose to ``[store] sync_interval``.

The worker thread applies logins to relayers.db in batches. When a batch
is taken (on the reactor), ``rotate`` makes the *other* file current if it
is empty; the files the batch covers and that are no longer current hold
nothing but that batch's logins, so once the batch is in the store the
worker empties them (``release``). Nothing else ever truncates a file, and
the reactor never appends to a file being emptied: no lock is needed
between the two threads, and no login falls between "applied" and
"emptied".

A daemon holds ``flock(LOCK_EX)`` on ``spool-a`` while it runs. Whoever
takes the spool next (a restarted daemon, or ``vsmtprelay`` when no daemon
runs) reads what is left (``leftovers``) and applies it; replaying a login
twice is harmless (the store keeps the newer time).

Workers (``[daemon] workers = N``, relayproxy.workers): worker n has a
spool of its own, ``relayers.db.spool-<n>-a``/``-b``, locked by it alone,
so the reactors never share a file. A restarted worker n replays its own.
A spool no running process can own any more (the single process's after a
switch to workers, a worker's beyond N, or the workers' after a switch
back to one process) is *adopted* when its lock is free: its logins are
appended to the adopter's own spool and synced, then the orphan is
emptied, all under the orphan's lock (a crash in between replays a login
twice, which is harmless). ``vsmtprelay`` applies every spool it finds
whose lock is free.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import time
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from relayproxy.stores import Store

_MODE: Final = 0o640


class SpoolError(Exception):
    """The spool cannot be used; the message names the file and the cause."""


class SpoolBusyError(SpoolError):
    """Another running daemon holds the spool."""


def spool_line(key: str, seconds: int) -> bytes:
    body = b"%s %d" % (key.encode("ascii"), seconds)
    return body + b" %08x\n" % zlib.crc32(body)


def parse_spool(data: bytes) -> dict[str, int]:
    """The logins in a spool file, newest time per key; a torn or damaged line is skipped."""
    logins: dict[str, int] = {}
    for line in data.split(b"\n"):
        body, _, crc = line.rpartition(b" ")
        key, _, seconds = body.partition(b" ")
        if not key or not seconds.isdigit() or len(seconds) > 19:
            continue  # more digits than a 64-bit time has: not a line we wrote
        if crc != b"%08x" % zlib.crc32(body):
            continue
        try:
            name = key.decode("ascii")
        except UnicodeDecodeError:
            continue  # not a key we wrote: relayers.db holds ASCII keys only
        logins[name] = max(int(seconds), logins.get(name, 0))
    return logins


def _merged(files: Iterable[bytes]) -> dict[str, int]:
    """The logins in several spool files, newest time per key."""
    logins: dict[str, int] = {}
    for data in files:
        for key, seconds in parse_spool(data).items():
            logins[key] = max(seconds, logins.get(key, 0))
    return logins


def spool_paths(db_path: str, worker: int | None = None) -> tuple[str, str]:
    """The two files of the single process's spool, or of worker ``worker``'s."""
    infix = "" if worker is None else f"-{worker}"
    return (f"{db_path}.spool{infix}-a", f"{db_path}.spool{infix}-b")


def worker_spools(db_path: str) -> dict[int, tuple[str, str]]:
    """Every worker spool beside ``db_path`` on disk, by worker number."""
    found: dict[int, tuple[str, str]] = {}
    prefix = db_path + ".spool-"
    for path in glob.glob(glob.escape(prefix) + "*-a"):
        number = path[len(prefix) : -len("-a")]
        if number.isdigit() and not number.startswith("0"):
            found[int(number)] = spool_paths(db_path, int(number))
    return found


class Spool:
    """The two spool files of one relayers.db (of one worker); see the module docstring.

    ``worker``: this worker's number (1..``workers``), None for the single
    process. Which orphans it adopts at ``open``: the single process takes
    every worker spool; worker 1 takes the single process's and those of
    workers beyond ``workers``; the others take none.
    """

    def __init__(self, db_path: str, worker: int | None = None, workers: int = 1) -> None:
        self.db_path = db_path
        self.worker = worker
        self.workers = workers
        self.paths = spool_paths(db_path, worker)
        # Orphans that could not be adopted at ``open`` (left for vsmtprelay or the next
        # start), one line each naming the file: for the daemon's log.
        self.adoption_problems: list[str] = []
        self._fds: list[int] = []
        self._sizes = [0, 0]
        self._current = 0

    def open(self, wait: float = 10.0) -> dict[str, int]:
        """Take the spool; return the logins a previous run left unapplied.

        ``wait``: how long another holder may keep it (``vsmtprelay`` applying
        leftovers holds it for one store write) before it counts as busy.
        """
        fds: list[int] = []
        try:
            for path in self.paths:
                fds.append(
                    os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _MODE)
                )
            _flock_within(fds[0], wait)
        except BlockingIOError:
            _close_all(fds)
            raise SpoolBusyError(f"{self.paths[0]}: in use by another relayproxy") from None
        except OSError as exc:
            _close_all(fds)
            raise SpoolError(f"{self.paths[len(fds) % 2]}: {exc.strerror}") from None
        self._fds = fds
        self._adopt_orphans()
        contents = [_read_all(fd) for fd in fds]
        self._sizes = [len(data) for data in contents]
        return _merged(contents)

    def _orphans(self) -> list[tuple[str, str]]:
        if self.worker is None:
            return list(worker_spools(self.db_path).values())
        if self.worker != 1:
            return []
        beyond = [
            paths for number, paths in worker_spools(self.db_path).items() if number > self.workers
        ]
        return [spool_paths(self.db_path), *beyond]

    def _adopt_orphans(self) -> None:
        """Move what unowned spools hold into this one's first file (see the docstring)."""
        self.adoption_problems = []
        for paths in self._orphans():
            fds: list[int] = []
            try:
                fds = _open_existing(paths)
                if not fds or not any(os.fstat(fd).st_size for fd in fds):
                    continue
                try:
                    fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner runs (a worker of another count, starting up)
                logins = _merged(_read_all(fd) for fd in fds)
                lines = b"".join(spool_line(key, seconds) for key, seconds in logins.items())
                _write_all(self._fds[0], lines, self.paths[0])
                os.fdatasync(self._fds[0])  # in this file for good before the orphan is emptied
                for fd, path in zip(fds, paths, strict=False):
                    _empty(fd, path)
            except SpoolError as exc:
                self.adoption_problems.append(str(exc))
            except OSError as exc:
                self.adoption_problems.append(f"{paths[0]}: {exc.strerror}")
            finally:
                _close_all(fds)

    @property
    def is_open(self) -> bool:
        return bool(self._fds)

    def append(self, key: str, seconds: int) -> None:
        """One ``write(2)`` of one login to the current file (reactor thread)."""
        line = spool_line(key, seconds)
        try:
            written = os.write(self._fds[self._current], line)
        except OSError as exc:
            raise SpoolError(f"{self.paths[self._current]}: {exc.strerror}") from None
        self._sizes[self._current] += written
        if written != len(line):
            # A short write (the disk filled up): the torn line is skipped on replay.
            raise SpoolError(f"{self.paths[self._current]}: No space left on device")

    def rotate(self) -> tuple[int, ...]:
        """A batch is taken (reactor thread): the files to empty once it is stored."""
        covered = [index for index, size in enumerate(self._sizes) if size]
        other = 1 - self._current
        if not self._sizes[other]:
            self._current = other
        return tuple(index for index in covered if index != self._current)

    def release(self, files: tuple[int, ...]) -> None:
        """Empty files whose logins are all in the store (worker thread)."""
        for index in files:
            _empty(self._fds[index], self.paths[index])

    def released(self, files: tuple[int, ...]) -> None:
        """``release`` succeeded (reactor thread)."""
        for index in files:
            self._sizes[index] = 0

    def sync(self) -> None:
        """Group commit against power loss (worker thread)."""
        for index, fd in enumerate(self._fds):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise SpoolError(f"{self.paths[index]}: {exc.strerror}") from None

    def close(self) -> None:
        _close_all(self._fds)
        self._fds = []


def _flock_within(fd: int, wait: float) -> None:
    """``LOCK_EX`` within ``wait`` seconds, else BlockingIOError."""
    deadline = time.monotonic() + wait
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _empty(fd: int, path: str) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        raise SpoolError(f"{path}: {exc.strerror}") from None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _open_existing(paths: tuple[str, str]) -> list[int]:
    """Descriptors of those of ``paths`` that exist (none when the first does not)."""
    fds: list[int] = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            if not fds:
                return []
    return fds


def _write_all(fd: int, data: bytes, path: str) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise SpoolError(f"{path}: No space left on device")
        view = view[written:]


def apply_leftovers(store: Store, db_path: str | None = None) -> int:
    """Store what stopped daemons left in their spools, then empty them; returns how many.

    The spools are ``db_path``'s ([store] path), by default the store's own
    file; a Redis store's spool is still beside ``[store] path``. Every
    spool found counts: the single process's and each worker's.
    """
    base = db_path or store.path
    spools = [spool_paths(base), *worker_spools(base).values()]
    return sum(_apply_one(store, paths) for paths in spools)


def _apply_one(store: Store, paths: tuple[str, str]) -> int:
    """One spool's leftovers stored, and that spool emptied; returns how many.

    For ``vsmtprelay``, before it reads or changes the store: a leftover login
    would be missing from a ``list`` until the daemon restarts, and would
    come back then after a ``delete`` or an ``expire``. Does nothing, and
    creates nothing, when there is no spool, when it is empty, when the
    caller may not write it (an administrator who may only read), or when a
    running daemon holds it (its logins are its own to store). A failing
    store write leaves the spool as it was.
    """
    fds: list[int] = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            except FileNotFoundError:
                if not fds:
                    return 0  # no spool-a to lock: a daemon that had none left nothing
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return 0
                raise SpoolError(f"{path}: {exc.strerror}") from None
        if not any(os.fstat(fd).st_size for fd in fds):
            # The usual case. Not taking the lock then keeps a daemon that starts
            # right now from finding its spool taken (it would run without one).
            return 0
        try:
            fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        leftovers = _merged(_read_all(fd) for fd in fds)
        store.record(sorted(leftovers.items()), keep_newer=True)
        for fd, path in zip(fds, paths, strict=False):
            _empty(fd, path)
        return len(leftovers)
    finally:
        _close_all(fds)
