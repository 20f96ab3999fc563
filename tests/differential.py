"""Differential fuzzing: relayproxy's records against Dovecot's own `Login:` lines.

Theory of operation
-------------------
relayproxy must record a client address exactly when the backend accepted that
client's credentials, and never otherwise. Dovecot says when it did: behind a
PROXY v2 header from the proxy, its login processes log
``Login: user=<...>, method=..., rip=<client>``. Every generated dialogue comes
from its own 127.x.y.z source address, so for each address two independent
witnesses answer the same question:

    recorded    the address is a key in relayers.db (read with the real store)
    logged_in   Dovecot logged a `Login:` with rip=<address>

    false record   recorded and not logged_in: the MTA relays for a stranger
    missed record  logged_in and not recorded: a customer cannot send

A *round* starts a fresh daemon (fresh relayers.db, `min_interval = 0`), plays
its dialogues concurrently, then stops the daemon with SIGTERM: the recorder
drains and sessions with a login in flight are finished or cut before the store
is read. Dovecot's log is read from where the round began until every address
has its final login-process line (`Login:` or `Disconnected`) or the log has
been quiet for a while, so a `Login:` still in Dovecot's log pipe is not taken
for "no login".

A dialogue is a list of steps (send bytes, wait for a reply, compute bytes from
what the server said, close in some way), generated from ``(seed, index)``
alone: any one can be regenerated and replayed with
``python -m tests.differential --seed S --replay I``. APOP digests and CRAM-MD5
responses depend on the server's words and are computed while playing; the
transcript printed for a failure shows the bytes actually sent.

Nothing here knows what relayproxy does inside: the verdict compares only the
store and Dovecot's log.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import itertools
import os
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from demo.dovecot import DEMO_USERS, Dovecot, running_dovecot
from tests.daemon import Daemon

# --- time bounds --------------------------------------------------------------------------

# Dovecot answers a failed authentication only at its next auth-failure flush (every
# 0.5 s, even with auth_failure_delay = 0): a client waiting for a reply must wait longer.
AWAIT_TIMEOUT = 1.0
# After the last step: read until EOF, or until nothing arrived for this long.
DRAIN_IDLE = 0.7
# Hard bound on one dialogue, connect to close.
DIALOGUE_SECONDS = 3.0
CONNECT_TIMEOUT = 2.0
# Dovecot's log after a round: quiet for this long means nothing more is coming.
LOG_QUIET = 1.0
LOG_DEADLINE = 20.0

CRLF = b"\r\n"

# --- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write ``data``; with cuts, in pieces with a short read (``pause`` s) between them."""

    data: bytes
    cuts: tuple[int, ...] = ()
    pause: float = 0.0


@dataclass(frozen=True)
class Compute:
    """Bytes made from what the server said (APOP's timestamp, CRAM-MD5's challenge).

    Before computing, wait until ``need`` matches the bytes received since the last
    wait (or, with ``anywhere``, all bytes received), at most AWAIT_TIMEOUT.
    """

    label: str
    make: Callable[[bytes], bytes]
    need: bytes
    anywhere: bool = False


@dataclass(frozen=True)
class Await:
    """Read until ``pattern`` (a multi-line regex) matches what arrived since the last wait."""

    pattern: bytes
    timeout: float = AWAIT_TIMEOUT


@dataclass(frozen=True)
class Close:
    """drain: read to EOF or idle; now: close at once; shutdown: SHUT_WR, then read to EOF;
    rst: SO_LINGER 0, so the kernel sends a reset."""

    how: str = "drain"


Step = Send | Compute | Await | Close


@dataclass(frozen=True)
class Dialogue:
    protocol: str  # pop3 | imap
    kind: str  # the class in the report table
    steps: tuple[Step, ...]
    tags: frozenset[str] = frozenset()  # modifiers: interactive, blast, split, ...
    seed: str = ""  # "seed:index", enough to regenerate it

    def describe(self) -> str:
        modifiers = ",".join(sorted(self.tags)) or "-"
        return f"{self.kind} [{self.protocol}; {modifiers}] seed={self.seed or '-'}"


# --- playing one dialogue ------------------------------------------------------------------


@dataclass
class Transcript:
    events: list[tuple[str, bytes]] = field(default_factory=list)  # ("C"|"S"|"#", bytes)
    error: str | None = None  # the harness could not play it (connect failed, ...)
    seconds: float = 0.0

    def add(self, who: str, data: bytes) -> None:
        if self.events and self.events[-1][0] == who and who != "#":
            self.events[-1] = (who, self.events[-1][1] + data)
        else:
            self.events.append((who, data))

    def sent(self) -> bytes:
        return b"".join(data for who, data in self.events if who == "C")

    def render(self, limit: int = 600) -> str:
        lines = []
        for who, data in self.events:
            text = data.decode("ascii", "replace") if who == "#" else repr(data)
            if len(text) > limit:
                text = text[:limit] + f"... ({len(data)} bytes)"
            lines.append(f"    {who}: {text}")
        if self.error:
            lines.append(f"    !: {self.error}")
        return "\n".join(lines)


_compiled: dict[bytes, re.Pattern[bytes]] = {}


def _regex(pattern: bytes) -> re.Pattern[bytes]:
    compiled = _compiled.get(pattern)
    if compiled is None:
        compiled = _compiled[pattern] = re.compile(pattern, re.MULTILINE)
    return compiled


class _Player:
    """Plays one dialogue over one blocking socket, within DIALOGUE_SECONDS."""

    def __init__(self, dialogue: Dialogue, source: str, port: int) -> None:
        self.dialogue = dialogue
        self.source = source
        self.port = port
        self.transcript = Transcript()
        self.received = bytearray()
        self.mark = 0  # received[:mark] was consumed by earlier waits
        self.eof = False
        self.closed = False
        self.deadline = 0.0
        self.sock: socket.socket | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def play(self) -> Transcript:
        started = time.monotonic()
        self.deadline = started + DIALOGUE_SECONDS
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.source, 0))
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(("127.0.0.1", self.port))
            except OSError as exc:
                self.transcript.error = f"connect from {self.source}: {exc}"
                return self.transcript
            closing = False
            for step in self.dialogue.steps:
                if self.remaining() <= 0:
                    self.transcript.add("#", b"dialogue time bound reached")
                    break
                if isinstance(step, Close):
                    self._close(step.how)
                    closing = True
                    break
                if not self._step(step):
                    break
            if not closing:
                self._close("drain")
        except OSError as exc:
            self.transcript.add("#", f"socket error: {exc}".encode())
        finally:
            sock.close()
            self.transcript.seconds = time.monotonic() - started
        return self.transcript

    def _step(self, step: Step) -> bool:
        """One step; False when the connection can carry no more."""
        if isinstance(step, Send):
            return self._send(step.data, step.cuts, step.pause)
        if isinstance(step, Await):
            self._await(step.pattern, step.timeout)
            return True
        if isinstance(step, Compute):
            if step.anywhere:
                self._await_anywhere(step.need)
            else:
                self._await(step.need, AWAIT_TIMEOUT)
            return self._send(step.make(bytes(self.received)), (), 0.0)
        raise TypeError(step)

    def _read(self, timeout: float) -> None:
        assert self.sock is not None
        if self.eof:
            return
        self.sock.settimeout(max(0.001, min(timeout, self.remaining())))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError as exc:
            self.transcript.add("#", f"read: {exc}".encode())
            self.eof = True
            return
        if not data:
            self.transcript.add("#", b"EOF from proxy")
            self.eof = True
            return
        self.received += data
        self.transcript.add("S", data)

    def _send(self, data: bytes, cuts: Sequence[int], pause: float) -> bool:
        assert self.sock is not None
        bounds = [0, *cuts, len(data)]
        for index, (start, end) in enumerate(itertools.pairwise(bounds)):
            piece = data[start:end]
            if not piece:
                continue
            if index:
                self.transcript.add("#", b"(cut)")
                if pause:
                    self._read(pause)
            self.sock.settimeout(max(0.001, self.remaining()))
            try:
                self.sock.sendall(piece)
            except OSError as exc:
                self.transcript.add("#", f"write: {exc}".encode())
                return False
            self.transcript.add("C", piece)
        return True

    def _await(self, pattern: bytes, timeout: float) -> None:
        regex = _regex(pattern)
        until = time.monotonic() + timeout
        while True:
            found = regex.search(self.received, self.mark)
            if found:
                self.mark = found.end()
                return
            left = until - time.monotonic()
            if self.eof or left <= 0 or self.remaining() <= 0:
                return
            self._read(left)

    def _await_anywhere(self, pattern: bytes) -> None:
        regex = _regex(pattern)
        until = time.monotonic() + AWAIT_TIMEOUT
        while not regex.search(self.received):
            left = until - time.monotonic()
            if self.eof or left <= 0 or self.remaining() <= 0:
                return
            self._read(left)

    def _close(self, how: str) -> None:
        assert self.sock is not None
        self.transcript.add("#", f"close: {how}".encode())
        if how == "drain":
            while not self.eof and self.remaining() > 0:
                before = len(self.received)
                self._read(DRAIN_IDLE)
                if len(self.received) == before and not self.eof:
                    break  # idle
        elif how == "shutdown":
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            while not self.eof and self.remaining() > 0:
                self._read(self.remaining())
        elif how == "rst":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how != "now":
            raise ValueError(how)


