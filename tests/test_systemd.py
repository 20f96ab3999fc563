"""systemd: the sd_notify client, the unit files, and the sandbox they set up.

The notifications go to real unix datagram sockets (a path in tmp_path and
an abstract name), and are compared with what systemd's own
``systemd-notify`` sends. The units are checked by systemd's own
``systemd-analyze`` (verify, security, calendar). MemoryDenyWriteExecute
is checked by running the code under the same seccomp rules systemd
installs for it.
"""

from __future__ import annotations

import ctypes.util
import errno
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.certs import make_ca, make_server_cert
from relayproxy import systemd
from tests.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
MAN = ROOT / "man"
DAEMON_UNIT = UNITS / "relayproxy.service"
EXPIRE_UNIT = UNITS / "vsmtprelay-expire.service"
TIMER = UNITS / "vsmtprelay-expire.timer"
ALL_UNITS = (DAEMON_UNIT, EXPIRE_UNIT, TIMER)
# The console scripts `pip install` made for this interpreter (the venv's bin/).
SCRIPTS = Path(sys.executable).parent

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def datagram(sock: socket.socket) -> dict[str, str]:
    """One notification, as systemd parses it: newline-separated assignments."""
    text = sock.recv(4096).decode("utf-8")
    return dict(line.split("=", 1) for line in text.split("\n") if line)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket in tmp_path, and the environment naming it."""
    path = tmp_path / "notify"
    assert len(str(path)) < 100  # sun_path holds 108 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        yield sock, {"NOTIFY_SOCKET": str(path)}


# --- relayproxy.systemd ---------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_outside_systemd_every_call_is_a_no_op(environ: dict[str, str]) -> None:
    assert systemd.notify("READY=1", environ=environ) is False
    assert systemd.ready(environ=environ) is False
    assert systemd.reloading(environ=environ) is False
    assert systemd.stopping(environ=environ) is False


def test_ready_reaches_a_socket_path(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, environ = notify_socket
    assert systemd.ready(environ=environ) is True
    assert sock.recv(4096) == b"READY=1"


def test_a_leading_at_sign_means_the_abstract_namespace() -> None:
    name = f"relayproxy-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(20)
        assert systemd.stopping(environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert datagram(sock) == {"STOPPING": "1"}


def test_reloading_carries_the_monotonic_time_systemd_253_asks_for(
    notify_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading(environ=environ) is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = datagram(sock)
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_an_unreachable_notify_socket_is_logged_and_the_daemon_serves_on(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-such-socket"))
    port = daemon.listener("pop3", protocol="pop3", backend="127.0.0.1:9")
    daemon.start()
    line = daemon.wait_for_log("systemd.error")
    assert "No such file or directory" in line
    assert line.split()[1] == "error"
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert daemon.process is not None and daemon.process.poll() is None


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="no systemd-notify")
@pytest.mark.parametrize("abstract", [False, True])
def test_the_datagram_is_the_one_systemd_notify_sends(tmp_path: Path, abstract: bool) -> None:
    name = f"relayproxy-test-{uuid.uuid4().hex}"
    bind, value = ("\0" + name, "@" + name) if abstract else (str(tmp_path / "n"),) * 2
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(bind)
        sock.settimeout(20)
        result = subprocess.run(
            ["systemd-notify", "--no-block", "--ready", "--status=serving 2 listeners"],
            env={**os.environ, "NOTIFY_SOCKET": value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        theirs = sock.recv(4096)
        systemd.notify("READY=1\nSTATUS=serving 2 listeners", environ={"NOTIFY_SOCKET": value})
        assert sock.recv(4096) == theirs


def test_a_socket_that_is_not_there_is_an_error_not_silence(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        systemd.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "absent")})
    with pytest.raises(OSError) as raised:
        systemd.ready(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert raised.value.errno == errno.EAFNOSUPPORT


def test_the_daemon_notifies_as_type_notify_expects(
    daemon: Daemon,
    notify_socket: tuple[socket.socket, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """READY=1 once listening, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 at SIGTERM."""
    sock, environ = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", environ["NOTIFY_SOCKET"])
    daemon.listener("pop3", protocol="pop3", backend="127.0.0.1:9")
    daemon.start()
    assert datagram(sock) == {"READY": "1"}
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    assert datagram(sock).keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert datagram(sock) == {"READY": "1"}
    assert daemon.stop() == 0
    assert datagram(sock) == {"STOPPING": "1"}


# --- the unit files, as systemd reads them ---------------------------------------------


def checkable_copy(unit: Path, directory: Path) -> Path:
    """``unit`` with /usr/bin/relayproxy and /usr/bin/vsmtprelay replaced by this venv's.

    systemd-analyze verify checks that every ExecStart= program exists and
    is executable, and they are not installed in /usr/bin on a development
    machine. Only that prefix changes; every other line is verified as it
    is shipped. (`--root` would need a whole systemd tree under the root
    for the units to load, /bin/kill included.)
    """
    text = unit.read_text()
    copy = directory / unit.name
    copy.write_text(
        text.replace("=/usr/bin/relayproxy ", f"={SCRIPTS}/relayproxy ").replace(
            "=/usr/bin/vsmtprelay ", f"={SCRIPTS}/vsmtprelay "
        )
    )
    return copy


def verify_problems(units: list[Path], tmp_path: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``units``: empty when they are right.

    systemd-analyze warns about an unknown key or a bad value and goes on
    ("ignoring"), with exit status 0: any line naming one of the units is
    a problem. The Documentation= man pages are looked up for real, in a
    MANPATH holding this project's pages.
    """
    manpath = tmp_path / "man"
    (manpath / "man8").mkdir(parents=True, exist_ok=True)
    for page in MAN.glob("*.8"):
        shutil.copy(page, manpath / "man8" / page.name)
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MANPATH": str(manpath), "SYSTEMD_LOG_COLOR": "0"},
    )
    names = [unit.name for unit in units]
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if any(name in line for name in names)]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {output}")
    return problems


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_three_units(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    copies = [checkable_copy(unit, units) for unit in ALL_UNITS]
    assert f"{SCRIPTS}/relayproxy --config" in copies[0].read_text()
    assert f"{SCRIPTS}/vsmtprelay --config" in copies[1].read_text()
    assert verify_problems(copies, tmp_path) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("line", "mistake"),
    [
        ("PrivateTmp=yes", "PrivateTmpp=yes"),
        ("ProtectSystem=strict", "ProtectSystem=strikt"),
        ("Type=notify", "Type=notfiy"),
        ("RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictAddressFamilies=AF_INET4"),
    ],
)
def test_verify_catches_a_typo(tmp_path: Path, line: str, mistake: str) -> None:
    units = tmp_path / "units"
    units.mkdir()
    copy = checkable_copy(DAEMON_UNIT, units)
    text = copy.read_text()
    assert f"\n{line}\n" in text
    copy.write_text(text.replace(f"\n{line}\n", f"\n{mistake}\n"))
    assert verify_problems([copy], tmp_path) != []


