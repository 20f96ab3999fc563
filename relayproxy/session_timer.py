"""A session's one timer: the login deadline, then the idle check, then the close grace.

The three follow one another and never overlap, so one delayed call is armed
at a time and arming one cancels the last. Not ``TimeoutMixin``: its idle
timeout is reset by every chunk relayed, a reactor call on the hot path; the
idle check here compares a byte count once per period instead, so a session
goes idle between one and two periods after its last byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall


class SessionTimer:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._call: IDelayedCall | None = None

    def after(self, delay: float, call: Callable[[], None]) -> None:
        self.cancel()
        self._call = self._reactor.callLater(delay, call)

    def when_idle(
        self, period: float, activity: Callable[[], int], call: Callable[[], None]
    ) -> None:
        """``call`` once ``activity()`` (a running count) stays the same for a whole period."""
        mark = -1

        def check() -> None:
            nonlocal mark
            if activity() == mark:
                call()
                return
            mark = activity()
            self.after(period, check)

        self.after(period, check)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