def play(dialogue: Dialogue, source: str, port: int) -> Transcript:
    """Play ``dialogue`` from ``source`` to 127.0.0.1:``port``; never longer than
    DIALOGUE_SECONDS (plus the connect timeout)."""
    return _Player(dialogue, source, port).play()


# --- addresses -------------------------------------------------------------------------------

# 127.64.0.1 upwards: the other tests use 127.0.x.y; .0 and .255 are avoided in the last
# octet. 190 * 256 * 254 addresses, about 12 million.
_FIRST_SECOND_OCTET = 64
_address_numbers = itertools.count()
_address_lock = threading.Lock()


def address_of(number: int) -> str:
    second, rest = divmod(number, 256 * 254)
    third, fourth = divmod(rest, 254)
    if _FIRST_SECOND_OCTET + second > 254:
        raise ValueError("out of fuzzer addresses")
    return f"127.{_FIRST_SECOND_OCTET + second}.{third}.{fourth + 1}"


def fresh_addresses(count: int) -> list[str]:
    """Addresses no earlier call in this process handed out."""
    with _address_lock:
        return [address_of(next(_address_numbers)) for _ in range(count)]


# --- Dovecot's log ---------------------------------------------------------------------------

_RIP = r"\brip=([0-9a-fA-F.:]+)[,)]"
_CLIENT_LINE = re.compile(r"(?:pop3|imap)-login: .*?" + _RIP)
_LOGIN_LINE = re.compile(r"(?:pop3|imap)-login: (?:\w+: )?Login: .*?" + _RIP)
# Every pre-login connection ends in exactly one login-process line: `Login:` or
# `Disconnected...` / `Aborted login...`. Other lines naming the client (`Authenticate
# LOGIN failed: ...`) come mid-session, before a possible `Login:`.
_FINAL_LINE = re.compile(
    r"(?:pop3|imap)-login: (?:\w+: )?(?:Login: |Disconnected|Aborted login).*?" + _RIP
)


class DovecotLog:
    """Dovecot's log from a byte offset on, parsed by client address."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self._partial = b""
        self.logins: set[str] = set()
        self.finished: set[str] = set()  # addresses whose final line was read
        self.lines: dict[str, list[str]] = {}

    def poll(self) -> bool:
        """Read what was appended; True if anything was."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return False
        if not data:
            return False
        self.offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        for raw in complete.split(b"\n"):
            line = raw.decode("utf-8", "replace")
            client = _CLIENT_LINE.search(line)
            if client is None:
                continue
            self.lines.setdefault(client.group(1), []).append(line)
            if final := _FINAL_LINE.search(line):
                self.finished.add(final.group(1))
            if login := _LOGIN_LINE.search(line):
                self.logins.add(login.group(1))
        return True

    def settle(self, addresses: Iterable[str]) -> None:
        """Wait until every address has its final line, or the log is quiet for LOG_QUIET s.

        An address may have no line at all (the proxy refused it, or never reached the
        backend): then the quiet period ends the wait.
        """
        waiting = set(addresses)
        deadline = time.monotonic() + LOG_DEADLINE
        quiet_since = time.monotonic()
        pause = 0.01
        while True:
            if self.poll():
                quiet_since = time.monotonic()
            waiting -= self.finished
            now = time.monotonic()
            if not waiting or now - quiet_since >= LOG_QUIET or now > deadline:
                return
            time.sleep(pause)  # a polling interval, not a timing assumption
            pause = min(pause * 2, 0.1)


# --- rounds and verdicts ---------------------------------------------------------------------


@dataclass
class Outcome:
    dialogue: Dialogue
    address: str
    transcript: Transcript
    recorded: bool
    logged_in: bool
    dovecot_lines: list[str]
    proxy_lines: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.recorded and not self.logged_in:
            return "FALSE RECORD"
        if self.logged_in and not self.recorded:
            return "MISSED RECORD"
        return "ok"

    @property
    def seen(self) -> bool:
        """Whether Dovecot logged anything for this address (a health check of the harness)."""
        return bool(self.dovecot_lines)

    def describe(self) -> str:
        parts = [
            f"{self.verdict}: {self.address} {self.dialogue.describe()}",
            f"  recorded={self.recorded} dovecot_login={self.logged_in}"
            f" ({self.transcript.seconds:.2f} s)",
            "  transcript (C: client, S: proxy):",
            self.transcript.render(),
        ]
        if self.dovecot_lines:
            parts.append("  dovecot:")
            parts += [f"    {line}" for line in self.dovecot_lines]
        if self.proxy_lines:
            parts.append("  relayproxy:")
            parts += [f"    {line}" for line in self.proxy_lines]
        return "\n".join(parts)


class HarnessError(RuntimeError):
    """The harness itself failed (daemon did not start or stop cleanly)."""


