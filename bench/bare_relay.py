"""A bare Twisted TCP relay, the floor relayproxy is measured against (issue 13).

`twisted.protocols.portforward` on Twisted's epoll reactor (relayproxy's
default on Linux) and nothing else: no protocol parsing, no logging, no
recording. `bench/logins.py` and `bench/memory.py` start it as a subprocess
and read its CPU (/proc/PID/stat) and memory (/proc/PID/status) like
relayproxy's, so the difference between the two is relayproxy's own work.

For each BACKEND (host:port) it listens on a free loopback port and prints one
line `ports=P1,P2,...` (in the order given) on stdout once it accepts;
SIGTERM stops it.

    .venv/bin/python bench/bare_relay.py [--host 127.0.0.1] BACKEND [BACKEND ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted.internet import epollreactor

if "twisted.internet.reactor" not in sys.modules:  # bench/harness.py's uvloop prelude ran
    epollreactor.install()  # type: ignore[no-untyped-call]

from twisted.internet import reactor
from twisted.protocols.portforward import ProxyFactory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="where to listen")
    parser.add_argument("backends", nargs="+", metavar="BACKEND", help="host:port")
    options = parser.parse_args(argv)
    ports: list[int] = []
    for backend in options.backends:
        host, _, port = backend.rpartition(":")
        factory = ProxyFactory(host, int(port))
        listening = reactor.listenTCP(0, factory, backlog=4096, interface=options.host)  # type: ignore[arg-type]
        ports.append(listening.getHost().port)  # type: ignore[attr-defined]
    print(f"ports={','.join(map(str, ports))}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