def exposure(unit: Path) -> float:
    """systemd-analyze's overall exposure score (0 safe .. 10 exposed) for the unit file."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


@needs_systemd_analyze
def test_the_sandbox_exposure_scores(tmp_path: Path) -> None:
    # 1.5 and 0.6 with systemd 252. What is left open for the daemon is
    # what it needs: the network (PrivateNetwork, IPAddressDeny), binding
    # ports below 1024, the host's users (PrivateUsers would disable the
    # capability), chown for [store] group, and W+X memory for pyOpenSSL.
    assert exposure(DAEMON_UNIT) <= 2.0
    assert exposure(EXPIRE_UNIT) <= 1.0


def unit_value(unit: Path, key: str) -> str:
    values: list[str] = re.findall(rf"^{key}=(.*)$", unit.read_text(), re.M)
    assert len(values) == 1, (key, values)
    return values[0]


@needs_systemd_analyze
def test_the_timer_fires_every_night_at_03_15() -> None:
    when = unit_value(TIMER, "OnCalendar")
    result = subprocess.run(
        ["systemd-analyze", "calendar", "--iterations=3", when],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TZ": "UTC"},
    )
    assert result.returncode == 0, result.stderr
    assert "Normalized form: *-*-* 03:15:00" in result.stdout
    elapses = re.findall(r"(?:Next elapse|Iter\. #\d): \w+ (\S+) (\S+)", result.stdout)
    assert [clock for _, clock in elapses] == ["03:15:00"] * 3
    assert len({day for day, _ in elapses}) == 3
    assert unit_value(TIMER, "Persistent") == "true"


def exec_start(unit: Path, config: Path) -> list[str]:
    """The unit's ExecStart= as argv, with this venv's script and a test config file."""
    argv = unit_value(unit, "ExecStart").split()
    assert argv[0].startswith("/usr/bin/")
    argv[0] = str(SCRIPTS / Path(argv[0]).name)
    return [str(config) if arg == "/etc/relayproxy/relayproxy.ini" else arg for arg in argv]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    config = tmp_path / "relayproxy.ini"
    config.write_text(
        f"[store]\npath = {tmp_path}/relayers.db\n\n"
        "[listener:pop3]\nprotocol = pop3\nlisten = 127.0.0.1:110\nbackend = 127.0.0.1:1110\n"
    )
    return config


def test_the_units_command_lines_are_ones_the_programs_accept(
    tmp_path: Path, config_file: Path
) -> None:
    daemon = subprocess.run(
        [*exec_start(DAEMON_UNIT, config_file), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert daemon.returncode == 0, daemon.stderr
    expire = subprocess.run(
        exec_start(EXPIRE_UNIT, config_file), capture_output=True, text=True, timeout=60
    )
    assert expire.returncode == 0, expire.stderr
    assert expire.stderr == "vsmtprelay: expired 0 entries\n"


# --- MemoryDenyWriteExecute -----------------------------------------------------------

# systemd's MemoryDenyWriteExecute=yes (seccomp_memory_deny_write_execute()
# in src/shared/seccomp-util.c): EPERM for mmap() asking for PROT_WRITE and
# PROT_EXEC together, for mprotect()/pkey_mprotect() adding PROT_EXEC, and
# for shmat() with SHM_EXEC. The same rules, loaded with libseccomp (which
# systemd itself links), before the code under test runs.
MDWE_PRELUDE = """
import ctypes, ctypes.util, mmap