class Harness:
    """A real relayproxy (fresh per round) in front of a real Dovecot's haproxy listeners."""

    def __init__(self, dovecot: Dovecot, directory: Path, *, concurrency: int = 96) -> None:
        self.dovecot = dovecot
        self.directory = Path(directory)
        self.concurrency = concurrency
        self.rounds = itertools.count(1)

    def _daemon(self, directory: Path) -> tuple[Daemon, dict[str, int]]:
        directory.mkdir(parents=True)
        daemon = Daemon(directory)
        generous = {
            "proxy_protocol_out": "v2",
            "max_connections": "100000",
            "max_connections_per_ip": "1000",
        }
        ports = {
            "pop3": daemon.listener(
                "pop3",
                protocol="pop3",
                backend=f"127.0.0.1:{self.dovecot.ports.pop3_haproxy}",
                **generous,
            ),
            "imap": daemon.listener(
                "imap",
                protocol="imap",
                backend=f"127.0.0.1:{self.dovecot.ports.imap_haproxy}",
                **generous,
            ),
        }
        return daemon, ports

    def run(self, dialogues: Sequence[Dialogue], *, keep: bool = False) -> list[Outcome]:
        """One round: every dialogue from its own fresh address, then the verdicts."""
        addresses = fresh_addresses(len(dialogues))
        directory = self.directory / f"round-{next(self.rounds)}"
        log = DovecotLog(self.dovecot.log_path)
        daemon, ports = self._daemon(directory)
        daemon.start()
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                transcripts = list(
                    pool.map(
                        lambda pair: play(pair[0], pair[1], ports[pair[0].protocol]),
                        zip(dialogues, addresses, strict=True),
                    )
                )
        finally:
            # SIGTERM: the recorder drains into the store before the process exits.
            code = daemon.stop()
        if code != 0:
            raise HarnessError(f"relayproxy exited {code}:\n{daemon.log()[-4000:]}")
        recorded = set(daemon.entries())
        log.settle(addresses)
        outcomes = [
            Outcome(
                dialogue=dialogue,
                address=address,
                transcript=transcript,
                recorded=address in recorded,
                logged_in=address in log.logins,
                dovecot_lines=log.lines.get(address, []),
            )
            for dialogue, address, transcript in zip(dialogues, addresses, transcripts, strict=True)
        ]
        strangers = recorded - set(addresses)
        if strangers:
            raise HarnessError(f"relayers.db holds addresses no dialogue used: {sorted(strangers)}")
        failing = {o.address: o for o in outcomes if o.verdict != "ok"}
        if failing:
            for line in daemon.log().splitlines():
                client = re.search(r"\bclient=(\S+)", line)
                if client and client.group(1) in failing:
                    failing[client.group(1)].proxy_lines.append(line)
        elif not keep:
            shutil.rmtree(directory, ignore_errors=True)
        return outcomes


# --- the report --------------------------------------------------------------------------------

_COLUMNS = ("dialogues", "logins", "records", "false", "missed", "unseen", "errors")


@dataclass
class Tally:
    dialogues: int = 0
    logins: int = 0  # Dovecot logged a Login: for the address
    records: int = 0  # the address is in relayers.db
    false: int = 0
    missed: int = 0
    unseen: int = 0  # Dovecot logged nothing for the address (harness health)
    errors: int = 0  # the dialogue could not be played (connect failed)

    def add(self, outcome: Outcome) -> None:
        self.dialogues += 1
        self.logins += outcome.logged_in
        self.records += outcome.recorded
        self.false += outcome.verdict == "FALSE RECORD"
        self.missed += outcome.verdict == "MISSED RECORD"
        self.unseen += not outcome.seen
        self.errors += outcome.transcript.error is not None

    def row(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in _COLUMNS)


@dataclass
class Report:
    seeds: list[int] = field(default_factory=list)
    by_class: dict[str, Tally] = field(default_factory=dict)
    by_modifier: dict[str, Tally] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    failures: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    keep_failures: int = 200

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.total.add(outcome)
            self.by_class.setdefault(outcome.dialogue.kind, Tally()).add(outcome)
            for tag in outcome.dialogue.tags:
                self.by_modifier.setdefault(tag, Tally()).add(outcome)
            if outcome.verdict != "ok" and len(self.failures) < self.keep_failures:
                self.failures.append(outcome)

    @property
    def ok(self) -> bool:
        return self.total.false == 0 and self.total.missed == 0

    def table(self) -> str:
        def render(title: str, rows: dict[str, Tally], total: bool) -> list[str]:
            width = max([len(title), len("total"), *map(len, rows)])
            lines = [f"{title:<{width}}" + "".join(f"{c:>10}" for c in _COLUMNS)]
            for name in sorted(rows):
                lines.append(f"{name:<{width}}" + "".join(f"{v:>10}" for v in rows[name].row()))
            if total:
                lines.append(f"{'total':<{width}}" + "".join(f"{v:>10}" for v in self.total.row()))
            return lines

        rate = self.total.dialogues / self.seconds if self.seconds else 0.0
        head = (
            f"seeds {', '.join(map(str, self.seeds))}: {self.total.dialogues} dialogues"
            f" in {self.seconds:.1f} s ({rate:.0f}/s)"
        )
        return "\n".join(
            [
                head,
                *render("class", self.by_class, True),
                "",
                *render("modifier", self.by_modifier, False),
            ]
        )

    def failure_text(self, limit: int = 20) -> str:
        shown = self.failures[:limit]
        more = self.total.false + self.total.missed - len(shown)
        text = "\n\n".join(outcome.describe() for outcome in shown)
        return text + (f"\n\n... and {more} more" if more > 0 else "")


