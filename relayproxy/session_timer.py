"""A session's one timer: the login deadline, then the idle check, then the close grace.

The three follow one another and never overlap, so one delayed call is armed
at a time. Not ``TimeoutMixin``: its idle timeout is reset by every chunk
relayed, a reactor call on the hot path; the idle check here compares a byte
count once per period instead, so a session goes idle between one and two
periods after its last byte.

A deadline that moves later (login deadline to idle check) moves the armed
call with ``DelayedCall.reset``, which Twisted does in place; one that moves
sooner (to the close grace) is a new call, because Twisted's reset to an
earlier time searches its whole queue of calls for the one to move.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall


class SessionTimer:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._call: IDelayedCall | None = None
        self._due: Callable[[], None] | None = None  # what the armed call does
        self._period = 0.0
        self._activity: Callable[[], int] | None = None
        self._mark = -1
        self._idle: Callable[[], None] | None = None

    def after(self, delay: float, call: Callable[[], None]) -> None:
        """``call`` in ``delay`` seconds, instead of whatever was armed."""
        self._due = call
        armed = self._call
        if armed is not None and armed.active():
            if self._reactor.seconds() + delay >= armed.getTime():
                armed.reset(delay)
                return
            armed.cancel()
        self._call = self._reactor.callLater(delay, self._fire)

    def when_idle(
        self, period: float, activity: Callable[[], int], call: Callable[[], None]
    ) -> None:
        """``call`` once ``activity()`` (a running count) stays the same for a whole period."""
        self._period, self._activity, self._mark = period, activity, -1
        self._idle = call
        self.after(period, self._check_idle)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._due = None

    def _fire(self) -> None:
        due, self._call = self._due, None
        if due is not None:
            due()

    def _check_idle(self) -> None:
        assert self._activity is not None and self._idle is not None
        carried = self._activity()
        if carried == self._mark:
            self._idle()
            return
        self._mark = carried
        self.after(self._period, self._check_idle)