class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

_lib = ctypes.CDLL(ctypes.util.find_library("seccomp"))
_lib.seccomp_init.restype = ctypes.c_void_p
_lib.seccomp_init.argtypes = [ctypes.c_uint32]
_lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Cmp)]
_lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
_lib.seccomp_load.argtypes = [ctypes.c_void_p]
_ALLOW, _EPERM, _MASKED_EQ, _SHM_EXEC = 0x7FFF0000, 0x00050000 | 1, 7, 0o100000
_ctx = _lib.seccomp_init(_ALLOW)
for _name, _mask in (("mmap", mmap.PROT_WRITE | mmap.PROT_EXEC), ("mprotect", mmap.PROT_EXEC),
                     ("pkey_mprotect", mmap.PROT_EXEC), ("shmat", _SHM_EXEC)):
    _nr = _lib.seccomp_syscall_resolve_name(_name.encode())
    _rule = _Cmp(2, _MASKED_EQ, _mask, _mask)
    assert _lib.seccomp_rule_add_array(_ctx, _EPERM, _nr, 1, ctypes.byref(_rule)) == 0
assert _lib.seccomp_load(_ctx) == 0
"""

needs_libseccomp = pytest.mark.skipif(
    ctypes.util.find_library("seccomp") is None, reason="libseccomp is not installed"
)


def under_mdwe(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE_PRELUDE + code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@needs_libseccomp
def test_the_emulated_filter_refuses_writable_executable_memory() -> None:
    result = under_mdwe(
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    assert result.stdout == "refused\n", result.stderr


@needs_libseccomp
def test_vsmtprelay_works_under_memory_deny_write_execute(tmp_path: Path) -> None:
    assert unit_value(EXPIRE_UNIT, "MemoryDenyWriteExecute") == "yes"
    run_vsmtprelay = (
        "import sys, runpy\n"
        "sys.argv[0] = 'vsmtprelay'\n"
        "runpy.run_module('relayproxy.cli.vsmtprelay', run_name='__main__')\n"
    )
    db = str(tmp_path / "relayers.db")
    added = under_mdwe(run_vsmtprelay, "--db", db, "add", "192.0.2.7", "1000")
    assert added.returncode == 0, added.stderr
    expired = under_mdwe(run_vsmtprelay, "--db", db, "expire", "1440")
    assert expired.returncode == 0, expired.stderr
    assert expired.stderr == "vsmtprelay: expired 1 entry\n"


@needs_libseccomp
def test_the_daemon_unit_leaves_out_memory_deny_write_execute_while_tls_needs_it(
    tmp_path: Path, config_file: Path
) -> None:
    """pyOpenSSL's ffi.callback() needs W+X memory: under the filter no TLS listener loads."""
    ca, ca_key = make_ca(tmp_path)
    certificate, key = make_server_cert(tmp_path, ca, ca_key)
    config_file.write_text(
        config_file.read_text()
        + f"tls = implicit\ncertificate = {certificate}\nprivate_key = {key}\n"
    )
    check = (
        "import sys, runpy\n"
        "sys.argv[0] = 'relayproxy'\n"
        "runpy.run_module('relayproxy.cli.daemon', run_name='__main__')\n"
    )
    result = under_mdwe(check, "--config", str(config_file), "--check-config")
    tls_works = result.returncode == 0
    if not tls_works:
        assert "write+execute memory" in result.stderr, result.stderr
    denied = "\nMemoryDenyWriteExecute=yes\n" in DAEMON_UNIT.read_text()
    assert not denied or tls_works, "MemoryDenyWriteExecute=yes would stop every TLS listener"