def fuzz(
    harness: Harness,
    seed: int,
    count: int,
    *,
    round_size: int = 5000,
    start: int = 0,
    classes: Sequence[str] = (),
    report: Report | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """``count`` generated dialogues (indices start..start+count) in rounds of ``round_size``."""
    report = report or Report()
    report.seeds.append(seed)
    began = time.monotonic()
    for first in range(start, start + count, round_size):
        last = min(first + round_size, start + count)
        dialogues = [generate(seed, index, classes) for index in range(first, last)]
        round_began = time.monotonic()
        outcomes = harness.run(dialogues)
        report.add(outcomes)
        if progress is not None:
            bad = [o for o in outcomes if o.verdict != "ok"]
            false = sum(o.verdict == "FALSE RECORD" for o in bad)
            took = time.monotonic() - round_began
            progress(
                f"seed {seed} dialogues {first}..{last - 1}: {took:.1f} s,"
                f" {false} false, {len(bad) - false} missed"
            )
    report.seconds += time.monotonic() - began
    return report


# --- generation: accounts and SASL -------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    user: bytes
    password: bytes


class Draws(random.Random):
    """A dialogue's random source, and its role.

    An attacker is given no valid credentials: the logins it tries are wrong (a blind
    mutation can still turn `alice2` into `alice`: Dovecot's log decides, not the role).
    A customer's logins are valid as often as its class says.
    """

    def __init__(self, seed: str) -> None:
        super().__init__(seed)
        self.attacker = self.random() < 0.5


def _wrong_account(rng: random.Random) -> Account:
    real = rng.choice(DEMO_USERS)
    if rng.random() < 0.6:
        other = next(u for u in DEMO_USERS if u.name != real.name)
        password = rng.choice(
            [b"wrong", other.password.encode(), real.password.upper().encode(), b"x", b""]
        )
        return Account(real.name.encode(), password)
    user = rng.choice([b"mallory", b"user0001", b"root", b"alice2", b"x"])
    return Account(user, real.password.encode())


def valid_account(rng: random.Random) -> Account:
    """A real account's credentials (an attacker's are wrong all the same)."""
    if getattr(rng, "attacker", False):
        return _wrong_account(rng)
    user = rng.choice(DEMO_USERS)
    return Account(user.name.encode(), user.password.encode())


def account(rng: random.Random, valid: float = 0.5) -> Account:
    """Valid credentials with probability ``valid``; else wrong, unknown or odd ones."""
    if getattr(rng, "attacker", False) or rng.random() >= valid:
        return _wrong_account(rng) if rng.random() < 0.75 else odd_account(rng)
    return valid_account(rng)


def odd_account(rng: random.Random) -> Account:
    """Names whose reading depends on the parser: case (Dovecot lowercases by default), a
    domain, spaces, quotes, backslashes, non-ASCII, NUL. An attacker gets a wrong password."""
    real = rng.choice(DEMO_USERS)
    name = real.name.encode()
    user = rng.choice(
        [
            name.upper(),
            name.capitalize(),
            name + b"@localhost",
            b" " + name,
            name + b" ",
            b'"' + name + b'"',
            name[:2] + b"\\" + name[2:],
            "al\u00efce".encode(),
            name + b"\x00x",
        ]
    )
    password = real.password.encode()
    if getattr(rng, "attacker", False):
        password += b"-wrong"
    else:
        password = rng.choice([password, password, password + b" ", b" " + password])
    return Account(user, password)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def sasl_ir(data: bytes) -> bytes:
    """An initial response: "=" stands for an empty one (RFC 4954, RFC 5034, RFC 4959)."""
    return b64(data) or b"="


def plain_payload(rng: random.Random, acct: Account) -> bytes:
    roll = rng.random()
    if roll < 0.75:
        return b"\0" + acct.user + b"\0" + acct.password
    if roll < 0.85:
        return acct.user + b"\0" + acct.user + b"\0" + acct.password
    if roll < 0.92:
        return b"bob\0" + acct.user + b"\0" + acct.password  # another authorisation identity
    return rng.choice([acct.user + b"\0" + acct.password, b"\0" + acct.user, b"", b"\0\0"])


_CHALLENGE = rb"^\+ ?[A-Za-z0-9+/=]+\r?\n"


def cram_response(acct: Account, mutate: Callable[[bytes], bytes] | None = None) -> Compute:
    def make(received: bytes) -> bytes:
        challenges = re.findall(rb"^\+ ?([A-Za-z0-9+/=]+)\r?$", received, re.MULTILINE)
        try:
            challenge = base64.b64decode(challenges[-1], validate=True) if challenges else b""
        except ValueError:
            challenge = b""
        digest = hmac.new(acct.password, challenge, hashlib.md5).hexdigest().encode()
        line = b64(acct.user + b" " + digest) + CRLF
        return mutate(line) if mutate else line

    return Compute("CRAM-MD5 response", make, _CHALLENGE)


def apop_command(
    acct: Account, *, upper: bool = False, mutate: Callable[[bytes], bytes] | None = None
) -> Compute:
    def make(received: bytes) -> bytes:
        stamp = re.search(rb"<[^<>\s]*>", received)
        digest = hashlib.md5((stamp.group(0) if stamp else b"") + acct.password).hexdigest()
        line = b"APOP " + acct.user + b" " + (digest.upper() if upper else digest).encode() + CRLF
        return mutate(line) if mutate else line

    return Compute("APOP digest", make, rb"<[^<>\s]*>", anywhere=True)


# --- generation: commands and rendering ---------------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    """One client command (or SASL line); ``wait``: the reply an interactive client awaits."""

    data: bytes | Compute
    wait: bytes | None


POP3_GREETING = rb"^[+-][^\n]*\n"
POP3_REPLY = rb"^[+-][^\n]*\n"
POP3_MULTILINE = rb"^\.\r?\n|^-ERR[^\n]*\n"
IMAP_GREETING = rb"^\* [^\n]*\n"
GREETING = {"pop3": POP3_GREETING, "imap": IMAP_GREETING}


def imap_done(tag: bytes) -> bytes:
    """The tagged completion, or an untagged BAD/BYE (what a refused tag gets)."""
    return rb"^" + re.escape(tag) + rb" [^\n]*\n|^\* (?:BAD|BYE)[^\n]*\n"


def imap_next(tag: bytes) -> bytes:
    """A continuation request, or the command's end."""
    return rb"^\+[^\n]*\n|" + imap_done(tag)


def _send(rng: random.Random, data: bytes, split: bool) -> Send:
    if not split or len(data) < 2:
        return Send(data)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    return Send(data, tuple(cuts), rng.choice([0.0, 0.0, 0.002, 0.01, 0.03]))


def render(
    rng: random.Random,
    protocol: str,
    cmds: Sequence[Cmd],
    *,
    mode: str | None = None,
    split: bool | None = None,
) -> tuple[list[Step], set[str]]:
    """Commands as steps, as some client would write them.

    interactive: wait for the greeting and for each reply, as a real client does;
    grouped: several commands per write, waiting only at the ends of groups;
    blast: everything in one write, often before the greeting.
    """
    mode = mode or rng.choices(["interactive", "grouped", "blast"], [70, 15, 15])[0]
    split = rng.random() < 0.25 if split is None else split
    tags = {mode} | ({"split"} if split else set())
    steps: list[Step] = []
    if mode != "blast" or rng.random() < 0.5:
        steps.append(Await(GREETING[protocol]))
    else:
        tags.add("before-greeting")
    pending = b""

    def flush() -> None:
        nonlocal pending
        if pending:
            steps.append(_send(rng, pending, split))
            pending = b""

    for cmd in cmds:
        if isinstance(cmd.data, Compute):
            flush()
            steps.append(cmd.data)
        else:
            pending += cmd.data
        if mode == "interactive" or (mode == "grouped" and rng.random() < 0.5):
            flush()
            if cmd.wait is not None:
                steps.append(Await(cmd.wait))
    flush()
    return steps, tags


def dialogue(
    rng: random.Random,
    protocol: str,
    kind: str,
    cmds: Sequence[Cmd],
    *,
    close: str = "drain",
    mode: str | None = None,
    split: bool | None = None,
    last_wait: bool = True,
) -> Dialogue:
    steps, tags = render(rng, protocol, cmds, mode=mode, split=split)
    if not last_wait and steps and isinstance(steps[-1], Await):
        steps.pop()  # close right after the last write
    if close != "drain":
        tags.add(f"close-{close}")
    return Dialogue(protocol, kind, (*steps, Close(close)), frozenset(tags))


def mutated(cmd: Cmd, rng: random.Random, mutation: Callable[[random.Random, bytes], bytes]) -> Cmd:
    """``cmd`` with ``mutation`` applied to its bytes; deterministic for computed bytes too."""
    seed = rng.random()
    if isinstance(cmd.data, Compute):
        inner = cmd.data

        def make(received: bytes) -> bytes:
            return mutation(random.Random(seed), inner.make(received))

        return Cmd(Compute(inner.label + " (mutated)", make, inner.need, inner.anywhere), cmd.wait)
    return Cmd(mutation(random.Random(seed), cmd.data), cmd.wait)


def _verb_end(body: bytes) -> int:
    space = body.find(b" ")
    return len(body) if space < 0 else space


_CONTROL = [b"\x00", b"\r", b"\n", b"\t", b"\x0b", b"\x0c", b"\x1b", b"\x7f", b"\x80", b"\xff"]


def control_bytes(rng: random.Random, data: bytes) -> bytes:
    """A control byte, bare CR or bare LF where the RFC grammar allows none."""
    body = data[:-2] if data.endswith(CRLF) else data
    end = _verb_end(body)
    kind = rng.randrange(12)
    if kind == 0:
        return b"\r" + data
    if kind == 1 and end > 1:
        at = rng.randrange(1, end)
        return body[:at] + b"\r" + body[at:] + CRLF
    if kind == 2:
        return body[:end] + b"\r" + body[end:] + CRLF
    if kind == 3:
        return body + b"\n"
    if kind == 4:
        return body + b"\r"
    if kind == 5:
        return body + b"\r\r\n"
    if kind == 6:
        return body + b"\n\r"
    if kind == 7:
        return body + b"\x00" + CRLF
    if kind == 8 and body:
        at = rng.randrange(len(body) + 1)
        return body[:at] + rng.choice([b"\r\n", b"\n", b"\r"]) + body[at:] + CRLF
    if kind == 9:
        return rng.choice([b"\x00", b" ", b"\t", b"\n"]) + data
    at = rng.randrange(len(body) + 1)
    return body[:at] + rng.choice(_CONTROL) + body[at:] + CRLF


def odd_whitespace(rng: random.Random, data: bytes) -> bytes:
    """Spaces and tabs where the grammar wants exactly one space, and case games."""
    body = data[:-2] if data.endswith(CRLF) else data
    spaces = [i for i, c in enumerate(body) if c == 0x20]
    kind = rng.randrange(8)
    if kind == 0 and spaces:
        at = rng.choice(spaces)
        return body[:at] + b" " + body[at:] + CRLF
    if kind == 1 and spaces:
        at = rng.choice(spaces)
        return body[:at] + b"\t" + body[at + 1 :] + CRLF
    if kind == 2:
        return body + rng.choice([b" ", b"\t", b"  "]) + CRLF
    if kind == 3:
        return rng.choice([b" ", b"\t"]) + data
    if kind == 4:
        end = _verb_end(body)
        return body[:end].lower() + body[end:] + CRLF
    if kind == 5:
        return body.swapcase() + CRLF
    if kind == 6 and spaces:
        return body.replace(b" ", b"  ") + CRLF
    return body + b" " + CRLF


def byte_mutation(rng: random.Random, data: bytes) -> bytes:
    """Blind mutations: flip, delete, duplicate, insert, swap, truncate."""
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        at = rng.randrange(len(out))
        kind = rng.randrange(6)
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[at]
        elif kind == 2:
            end = min(len(out), at + rng.randint(1, 8))
            out[at:at] = out[at:end]
        elif kind == 3:
            out[at:at] = bytes(rng.choice(b' \t\r\n\x00{}()[]"\\*+%0123456789') for _ in range(1))
        elif kind == 4 and at + 1 < len(out):
            out[at], out[at + 1] = out[at + 1], out[at]
        else:
            del out[at + 1 :]
    return bytes(out)


# --- generation: POP3 ----------------------------------------------------------------------------

POP3_FORMS = ("userpass", "apop", "plain-ir", "plain", "login", "login-ir", "cram")


def pop3_login(rng: random.Random, acct: Account, form: str) -> list[Cmd]:
    if form == "userpass":
        return [
            Cmd(b"USER " + acct.user + CRLF, POP3_REPLY),
            Cmd(b"PASS " + acct.password + CRLF, POP3_REPLY),
        ]
    if form == "apop":
        return [Cmd(apop_command(acct, upper=rng.random() < 0.1), POP3_REPLY)]
    if form == "plain-ir":
        return [Cmd(b"AUTH PLAIN " + sasl_ir(plain_payload(rng, acct)) + CRLF, POP3_REPLY)]
    if form == "plain":
        return [
            Cmd(b"AUTH PLAIN" + CRLF, POP3_REPLY),
            Cmd(b64(plain_payload(rng, acct)) + CRLF, POP3_REPLY),
        ]
    if form == "login":
        return [
            Cmd(b"AUTH LOGIN" + CRLF, POP3_REPLY),
            Cmd(b64(acct.user) + CRLF, POP3_REPLY),
            Cmd(b64(acct.password) + CRLF, POP3_REPLY),
        ]
    if form == "login-ir":
        return [
            Cmd(b"AUTH LOGIN " + sasl_ir(acct.user) + CRLF, POP3_REPLY),
            Cmd(b64(acct.password) + CRLF, POP3_REPLY),
        ]
    if form == "cram":
        return [Cmd(b"AUTH CRAM-MD5" + CRLF, None), Cmd(cram_response(acct), POP3_REPLY)]
    raise ValueError(form)


_POP3_NOISE = (
    (b"CAPA", POP3_MULTILINE),
    (b"NOOP", POP3_REPLY),
    (b"STAT", POP3_REPLY),
    (b"LIST", POP3_REPLY),
    (b"UIDL", POP3_REPLY),
    (b"RSET", POP3_REPLY),
    (b"TOP 1 0", POP3_REPLY),
    (b"STLS", POP3_REPLY),
    (b"UTF8", POP3_REPLY),
    (b"AUTH", POP3_MULTILINE),
    (b"USER", POP3_REPLY),
    (b"PASS", POP3_REPLY),
    (b"APOP", POP3_REPLY),
    (b"XCLIENT ADDR=192.0.2.1", POP3_REPLY),
    (b"HELP", POP3_REPLY),
    (b"", POP3_REPLY),
)


def pop3_noise(rng: random.Random, count: int = 1) -> list[Cmd]:
    picked = [rng.choice(_POP3_NOISE) for _ in range(count)]
    return [Cmd(line + CRLF, wait) for line, wait in picked]


_POP3_SERVER_TEXT = (
    b"+OK",
    b"+OK Logged in.",
    b"+OK Dovecot (Debian) ready. <1.2.3@host>",
    b"-ERR",
    b".",
    b"+ ",
    b"+",
    b"+OK\r\n.",
)


def _pop3_quit(rng: random.Random, cmds: list[Cmd], chance: float = 0.85) -> list[Cmd]:
    if rng.random() < chance:
        cmds.append(Cmd(rng.choice([b"QUIT", b"QUIT", b"quit"]) + CRLF, POP3_REPLY))
    return cmds


def _pop3_forms(kind: str, forms: Sequence[str]) -> Callable[[random.Random], Dialogue]:
    def generate_pop3(rng: random.Random) -> Dialogue:
        cmds = pop3_noise(rng, rng.randint(1, 2)) if rng.random() < 0.2 else []
        cmds += pop3_login(rng, account(rng), rng.choice(forms))
        if rng.random() < 0.2:
            cmds += pop3_noise(rng)
        return dialogue(rng, "pop3", kind, _pop3_quit(rng, cmds))

    return generate_pop3


def pop3_auth_cancel(rng: random.Random) -> Dialogue:
    acct = account(rng, valid=0.8)
    mechanism = rng.choice([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"plain"])
    cmds = [Cmd(b"AUTH " + mechanism + CRLF, POP3_REPLY)]
    if mechanism == b"LOGIN" and rng.random() < 0.5:
        cmds.append(Cmd(b64(acct.user) + CRLF, POP3_REPLY))
    cancel = rng.choice([b"*", b"*", b"*", b" *", b"* ", b"**", b"*" + b64(acct.password)])
    cmds.append(Cmd(cancel + CRLF, POP3_REPLY))
    if rng.random() < 0.7:
        cmds += pop3_login(rng, acct, rng.choice(POP3_FORMS))
    return dialogue(rng, "pop3", "pop3-auth-cancel", _pop3_quit(rng, cmds))


def pop3_pipelining(rng: random.Random) -> Dialogue:
    cmds = pop3_noise(rng, rng.randint(0, 3))
    cmds += pop3_login(rng, account(rng), rng.choice(POP3_FORMS))
    if rng.random() < 0.4:
        cmds += pop3_login(rng, account(rng), rng.choice(POP3_FORMS))
    cmds += pop3_noise(rng, rng.randint(0, 2))
    mode = rng.choice(["blast", "grouped"])
    return dialogue(rng, "pop3", "pop3-pipelining", _pop3_quit(rng, cmds), mode=mode)


def pop3_server_text(rng: random.Random) -> Dialogue:
    cmds = pop3_login(rng, account(rng), rng.choice(POP3_FORMS))
    for _ in range(rng.randint(1, 3)):
        text = Cmd(rng.choice(_POP3_SERVER_TEXT) + CRLF, POP3_REPLY)
        cmds.insert(rng.randint(0, len(cmds)), text)
    return dialogue(rng, "pop3", "pop3-server-text", _pop3_quit(rng, cmds))


def _pop3_mutated(
    kind: str, mutation: Callable[[random.Random, bytes], bytes], extra: Sequence[bytes] = ()
) -> Callable[[random.Random], Dialogue]:
    def generate_pop3(rng: random.Random) -> Dialogue:
        cmds = pop3_login(rng, account(rng, valid=0.8), rng.choice(POP3_FORMS))
        for _ in range(rng.choice([1, 1, 1, 2])):
            at = rng.randrange(len(cmds))
            cmds[at] = mutated(cmds[at], rng, mutation)
        if extra and rng.random() < 0.4:
            line = rng.choice(extra)
            cmds.insert(rng.randint(0, len(cmds)), Cmd(line, POP3_MULTILINE))
        if rng.random() < 0.3:
            cmds += pop3_login(rng, valid_account(rng), rng.choice(POP3_FORMS))
        return dialogue(rng, "pop3", kind, _pop3_quit(rng, cmds))

    return generate_pop3


_POP3_EMPTY_AUTH = (b"AUTH  \r\n", b"AUTH \r\r\n", b"AUTH  PLAIN\r\n", b"AUTH \t\r\n", b"AUTH \r\n")
_IMAP_EMPTY_AUTH = (
    b"AUTHENTICATE  PLAIN\r\n",
    b"AUTHENTICATE \r\n",
    b"AUTHENTICATE  \r\n",
    b"AUTHENTICATE\tPLAIN\r\n",
    b"LOGIN  \r\n",
    b"LOGIN \r\n",
)


def pop3_abrupt_close(rng: random.Random) -> Dialogue:
    cmds = pop3_noise(rng) if rng.random() < 0.2 else []
    login = pop3_login(rng, account(rng, valid=0.85), rng.choice(POP3_FORMS))
    if rng.random() < 0.25:
        login = login[: rng.randint(1, len(login))]  # leave in the middle of the exchange
    cmds += login
    close = rng.choice(["now", "shutdown", "rst"])
    return dialogue(rng, "pop3", "pop3-abrupt-close", cmds, close=close, last_wait=False)


# --- generation: IMAP ----------------------------------------------------------------------------

IMAP_FORMS = ("atom", "quoted", "literal", "literal+", "plain-ir", "plain", "login", "cram")
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}


