"""``[daemon] workers = N``: one supervising parent, N reactor processes sharing its sockets.

Owns the parent (binds every listener once, starts the workers, restarts one
that dies, passes signals on, tells systemd) and the worker's side of the
hand-over (adopting the parent's sockets, its share of the limits, telling
the parent it is ready, leaving when the parent is gone). Never touches a
client's bytes in the parent, and never used with ``workers = 1``: that is
the single process of old, with no supervisor.

Theory of operation
-------------------
The parent binds each ``[listener:NAME]`` address once, as it was started
(root, before any worker drops to ``[daemon] user``), and hands the
listening sockets to every worker as inherited descriptors. All workers
accept from the same kernel queue: a busy worker simply accepts less, and
a worker that dies loses only the connections it had accepted, never the
ones still queued (with ``SO_REUSEPORT`` each socket has its own queue, the
kernel hashes connections to them blindly, and a dead worker's queue is
reset). The parent keeps its copies, so a restarted worker adopts the same
sockets, and keeps the identity it was started with so that a restarted
worker can bind and open its log as the first one did (like nginx's
master, it reads no client byte).

Each worker is ``relayproxy --config PATH --worker n/N``, a fresh
interpreter (no reactor state is shared across a fork). Its descriptors:
0-2 the parent's; 3 a pipe from the parent, whose end-of-file means the
parent is gone (the worker then drains and stops); 4 a pipe to the parent,
one line ``ready`` when it is serving (again after each reload); from 5,
the listening sockets, named in ``$RELAYPROXY_LISTEN_FDS`` as
``address=fd,...``. A listener added or moved by a reload is bound by each
worker itself with ``SO_REUSEPORT`` (the parent binds nothing after
start).

Signals to the parent: SIGHUP and SIGUSR1 go to every worker (each reloads
or reopens its log as the single process does); SIGTERM (or SIGINT) sends
SIGTERM to every worker, each drains (``shutdown_timeout``, then its
pending records), and the parent exits when all have: 0 if every worker
exited 0. Only the parent speaks to systemd (``NotifyAccess=main``): READY
when every worker is ready, RELOADING then READY around a reload once every
worker has reported, STOPPING at SIGTERM. Workers get no ``$NOTIFY_SOCKET``.

Limits are per worker: each gets ``ceil(limit / N)`` of ``max_connections``
and ``max_connections_per_ip`` (one address's connections may all land on
one worker, so its effective per-address limit lies between the share and
the whole), and raises its own ``RLIMIT_NOFILE`` for its share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayproxy import systemd
from relayproxy.config import Config, ConfigError, HostPort, load_config

log = Logger(namespace="relayproxy")

LISTEN_FDS = "RELAYPROXY_LISTEN_FDS"
PARENT_FD = 3  # the parent's pipe to the worker: end-of-file = the parent is gone
STATUS_FD = 4  # the worker's pipe to the parent: "ready" lines
FIRST_SOCKET_FD = 5


def bind_listening(address: HostPort, backlog: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``address``; raises CannotListenError as listenTCP does.

    ``SO_REUSEADDR`` as Twisted sets it (a restart need not wait for
    TIME_WAIT); ``SO_REUSEPORT`` only for a worker's own socket beside its
    siblings', never for the parent's: it would let a second daemon share
    the port silently instead of failing to start.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        # Shared by every worker's epoll: a blocking accept would stall a worker
        # that lost the race for a connection to a sibling.
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise CannotListenError(address.host, address.port, exc) from None  # type: ignore[no-untyped-call]
    return sock


def share_limits(config: Config, workers: int) -> Config:
    """``config`` with each listener's connection limits divided among ``workers``."""
    listeners = tuple(
        dataclasses.replace(
            listener,
            max_connections=math.ceil(listener.max_connections / workers),
            max_connections_per_ip=math.ceil(listener.max_connections_per_ip / workers),
        )
        for listener in config.listeners
    )
    return dataclasses.replace(config, listeners=listeners)


# -- the worker's side --


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


