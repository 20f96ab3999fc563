"""A stub POP3/IMAP backend for the benchmarks: it accepts every login.

FOR BENCHMARKS ONLY. It is not a mail server and never a stand-in for Dovecot
in tests of behaviour: it answers a handful of commands with fixed lines so
that a proxy in front of it, not the backend, is what a benchmark measures
(`bench/logins.py`, `bench/memory.py`). Its own CPU is reported by them, so a
reader can see it is not the bottleneck.

What it speaks, one asyncio Protocol per connection, no parsing beyond the verb:

* POP3: greeting `+OK`; USER, PASS (any: `+OK Logged in.`), STAT (`+OK 0 0`),
  CAPA, NOOP, RSET; QUIT answers `+OK` and closes; anything else `-ERR`.
* IMAP: greeting `* OK [CAPABILITY ...]`; CAPABILITY, LOGIN (any: tagged OK),
  SELECT/EXAMINE (an empty mailbox), NOOP, ID; LOGOUT answers `* BYE` and the
  tagged OK and closes; anything else tagged BAD. Literals are not supported.

It listens on loopback, on the ports given (0: the kernel picks), and prints
one line `pop3=PORT imap=PORT` on stdout once it accepts; SIGTERM or SIGINT
stops it.

    .venv/bin/python bench/stub_backend.py [--host 127.0.0.1] [--pop3 PORT] [--imap PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

MAX_LINE = 8192

POP3_GREETING = b"+OK stub ready.\r\n"
POP3_REPLIES = {
    b"USER": b"+OK\r\n",
    b"PASS": b"+OK Logged in.\r\n",
    b"STAT": b"+OK 0 0\r\n",
    b"NOOP": b"+OK\r\n",
    b"RSET": b"+OK\r\n",
    b"CAPA": b"+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n",
}
POP3_QUIT = b"+OK Logging out.\r\n"
POP3_UNKNOWN = b"-ERR Unknown command.\r\n"

CAPABILITIES = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN"
IMAP_GREETING = b"* OK [CAPABILITY " + CAPABILITIES + b"] stub ready.\r\n"
IMAP_SELECT = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Limited\r\n"
    b"* 0 EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1] UIDs valid\r\n"
    b"* OK [UIDNEXT 1] Predicted next UID\r\n"
)
# verb -> (untagged lines, tagged text after "TAG ")
IMAP_REPLIES = {
    b"CAPABILITY": (b"* CAPABILITY " + CAPABILITIES + b"\r\n", b"OK Capability completed.\r\n"),
    b"LOGIN": (b"", b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
    b"SELECT": (IMAP_SELECT, b"OK [READ-WRITE] Select completed.\r\n"),
    b"EXAMINE": (IMAP_SELECT, b"OK [READ-ONLY] Examine completed.\r\n"),
    b"NOOP": (b"", b"OK NOOP completed.\r\n"),
    b"ID": (b'* ID ("name" "stub")\r\n', b"OK ID completed.\r\n"),
}
IMAP_LOGOUT = (b"* BYE Logging out\r\n", b"OK Logout completed.\r\n")


class LineServer(asyncio.Protocol):
    """Splits the input into lines; `line()` answers each."""

    greeting = b""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer + data if self.buffer else data
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end], buffer[end + 1 :]
            if not self.line(line.rstrip(b"\r")):
                self.transport.close()
                return
        if len(buffer) > MAX_LINE:
            self.transport.close()
            return
        self.buffer = buffer

    def line(self, line: bytes) -> bool:
        """Answer one line; False closes the connection."""
        raise NotImplementedError


class Pop3Stub(LineServer):
    greeting = POP3_GREETING

    def line(self, line: bytes) -> bool:
        assert self.transport is not None
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"QUIT":
            self.transport.write(POP3_QUIT)
            return False
        self.transport.write(POP3_REPLIES.get(verb, POP3_UNKNOWN))
        return True


class ImapStub(LineServer):
    greeting = IMAP_GREETING

    def line(self, line: bytes) -> bool:
        assert self.transport is not None
        parts = line.split(b" ", 2)
        tag = parts[0] or b"*"
        verb = parts[1].upper() if len(parts) > 1 else b""
        if verb == b"LOGOUT":
            self.transport.write(IMAP_LOGOUT[0] + tag + b" " + IMAP_LOGOUT[1])
            return False
        reply = IMAP_REPLIES.get(verb)
        if reply is None:
            self.transport.write(tag + b" BAD Unknown command.\r\n")
        else:
            self.transport.write(reply[0] + tag + b" " + reply[1])
        return True


async def serve(host: str, pop3_port: int, imap_port: int) -> None:
    loop = asyncio.get_running_loop()
    pop3 = await loop.create_server(Pop3Stub, host, pop3_port, backlog=4096)
    imap = await loop.create_server(ImapStub, host, imap_port, backlog=4096)
    ports = [server.sockets[0].getsockname()[1] for server in (pop3, imap)]
    print(f"pop3={ports[0]} imap={ports[1]}", flush=True)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    pop3.close()
    imap.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pop3", type=int, default=0, help="POP3 port (0: any free one)")
    parser.add_argument("--imap", type=int, default=0, help="IMAP port (0: any free one)")
    options = parser.parse_args(argv)
    asyncio.run(serve(options.host, options.pop3, options.imap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
