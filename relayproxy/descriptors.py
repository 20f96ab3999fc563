"""File descriptors: as many as the listeners need, and a reserve that recording keeps.

Owns the process's ``RLIMIT_NOFILE`` and the budget of sessions it allows.
Never imports Twisted.

A session holds two descriptors (client and backend). A batch of the
recorder opens several more for a moment (the file's lock, the database,
the journal, a temporary snapshot), and so do the log and the spool. If
sessions could take every descriptor, logins would be answered ``+OK`` and
their records fail with ``EMFILE`` until sessions ended (measured: 10,000
idle sessions under ``ulimit -n 20000``, 31 s of unrecorded logins). So
the soft limit is raised to what ``max_connections`` asks for, up to the
hard limit, and sessions are capped at what the limit leaves beyond a
reserve that only the daemon's own files use.

With ``[daemon] workers = N`` the limit is a process's: each worker plans
for its own share, ``max_connections / N`` (relayproxy.workers), and the
parent, which holds only the listening sockets, plans nothing.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

# The store's batch, the spool, the log, listening sockets, the thread
# pools and Python's own: generous, since running short stops recording.
RESERVE: Final = 128


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    needed: int  # 2 per allowed session, plus the reserve
    soft: int  # the soft limit now in force
    hard: int
    sessions: int  # how many sessions the limit leaves room for

    @property
    def short(self) -> bool:
        return self.soft < self.needed


def plan_descriptors(max_sessions: int) -> DescriptorPlan:
    """Raise the soft limit towards what ``max_sessions`` need; say what is possible."""
    needed = 2 * max_sessions + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if ceiling > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    sessions = max(1, (soft - RESERVE) // 2)
    return DescriptorPlan(needed, soft, hard, min(max_sessions, sessions))


class SessionBudget:
    """Sessions open across every listener, against what the descriptors allow."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def admit(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