@implementer(IReadDescriptor)
class _ParentPipe:
    """Descriptor 3 in the reactor: the parent never writes, so readable means it is gone."""

    def __init__(self, reactor: Any, parent_gone: Callable[[], None]) -> None:
        self.reactor = reactor
        self.parent_gone = parent_gone
        self.watching = True

    def stop_watching(self) -> None:
        """The reactor stops anyway: the end of the pipe then means nothing."""
        self.watching = False

    def fileno(self) -> int:
        return PARENT_FD

    def doRead(self) -> None:
        try:
            data = os.read(PARENT_FD, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.connectionLost(Failure(EOFError()))  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        """The end of the pipe (epoll reports a hang-up here, not to doRead)."""
        self.reactor.removeReader(self)
        if self.watching:
            self.watching = False
            self.parent_gone()

    def logPrefix(self) -> str:
        return "relayproxy-parent"


@dataclass
class Worker:
    """This process as worker ``number`` of ``count``: its sockets and its link to the parent."""

    number: int
    count: int
    sockets: dict[str, int] = field(default_factory=dict)  # listen address -> inherited fd

    @classmethod
    def from_environment(cls, slot: str, environ: dict[str, str]) -> Worker:
        """``--worker n/N`` and ``$RELAYPROXY_LISTEN_FDS``; ValueError when malformed."""
        number, _, count = slot.partition("/")
        if not (number.isdigit() and count.isdigit() and 1 <= int(number) <= int(count)):
            raise ValueError(f"--worker {slot}: not n/N with 1 <= n <= N")
        worker = cls(int(number), int(count))
        for pipe in (PARENT_FD, STATUS_FD):
            if not _is_pipe(pipe):
                raise ValueError("--worker is for the processes [daemon] workers starts")
        for item in filter(None, environ.get(LISTEN_FDS, "").split(",")):
            address, _, fd = item.rpartition("=")
            worker.sockets[address] = int(fd)
        return worker

    def share(self, config: Config) -> Config:
        return share_limits(config, self.count)

    def listen(
        self, reactor: Any, address: HostPort, factory: Factory, backlog: int
    ) -> IListeningPort:
        """Adopt the parent's socket for ``address``, or bind one beside the siblings'."""
        fd = self.sockets.pop(str(address), None)
        if fd is None:
            own = bind_listening(address, backlog, reuse_port=True)
            fd = own.detach()
        try:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
        finally:
            os.close(fd)  # the port holds a duplicate of its own
        return port

    def close_unused(self) -> None:
        """Inherited sockets no listener of this configuration wants: let them go, so
        that once every process has, the kernel stops accepting there."""
        for fd in self.sockets.values():
            os.close(fd)
        self.sockets.clear()

    def attach(self, reactor: Any, parent_gone: Callable[[], None]) -> None:
        """Watch descriptor 3 for the parent's end."""
        os.set_blocking(PARENT_FD, False)
        pipe = _ParentPipe(reactor, parent_gone)
        reactor.addSystemEventTrigger("before", "shutdown", pipe.stop_watching)
        reactor.addReader(pipe)

    def report_ready(self) -> None:
        """One line on descriptor 4 (a few bytes into a pipe the parent drains: no wait)."""
        with contextlib.suppress(OSError):  # the parent is gone: descriptor 3 says so too
            os.write(STATUS_FD, b"ready\n")


# -- the parent's side --


@dataclass
class Backoff:
    """Restart delays: ``minimum`` after a worker that ran ``stable`` seconds, else doubled
    up to ``maximum``, so that a worker crashing at start does not spin a core."""

    minimum: float = 0.1
    maximum: float = 10.0
    stable: float = 5.0
    delay: float = 0.0

    def next(self, ran_for: float) -> float:
        if ran_for >= self.stable or not self.delay:
            self.delay = self.minimum
        else:
            self.delay = min(self.delay * 2, self.maximum)
        return self.delay


class _WorkerProcess(ProcessProtocol):
    """The parent's view of one running worker."""

    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.pid = 0
        self.started = time.monotonic()
        self.ready = False
        # Signals that came before it was ready: until its handlers are in place,
        # SIGHUP or SIGUSR1 would end it (their default action).
        self.owed: list[signal.Signals] = []
        self._status = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid or 0

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._status += data
        *lines, self._status = self._status.split(b"\n")
        for line in lines:
            if line == b"ready":
                if not self.ready:
                    self.ready = True
                    for number in self.owed:
                        self.send(number)
                    self.owed = []
                self.supervisor.worker_ready(self.number)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_exited(self, reason.value)

    def send(self, number: signal.Signals) -> None:
        if not self.ready:
            if number not in self.owed:
                self.owed.append(number)
            return
        if self.transport is not None and self.transport.pid is not None:
            self.transport.signalProcess(int(number))


def _status(value: Any) -> str:
    """An exit status for the log: the code, or the signal that ended the worker."""
    number = getattr(value, "signal", None)
    if number is not None:
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return str(getattr(value, "exitCode", "?"))


class Supervisor:
    """The parent: N workers on the sockets bound once; see the module docstring."""

    def __init__(
        self,
        config: Config,
        path: str,
        reactor: Any,
        sockets: dict[str, socket.socket],
    ) -> None:
        self.config = config
        self.path = path
        self.reactor = reactor
        self.sockets = sockets
        self.count = config.daemon.workers
        self.running: dict[int, _WorkerProcess] = {}
        self.backoff = {number: Backoff() for number in range(1, self.count + 1)}
        self.waiting_ready: set[int] = set(self.backoff)
        self.serving = False  # every worker was ready once: READY=1 was sent
        self.reloading = False
        self.stopping = False
        self.clean = True  # every worker stopped at SIGTERM exited 0
        self._pending_restarts: dict[int, Any] = {}
        self._all_stopped: Deferred[None] | None = None

    # -- starting and restarting --

    def start(self) -> None:
        for number in range(1, self.count + 1):
            self.spawn(number)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        signal.signal(signal.SIGUSR1, lambda *_: self.reactor.callFromThread(self.reopen_logs))
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def spawn(self, number: int) -> None:
        self._pending_restarts.pop(number, None)
        environment = {k: v for k, v in os.environ.items() if k != systemd.NOTIFY_SOCKET}
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, PARENT_FD: "w", STATUS_FD: "r"}
        named = []
        for offset, (address, sock) in enumerate(sorted(self.sockets.items())):
            child_fds[FIRST_SOCKET_FD + offset] = sock.fileno()
            named.append(f"{address}={FIRST_SOCKET_FD + offset}")
        environment[LISTEN_FDS] = ",".join(named)
        command = [sys.executable, "-m", "relayproxy.cli.daemon", "--config", self.path]
        command += ["--worker", f"{number}/{self.count}"]
        worker = _WorkerProcess(self, number)
        self.reactor.spawnProcess(
            worker, sys.executable, command, env=environment, childFDs=child_fds
        )
        self.running[number] = worker
        log.info("daemon.worker.started worker={worker} pid={pid}", worker=number, pid=worker.pid)

    def worker_ready(self, number: int) -> None:
        self.waiting_ready.discard(number)
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.waiting_ready or self.stopping:
            return
        if not self.serving:
            self.serving = True
            log.info("daemon.workers.ready workers={workers}", workers=self.count)
            _notify(systemd.ready)
        elif self.reloading:
            self.reloading = False
            _notify(systemd.ready)

    def worker_exited(self, worker: _WorkerProcess, value: Any) -> None:
        number = worker.number
        if self.running.get(number) is worker:
            del self.running[number]
        status = _status(value)
        log.info(
            "daemon.worker.exited worker={worker} pid={pid} status={status}",
            worker=number,
            pid=worker.pid,
            status=status,
        )
        if self.stopping:
            self.clean = self.clean and status == "0"
            if not self.running and self._all_stopped is not None:
                self._all_stopped.callback(None)
            return
        delay = self.backoff[number].next(time.monotonic() - worker.started)
        log.warn(
            "daemon.worker.restart worker={worker} delay={delay:.1f}", worker=number, delay=delay
        )
        if self.reloading:
            self.waiting_ready.discard(number)  # it reads the new file when it starts
            self._maybe_ready()
        self._pending_restarts[number] = self.reactor.callLater(delay, self.spawn, number)

    # -- signals --

    def reload(self) -> None:
        """SIGHUP: every worker reloads; systemd hears READY once all have reported."""
        _notify(systemd.reloading)
        self.reloading = True
        self.waiting_ready = set(self.running)
        self._forget_removed_listeners()
        for worker in self.running.values():
            worker.send(signal.SIGHUP)
        self._maybe_ready()

    def _forget_removed_listeners(self) -> None:
        """Close the parent's socket of a listener gone from the file, so that its port
        stops accepting once the workers (reloading now) let go of theirs too."""
        try:
            config = load_config(self.path)
        except ConfigError:
            return  # the workers log the problems and keep their configuration
        wanted = {str(listener.listen) for listener in config.listeners}
        for address in [address for address in self.sockets if address not in wanted]:
            self.sockets.pop(address).close()

    def reopen_logs(self) -> None:
        log.info("log.reopened signal=USR1")
        for worker in self.running.values():
            worker.send(signal.SIGUSR1)

    def stop(self) -> Deferred[None]:
        """Before the reactor stops: every worker drains; fires when all have exited."""
        self.stopping = True
        _notify(systemd.stopping)
        for pending in self._pending_restarts.values():
            pending.cancel()
        self._pending_restarts.clear()
        if not self.running:
            return succeed(None)
        self._all_stopped = Deferred()
        for worker in self.running.values():
            worker.send(signal.SIGTERM)
        log.info("daemon.workers.stopping workers={workers}", workers=len(self.running))
        return self._all_stopped


def _notify(message: Callable[[], bool]) -> None:
    try:
        message()
    except OSError as exc:
        log.error("systemd.error error={error}", error=exc.strerror or str(exc))
