"""A real Dovecot 2.3 on loopback, configured from scratch in a directory of its own.

Used by the integration tests, the benchmarks and `make run`. Nothing of the system
configuration (/etc/dovecot) is read and nothing outside `directory` is written, so several
instances can run side by side, and next to a system Dovecot, each with its own ports.

Layout of `directory`:

    dovecot.conf    the configuration (`doveconf -c` shows it expanded)
    dovecot.log     everything Dovecot logs (`log_path`, `info_log_path`, `debug_log_path`)
    stderr.log      the master's own stderr, read when it fails before logging is set up
    passwd          the passwd-file, `{PLAIN}` passwords (needed by APOP and CRAM-MD5)
    tls/            ca.pem, ca.key, server.pem, server.key
    run/            base_dir (sockets, master.pid); see `_SOCKET_DIR_MAX` for long paths
    state/          state_dir
    mail/<user>/Maildir   owned by the unprivileged mail user (`nobody`)

The mail processes run as `nobody` chrooted into `mail/`, so the instance works even when
`directory` sits below a directory only root may enter (pytest's tmp_path does).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType

from demo.certs import make_ca, make_server_cert

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
_POLL = 0.02
# Unix sockets live in base_dir; sun_path is 108 bytes and Dovecot's deepest socket adds
# about 30 (`login/imap-urlauth`, `token-login/tokenlogin`). A longer base_dir moves to a
# short private directory under the system temp dir (removed again by stop()).
_SOCKET_DIR_MAX = 70
_START_ATTEMPTS = 3
_MAIL_USER = "nobody"
# Characters that Dovecot's config syntax or its %-variables would reinterpret in a path.
_UNSAFE_PATH_CHARACTERS = frozenset(" \t\n\r\"'#%{}\\<$")
_deliveries = itertools.count()


@dataclass(frozen=True)
class DovecotUser:
    name: str
    password: str


DEMO_USERS = (DovecotUser("alice", "alice-secret"), DovecotUser("bob", "bob-secret"))


@dataclass(frozen=True)
class DovecotPorts:
    pop3: int  # plain POP3, STLS available
    pop3s: int  # implicit TLS POP3
    imap: int  # plain IMAP, STARTTLS available
    imaps: int  # implicit TLS IMAP
    pop3_haproxy: int  # POP3 listener with `haproxy = yes` (expects a PROXY v1/v2 header)
    imap_haproxy: int  # IMAP listener with `haproxy = yes`
    pop3s_haproxy: int  # implicit TLS POP3 after a PROXY header (in clear, before the handshake)
    imaps_haproxy: int  # implicit TLS IMAP after a PROXY header


class DovecotError(RuntimeError):
    """Dovecot did not start or stop; the message carries the tail of its logs."""


def _free_ports(host: str, count: int) -> list[int]:
    """Ports the kernel hands out for `host` right now (all held open together: distinct)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts(host: str, port: int, greeting: bytes | None = None, farewell: bytes = b"") -> bool:
    """Whether `port` accepts; with `greeting`, also whether the server says it first.

    Dovecot's login processes hold the greeting back until the auth process answers, so a
    greeting on the plain ports means logins work, not just that the socket is bound.
    """
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            if greeting is None:
                return True
            received = b""
            while b"\n" not in received:
                chunk = sock.recv(512)
                if not chunk:
                    return False
                received += chunk
            sock.sendall(farewell)
            return received.startswith(greeting)
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Dovecot:
    """One Dovecot instance: `start()`, use `ports`, `deliver()`, `stop()` (or `with`)."""

    def __init__(
        self,
        directory: Path,
        users: Sequence[DovecotUser] = DEMO_USERS,
        *,
        host: str = "127.0.0.1",
        haproxy_trusted: str = "127.0.0.0/8",
        login_trusted: str = "",
    ) -> None:
        self.directory = Path(directory).absolute()
        if unsafe := _UNSAFE_PATH_CHARACTERS.intersection(str(self.directory)):
            raise ValueError(
                f"{self.directory}: characters Dovecot would misread: {''.join(sorted(unsafe))!r}"
            )
        self.users = tuple(users)
        self.host = host
        self.haproxy_trusted = haproxy_trusted
        # Networks whose IMAP ID x-originating-ip Dovecot believes (forward_id).
        self.login_trusted = login_trusted
        self.config_path = self.directory / "dovecot.conf"
        self.log_path = self.directory / "dovecot.log"
        self.stderr_path = self.directory / "stderr.log"
        self.passwd_path = self.directory / "passwd"
        self.tls_dir = self.directory / "tls"
        self.ca_certificate = self.tls_dir / "ca.pem"
        self.ca_key = self.tls_dir / "ca.key"
        self.server_certificate = self.tls_dir / "server.pem"
        self.server_key = self.tls_dir / "server.key"
        self.state_dir = self.directory / "state"
        self.mail_root = self.directory / "mail"
        self.base_dir = self.directory / "run"
        self._private_base_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: DovecotPorts | None = None

    # -- public -------------------------------------------------------------------------

    @property
    def ports(self) -> DovecotPorts:
        if self._ports is None:
            raise DovecotError("Dovecot has not been started")
        return self._ports

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def maildir(self, user: str) -> Path:
        """The user's INBOX Maildir as seen from outside the chroot."""
        return self.mail_root / user / "Maildir"

    def start(self, *, same_ports: bool = False) -> None:
        """Write everything, start the master, return once every listener accepts.

        ``same_ports``: after ``stop()``, the ports of the previous start (a
        backend coming back at the address its clients know).
        """
        if self.running:
            raise DovecotError("Dovecot is already running")
        try:
            self._prepare()
            # A port found free can be taken before Dovecot binds it: then pick again.
            # Ports asked for again are not swapped for others when taken.
            same_ports = same_ports and self._ports is not None
            for attempt in itertools.count(1):
                if not same_ports:
                    self._ports = DovecotPorts(*_free_ports(self.host, len(fields(DovecotPorts))))
                self._write_config()
                try:
                    self._spawn_and_wait()
                    return
                except DovecotError as error:
                    taken = "Address already in use" in str(error)
                    if attempt >= _START_ATTEMPTS or not taken or same_ports:
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the master (and with it every Dovecot process); wait until it is gone.

        SIGTERM to the master is what `dovecot stop` sends; signalling our own child
        directly skips that command's coarse polling (3 s instead of about 1 s, which is
        Dovecot's own grace period for its log process).
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        if self._private_base_dir is not None:
            shutil.rmtree(self._private_base_dir, ignore_errors=True)
            self._private_base_dir = None

    def deliver(self, user: str, message: bytes) -> None:
        """Put `message` into the user's INBOX, as an MDA does: tmp/, then rename into new/.

        Dovecot notices it on the next POP3 login, the next IMAP command and (inotify)
        during IMAP IDLE. LF line ends are stored as given; Dovecot sends CRLF.
        """
        if user not in {u.name for u in self.users}:
            raise KeyError(f"no such Dovecot user: {user!r}")
        maildir = self.maildir(user)
        account = pwd.getpwnam(_MAIL_USER)
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(_deliveries)}.relayproxy-demo"
        temporary = maildir / "tmp" / name
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchown(fd, account.pw_uid, account.pw_gid)
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(message)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.close(fd)
        os.rename(temporary, maildir / "new" / f"{name},S={len(message)}")

    def log_text(self) -> str:
        """Everything Dovecot has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, *, timeout: float = 10.0) -> str:
        """The first log line containing `needle`, waiting for it up to `timeout` seconds.

        Dovecot's log process writes asynchronously: a client can see `+OK` before the
        matching `Login:` line is in the file.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"{needle!r} not logged within {timeout} s\n{_tail(self.log_path)}"
                )
            time.sleep(_POLL)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    def _prepare(self) -> None:
        account = pwd.getpwnam(_MAIL_USER)
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in (self.state_dir, self.mail_root):
            path.mkdir(mode=0o755, exist_ok=True)
        self.base_dir = self.directory / "run"
        if len(str(self.base_dir)) > _SOCKET_DIR_MAX:
            self._private_base_dir = Path(tempfile.mkdtemp(prefix="dovecot-"))
            self.base_dir = self._private_base_dir / "run"
        if not self.ca_certificate.exists():
            make_ca(self.tls_dir, name="relayproxy demo Dovecot CA")
        if not self.server_certificate.exists():
            make_server_cert(self.tls_dir, self.ca_certificate, self.ca_key)
        for user in self.users:
            if not user.name or any(c in user.name for c in ":/%\n\t ") or user.name[0] == ".":
                raise ValueError(f"unusable Dovecot user name: {user.name!r}")
            if any(c in user.password for c in ":\n"):
                raise ValueError(f"unusable password for {user.name!r}")
        fd = os.open(self.passwd_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f"{u.name}:{{PLAIN}}{u.password}::::::\n" for u in self.users)
        for user in self.users:
            home = self.mail_root / user.name
            for path in (home, home / "Maildir", *(home / "Maildir" / d for d in _MAILDIR)):
                path.mkdir(mode=0o700, exist_ok=True)
                os.chown(path, account.pw_uid, account.pw_gid)

    def _write_config(self) -> None:
        account = pwd.getpwnam(_MAIL_USER)
        ports = self.ports
        cores = max(1, min(4, os.cpu_count() or 1))
        # Room for benchmarks, within the fd limit Dovecot checks its settings against.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        fds = 4096 if soft == resource.RLIM_INFINITY else max(256, min(4096, soft - 64))
        sessions = max(100, fds // 4)
        config = _CONFIG.format(
            instance=f"relayproxy-demo-{ports.pop3}",
            base_dir=self.base_dir,
            state_dir=self.state_dir,
            log=self.log_path,
            host=self.host,
            cert=self.server_certificate,
            key=self.server_key,
            haproxy_trusted=self.haproxy_trusted,
            login_trusted=self.login_trusted,
            passwd=self.passwd_path,
            uid=account.pw_uid,
            gid=account.pw_gid,
            mail_root=self.mail_root,
            cores=cores,
            clients=fds,
            sessions=sessions,
            auth_clients=fds,
            **{field.name: getattr(ports, field.name) for field in fields(ports)},
        )
        self.config_path.write_text(config)

    def _spawn_and_wait(self) -> None:
        ports = self.ports
        with self.stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        # Plain ports last: their greeting needs the login and auth processes up.
        probes: list[tuple[int, bytes | None, bytes]] = [
            (ports.pop3s, None, b""),
            (ports.imaps, None, b""),
            (ports.pop3_haproxy, None, b""),
            (ports.imap_haproxy, None, b""),
            (ports.pop3s_haproxy, None, b""),
            (ports.imaps_haproxy, None, b""),
            (ports.pop3, b"+OK", b"QUIT\r\n"),
            (ports.imap, b"* OK", b"a LOGOUT\r\n"),
        ]
        deadline = time.monotonic() + START_TIMEOUT
        while probes:
            if self._process.poll() is not None:
                self._process = None
                raise DovecotError(self._failure("exited during start-up"))
            if time.monotonic() > deadline:
                self.stop()
                waiting = [port for port, _, _ in probes]
                raise DovecotError(self._failure(f"ports {waiting} not ready"))
            if _accepts(self.host, *probes[0]):
                probes.pop(0)
            else:
                time.sleep(_POLL)

    def _failure(self, what: str) -> str:
        return (
            f"Dovecot ({self.config_path}) {what}\n"
            f"--- {self.stderr_path}\n{_tail(self.stderr_path)}\n"
            f"--- {self.log_path}\n{_tail(self.log_path)}"
        )


_MAILDIR = ("cur", "new", "tmp")

_CONFIG = """\
# Written by demo/dovecot.py: a self-contained test/demo instance. Nothing from
# /etc/dovecot is included.
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
log_timestamp = "%Y-%m-%d %H:%M:%S "

protocols = pop3 imap
listen = {host}
default_login_user = dovenull
default_internal_user = dovecot

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2

# The proxy in front may speak plaintext to this backend, and a PROXY header can make a
# loopback connection look remote: allow plaintext logins everywhere.
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 apop
auth_verbose = yes
auth_failure_delay = 0
haproxy_trusted_networks = {haproxy_trusted}
login_trusted_networks = {login_trusted}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  # "/./": chroot into the mail root, home is /<user> inside it.
  args = uid={uid} gid={gid} home={mail_root}/./%u
}}
valid_chroot_dirs = {mail_root}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 10000

service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
  inet_listener pop3_haproxy {{
    port = {pop3_haproxy}
    haproxy = yes
  }}
  inet_listener pop3s_haproxy {{
    port = {pop3s_haproxy}
    ssl = yes
    haproxy = yes
  }}
  service_count = 0
  process_min_avail = {cores}
  client_limit = {clients}
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
  inet_listener imap_haproxy {{
    port = {imap_haproxy}
    haproxy = yes
  }}
  inet_listener imaps_haproxy {{
    port = {imaps_haproxy}
    ssl = yes
    haproxy = yes
  }}
  service_count = 0
  process_min_avail = {cores}
  client_limit = {clients}
}}
service pop3 {{
  process_limit = {sessions}
}}
service imap {{
  process_limit = {sessions}
}}
service auth {{
  # Reads the passwd-file, which may sit below a directory only root can enter.
  user = root
  client_limit = {auth_clients}
}}
service anvil {{
  client_limit = {auth_clients}
  # Mode 0 disables the listener, and with it auth penalties (2 s .. 15 s delays for every
  # login from an address after failed ones): tests mix failures and successes on 127.0.0.1.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@contextlib.contextmanager
def running_dovecot(
    directory: Path,
    users: Sequence[DovecotUser] = DEMO_USERS,
    *,
    host: str = "127.0.0.1",
    haproxy_trusted: str = "127.0.0.0/8",
    login_trusted: str = "",
) -> Iterator[Dovecot]:
    """`with running_dovecot(tmp) as dovecot:` -- started on entry, stopped on exit."""
    with Dovecot(
        directory, users, host=host, haproxy_trusted=haproxy_trusted, login_trusted=login_trusted
    ) as dovecot:
        yield dovecot


__all__ = [
    "DEMO_USERS",
    "Dovecot",
    "DovecotError",
    "DovecotPorts",
    "DovecotUser",
    "running_dovecot",
]
