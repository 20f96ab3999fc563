"""A session's one timer on Twisted's ``Clock``: each deadline fires when it says, one call armed.

The idle check and the close grace take over from the login deadline; a
deadline that moves later moves the armed call in place (``DelayedCall.reset``),
one that moves sooner is a new call. Either way a deadline fires at its own
time, never at the one it replaced, and nothing is left armed after ``cancel``.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from relayproxy.session_timer import SessionTimer


def test_the_login_deadline_fires_at_its_time() -> None:
    clock, fired = Clock(), []
    timer = SessionTimer(clock)
    timer.after(60, lambda: fired.append("login"))
    clock.advance(59.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == ["login"]
    assert clock.getDelayedCalls() == []


def test_the_idle_check_replaces_the_login_deadline_with_the_same_call() -> None:
    clock, fired = Clock(), []
    timer = SessionTimer(clock)
    timer.after(60, lambda: fired.append("login"))
    [armed] = clock.getDelayedCalls()
    clock.advance(10)
    carried = [0]
    timer.when_idle(100, lambda: carried[0], lambda: fired.append("idle"))
    assert clock.getDelayedCalls() == [armed]  # moved later in place, not a second call
    clock.advance(90)  # past the old login deadline: it no longer fires
    assert fired == []
    clock.advance(10)  # the first check marks the count
    carried[0] += 5  # bytes flowed during the next period
    clock.advance(100)
    assert fired == []
    clock.advance(100)  # a whole period without a byte
    assert fired == ["idle"]


def test_a_sooner_deadline_fires_at_its_own_time() -> None:
    clock, fired = Clock(), []
    timer = SessionTimer(clock)
    timer.when_idle(1800, lambda: 0, lambda: fired.append("idle"))
    clock.advance(5)
    timer.after(10, lambda: fired.append("grace"))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert fired == ["grace"]
    clock.advance(4000)
    assert fired == ["grace"]  # the idle check it replaced never fires


def test_cancel_leaves_nothing_armed() -> None:
    clock, fired = Clock(), []
    timer = SessionTimer(clock)
    timer.after(60, lambda: fired.append("login"))
    timer.when_idle(100, lambda: 0, lambda: fired.append("idle"))
    timer.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(10_000)
    assert fired == []
    timer.cancel()  # twice is harmless