def quoted(value: bytes, *, escape_all: bool = False) -> bytes:
    out = bytearray(b'"')
    for byte in value:
        if escape_all or byte in b'"\\':
            out += b"\\"
        out.append(byte)
    return bytes(out + b'"')


def imap_command(tag: bytes, words: bytes, args: Sequence[tuple[str, bytes]]) -> list[Cmd]:
    """A command as the client's writes: a synchronising literal ends a write (wait for +)."""
    cmds: list[Cmd] = []
    line = tag + b" " + words
    for form, value in args:
        line += b" "
        if form == "atom":
            line += value
        elif form == "quoted":
            line += quoted(value)
        elif form == "quoted-escaped":
            line += quoted(value, escape_all=True)
        elif form == "literal+":
            line += b"{%d+}\r\n" % len(value) + value
        elif form == "literal":
            cmds.append(Cmd(line + b"{%d}\r\n" % len(value), imap_next(tag)))
            line = value
        else:
            raise ValueError(form)
    cmds.append(Cmd(line + CRLF, imap_done(tag)))
    return cmds


def _string_form(rng: random.Random, value: bytes, form: str) -> str:
    if form == "atom" and (not value or _ATOM_SPECIALS.intersection(value)):
        return "quoted" if value and rng.random() < 0.5 else "atom"  # sometimes a bad atom
    if form == "quoted" and rng.random() < 0.15:
        return "quoted-escaped"  # escapes the RFC does not define: \a
    if form == "mixed":
        return rng.choice(["atom", "quoted", "literal", "literal+"])
    return form