# --- logrotate: the log file of `[log] target = file:/var/log/relayproxy.log` -----------

LOGROTATE = ROOT / "config" / "logrotate.d" / "relayproxy"
LOG_FILE = "/var/log/relayproxy.log"
needs_logrotate = pytest.mark.skipif(
    shutil.which("logrotate") is None, reason="logrotate is not installed (make test installs it)"
)


FAKE_UID = 64999


def relayproxy_uid() -> int | None:
    try:
        return pwd.getpwnam("relayproxy").pw_uid
    except KeyError:
        return None


def as_if_the_user_existed(
    argv: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` where user relayproxy exists, as the config's ``create`` needs.

    Without that user on this machine: in a private mount namespace, over
    whose /etc/passwd a copy with the user is bind-mounted. The system's
    accounts are left alone, and the file under test is used unchanged.
    """
    if relayproxy_uid() is None:
        passwd = tmp_path / "passwd"
        account = f"relayproxy:x:{FAKE_UID}:{FAKE_UID}::/var/lib/relayproxy:/usr/sbin/nologin\n"
        passwd.write_text(Path("/etc/passwd").read_text() + account)
        mount = 'mount --bind "$0" /etc/passwd && exec "$@"'
        argv = ["unshare", "--mount", "sh", "-c", mount, str(passwd), *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if argv[0] == "unshare" and result.returncode != 0 and "unshare:" in result.stderr:
        pytest.skip(f"no user relayproxy, and no mount namespace to pretend one: {result.stderr}")
    return result


@needs_logrotate
def test_logrotate_reads_the_configuration_without_an_error(tmp_path: Path) -> None:
    result = as_if_the_user_existed(
        ["logrotate", "--debug", "--state", str(tmp_path / "state"), str(LOGROTATE)], tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower()
    assert f"rotating pattern: {LOG_FILE}  weekly (8 rotations)" in output


@needs_logrotate
def test_a_rotation_keeps_the_file_and_tells_the_daemon_to_reopen(tmp_path: Path) -> None:
    """A real rotation by the shipped file, with only the log's path moved to tmp_path.

    systemctl is a stand-in that writes down its arguments: there is no
    systemd to signal here, and what matters is the command line.
    """
    log = tmp_path / "relayproxy.log"
    log.write_text("2026-11-25T10:00:00.123Z info listener.ready listener=pop3\n")
    text = LOGROTATE.read_text()
    assert text.count(f"{LOG_FILE} {{") == 1
    config = tmp_path / "logrotate.conf"
    config.write_text(text.replace(f"{LOG_FILE} {{", f"{log} {{"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    argv = ["logrotate", "--force", "--state", str(tmp_path / "state"), str(config)]
    result = as_if_the_user_existed(argv, tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    # delaycompress: the newest old file stays plain, for lines written before the reopen.
    assert (tmp_path / "relayproxy.log.1").read_text().endswith("listener=pop3\n")
    fresh = log.stat()
    assert fresh.st_size == 0
    assert stat.S_IMODE(fresh.st_mode) == 0o640
    assert fresh.st_uid == (relayproxy_uid() or FAKE_UID)
    assert fresh.st_gid == grp.getgrnam("adm").gr_gid
    assert calls.read_text() == "kill --kill-whom=main --signal=USR1 relayproxy.service\n"
