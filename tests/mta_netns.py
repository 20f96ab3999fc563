"""Run an MTA in a private network and mount namespace and talk SMTP to it.

Started by tests/test_mta_recipes.py as

    unshare --net --mount python tests/mta_netns.py --etc DIR --server ADDR... MODE -- ARGV...

It brings up the loopback of the new network namespace, adds the server
addresses to it, bind-mounts ``DIR/passwd`` and ``DIR/group`` over the
system's (the MTA users exist only in this mount namespace), and starts the
MTA:

* ``exim``: ``ARGV -bs`` per connection, with the accepted socket as stdin
  and stdout, as inetd runs it; Exim takes the client address from
  getpeername() as it does for a real connection.
* ``postfix``: ``ARGV`` is the master daemon, kept in the foreground; the
  SMTP server is whatever its master.cf makes listen on port 25.

Then it reads commands on stdin, one a line: ``SOURCE RECIPIENT``. For each
it adds SOURCE to the loopback (once), connects from SOURCE to the server
address of the same family, port 25, says EHLO, MAIL FROM and RCPT TO and
QUIT, and prints one JSON line: the list of the last reply line to each
step (banner first). Nothing here knows about relayers.db.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

SMTP_PORT = 25


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)}: {result.stderr.strip()}")


def add_address(address: str) -> None:
    if ipaddress.ip_address(address).version == 6:
        run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
    else:
        run("ip", "addr", "add", f"{address}/32", "dev", "lo")


def read_reply(stream: socket.SocketIO) -> str:
    """The last line of one (possibly multi-line) SMTP reply."""
    buffered = b""
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = stream.read(1)
            if not chunk:
                return (buffered + line).decode(errors="replace").strip() or "(connection closed)"
            line += chunk
        if line[3:4] != b"-":
            return line.decode(errors="replace").rstrip("\r\n")
        buffered = line


class Server:
    def __init__(self, mode: str, argv: list[str], servers: dict[int, str]) -> None:
        self.mode = mode
        self.argv = argv
        self.servers = servers
        self.master: subprocess.Popen[bytes] | None = None
        # exim: our own listening sockets, one connection (and one exim) at a time.
        self.listeners: dict[int, socket.socket] = {}
        if mode == "exim":
            for family, address in servers.items():
                listener = socket.socket(family)
                listener.bind((address, SMTP_PORT))
                listener.listen(1)
                self.listeners[family] = listener
        if mode == "postfix":
            # Its own session: on SIGTERM the master kills its process group.
            self.master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_for_listener()

    def _wait_for_listener(self) -> None:
        deadline = time.monotonic() + 20
        for address in self.servers.values():
            while True:
                with contextlib.suppress(OSError), socket.create_connection((address, SMTP_PORT)):
                    break
                if self.master is not None and self.master.poll() is not None:
                    sys.exit(f"postfix master exited with status {self.master.returncode}")
                if time.monotonic() > deadline:
                    sys.exit(f"nothing listens on [{address}]:{SMTP_PORT}")
                time.sleep(0.05)

    def dialogue(self, source: str, recipient: str) -> list[str]:
        family = socket.AF_INET6 if ipaddress.ip_address(source).version == 6 else socket.AF_INET
        client = socket.socket(family)
        client.bind((source, 0))
        client.settimeout(20)
        client.connect((self.servers[family], SMTP_PORT))
        process: subprocess.Popen[bytes] | None = None
        if self.mode == "exim":
            accepted, _ = self.listeners[family].accept()
            process = subprocess.Popen([*self.argv, "-bs"], stdin=accepted, stdout=accepted)
            accepted.close()
        stream = socket.SocketIO(client, "rwb")
        replies = [read_reply(stream)]
        for command in ("EHLO client.example", "MAIL FROM:<sender@client.example>"):
            stream.write(f"{command}\r\n".encode())
            replies.append(read_reply(stream))
        stream.write(f"RCPT TO:<{recipient}>\r\n".encode())
        replies.append(read_reply(stream))
        stream.write(b"QUIT\r\n")
        replies.append(read_reply(stream))
        client.close()
        if process is not None:
            process.wait(timeout=20)
        return replies

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        if self.master is not None:
            self.master.terminate()
            self.master.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etc", required=True, help="directory with passwd and group")
    parser.add_argument("--server", action="append", required=True, help="server address")
    parser.add_argument("mode", choices=("exim", "postfix"))
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()

    run("ip", "link", "set", "lo", "up")
    servers: dict[int, str] = {}
    for address in args.server:
        add_address(address)
        version = ipaddress.ip_address(address).version
        servers[socket.AF_INET6 if version == 6 else socket.AF_INET] = address
    for name in ("passwd", "group"):
        run("mount", "--bind", os.path.join(args.etc, name), f"/etc/{name}")

    server = Server(args.mode, args.argv, servers)
    sources: set[str] = set()
    print(json.dumps("ready"), flush=True)
    try:
        for line in sys.stdin:
            source, recipient = line.split()
            if source not in sources:
                add_address(source)
                sources.add(source)
            print(json.dumps(server.dialogue(source, recipient)), flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    main()