def imap_login(rng: random.Random, acct: Account, form: str, tag: bytes) -> list[Cmd]:
    if form in ("atom", "quoted", "literal", "literal+", "mixed"):
        args = [
            (_string_form(rng, acct.user, form), acct.user),
            (_string_form(rng, acct.password, form), acct.password),
        ]
        verb = rng.choice([b"LOGIN", b"LOGIN", b"LOGIN", b"login", b"Login"])
        return imap_command(tag, verb, args)
    authenticate = tag + b" " + rng.choice([b"AUTHENTICATE", b"AUTHENTICATE", b"authenticate"])
    if form == "plain-ir":
        payload = sasl_ir(plain_payload(rng, acct))
        return [Cmd(authenticate + b" PLAIN " + payload + CRLF, imap_done(tag))]
    if form == "plain":
        return [
            Cmd(authenticate + b" PLAIN" + CRLF, imap_next(tag)),
            Cmd(b64(plain_payload(rng, acct)) + CRLF, imap_done(tag)),
        ]
    if form == "login":
        first = (
            [Cmd(authenticate + b" LOGIN " + sasl_ir(acct.user) + CRLF, imap_next(tag))]
            if rng.random() < 0.3
            else [
                Cmd(authenticate + b" LOGIN" + CRLF, imap_next(tag)),
                Cmd(b64(acct.user) + CRLF, imap_next(tag)),
            ]
        )
        return [*first, Cmd(b64(acct.password) + CRLF, imap_done(tag))]
    if form == "cram":
        return [
            Cmd(authenticate + b" CRAM-MD5" + CRLF, None),
            Cmd(cram_response(acct), imap_done(tag)),
        ]
    raise ValueError(form)


class Tags:
    """Ordinary client tags, distinct within a dialogue."""

    def __init__(self, rng: random.Random) -> None:
        self.prefix = rng.choice([b"a", b"A", b"t", b"x", b"", b"A00", b"tag."])
        self.numbers = itertools.count(rng.choice([0, 1, 1, 7, 1000]))

    def __call__(self) -> bytes:
        return self.prefix + str(next(self.numbers)).encode()


_IMAP_NOISE = (
    b"CAPABILITY",
    b"NOOP",
    b"ID NIL",
    b'ID ("name" "fuzz" "version" "1")',
    b"ENABLE CONDSTORE",
    b"STARTTLS",
    b"SELECT INBOX",
    b'LIST "" "*"',
    b"XUNKNOWN",
    b"LOGIN",
    b"AUTHENTICATE",
    b'ID ("name" {4+}\r\nfuzz)',
)


def imap_noise(rng: random.Random, tags: Tags, count: int = 1) -> list[Cmd]:
    out = []
    for _ in range(count):
        tag = tags()
        out.append(Cmd(tag + b" " + rng.choice(_IMAP_NOISE) + CRLF, imap_done(tag)))
    return out


