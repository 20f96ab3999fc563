"""Whatever a client sends before login, the backend reads only the proxy's own grammar.

Hypothesis builds client streams from the pieces attackers use (verbs,
double spaces, bare CR and LF, NUL, literal markers, quotes, server-like
lines) and a backend that answers each forwarded line in one of a few
ways; every line the backend receives must match the canonical forms the
watchers write, and none may be the client's bytes passed through.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.protocols.common import (
    Action,
    Close,
    Splice,
    ToServer,
    Watcher,
    WatcherSettings,
)
from relayproxy.protocols.imap import ImapWatcher
from relayproxy.protocols.pop3 import Pop3Watcher

_B64 = rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
_MECH = rb"[A-Z0-9_-]{1,20}"
_SASL = rb"(?:\*|" + _B64 + rb")\r\n"
POP3_CANONICAL = re.compile(
    rb"(?:CAPA|QUIT|AUTH|USER [^ \x00-\x1f\x7f]+|PASS [^\x00-\x1f\x7f]+"
    rb"|APOP [^ \x00-\x1f\x7f]+ [0-9a-fA-F]{32}"
    rb"|AUTH " + _MECH + rb"(?: (?:=|" + _B64 + rb"))?)\r\n|" + _SASL
)
_QUOTED = rb'"(?:[^"\\\x00-\x1f\x7f]|\\["\\])*"'
IMAP_CANONICAL = re.compile(
    rb"rpx[0-9]+ (?:CAPABILITY|NOOP|LOGOUT|LOGIN " + _QUOTED + rb" " + _QUOTED + rb""
    rb"|AUTHENTICATE " + _MECH + rb"(?: (?:=|" + _B64 + rb"))?)\r\n|" + _SASL
)

PIECES = [
    b"USER",
    b"PASS",
    b"APOP",
    b"AUTH",
    b"CAPA",
    b"STLS",
    b"NOOP",
    b"a",
    b"a]",
    b"rpx1",
    b"LOGIN",
    b"AUTHENTICATE",
    b"ID",
    b"NIL",
    b"PLAIN",
    b"alice",
    b"pw",
    b" ",
    b"  ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\t",
    b"{5}",
    b"{3+}",
    b"{0}",
    b'"',
    b"\\",
    b"(",
    b")",
    b"*",
    b"=",
    b"AGFsaWNlAHB3",
    b"+OK",
    b"OK",
    b"c4c9334bac560ecc979e58001b3e22fb",
]
POP3_ANSWERS = [b"-ERR no\r\n", b"+ \r\n", b"+OK\r\n", b"+OK\r\nX\r\n.\r\n"]
IMAP_ANSWERS = [b"+ \r\n", b"* OK x\r\n", b"NO x\r\n", b"BAD x\r\n", b"OK x\r\n"]


def _exercise(
    make: Callable[[], Watcher],
    *,
    greeting: bytes,
    chunks: list[bytes],
    answers: list[int],
    answer_for: Callable[[int, bytes], bytes],
    canonical: re.Pattern[bytes],
) -> None:
    watcher = make()
    tag = b""  # the proxy's tag of the command in flight (IMAP)
    pending: list[Action] = list(watcher.server_data(greeting))
    turn = 0
    for chunk in chunks:
        pending += watcher.client_data(chunk)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Splice | Close):
                return
            if not isinstance(action, ToServer):
                continue
            assert canonical.fullmatch(action.data), action.data
            if match := re.match(rb"(rpx[0-9]+) ", action.data):
                tag = match.group(1)
            choice = answers[turn % len(answers)] if answers else 0
            turn += 1
            pending += watcher.server_data(answer_for(choice, tag))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join), max_size=10),
    st.lists(st.integers(0, len(POP3_ANSWERS) - 1), max_size=10),
)
def test_pop3_backend_reads_only_canonical_lines(chunks: list[bytes], answers: list[int]) -> None:
    _exercise(
        lambda: Pop3Watcher(WatcherSettings()),
        greeting=b"+OK ready <1.2@x>\r\n",
        chunks=chunks,
        answers=answers,
        answer_for=lambda choice, _: POP3_ANSWERS[choice],
        canonical=POP3_CANONICAL,
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join), max_size=10),
    st.lists(st.integers(0, len(IMAP_ANSWERS) - 1), max_size=10),
)
def test_imap_backend_reads_only_canonical_lines(chunks: list[bytes], answers: list[int]) -> None:
    def answer(choice: int, tag: bytes) -> bytes:
        line = IMAP_ANSWERS[choice]
        return line if line.startswith((b"+", b"*")) else tag + b" " + line

    _exercise(
        lambda: ImapWatcher(WatcherSettings()),
        greeting=b"* OK ready\r\n",
        chunks=chunks,
        answers=answers,
        answer_for=answer,
        canonical=IMAP_CANONICAL,
    )
