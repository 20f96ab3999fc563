"""relayproxy-map with the MTAs' own binaries: sendmail's socket map, Postfix's socketmap.

The recipes (config/sendmail/relayproxy-socketmap.mc and
config/postfix/socketmap.cf.fragment) are used verbatim but for the port.
The machinery (sendmail.cf from m4, `sendmail -bt`, Postfix unpacked from
its .deb, a real master + smtpd in a private network namespace) is
tests/test_mta_recipes.py's. What is asserted is what the MTA answers.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo.redis_servers import RedisServer
from relayproxy.store import RelayStore
from tests.daemon import free_port, wait_for
from tests.map_daemon import MapDaemon
from tests.test_mta_recipes import (
    CONFIG,
    POSTFIX_DENIED,
    RELAY_DENIED,
    MtaUsers,
    NetnsMTA,
    _library_path,
    build_sendmail_cf,
    check_rcpt,
    minimal_postfix_config,
    mta_root,
    mta_users,
    open_tmp,
    postfix_instance,
    sendmail_test_mode,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (namespaces, bind mounts, MTA privileges)"
)

# The fixtures come from test_mta_recipes (imported, not copied).
__all__ = ["mta_root", "mta_users", "open_tmp"]

RECIPE_PORT = "7340"
DEFERRED = '$# error $@ 4 . 3 . 0 $: "451 Relay check failed temporarily, try again later"'
DAY = 86400


def socketmap_recipe(relative: str, port: int) -> str:
    """A recipe of config/, its map server's port (7340) replaced by ``port``."""
    text = (CONFIG / relative).read_text()
    active = "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith(("#", "dnl"))
    )
    spellings = (f"inet:{RECIPE_PORT}@127.0.0.1", f"inet:127.0.0.1:{RECIPE_PORT}")
    assert any(s in active for s in spellings), f"{relative} does not use port {RECIPE_PORT}"
    for spelling in spellings:
        text = text.replace(spelling, spelling.replace(RECIPE_PORT, str(port)))
    return text


@pytest.fixture
def map_daemon(tmp_path: Path) -> Iterator[MapDaemon]:
    server = MapDaemon(tmp_path / "map")
    server.directory.mkdir()
    yield server
    if server.process is not None and server.process.poll() is None:
        assert server.stop() == 0, server.log()


def record(db: Path, *items: tuple[str, int]) -> None:
    RelayStore(db).record(items)


# --------------------------------------------------------------------------
# sendmail


