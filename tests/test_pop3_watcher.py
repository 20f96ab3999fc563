"""The POP3 watcher: every rule of issue 3, and each dialogue cut at every byte boundary."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.protocols.common import (
    Close,
    LoginFailed,
    LoginRefused,
    LoginSucceeded,
    Splice,
    TLSMode,
    ToClient,
    WatcherSettings,
)
from relayproxy.protocols.pop3 import TRANSITIONS, Event, Pop3Watcher, State
from tests.watcher_dialogues import (
    Outcome,
    Step,
    every_byte,
    play,
    reachable_states,
    single_cuts,
)

GREETING = b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def watcher(**overrides: object) -> Pop3Watcher:
    return Pop3Watcher(WatcherSettings(**overrides))  # type: ignore[arg-type]


def run(steps: list[Step], cuts: tuple[int, ...] = (), **overrides: object) -> Outcome:
    return play(lambda: watcher(**overrides), steps, cuts)


USER_PASS_OK: list[Step] = [
    ("S", GREETING),
    ("C", b"USER alice\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"PASS alice-secret\r\n"),
    ("S", b"+OK Logged in.\r\n"),
    ("C", b"STAT\r\n"),
    ("S", b"+OK 0 0\r\n"),
]

DIALOGUES: dict[str, tuple[list[Step], list[LoginSucceeded], dict[str, object]]] = {
    "user-pass": (USER_PASS_OK, [LoginSucceeded("alice", "USER")], {}),
    "apop": (
        [
            ("S", GREETING),
            ("C", b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
            ("S", b"+OK Logged in.\r\n"),
        ],
        [LoginSucceeded("alice", "APOP")],
        {},
    ),
    "auth-plain-initial-response": (
        [
            ("S", GREETING),
            ("C", b"AUTH PLAIN " + b64(b"\x00alice\x00alice-secret") + b"\r\n"),
            ("S", b"+OK Logged in.\r\n"),
        ],
        [LoginSucceeded("alice", "PLAIN")],
        {},
    ),
    "auth-plain-continuation": (
        [
            ("S", GREETING),
            ("C", b"AUTH PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b64(b"\x00alice\x00alice-secret") + b"\r\n"),
            ("S", b"+OK Logged in.\r\n"),
        ],
        [LoginSucceeded("alice", "PLAIN")],
        {},
    ),
    "auth-login": (
        [
            ("S", GREETING),
            ("C", b"AUTH LOGIN\r\n"),
            ("S", b"+ VXNlcm5hbWU6\r\n"),
            ("C", b64(b"alice") + b"\r\n"),
            ("S", b"+ UGFzc3dvcmQ6\r\n"),
            ("C", b64(b"alice-secret") + b"\r\n"),
            ("S", b"+OK Logged in.\r\n"),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "auth-cram-md5": (
        [
            ("S", GREETING),
            ("C", b"AUTH CRAM-MD5\r\n"),
            ("S", b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n"),
            ("C", b64(b"alice b913a602c7eda7a495b4e6e7334d3890") + b"\r\n"),
            ("S", b"+OK Logged in.\r\n"),
        ],
        [LoginSucceeded("alice", "CRAM-MD5")],
        {},
    ),
    "capa-then-login": (
        [
            ("S", GREETING),
            ("C", b"CAPA\r\n"),
            ("S", b"+OK\r\nCAPA\r\nTOP\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"),
            *USER_PASS_OK[1:],
        ],
        [LoginSucceeded("alice", "USER")],
        {},
    ),
    "stls-then-login": (
        [
            ("S", GREETING),
            ("C", b"STLS\r\n"),
            ("TLS", b""),
            ("C", b"CAPA\r\n"),
            ("S", b"+OK\r\nUSER\r\n.\r\n"),
            *USER_PASS_OK[1:],
        ],
        [LoginSucceeded("alice", "USER")],
        {"client_tls": TLSMode.STARTTLS, "require_tls": True},
    ),
    "wrong-password": (
        [
            ("S", GREETING),
            ("C", b"USER alice\r\n"),
            ("S", b"+OK\r\n"),
            ("C", b"PASS wrong\r\n"),
            ("S", b"-ERR [AUTH] Authentication failed.\r\n"),
            ("C", b"QUIT\r\n"),
            ("S", b"+OK Logging out\r\n"),
        ],
        [],
        {},
    ),
    "pipelined-pass-and-noop": (
        [
            ("S", GREETING),
            ("C", b"USER alice\r\nPASS bad\r\nNOOP\r\n"),
            ("S", b"+OK\r\n"),
            ("S", b"-ERR [AUTH] Authentication failed.\r\n"),
            ("S", b"+OK\r\n"),
        ],
        [],
        {},
    ),
    "cancelled-auth": (
        [
            ("S", GREETING),
            ("C", b"AUTH PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b"*\r\n"),
            ("S", b"-ERR Authentication aborted\r\n"),
            ("C", b"NOOP\r\n"),
            ("S", b"+OK\r\n"),
        ],
        [],
        {},
    ),
    "client-sends-ok-itself": (
        [
            ("S", GREETING),
            ("C", b"+OK\r\n"),
            ("S", b"-ERR Unknown command.\r\n"),
            ("C", b"USER alice\r\n+OK Logged in.\r\n"),
            ("S", b"+OK\r\n"),
            ("S", b"-ERR Unknown command.\r\n"),
        ],
        [],
        {},
    ),
    "ok-to-user-only": (
        [("S", GREETING), ("C", b"USER alice\r\n"), ("S", b"+OK\r\n")],
        [],
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_records_exactly_the_successful_logins(name: str) -> None:
    steps, logins, overrides = DIALOGUES[name]
    assert run(steps, **overrides).logins == logins


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(DIALOGUES)), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_any_fragmentation_gives_the_same_bytes_and_decisions(name: str, cuts: list[int]) -> None:
    steps, _, overrides = DIALOGUES[name]
    whole = run(steps, **overrides)
    assert run(steps, tuple(cuts), **overrides) == whole


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_every_single_cut_gives_the_same_outcome(name: str) -> None:
    steps, _, overrides = DIALOGUES[name]
    whole = run(steps, **overrides)
    for cut in single_cuts(steps):
        assert run(steps, (cut,), **overrides) == whole, cut


def test_byte_at_a_time() -> None:
    for name, (steps, _, overrides) in DIALOGUES.items():
        assert run(steps, every_byte(steps), **overrides) == run(steps, **overrides), name


def test_the_password_is_forwarded_but_never_kept() -> None:
    w = watcher()
    play(lambda: w, DIALOGUES["auth-login"][0])
    state = repr(vars(w)) + repr(vars(w._client)) + repr(vars(w._server))
    assert "alice-secret" not in state
    assert b64(b"alice-secret").decode() not in state


def test_lockstep_holds_pipelined_commands_until_the_response() -> None:
    w = watcher()
    out = play(lambda: w, [("S", GREETING), ("C", b"USER alice\r\nPASS bad\r\nCAPA\r\n")])
    assert out.to_server == b"USER alice\r\n"
    out2 = play(lambda: w, [("S", b"+OK\r\n")])
    assert out2.to_server == b"PASS bad\r\n"
    out3 = play(lambda: w, [("S", b"-ERR [AUTH] Authentication failed.\r\n")])
    assert out3.to_server == b"CAPA\r\n"
    assert out3.failures == [LoginFailed("alice", "USER")]


def test_after_login_pipelined_bytes_pass_and_parsing_stops() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"USER alice\r\n"),
            ("S", b"+OK\r\n"),
            ("C", b"PASS alice-secret\r\nSTAT\r\nLIST\r\n"),
            ("S", b"+OK Logged in.\r\n+OK 1 10\r\n"),
            ("S", b"+OK Logged in.\r\n"),  # would be a second login if still parsed
        ]
    )
    assert out.spliced
    assert out.logins == [LoginSucceeded("alice", "USER")]
    assert out.to_server.endswith(b"PASS alice-secret\r\nSTAT\r\nLIST\r\n")
    assert out.to_client.endswith(b"+OK Logged in.\r\n+OK 1 10\r\n+OK Logged in.\r\n")


def test_stls_is_answered_by_the_proxy_and_injected_bytes_are_dropped() -> None:
    out = run(
        [("S", GREETING), ("C", b"STLS\r\nUSER x\r\n"), ("TLS", b""), ("C", b"CAPA\r\n")],
        client_tls=TLSMode.STARTTLS,
    )
    assert out.to_server == b"CAPA\r\n"  # never "STLS", never the injected "USER x"
    assert out.to_client == GREETING + b"+OK Begin TLS negotiation\r\n"
    assert out.tls_at == [("client", len(out.to_client))]


def test_stls_without_a_tls_listener_is_refused_locally() -> None:
    out = run([("S", GREETING), ("C", b"STLS\r\n")])
    assert out.to_server == b""
    assert out.to_client.endswith(b"-ERR STLS not available\r\n")


def test_capa_offers_stls_only_when_the_proxy_can() -> None:
    steps: list[Step] = [
        ("S", GREETING),
        ("C", b"CAPA\r\n"),
        ("S", b"+OK Capability list follows\r\nTOP\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n"),
    ]
    plain = run(steps).to_client
    assert plain.endswith(b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\n.\r\n")
    offered = run(steps, client_tls=TLSMode.STARTTLS).to_client
    assert offered.endswith(b"TOP\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n.\r\n")
    implicit = run(steps, client_tls=TLSMode.IMPLICIT).to_client
    assert b"STLS" not in implicit


def test_require_tls_refuses_logins_and_hides_them_before_tls() -> None:
    overrides = {"client_tls": TLSMode.STARTTLS, "require_tls": True}
    capa = run(
        [
            ("S", GREETING),
            ("C", b"CAPA\r\n"),
            ("S", b"+OK\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"),
        ],
        **overrides,
    )
    assert capa.to_client.endswith(b"+OK\r\nTOP\r\nSTLS\r\n.\r\n")
    apop = b"APOP alice " + b"0" * 32 + b"\r\n"
    for command in (b"USER alice\r\n", b"PASS x\r\n", apop, b"AUTH PLAIN\r\n"):
        out = run([("S", GREETING), ("C", command)], **overrides)
        assert out.to_server == b""
        assert out.to_client.endswith(b"-ERR TLS required: use STLS first\r\n")
        assert [e.reason for e in out.events if isinstance(e, LoginRefused)] == ["tls-required"]


def test_backend_starttls_happens_before_the_greeting_reaches_the_client() -> None:
    out = run(
        [("S", GREETING), ("S", b"+OK Begin TLS negotiation now.\r\n"), ("C", b"CAPA\r\n")],
        backend_tls=TLSMode.STARTTLS,
    )
    assert out.to_server.startswith(b"STLS\r\n")
    assert out.tls_at == [("server", len(b"STLS\r\n"))]
    assert out.to_client == GREETING
    assert out.to_server == b"STLS\r\nCAPA\r\n"


def test_a_backend_that_refuses_stls_closes_the_session() -> None:
    out = run([("S", GREETING), ("S", b"-ERR no\r\n")], backend_tls=TLSMode.STARTTLS)
    assert out.closed
    assert out.to_client == b"-ERR backend unavailable\r\n"


def test_an_overlong_line_is_refused_and_closes() -> None:
    out = run([("S", GREETING), ("C", b"USER " + b"a" * 9000)], max_line_length=8192)
    assert out.closed
    assert out.to_client.endswith(b"-ERR line too long\r\n")
    assert out.to_server == b""


def test_too_much_held_data_is_refused() -> None:
    out = run(
        [("S", GREETING), ("C", b"USER alice\r\n" + b"NOOP\r\n" * 20000)], max_held_bytes=65536
    )
    assert out.closed
    assert out.to_server == b"USER alice\r\n"


def test_a_backend_that_closes_mid_login_records_nothing() -> None:
    out = run([("S", GREETING), ("C", b"USER alice\r\n"), ("S", b"+OK\r\n"), ("C", b"PASS x\r\n")])
    assert out.logins == []  # the connection simply ends: no response, no record


def test_strict_grammar_answers_locally_and_forwards_nothing() -> None:
    refused = [
        b"AUTH  \r\n",  # issue 9, reproduction 1: Dovecot listed its mechanisms with +OK
        b"AUTH \r\r\n",
        b"AUTH  PLAIN\r\n",
        b"AUTH PLAIN  \r\n",
        b"AUTH PL@IN\r\n",
        b"AUTH PLAIN not*base64\r\n",
        b"\rPASS pw\r\n",  # reproduction 3: Dovecot skipped the CR and logged in
        b"PA\rSS pw\r\n",
        b"\rAPOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
        b"AUTH\r PLAIN AGFsaWNlAHB3\r\n",
        b"USER alice\n",  # bare LF
        b"USER alice\x00\r\n",
        b"USER  alice\r\n",
        b"USER al ice\r\n",
        b"USER\r\n",
        b"PASS\r\n",
        b"PASS pw\tx\r\n",
        b"APOP alice 1234\r\n",
        b"CAPA now\r\n",
        b"NOOP\r\n",  # not before login (RFC 1939)
        b"XCLIENT ADDR=1.2.3.4\r\n",
        b" USER alice\r\n",
        b"\r\n",
    ]
    for command in refused:
        out = run([("S", GREETING), ("C", command), ("C", b"CAPA\r\n")])
        assert out.to_server == b"CAPA\r\n", command
        assert out.to_client.startswith(GREETING + b"-ERR "), command
        assert not out.logins


def test_the_backend_sees_canonical_commands() -> None:
    cases = {
        b"user alice\r\n": b"USER alice\r\n",
        b"pass  two  spaces \r\n": b"PASS  two  spaces \r\n",  # RFC 1939: all of it
        b"auth plain\r\n": b"AUTH PLAIN\r\n",
        b"auth plain =\r\n": b"AUTH PLAIN =\r\n",
        b"capa\r\n": b"CAPA\r\n",
    }
    for command, wire in cases.items():
        assert run([("S", GREETING), ("C", command)]).to_server == wire, command


def test_bare_auth_lists_mechanisms_and_is_no_login() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"AUTH\r\n"),
            ("S", b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
            ("C", b"CAPA\r\n"),
        ]
    )
    assert out.logins == []
    assert out.to_server == b"AUTH\r\nCAPA\r\n"


def test_a_sasl_response_that_is_not_base64_cancels_the_exchange() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"AUTH PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b"PASS pw\r\n"),
            ("S", b"-ERR Authentication aborted\r\n"),
        ]
    )
    assert out.to_server == b"AUTH PLAIN\r\n*\r\n"
    assert out.failures == []


def test_a_client_that_leaves_mid_login_is_seen_to_the_answer() -> None:
    w = watcher()
    steps: list[Step] = [("S", GREETING), ("C", b"USER alice\r\nPASS alice-secret\r\n")]
    play(lambda: w, steps)
    assert w.client_closed() == []
    out = play(lambda: w, [("S", b"+OK\r\n")])
    assert out.to_server == b"PASS alice-secret\r\n"
    out = play(lambda: w, [("S", b"+OK Logged in.\r\n")])
    assert out.logins == [LoginSucceeded("alice", "USER")]
    assert out.closed and not out.spliced


def test_a_client_that_leaves_with_nothing_in_flight_closes_at_once() -> None:
    for pending in (b"", b"USER ali", b"AUTH PLAIN\r\n"):
        w = watcher()
        play(lambda w=w: w, [("S", GREETING), ("C", pending)])  # type: ignore[misc]
        if pending.startswith(b"AUTH"):
            play(lambda w=w: w, [("S", b"+ \r\n")])  # type: ignore[misc]
        assert any(isinstance(a, Close) for a in w.client_closed()), pending


def test_the_transition_table_reaches_every_state() -> None:
    assert reachable_states(TRANSITIONS, State.GREETING) == set(State)
    assert all(moves.get(Event.CLOSE) is State.CLOSED for moves in TRANSITIONS.values() if moves)


def test_the_login_is_announced_before_the_client_hears_of_it() -> None:
    w = watcher()
    play(lambda: w, [("S", GREETING), ("C", b"USER alice\r\n"), ("S", b"+OK\r\n")])
    play(lambda: w, [("C", b"PASS alice-secret\r\n")])
    actions = w.server_data(b"+OK Logged in.\r\n")
    # The glue makes the record durable on LoginSucceeded, before it writes the answer.
    assert actions == [
        LoginSucceeded("alice", "USER"),
        ToClient(b"+OK Logged in.\r\n"),
        Splice(),
    ]


def test_a_capability_list_is_held_whole_only_up_to_a_bound() -> None:
    endless = b"+OK\r\n" + b"X-CAPABILITY\r\n" * 10000  # 140 KB, no end
    out = run([("S", GREETING), ("C", b"CAPA\r\n"), ("S", endless)], max_server_line_length=65536)
    assert out.closed
    assert out.to_client == GREETING + b"-ERR backend error\r\n"
