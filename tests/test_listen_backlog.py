"""A burst of connects is queued by the kernel, not dropped: the listeners' backlog.

With Twisted's default of 50, 100 clients connecting at once overflowed the
accept queue and each dropped SYN cost its client a 1 s retry. ``ss`` shows a
listening socket's backlog in its Send-Q column.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relayproxy.service import LISTEN_BACKLOG
from tests.daemon import Daemon


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_each_listener_queues_a_burst_of_connects(daemon: Daemon) -> None:
    port = daemon.listener("pop3", protocol="pop3", backend="127.0.0.1:9")
    daemon.start()
    listing = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listing[0] == "LISTEN", listing
    assert int(listing[2]) == min(LISTEN_BACKLOG, somaxconn) > 50
