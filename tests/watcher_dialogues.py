"""Drive a sans-I/O watcher through a scripted dialogue, whole or cut into pieces."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relayproxy.protocols.common import (
    Action,
    Close,
    LoginFailed,
    LoginSucceeded,
    Splice,
    StartClientTLS,
    StartServerTLS,
    ToClient,
    ToServer,
    Watcher,
)

E = TypeVar("E")

# A step: ("C", bytes) from the client, ("S", bytes) from the server,
# ("TLS", b"") the glue finished starting client TLS.
Step = tuple[str, bytes]


@dataclass
class Outcome:
    to_server: bytes = b""
    to_client: bytes = b""
    events: list[Action] = field(default_factory=list)  # everything but byte writes
    # Bytes each side had been sent when a TLS start was requested.
    tls_at: list[tuple[str, int]] = field(default_factory=list)
    spliced: bool = False

    @property
    def logins(self) -> list[LoginSucceeded]:
        return [e for e in self.events if isinstance(e, LoginSucceeded)]

    @property
    def failures(self) -> list[LoginFailed]:
        return [e for e in self.events if isinstance(e, LoginFailed)]

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Close) for e in self.events)


def play(make: Callable[[], Watcher], steps: Sequence[Step], cuts: Sequence[int] = ()) -> Outcome:
    """Feed ``steps`` in order; ``cuts`` splits every chunk at those offsets too."""
    watcher = make()
    outcome = Outcome()
    for who, data in steps:
        if who == "TLS":
            apply(outcome, watcher.client_tls_started())
            continue
        for piece in _pieces(data, cuts):
            if outcome.spliced:
                # After Splice the glue relays raw and never calls the watcher.
                if who == "C":
                    outcome.to_server += piece
                else:
                    outcome.to_client += piece
                continue
            feed = watcher.client_data if who == "C" else watcher.server_data
            apply(outcome, feed(piece))
    return outcome


def apply(outcome: Outcome, actions: list[Action]) -> None:
    for action in actions:
        if isinstance(action, ToServer):
            outcome.to_server += action.data
        elif isinstance(action, ToClient):
            outcome.to_client += action.data
        else:
            if isinstance(action, StartClientTLS):
                outcome.tls_at.append(("client", len(outcome.to_client)))
            elif isinstance(action, StartServerTLS):
                outcome.tls_at.append(("server", len(outcome.to_server)))
            elif isinstance(action, Splice):
                outcome.spliced = True
            outcome.events.append(action)


def single_cuts(steps: Sequence[Step]) -> range:
    """Every offset at which to cut each chunk of a dialogue, one at a time."""
    return range(max(len(data) for _, data in steps) + 1)


def every_byte(steps: Sequence[Step]) -> tuple[int, ...]:
    """Cuts that deliver every chunk one byte at a time."""
    return tuple(range(max(len(data) for _, data in steps)))


def reachable_states(transitions: Mapping[E, Mapping[Any, E]], start: E) -> set[E]:
    """The states a transition table can reach from ``start``."""
    seen, frontier = {start}, [start]
    while frontier:
        for target in transitions[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def _pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [data]
