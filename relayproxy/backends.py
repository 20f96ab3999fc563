"""A listener's backends: the order one client tries them in, and which have stopped answering.

Owns the balance and each backend's health as connects see it; never
connects and never imports Twisted. Time is the caller's (the reactor's
``seconds()``), so tests move it by hand.

Theory of operation. Each client gets an order (``order()``) and the glue
(``relayproxy.backend``) connects to each backend in it until one answers.
The client has seen nothing yet (the greeting is the backend's), so a
failed connect costs it only the wait. ``first`` orders the list as
written (failover); ``roundrobin`` starts each client one further along.
A backend whose connect fails (``failed()``) is *down*: for
``backend_retry`` seconds it moves to the end of every order, then it is
back in its place, and the next client that tries it finds out: answered
(``answered()``: up again) or failed (down for another ``backend_retry``).
Only the changes, down and up, are reported, so the log says it once and
not once per client.

Down backends stay in the order, last, rather than out of it: the state
is a guess up to ``backend_retry`` seconds old, and a backend back after a
restart (Dovecot takes about a second) must not have its clients turned
away for the rest of that time. A refused connect costs a round trip; a
backend that drops packets costs a connect timeout, which the ones still
up are tried before.

Several clients' connects run at once, and one may end after the state it
started in has changed: a connect that began before a backend went down
and succeeds after it is not a recovery, and a timeout that began before
the backend recovered is not a new failure. Each ``Attempt`` carries the
``epoch`` it began in; an outcome from an older epoch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relayproxy.config import HostPort

BALANCES = ("first", "roundrobin")


@dataclass
class _Health:
    down: bool = False
    retry_at: float = 0.0  # while down: tried before the others again from then on
    epoch: int = 0  # moves on with each change between up and down


@dataclass(frozen=True)
class Attempt:
    """One connect to ``backend``, begun in its health's ``epoch``."""

    backend: HostPort
    epoch: int


class Backends:
    """The backends of one listener, in its ``backend_balance``, with their health."""

    def __init__(self, backends: Sequence[HostPort], balance: str, retry: float) -> None:
        if not backends:
            raise ValueError("a listener needs at least one backend")
        if balance not in BALANCES:
            raise ValueError(f"{balance!r} is not one of {', '.join(BALANCES)}")
        self.backends = tuple(backends)
        self.balance = balance
        self.retry = retry
        self._health = {backend: _Health() for backend in self.backends}
        self._turn = 0

    def order(self, now: float) -> list[HostPort]:
        """The backends one client tries, in turn: those up first, those down last."""
        waiting = [b for b in self.backends if not self._skipped(b, now)]
        skipped = [b for b in self.backends if self._skipped(b, now)]
        if self.balance == "roundrobin" and waiting:
            # Turns go round the ones up: with one of three down, the
            # other two share its clients evenly.
            start = self._turn % len(waiting)
            self._turn += 1
            waiting = waiting[start:] + waiting[:start]
        return waiting + skipped

    def attempt(self, backend: HostPort) -> Attempt:
        """A connect to ``backend`` begins now."""
        return Attempt(backend, self._health[backend].epoch)

    def failed(self, attempt: Attempt, now: float) -> bool:
        """The connect did not answer; True when this puts an answering backend down."""
        health = self._health.get(attempt.backend)
        if health is None or health.epoch != attempt.epoch:
            return False  # a backend a reload removed, or news from before a change
        health.retry_at = now + self.retry
        if health.down:
            return False
        health.down = True
        health.epoch += 1
        return True

    def answered(self, attempt: Attempt) -> bool:
        """The connect was answered; True when this brings a down backend back up."""
        health = self._health.get(attempt.backend)
        if health is None or health.epoch != attempt.epoch or not health.down:
            return False
        health.down = False
        health.epoch += 1
        return True

    def down(self) -> list[HostPort]:
        """The backends down now, in the list's order."""
        return [backend for backend in self.backends if self._health[backend].down]

    def carry_over(self, previous: Backends) -> None:
        """After a reload: the health of each backend still listed, as ``previous`` saw it.

        Shared, not copied: connects that began before the reload report to
        the same record as those that begin after it.
        """
        kept: Iterable[HostPort] = (b for b in self.backends if b in previous._health)
        for backend in kept:
            self._health[backend] = previous._health[backend]

    def _skipped(self, backend: HostPort, now: float) -> bool:
        health = self._health[backend]
        return health.down and now < health.retry_at
