"""The IMAP watcher: every rule of issue 4, each dialogue cut at every byte boundary."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.protocols.common import (
    ClientOrigin,
    LoginFailed,
    LoginSucceeded,
    TLSMode,
    WatcherSettings,
)
from relayproxy.protocols.imap import TRANSITIONS, ImapWatcher, State, scan
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


OK_LOGIN = b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"

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
            ("S", b"+ OK\r\n"),
            ("C", b"alice {12}\r\n"),
            ("S", b"+ OK\r\n"),
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
            ("S", b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\na0 OK done\r\n"),
            ("C", b'a1 ID ("name" "test")\r\n'),
            ("S", b'* ID ("name" {7}\r\nDovecot)\r\na1 OK ID completed\r\n'),
            ("C", b"a2 LOGIN alice alice-secret\r\n"),
            ("S", b"a2 OK Logged in\r\n"),
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
            ("S", b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("C", b"a2 LOGOUT\r\n"),
            ("S", b"* BYE Logging out\r\na2 OK Logout completed.\r\n"),
        ],
        [],
        {},
    ),
    "pipelined-login-and-noop-same-tag": (
        [
            ("S", GREETING),
            ("C", b"a LOGIN alice bad\r\na NOOP\r\n"),
            ("S", b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("S", b"a OK NOOP completed.\r\n"),
        ],
        [],
        {},
    ),
    "untagged-ok-is-not-a-login": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice bad\r\n"),
            ("S", b"* OK still here\r\n"),
            ("S", b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        ],
        [],
        {},
    ),
    "client-sends-ok-itself": (
        [
            ("S", GREETING),
            ("C", b"a1 OK Logged in\r\n"),
            ("S", b"a1 BAD Error in IMAP command OK: Unknown command.\r\n"),
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
            ("S", b"a1 BAD Authentication aborted by client.\r\n"),
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
            ("S", b"AB OK Logged in\r\n"),
            ("S", b"abc OK Logged in\r\n"),
            ("S", b"ab NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        ],
        [],
        {},
    ),
    "tag-reused-after-failure": (
        [
            ("S", GREETING),
            ("C", b"a LOGIN alice bad\r\n"),
            ("S", b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            ("C", b"a CAPABILITY\r\n"),
            ("S", b"* CAPABILITY IMAP4rev1\r\na OK done\r\n"),
        ],
        [],
        {},
    ),
    "literal-refused-by-backend": (
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN {5}\r\n"),
            ("S", b"a1 NO too big\r\n"),
            ("C", b"a2 NOOP\r\n"),
            ("S", b"a2 OK done\r\n"),
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
    assert out.to_server == b"a LOGIN alice bad\r\n"
    out = play(lambda: w, [("S", b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")])
    assert out.to_server == b"a NOOP\r\n"


def test_sync_literal_waits_for_the_go_ahead() -> None:
    w = ImapWatcher(WatcherSettings())
    out = play(lambda: w, [("S", GREETING), ("C", b"a1 LOGIN {5}\r\nalice {12}\r\n")])
    assert out.to_server == b"a1 LOGIN {5}\r\n"
    out = play(lambda: w, [("S", b"+ OK\r\n")])
    assert out.to_client == b"+ OK\r\n"
    assert out.to_server == b"alice {12}\r\n"


def test_after_login_everything_flows_untouched() -> None:
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 LOGIN alice alice-secret\r\na2 SELECT INBOX\r\na3 IDLE\r\n"),
            ("S", OK_LOGIN + b"* 3 EXISTS\r\n"),
            ("C", b"a4 APPEND INBOX {100000+}\r\n" + b"x" * 100000),
            ("S", b"a1 OK Logged in\r\n"),
        ]
    )
    assert out.logins == [LoginSucceeded("alice", "LOGIN")]
    assert out.to_server.endswith(b"a3 IDLE\r\na4 APPEND INBOX {100000+}\r\n" + b"x" * 100000)
    assert out.to_client.endswith(OK_LOGIN + b"* 3 EXISTS\r\na1 OK Logged in\r\n")


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
    assert out.to_server == b"a2 CAPABILITY\r\n"
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
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=LOGIN\r\na0 OK [CAPABILITY X] ok\r\n",
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
    # Non-synchronising literals arrive anyway: skipped, then refused, then the next command.
    out = run(
        [("S", GREETING), ("C", b"a1 LOGIN {5+}\r\nalice {2+}\r\npw\r\na2 NOOP\r\n")], **overrides
    )
    assert out.to_server == b"a2 NOOP\r\n"
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
    assert out.to_client.count(b"* BAD Missing or invalid tag or command\r\n") == 3


def test_backend_starttls_then_id_before_the_first_command() -> None:
    origin = ClientOrigin("192.0.2.7", 40000, "127.0.0.1", 143)
    out = run(
        [
            ("S", GREETING),
            ("C", b"a1 CAPABILITY\r\n"),
            ("S", b"rpx0 OK Begin TLS negotiation now.\r\n"),
            ("S", b'* ID ("name" "Dovecot")\r\nrpx1 OK ID completed.\r\n'),
            ("S", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na1 OK done\r\n"),
        ],
        backend_tls=TLSMode.STARTTLS,
        forward_id=origin,
    )
    assert out.to_server == (
        b"rpx0 STARTTLS\r\n"
        b'rpx1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40000" '
        b'"x-connected-ip" "127.0.0.1" "x-connected-port" "143")\r\n'
        b"a1 CAPABILITY\r\n"
    )
    assert out.tls_at == [("server", len(b"rpx0 STARTTLS\r\n"))]
    # The pre-TLS capability list is not passed on; the ID exchange is not shown.
    assert out.to_client == (
        b"* OK Dovecot ready.\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na1 OK done\r\n"
    )


def test_scan_finds_literals_only_outside_quotes() -> None:
    assert scan(b'alice "pw {5}"').literal is None
    assert scan(b'"a\\"b" {5}').literal == 5
    assert scan(b'"a\\"b" {5}').tokens == [b'a"b']
    assert scan(b"{12+}").synchronising is False
    assert scan(b'"unterminated {5}').literal is None


def test_the_transition_table_reaches_every_state() -> None:
    assert reachable_states(TRANSITIONS, State.GREETING) == set(State) - {State.CLOSED}
