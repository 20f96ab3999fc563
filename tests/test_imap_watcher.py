"""The IMAP watcher: every rule of issue 4, each dialogue cut at every byte boundary."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.protocols.common import (
    ClientOrigin,
    Close,
    LoginFailed,
    LoginRefused,
    LoginSucceeded,
    Splice,
    TLSMode,
    ToClient,
    WatcherSettings,
)
from relayproxy.protocols.imap import TRANSITIONS, Event, ImapWatcher, State
from tests.watcher_dialogues import (
    Outcome,
    Step,
    every_byte,
    play,
    reachable_states,
    single_cuts,
)

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def run(steps: list[Step], cuts: tuple[int, ...] = (), **overrides: object) -> Outcome:
    origin = overrides.pop("forward_id", None)
    return play(
        lambda: ImapWatcher(WatcherSettings(**overrides), forward_id=origin),  # type: ignore[arg-type]
        steps,
        cuts,
    )


# The backend answers the proxy's tags (rpx1, rpx2, ...), never the client's.
OK_LOGIN = b"rpx1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"

DIALOGUES: dict[str, tuple[list[Step], list[LoginSucceeded], dict[str, object]]] = {
    "login-atoms": (
        [("S", GREETING), ("C", b"a1 LOGIN alice alice-secret\r\n"), ("S", OK_LOGIN)],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "login-quoted-escapes": (
        [
            ("S", GREETING),
            ("C", b'a1 LOGIN "al\\\\ice" "pa\\"ss {5}"\r\n'),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("al\\ice", "LOGIN")],
        {},
    ),
    "login-sync-literals": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN {5}\r\n"),
            ("C", b"alice {12}\r\n"),
            ("C", b"alice-secret\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "login-nonsync-literals": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN {5+}\r\nalice {12+}\r\nalice-secret\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "authenticate-plain": (
        [
            ("S", GREETING),
            ("C", b"a1 AUTHENTICATE PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b64(b"\x00alice\x00alice-secret") + b"\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("alice", "PLAIN")],
        {},
    ),
    "authenticate-sasl-ir": (
        [
            ("S", GREETING),
            ("C", b"a1 AUTHENTICATE PLAIN " + b64(b"\x00bob\x00bob-secret") + b"\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("bob", "PLAIN")],
        {},
    ),
    "authenticate-login": (
        [
            ("S", GREETING),
            ("C", b"a1 AUTHENTICATE LOGIN\r\n"),
            ("S", b"+ VXNlcm5hbWU6\r\n"),
            ("C", b64(b"alice") + b"\r\n"),
            ("S", b"+ UGFzc3dvcmQ6\r\n"),
            ("C", b64(b"alice-secret") + b"\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "capability-id-then-login": (
        [
            ("S", GREETING),
            ("C", b"a0 CAPABILITY\r\n"),
            ("S", b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nrpx1 OK done\r\n"),
            ("C", b'a1 ID ("name" "test")\r\n'),
            ("C", b"a2 LOGIN alice alice-secret\r\n"),
            ("S", b"rpx2 OK Logged in\r\n"),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "starttls-then-login": (
        [
            ("S", GREETING),
            ("C", b"a0 STARTTLS\r\n"),
            ("TLS", b""),
            ("C", b"a1 LOGIN alice alice-secret\r\n"),
            ("S", OK_LOGIN),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {"client_tls": TLSMode.STARTTLS, "require_tls": True},
    ),
    "wrong-password": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice wrong\r\n"),
            ("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("C", b"a2 LOGOUT\r\n"),
            ("S", b"* BYE Logging out\r\nrpx2 OK Logout completed.\r\n"),
        ],
        [],
        {},
    ),
    "pipelined-login-and-noop-same-tag": (
        [
            ("S", GREETING),
            ("C", b"a LOGIN alice bad\r\na NOOP\r\n"),
            ("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("S", b"rpx2 OK NOOP completed.\r\n"),
        ],
        [],
        {},
    ),
    "untagged-ok-is-not-a-login": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice bad\r\n"),
            ("S", b"* OK still here\r\n"),
            ("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        ],
        [],
        {},
    ),
    "client-sends-ok-itself": (
        [
            ("S", GREETING),
            ("C", b"a1 OK Logged in\r\n"),  # answered BAD by the proxy, never forwarded
            ("C", b"rpx1 OK Logged in\r\n"),
        ],
        [],
        {},
    ),
    "cancelled-authenticate": (
        [
            ("S", GREETING),
            ("C", b"a1 AUTHENTICATE PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b"*\r\n"),
            ("S", b"rpx1 BAD Authentication aborted by client.\r\n"),
        ],
        [],
        {},
    ),
    "bye-mid-login": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice alice-secret\r\n"),
            ("S", b"* BYE Server shutting down.\r\n"),
        ],
        [],
        {},
    ),
    "ok-with-other-case-or-longer-tag": (
        [
            ("S", GREETING),
            ("C", b"ab LOGIN alice alice-secret\r\n"),
            ("S", b"RPX1 OK Logged in\r\n"),  # a tag never sent: the session ends
            ("S", b"rpx1 OK Logged in\r\n"),
        ],
        [],
        {},
    ),
    "tag-reused-after-failure": (
        [
            ("S", GREETING),
            ("C", b"a LOGIN alice bad\r\n"),
            ("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("C", b"a CAPABILITY\r\n"),
            ("S", b"* CAPABILITY IMAP4rev1\r\nrpx2 OK done\r\n"),
            ("S", b"rpx1 OK Logged in\r\n"),  # a tag already answered
        ],
        [],
        {},
    ),
    "literal-smuggled-after-id": (  # issue 9, reproduction 2
        [
            ("S", GREETING),
            ("C", b"a ID NIL {21+}\r\nb LOGIN x y\r\na NOOP\r\n\r\na LOGIN x y\r\n"),
            ("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("S", b"rpx2 OK NOOP completed.\r\n"),
            ("S", b"a OK NOOP completed.\r\n"),
        ],
        [],
        {},
    ),
    "tag-the-backend-would-refuse": (  # issue 9, reproduction 5
        [
            ("S", GREETING),
            ("C", b"a] LOGIN alice {12+}\r\nalice-secret\r\n"),
            ("S", b"rpx1 OK Logged in\r\n"),
        ],
        [LoginSucceeded("alice", "LOGIN")],
        {},
    ),
    "literal-holding-a-command": (
        [
            ("S", GREETING),
            ("C", b"a] LOGIN x {30+}\r\nb LOGIN user0005 pw-user0005\r\n\r\n"),
            ("S", b"rpx1 OK Logged in\r\n"),
        ],
        [],
        {},
    ),
    "preauth-recorded": (
        [("S", b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as alice\r\n")],
        [LoginSucceeded(None, "PREAUTH")],
        {"record_preauth": True},
    ),
    "preauth-not-recorded": (
        [("S", b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as alice\r\n")],
        [],
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_records_exactly_the_successful_logins(name: str) -> None:
    steps, logins, overrides = DIALOGUES[name]
    assert run(steps, **overrides).logins == logins


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(sorted(DIALOGUES)), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_any_fragmentation_gives_the_same_bytes_and_decisions(name: str, cuts: list[int]) -> None:
    steps, _, overrides = DIALOGUES[name]
    assert run(steps, tuple(cuts), **overrides) == run(steps, **overrides)


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_every_single_cut_gives_the_same_outcome(name: str) -> None:
    steps, _, overrides = DIALOGUES[name]
    whole = run(steps, **overrides)
    for cut in single_cuts(steps):
        assert run(steps, (cut,), **overrides) == whole, cut


def test_byte_at_a_time() -> None:
    for name, (steps, _, overrides) in DIALOGUES.items():
        assert run(steps, every_byte(steps), **overrides) == run(steps, **overrides), name


def test_failures_are_reported_with_the_user_and_never_the_password() -> None:
    out = run(DIALOGUES["wrong-password"][0])
    assert out.failures == [LoginFailed("alice", "LOGIN")]
    w = ImapWatcher(WatcherSettings())
    play(lambda: w, DIALOGUES["login-sync-literals"][0])
    assert "alice-secret" not in repr(vars(w))


def test_lockstep_holds_the_pipelined_noop() -> None:
    w = ImapWatcher(WatcherSettings())
    out = play(lambda: w, [("S", GREETING), ("C", b"a LOGIN alice bad\r\na NOOP\r\n")])
    assert out.to_server == b'rpx1 LOGIN "alice" "bad"\r\n'
    out = play(lambda: w, [("S", b"rpx1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")])
    assert out.to_client == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert out.to_server == b"rpx2 NOOP\r\n"


def test_the_proxy_reads_literals_itself_and_sends_one_canonical_command() -> None:
    w = ImapWatcher(WatcherSettings())
    out = play(lambda: w, [("S", GREETING), ("C", b"a1 LOGIN {5}\r\n")])
    assert out.to_client.endswith(b"+ Ready for literal data\r\n")
    out = play(lambda: w, [("C", b"alice {12}\r\n")])
    assert out.to_client == b"+ Ready for literal data\r\n"
    assert out.to_server == b""
    out = play(lambda: w, [("C", b'al"ce\\secret\r\n')])
    assert out.to_server == b'rpx1 LOGIN "alice" "al\\"ce\\\\secret"\r\n'


def test_strict_grammar_answers_locally_and_forwards_nothing() -> None:
    refused = [
        b"a  LOGIN alice pw\r\n",  # two spaces
        b"a LOGIN alice pw \r\n",  # trailing space
        b"a LOGIN alice pw\n",  # bare LF
        b"a LOG\rIN alice pw\r\n",  # bare CR
        b"a LOGIN alice\x00 pw\r\n",  # NUL
        b"a LOGIN alice\tpw\r\n",  # tab
        b"a LOGIN alice\r\n",  # one argument
        b"a LOGIN alice pw extra\r\n",
        b"a LOGIN (alice) pw\r\n",
        b"a LOGIN alice{3}\r\n",  # marker glued to an atom
        b"a AUTHENTICATE\r\n",
        b"a AUTHENTICATE  PLAIN\r\n",
        b"a AUTHENTICATE PL@IN\r\n",
        b"a AUTHENTICATE PLAIN not-base64!\r\n",
        b"a AUTHENTICATE PLAIN {5+}\r\nAAAAA\r\n",
        b"a NOOP now\r\n",
        b"a SELECT INBOX\r\n",  # not before login
        b"a ENABLE UTF8=ACCEPT\r\n",
        b"a XCLIENT ADDR=1.2.3.4\r\n",
        b"a+ LOGIN alice pw\r\n",  # "+" is not a tag character
        b"* LOGIN alice pw\r\n",
        b'a ID ("x-originating-ip")\r\n',  # a field without a value
        b"a LOGIN alice {5+}\r\nab\ncd\r\n",  # LF inside a literal password
        b"\r\n",
    ]
    for command in refused:
        out = run([("S", GREETING), ("C", command), ("C", b"z NOOP\r\n")])
        assert out.to_server == b"rpx1 NOOP\r\n", command
        assert b" BAD " in out.to_client, command
        assert not out.logins


def test_the_backend_sees_canonical_commands() -> None:
    cases = {
        b"a1 login alice pw\r\n": b'rpx1 LOGIN "alice" "pw"\r\n',
        b'a1 LOGIN "ali ce" "p\\"w"\r\n': b'rpx1 LOGIN "ali ce" "p\\"w"\r\n',
        b"a1 LOGIN al]ce {2+}\r\npw\r\n": b'rpx1 LOGIN "al]ce" "pw"\r\n',
        b"a1 authenticate plain\r\n": b"rpx1 AUTHENTICATE PLAIN\r\n",
        b"a1 AUTHENTICATE PLAIN =\r\n": b"rpx1 AUTHENTICATE PLAIN =\r\n",
        b"a1 capability\r\n": b"rpx1 CAPABILITY\r\n",
    }
    for command, wire in cases.items():
        assert run([("S", GREETING), ("C", command)]).to_server == wire, command


def test_id_is_answered_by_the_proxy() -> None:
    out = run([("S", GREETING), ("C", b'a1 ID ("x-originating-ip" "6.6.6.6" "name" NIL)\r\n')])
    assert out.to_server == b""
    assert out.to_client.endswith(b"* ID NIL\r\na1 OK ID completed\r\n")


def test_a_sasl_response_that_is_not_base64_cancels_the_exchange() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 AUTHENTICATE PLAIN\r\n"),
            ("S", b"+ \r\n"),
            ("C", b"a2 LOGIN alice pw\r\n"),
            ("S", b"rpx1 BAD Authentication aborted by client.\r\n"),
        ]
    )
    assert out.to_server == b"rpx1 AUTHENTICATE PLAIN\r\n*\r\n"
    assert out.to_client.endswith(b"a1 BAD Authentication aborted by client.\r\n")
    assert out.failures == []


def test_a_client_that_leaves_mid_login_is_seen_to_the_answer() -> None:
    w = ImapWatcher(WatcherSettings())
    play(lambda: w, [("S", GREETING), ("C", b"a LOGIN alice alice-secret\r\n")])
    assert w.client_closed() == []  # the login is at the backend: wait for it
    out = play(lambda: w, [("S", b"rpx1 OK Logged in\r\n")])
    assert out.logins == [LoginSucceeded("alice", "LOGIN")]
    assert out.closed and not out.spliced


def test_a_client_that_leaves_with_commands_held_has_them_played_out() -> None:
    w = ImapWatcher(WatcherSettings())
    steps: list[Step] = [("S", GREETING), ("C", b"a CAPABILITY\r\nb LOGIN alice alice-secret\r\n")]
    play(lambda: w, steps)
    assert w.client_closed() == []
    out = play(lambda: w, [("S", b"* CAPABILITY IMAP4rev1\r\nrpx1 OK done\r\n")])
    assert out.to_server == b'rpx2 LOGIN "alice" "alice-secret"\r\n'
    out = play(lambda: w, [("S", b"rpx2 NO [AUTHENTICATIONFAILED] failed\r\n")])
    assert out.failures == [LoginFailed("alice", "LOGIN")]
    assert out.closed


def test_a_client_that_leaves_with_nothing_in_flight_closes_at_once() -> None:
    for pending in (b"", b"a LOGIN {5}\r\n", b"a LOGIN alice pw"):
        w = ImapWatcher(WatcherSettings())
        play(lambda w=w: w, [("S", GREETING), ("C", pending)])  # type: ignore[misc]
        actions = w.client_closed()
        assert any(isinstance(a, Close) for a in actions), pending


def test_after_login_everything_flows_untouched() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice alice-secret\r\na2 SELECT INBOX\r\na3 IDLE\r\n"),
            ("S", OK_LOGIN + b"* 3 EXISTS\r\n"),
            ("C", b"a4 APPEND INBOX {100000+}\r\n" + b"x" * 100000),
            ("S", b"a2 OK Selected\r\n"),
        ]
    )
    assert out.logins == [LoginSucceeded("alice", "LOGIN")]
    assert out.to_server.endswith(
        b"a2 SELECT INBOX\r\na3 IDLE\r\na4 APPEND INBOX {100000+}\r\n" + b"x" * 100000
    )
    assert out.to_client.endswith(
        b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\na2 OK Selected\r\n"
    )


def test_starttls_is_answered_by_the_proxy_and_injection_dropped() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"a0 STARTTLS\r\na1 LOGIN alice alice-secret\r\n"),
            ("TLS", b""),
            ("C", b"a2 CAPABILITY\r\n"),
        ],
        client_tls=TLSMode.STARTTLS,
    )
    assert out.to_server == b"rpx1 CAPABILITY\r\n"
    assert out.to_client.endswith(b"a0 OK Begin TLS negotiation now\r\n")
    assert out.tls_at == [("client", len(out.to_client))]


def test_starttls_without_tls_is_refused_locally() -> None:
    out = run([("S", GREETING), ("C", b"a0 STARTTLS\r\n")])
    assert out.to_server == b""
    assert out.to_client.endswith(b"a0 BAD STARTTLS is not available here\r\n")


def test_capabilities_are_rewritten_everywhere() -> None:
    steps: list[Step] = [
        ("S", GREETING),
        ("C", b"a0 CAPABILITY\r\n"),
        (
            "S",
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=LOGIN\r\n"
            b"rpx1 OK [CAPABILITY X] ok\r\n",
        ),
    ]
    plain = run(steps).to_client
    assert plain.startswith(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] Dovecot")
    assert b"* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN\r\n" in plain
    required = run(steps, client_tls=TLSMode.STARTTLS, require_tls=True).to_client
    assert required.startswith(
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS LOGINDISABLED] Dovecot"
    )
    assert b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n" in required
    assert b"a0 OK [CAPABILITY X STARTTLS LOGINDISABLED] ok\r\n" in required
    implicit = run(steps, client_tls=TLSMode.IMPLICIT, require_tls=True).to_client
    assert b"STARTTLS" not in implicit
    assert b"LOGINDISABLED" not in implicit


def test_require_tls_refuses_login_and_authenticate_before_tls() -> None:
    overrides = {"client_tls": TLSMode.STARTTLS, "require_tls": True}
    for command in (b"a1 LOGIN alice pw\r\n", b"a1 AUTHENTICATE PLAIN\r\n", b"a1 LOGIN {5}\r\n"):
        out = run([("S", GREETING), ("C", command)], **overrides)
        assert out.to_server == b""
        assert out.to_client.endswith(b"a1 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n")
        assert [e.reason for e in out.events if isinstance(e, LoginRefused)] == ["tls-required"]
    # Non-synchronising literals arrive anyway: skipped, then refused, then the next command.
    out = run(
        [("S", GREETING), ("C", b"a1 LOGIN {5+}\r\nalice {2+}\r\npw\r\na2 NOOP\r\n")], **overrides
    )
    assert out.to_server == b"rpx1 NOOP\r\n"
    assert b"a1 NO [PRIVACYREQUIRED]" in out.to_client


def test_a_literal_too_large_before_login_is_refused() -> None:
    out = run([("S", GREETING), ("C", b"a1 LOGIN {100000}\r\n")], max_literal_length=65536)
    assert out.to_server == b""
    assert out.to_client.endswith(b"a1 BAD Literal too large before login\r\n")
    assert not out.closed
    out = run([("S", GREETING), ("C", b"a1 LOGIN {100000+}\r\n")], max_literal_length=65536)
    assert out.closed
    assert out.to_server == b""


def test_a_line_without_a_tag_is_answered_locally() -> None:
    out = run([("S", GREETING), ("C", b"\r\n"), ("C", b"LOGIN\r\n"), ("C", b"* LOGIN a b\r\n")])
    assert out.to_server == b""
    assert out.to_client.count(b"* BAD ") == 3


def test_an_unreadable_line_ending_in_a_nonsync_literal_closes() -> None:
    out = run([("S", GREETING), ("C", b'a LOGIN "x {5+}\r\nhello\r\n')])
    assert out.closed
    assert out.to_server == b""


def test_backend_starttls_then_id_before_the_first_command() -> None:
    origin = ClientOrigin("192.0.2.7", 40000, "127.0.0.1", 143)
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 CAPABILITY\r\n"),
            ("S", b"rpx1 OK Begin TLS negotiation now.\r\n"),
            ("S", b'* ID ("name" "Dovecot")\r\nrpx2 OK ID completed.\r\n'),
            ("S", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nrpx3 OK done\r\n"),
        ],
        backend_tls=TLSMode.STARTTLS,
        forward_id=origin,
    )
    assert out.to_server == (
        b"rpx1 STARTTLS\r\n"
        b'rpx2 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40000" '
        b'"x-connected-ip" "127.0.0.1" "x-connected-port" "143")\r\n'
        b"rpx3 CAPABILITY\r\n"
    )
    assert out.tls_at == [("server", len(b"rpx1 STARTTLS\r\n"))]
    # The pre-TLS capability list is not passed on; the ID exchange is not shown.
    assert out.to_client == (
        b"* OK Dovecot ready.\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na1 OK done\r\n"
    )


def test_server_literals_are_read_whole() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 CAPABILITY\r\n"),
            ("S", b'* X "q {9}" {19}\r\nrpx1 OK Logged in\r\n\r\nrpx1 OK done\r\n'),
        ]
    )
    assert out.to_client.endswith(b"rpx1 OK Logged in\r\n\r\na1 OK done\r\n")
    assert out.logins == []


def test_the_transition_table_reaches_every_state() -> None:
    assert reachable_states(TRANSITIONS, State.GREETING) == set(State)
    assert all(moves.get(Event.CLOSE) is State.CLOSED for moves in TRANSITIONS.values() if moves)


def test_the_login_is_announced_before_the_client_hears_of_it() -> None:
    w = ImapWatcher(WatcherSettings())
    play(lambda: w, [("S", GREETING), ("C", b"a LOGIN alice alice-secret\r\n")])
    actions = w.server_data(b"rpx1 OK Logged in\r\n")
    # The glue makes the record durable on LoginSucceeded, before it writes the answer.
    assert actions == [LoginSucceeded("alice", "LOGIN"), ToClient(b"a OK Logged in\r\n"), Splice()]


def test_a_response_is_held_whole_only_up_to_a_bound_however_many_literals() -> None:
    many = b"* ID (" + b"".join(b'"k%d" {100}\r\n' % n + b"x" * 100 + b" " for n in range(1000))
    out = run(
        [("S", GREETING), ("C", b"a CAPABILITY\r\n"), ("S", many)], max_server_line_length=65536
    )
    assert out.closed
    assert out.to_client.endswith(b"* BYE backend error\r\n")