def _imap_logout(
    rng: random.Random, tags: Tags, cmds: list[Cmd], chance: float = 0.85
) -> list[Cmd]:
    if rng.random() < chance:
        tag = tags()
        cmds.append(
            Cmd(tag + rng.choice([b" LOGOUT", b" LOGOUT", b" logout"]) + CRLF, imap_done(tag))
        )
    return cmds


def _imap_forms(kind: str, forms: Sequence[str]) -> Callable[[random.Random], Dialogue]:
    def generate_imap(rng: random.Random) -> Dialogue:
        tags = Tags(rng)
        cmds = imap_noise(rng, tags, rng.randint(1, 2)) if rng.random() < 0.2 else []
        cmds += imap_login(rng, account(rng), rng.choice(forms), tags())
        if rng.random() < 0.2:
            cmds += imap_noise(rng, tags)
        return dialogue(rng, "imap", kind, _imap_logout(rng, tags, cmds))

    return generate_imap


def imap_auth_cancel(rng: random.Random) -> Dialogue:
    tags = Tags(rng)
    acct = account(rng, valid=0.8)
    tag = tags()
    mechanism = rng.choice([b"PLAIN", b"LOGIN", b"CRAM-MD5"])
    cmds = [Cmd(tag + b" AUTHENTICATE " + mechanism + CRLF, imap_next(tag))]
    if mechanism == b"LOGIN" and rng.random() < 0.5:
        cmds.append(Cmd(b64(acct.user) + CRLF, imap_next(tag)))
    cancel = rng.choice([b"*", b"*", b"*", b" *", b"* ", b"**", tag + b" OK"])
    cmds.append(Cmd(cancel + CRLF, imap_done(tag)))
    if rng.random() < 0.7:
        cmds += imap_login(rng, acct, rng.choice(IMAP_FORMS), rng.choice([tag, tags()]))
    return dialogue(rng, "imap", "imap-auth-cancel", _imap_logout(rng, tags, cmds))


def imap_pipelining(rng: random.Random) -> Dialogue:
    tags = Tags(rng)
    cmds = imap_noise(rng, tags, rng.randint(0, 3))
    cmds += imap_login(rng, account(rng), rng.choice(IMAP_FORMS), tags())
    if rng.random() < 0.4:
        cmds += imap_login(rng, account(rng), rng.choice(IMAP_FORMS), tags())
    cmds += imap_noise(rng, tags, rng.randint(0, 2))
    mode = rng.choice(["blast", "grouped"])
    return dialogue(rng, "imap", "imap-pipelining", _imap_logout(rng, tags, cmds), mode=mode)


def _weird_tag(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"a]",
            b"]",
            b"*",
            b"+",
            b"a" * rng.randint(120, 200),
            b"a" * 126,
            b"a" * 127,
            b"a%",
            b"a(",
            b"a{",
            b"a}",
            b"a)",
            b'a"',
            b"a\\",
            b"a*",
            b"",
            b"A0001",
            b"1",
            b"*a",
            b"+a",
            b"a\x7f",
        ]
    )


def imap_tag_games(rng: random.Random) -> Dialogue:
    tags = Tags(rng)
    acct = account(rng, valid=0.7)
    game = rng.randrange(5)
    if game == 0:  # the login itself behind a strange tag
        cmds = imap_login(rng, acct, rng.choice(IMAP_FORMS), _weird_tag(rng))
    elif game == 1:  # another command and the login share a tag
        tag = rng.choice([tags(), _weird_tag(rng)])
        cmds = [Cmd(tag + b" " + rng.choice(_IMAP_NOISE) + CRLF, imap_done(tag))]
        cmds += imap_login(rng, acct, rng.choice(IMAP_FORMS), tag)
    elif game == 2:  # two logins with one tag: a failure, then the real one
        tag = rng.choice([tags(), _weird_tag(rng)])
        cmds = imap_login(rng, account(rng, valid=0.0), rng.choice(IMAP_FORMS), tag)
        cmds += imap_login(rng, acct, rng.choice(IMAP_FORMS), tag)
    elif game == 3:  # a refused tag hiding a literal that is a login (issue 9, item 5)
        inner_tag = tags()
        inner = b"%s LOGIN %s %s\r\n" % (inner_tag, acct.user, acct.password)
        plus = rng.choice([b"+", b"+", b""])
        line = _weird_tag(rng) + b" LOGIN x {%d%s}\r\n" % (len(inner), plus) + inner + CRLF
        cmds = [Cmd(line, imap_done(inner_tag))]
    else:  # a strange-tagged command first, then an ordinary login
        weird = _weird_tag(rng)
        cmds = [Cmd(weird + b" " + rng.choice(_IMAP_NOISE) + CRLF, imap_done(weird))]
        cmds += imap_login(rng, acct, rng.choice(IMAP_FORMS), tags())
    return dialogue(rng, "imap", "imap-tag-games", _imap_logout(rng, tags, cmds))


# Commands that carry a literal they do not take. Dovecot completes `ID NIL` before it reads
# the literal, then runs the literal's lines as commands: weighted up.
_LITERAL_CARRIERS = (
    *[b"ID NIL"] * 6,
    b"ID NIL NIL",
    b"ID NIL x",
    b"NOOP",
    b"CAPABILITY",
    b"LOGIN x",
    b"LOGIN",
    b"ID",
    b'ID ("name"',
    b"ENABLE",
    b"STARTTLS",
    b"AUTHENTICATE PLAIN",
    b"LOGIN {1+}\r\nx",
)


def imap_literal_games(rng: random.Random) -> Dialogue:
    """Literals whose contents are command lines, after commands that take no literal,
    with sizes that are wrong (issue 9, item 2 is one of these)."""
    tags = Tags(rng)
    acct = account(rng, valid=0.6)
    outer = rng.choice([tags(), b"a"])
    lines = []
    for _ in range(rng.randint(1, 3)):
        pick = rng.choices(range(5), [2, 2, 3, 1, 1])[0]
        if pick == 0:
            lines.append(b"%s LOGIN %s %s\r\n" % (tags(), acct.user, acct.password))
        elif pick == 1:
            lines.append(b"%s LOGIN x y\r\n" % tags())
        elif pick == 2:  # a command Dovecot completes with the outer tag
            lines.append(outer + rng.choice([b" NOOP", b" CAPABILITY", b" ID NIL"]) + CRLF)
        elif pick == 3:
            lines.append(outer + b" OK LOGIN completed\r\n")
        else:
            lines.append(CRLF)
    payload = b"".join(lines)
    delta = rng.choice([0, 0, 0, 0, -1, 1, -2, 2, -len(payload)])
    size = max(0, len(payload) + delta)
    if rng.random() < 0.05:
        size = rng.choice([4294967296, 99999999, 2**63])
    marker = rng.choice([b"+", b"+", b""])
    carrier = rng.choice(_LITERAL_CARRIERS)
    head = outer + b" " + carrier + b" {%d%s}\r\n" % (size, marker)
    if not marker and rng.random() < 0.5:  # as a client that waits for the server's "+"
        cmds = [Cmd(head, imap_next(outer)), Cmd(payload + CRLF, imap_done(outer))]
    else:
        cmds = [Cmd(head + payload + CRLF, imap_done(outer))]
    if rng.random() < 0.6:  # then a login with the tag the literal's lines used
        cmds += imap_login(rng, account(rng, valid=0.3), rng.choice(IMAP_FORMS), outer)
    return dialogue(rng, "imap", "imap-literal-games", _imap_logout(rng, tags, cmds))