def test_sendmail_is_built_with_socketmap() -> None:
    if shutil.which("sendmail") is None:
        pytest.skip("needs sendmail-bin")
    # A qualified host name spares sendmail its 60 s wait for one (as sendmail_test_mode).
    result = subprocess.run(
        ["unshare", "--uts", "sh", "-c", "hostname mta.relayproxy.test && sendmail -d0.1 -bv root"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(r"\bSOCKETMAP\b", result.stdout), result.stdout


def socketmap_cf(directory: Path, port: int) -> Path:
    """sendmail.cf with config/sendmail/relayproxy-socketmap.mc, asking ``port``."""
    lines = socketmap_recipe("sendmail/relayproxy-socketmap.mc", port)
    cf = build_sendmail_cf(directory, directory / "unused", lines=lines)
    assert f"Kdrac socket inet:{port}@127.0.0.1\n" in cf.read_text()
    return cf


@pytest.mark.parametrize("ipv6_keys", ["sendmail", "postfix"])
def test_sendmail_drac_relays_through_the_map_server(
    map_daemon: MapDaemon, open_tmp: Path, ipv6_keys: str
) -> None:
    now = int(time.time())
    ipv6_key = "ipv6:2001:db8:0:0:0:0:0:7" if ipv6_keys == "sendmail" else "2001:db8::7"
    record(map_daemon.db, ("192.0.2.7", now - 60), (ipv6_key, now), ("192.0.2.8", now - DAY))
    map_daemon.store["ipv6_keys"] = ipv6_keys
    map_daemon.start()
    cf = socketmap_cf(open_tmp, map_daemon.port)
    clients = (
        "192.0.2.7",
        "IPv6:2001:db8:0:0:0:0:0:7",  # ${client_addr} as sendmail sets it
        "192.0.2.8",  # recorded a day ago: past max_age
        "192.0.2.9",
        "IPv6:2001:db8:0:0:0:0:0:9",
    )
    assert check_rcpt(cf, *clients) == ["RELAY", "RELAY", *[RELAY_DENIED] * 3]

    # The map server gone: the relayed recipient is deferred, never relayed.
    assert map_daemon.stop() == 0
    assert check_rcpt(cf, "192.0.2.7", "192.0.2.9") == [DEFERRED, DEFERRED]


def test_sendmail_drac_with_minus_T_would_relay_everyone_while_the_server_is_down(
    open_tmp: Path,
) -> None:
    """Why the drac map has no -T<TMPF>: FEATURE(drac) relays for any map result."""
    nobody = free_port()
    lines = f"FEATURE(`drac', `socket -T<TMPF> inet:{nobody}@127.0.0.1')dnl\n"
    cf = build_sendmail_cf(open_tmp, open_tmp / "unused", lines=lines)
    assert check_rcpt(cf, "192.0.2.9") == ["RELAY"]


def test_sendmail_without_the_deferring_rules_denies_while_the_server_is_down(
    open_tmp: Path,
) -> None:
    recipe = socketmap_recipe("sendmail/relayproxy-socketmap.mc", free_port())
    drac_only = recipe.split("LOCAL_CONFIG", 1)[0]
    cf = build_sendmail_cf(open_tmp, open_tmp / "unused", lines=drac_only)
    assert check_rcpt(cf, "192.0.2.7") == [RELAY_DENIED]


def test_sendmail_defers_only_relayed_mail_while_the_store_answers_temp(
    map_daemon: MapDaemon, open_tmp: Path, redis_server: RedisServer
) -> None:
    map_daemon.store.update({"backend": "redis", "redis_url": redis_server.url})
    redis_server.stop()
    map_daemon.start()
    cf = socketmap_cf(open_tmp, map_daemon.port)
    assert check_rcpt(cf, "192.0.2.7") == [DEFERRED]
    wait_for("map.store_failed", lambda: map_daemon.log_lines("map.store_failed"))
    # Mail for this host, and local submissions, are not held up by the store.
    commands = [".D{client_addr}192.0.2.7", "check_rcpt <root@mta.relayproxy.test>"]
    commands += [".D{client_addr}", "check_rcpt <user@remote.example>"]
    output = sendmail_test_mode(cf, commands)
    answers = re.findall(r"^check_rcpt +returns: (.*)$", output, re.MULTILINE)
    assert answers == ["RELAY", "RELAY"], output


def sendmail_smtp(cf: Path, source: str, recipient: str) -> str:
    """sendmail -bs on a TCP connection from ``source`` (a 127/8 address): the RCPT reply.

    sendmail takes ${client_addr} from the socket it is given, as under inetd.
    """
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.bind((source, 0))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        command = ["unshare", "--uts", "sh", "-c"]
        command += [f"hostname mta.relayproxy.test && exec sendmail -C {cf} -bs"]
        with accepted:
            process = subprocess.Popen(command, stdin=accepted, stdout=accepted)
        client.settimeout(60)
        stream = client.makefile("rwb")
        replies = [last_reply_line(stream)]
        for line in (
            "EHLO client.example",
            "MAIL FROM:<s@mta.relayproxy.test>",
            f"RCPT TO:<{recipient}>",
            "QUIT",
        ):
            stream.write(line.encode() + b"\r\n")
            stream.flush()
            replies.append(last_reply_line(stream))
        stream.close()
        process.wait(timeout=60)
    assert replies[0].startswith("220 ") and replies[2].startswith("250 "), replies
    return replies[3]


def last_reply_line(stream: Any) -> str:
    """The last line of one SMTP reply (sendmail may write a warning line first)."""
    while True:
        line = stream.readline()
        assert line, "connection closed"
        if line[:3].isdigit() and line[3:4] != b"-":
            return str(line.decode().rstrip())


def test_a_sendmail_smtp_session_relays_denies_and_defers(
    map_daemon: MapDaemon, open_tmp: Path
) -> None:
    record(map_daemon.db, ("127.0.0.7", int(time.time())))
    map_daemon.store["lock_timeout"] = "0.2"
    map_daemon.start()
    cf = socketmap_cf(open_tmp, map_daemon.port)
    assert sendmail_smtp(cf, "127.0.0.7", "user@remote.example") == (
        "250 2.1.5 <user@remote.example>... Recipient ok"
    )
    assert sendmail_smtp(cf, "127.0.0.8", "user@remote.example") == (
        "550 5.7.1 <user@remote.example>... Relaying denied"
    )
    with map_daemon.db.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the store fails: TEMP
        assert sendmail_smtp(cf, "127.0.0.7", "user@remote.example") == (
            "451 4.3.0 Relay check failed temporarily, try again later"
        )


# --------------------------------------------------------------------------
# Postfix


def postmap_socketmap(root: Path, confdir: Path, key: str, port: int) -> tuple[int, str, str]:
    """`postmap -q key socketmap:inet:127.0.0.1:port:relayers`: status, stdout, stderr."""
    result = subprocess.run(
        [
            str(root / "usr/sbin/postmap"),
            "-c",
            str(confdir),
            "-q",
            key,
            f"socketmap:inet:127.0.0.1:{port}:relayers",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": _library_path(root)},
        timeout=60,
    )
    return result.returncode, result.stdout, result.stderr


def test_postmap_queries_the_map_server(
    map_daemon: MapDaemon, mta_root: Path, tmp_path: Path
) -> None:
    now = int(time.time())
    record(map_daemon.db, ("192.0.2.7", now), ("2001:db8::7", now - 5))
    map_daemon.store["ipv6_keys"] = "postfix"
    map_daemon.start()
    confdir = minimal_postfix_config(tmp_path)
    assert postmap_socketmap(mta_root, confdir, "192.0.2.7", map_daemon.port) == (
        0,
        f"{now}\n",
        "",
    )
    assert postmap_socketmap(mta_root, confdir, "2001:db8::7", map_daemon.port)[:2] == (
        0,
        f"{now - 5}\n",
    )
    assert postmap_socketmap(mta_root, confdir, "192.0.2.9", map_daemon.port) == (1, "", "")
    assert map_daemon.stop() == 0
    status, stdout, stderr = postmap_socketmap(mta_root, confdir, "192.0.2.7", map_daemon.port)
    assert (status, stdout) != (0, f"{now}\n")
    assert "socketmap:inet:127.0.0.1" in stderr


# The map server runs inside the MTA's network namespace (its 127.0.0.1),
# started before the master; its pid is written for the test to stop it. It
# is started from a child that exits at once: were it the master's child,
# its exit would make the master panic ("master_reap: unknown pid").
WRAPPER = """
import os, socket, subprocess, sys, time
config, port, pidfile, *master = sys.argv[1:]
command = [sys.executable, "-m", "relayproxy.cli.mapserver", "--config", config]
if os.fork() == 0:
    server = subprocess.Popen(command, start_new_session=True)
    with open(pidfile, "w") as out:
        out.write(str(server.pid))
    os._exit(0)
os.wait()
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("relayproxy-map did not start")
        time.sleep(0.02)
os.execv(master[0], master)
"""


def stop_process(pid: int) -> None:
    """SIGTERM ``pid`` (not our child: the master's) and wait until it is gone."""
    os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state == "Z"

    wait_for(f"process {pid} to exit", gone)


def test_postfix_smtpd_relays_through_the_map_server(
    map_daemon: MapDaemon, mta_root: Path, mta_users: MtaUsers, open_tmp: Path
) -> None:
    now = int(time.time())
    record(map_daemon.db, ("192.0.2.7", now), ("ipv6:2001:db8:0:0:0:0:0:7", now))
    map_daemon.store["ipv6_keys"] = "sendmail"  # smtpd sends 2001:db8::7: folded
    map_daemon.store["lock_timeout"] = "0.2"
    map_daemon.config_path.write_text(map_daemon.config_text())
    fragment = socketmap_recipe("postfix/socketmap.cf.fragment", map_daemon.port)
    master = postfix_instance(mta_root, mta_users, open_tmp, open_tmp / "unused", fragment)
    pidfile = open_tmp / "map.pid"
    argv = [
        sys.executable,
        "-c",
        WRAPPER,
        str(map_daemon.config_path),
        str(map_daemon.port),
        str(pidfile),
        *master,
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": _library_path(mta_root)}
    smtp = NetnsMTA(mta_users, open_tmp, "postfix", argv, env)
    pid = int(pidfile.read_text())
    try:
        accepted = "250 2.1.5 Ok"
        assert smtp.rcpt("192.0.2.7") == accepted, smtp.log()
        assert smtp.rcpt("2001:db8::7") == accepted, smtp.log()
        assert smtp.rcpt("192.0.2.9") == POSTFIX_DENIED, smtp.log()
        assert smtp.rcpt("2001:db8::9") == POSTFIX_DENIED, smtp.log()
        # A new login counts at once: nothing to reopen.
        record(map_daemon.db, ("192.0.2.9", now))
        assert smtp.rcpt("192.0.2.9") == accepted, smtp.log()
        # The store failing (its lock held past the deadline): TEMP, deferred.
        deferred = (
            "451 4.3.5 <unknown[192.0.2.7]>: Client host rejected: Server configuration error"
        )
        with map_daemon.db.open("rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            assert smtp.rcpt("192.0.2.7") == deferred, smtp.log()
        assert smtp.rcpt("192.0.2.7") == accepted, smtp.log()
        # The map server gone: deferred, not relayed and not refused for good.
        stop_process(pid)
        assert smtp.rcpt("192.0.2.7") == deferred, smtp.log()
    finally:
        smtp.close()
        if Path(f"/proc/{pid}").exists():
            stop_process(pid)
    assert len(map_daemon.log_lines("map.store_failed")) == 1
    assert len(map_daemon.log_lines("map.store_recovered")) == 1