def imap_server_text(rng: random.Random) -> Dialogue:
    tags = Tags(rng)
    tag = tags()
    cmds = imap_login(rng, account(rng), rng.choice(IMAP_FORMS), tag)
    texts = [
        b"* OK",
        b"* PREAUTH ready",
        b"+ ",
        b"+",
        b"* BYE",
        b"* CAPABILITY IMAP4rev1",
        tag + b" OK LOGIN completed",
        tag + b" OK [CAPABILITY IMAP4rev1] Logged in",
        b"a OK LOGIN completed",
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.",
    ]
    for _ in range(rng.randint(1, 3)):
        cmds.insert(rng.randint(0, len(cmds)), Cmd(rng.choice(texts) + CRLF, imap_done(tag)))
    return dialogue(rng, "imap", "imap-server-text", _imap_logout(rng, tags, cmds))


def _imap_mutated(
    kind: str, mutation: Callable[[random.Random, bytes], bytes], extra: Sequence[bytes] = ()
) -> Callable[[random.Random], Dialogue]:
    def generate_imap(rng: random.Random) -> Dialogue:
        tags = Tags(rng)
        cmds = imap_login(rng, account(rng, valid=0.8), rng.choice(IMAP_FORMS), tags())
        for _ in range(rng.choice([1, 1, 1, 2])):
            at = rng.randrange(len(cmds))
            cmds[at] = mutated(cmds[at], rng, mutation)
        if extra and rng.random() < 0.4:
            tag = tags()
            line = tag + b" " + rng.choice(extra)
            cmds.insert(rng.randint(0, len(cmds)), Cmd(line, imap_next(tag)))
        if rng.random() < 0.3:
            cmds += imap_login(rng, valid_account(rng), rng.choice(IMAP_FORMS), tags())
        return dialogue(rng, "imap", kind, _imap_logout(rng, tags, cmds))

    return generate_imap


def imap_abrupt_close(rng: random.Random) -> Dialogue:
    tags = Tags(rng)
    cmds = imap_noise(rng, tags) if rng.random() < 0.2 else []
    login = imap_login(rng, account(rng, valid=0.85), rng.choice(IMAP_FORMS), tags())
    if rng.random() < 0.25:
        login = login[: rng.randint(1, len(login))]
    cmds += login
    close = rng.choice(["now", "shutdown", "rst"])
    return dialogue(rng, "imap", "imap-abrupt-close", cmds, close=close, last_wait=False)


# --- the class table ------------------------------------------------------------------------------

CLASSES: dict[str, Callable[[random.Random], Dialogue]] = {
    "pop3-userpass": _pop3_forms("pop3-userpass", ["userpass"]),
    "pop3-apop": _pop3_forms("pop3-apop", ["apop"]),
    "pop3-auth-plain": _pop3_forms("pop3-auth-plain", ["plain-ir", "plain"]),
    "pop3-auth-login": _pop3_forms("pop3-auth-login", ["login", "login-ir"]),
    "pop3-auth-cram": _pop3_forms("pop3-auth-cram", ["cram"]),
    "pop3-auth-cancel": pop3_auth_cancel,
    "pop3-pipelining": pop3_pipelining,
    "pop3-server-text": pop3_server_text,
    "pop3-control-bytes": _pop3_mutated("pop3-control-bytes", control_bytes),
    "pop3-whitespace": _pop3_mutated("pop3-whitespace", odd_whitespace, _POP3_EMPTY_AUTH),
    "pop3-mutant": _pop3_mutated("pop3-mutant", byte_mutation),
    "pop3-abrupt-close": pop3_abrupt_close,
    "imap-login-atom": _imap_forms("imap-login-atom", ["atom"]),
    "imap-login-quoted": _imap_forms("imap-login-quoted", ["quoted"]),
    "imap-login-literal": _imap_forms("imap-login-literal", ["literal", "literal+", "mixed"]),
    "imap-auth-plain": _imap_forms("imap-auth-plain", ["plain-ir", "plain"]),
    "imap-auth-login": _imap_forms("imap-auth-login", ["login"]),
    "imap-auth-cram": _imap_forms("imap-auth-cram", ["cram"]),
    "imap-auth-cancel": imap_auth_cancel,
    "imap-pipelining": imap_pipelining,
    "imap-tag-games": imap_tag_games,
    "imap-literal-games": imap_literal_games,
    "imap-server-text": imap_server_text,
    "imap-control-bytes": _imap_mutated("imap-control-bytes", control_bytes),
    "imap-whitespace": _imap_mutated("imap-whitespace", odd_whitespace, _IMAP_EMPTY_AUTH),
    "imap-mutant": _imap_mutated("imap-mutant", byte_mutation),
    "imap-abrupt-close": imap_abrupt_close,
}
_CLASS_NAMES = sorted(CLASSES)


def generate(seed: int, index: int, classes: Sequence[str] = ()) -> Dialogue:
    """Dialogue number ``index`` of ``seed`` (among ``classes``, default all): the same
    bytes plan every time."""
    rng = Draws(f"{seed}:{index}")
    kind = rng.choice(sorted(classes) or _CLASS_NAMES)
    made = CLASSES[kind](rng)
    tags = made.tags | {"attacker" if rng.attacker else "customer"}
    return Dialogue(made.protocol, made.kind, made.steps, tags, f"{seed}:{index}")


# --- command line: `make fuzz` ----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.differential",
        description="Fuzz relayproxy against a real Dovecot: false and missed records.",
    )
    parser.add_argument("--count", type=int, default=100_000, help="dialogues (default 100000)")
    parser.add_argument("--seed", type=int, help="default: a random one, printed")
    parser.add_argument("--round", type=int, default=5000, help="dialogues per daemon run")
    parser.add_argument("--concurrency", type=int, default=96)
    parser.add_argument("--replay", help="only these indices of --seed (comma-separated)")
    parser.add_argument("--classes", default="", help="only these classes (comma-separated)")
    parser.add_argument("--show", type=int, default=20, help="failing dialogues to print")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    classes = [name for name in options.classes.split(",") if name]
    if unknown := set(classes) - set(CLASSES):
        parser.error(f"unknown classes: {', '.join(sorted(unknown))}; known: {', '.join(CLASSES)}")
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "big")
    work = Path(tempfile.mkdtemp(prefix="relayproxy-fuzz-"))
    work.chmod(0o755)
    print(f"seed {seed}; work directory {work}", flush=True)
    keep = options.keep
    try:
        with running_dovecot(work / "dovecot") as dovecot:
            harness = Harness(dovecot, work / "rounds", concurrency=options.concurrency)
            if options.replay:
                indices = [int(i) for i in options.replay.split(",")]
                report = Report(seeds=[seed])
                began = time.monotonic()
                outcomes = harness.run([generate(seed, i, classes) for i in indices], keep=True)
                report.seconds = time.monotonic() - began
                report.add(outcomes)
                for outcome in outcomes:
                    print(outcome.describe(), end="\n\n")
            else:
                report = fuzz(
                    harness,
                    seed,
                    options.count,
                    round_size=options.round,
                    classes=classes,
                    progress=lambda text: print(text, file=sys.stderr, flush=True),
                )
                if not report.ok:
                    print(report.failure_text(options.show), end="\n\n")
        print(report.table())
        if not report.ok:
            keep = True
            total = report.total
            print(f"\nFAILED: {total.false} false records, {total.missed} missed records")
            print(f"replay one: python -m tests.differential --seed {seed} --replay INDEX")
        return 0 if report.ok else 1
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
