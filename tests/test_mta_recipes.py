"""The MTA recipes in config/ work with the MTAs' own binaries on our file.

Each recipe is used verbatim (only its /var/lib/relayproxy path is pointed
at a test directory) and every relayers.db is written by relayproxy's store
(`vsmtprelay`). What is asserted is what an administrator would see:

* sendmail: a sendmail.cf built with m4 from the sendmail-cf macros and
  config/sendmail/relayproxy.mc, and `sendmail -bt` answering `check_rcpt`;
* Postfix: `postmap -q` on the file, and a real master + smtpd (from the
  Debian package, unpacked) answering RCPT TO in a private network namespace;
* Exim: `exim -be` on the fragment's conditions, and `exim -bs` running the
  fragment in acl_check_rcpt for real TCP clients in a private namespace.

Postfix and Exim conflict with sendmail-bin as packages, so their .debs are
fetched with `apt-get download` (once, into DEB_CACHE) and unpacked with
`dpkg -x`. Their users (postfix, Debian-exim) exist only in a private mount
namespace, over a bind-mounted /etc/passwd. Everything here needs root.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (namespaces, bind mounts, chown, MTA privileges)"
)

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
NETNS_HELPER = Path(__file__).resolve().parent / "mta_netns.py"
RECIPE_PATH = "/var/lib/relayproxy/relayers"
DEB_CACHE = Path(os.environ.get("RELAYPROXY_TEST_DEBS", "/var/cache/relayproxy-test-debs"))
MTA_PACKAGES = ("postfix", "exim4-daemon-light")
CF_DIR = Path("/usr/share/sendmail/cf")

RELAY_DENIED = '$# error $@ 5 . 7 . 1 $: "550 Relaying denied"'
POSTFIX_DENIED = "554 5.7.1 <user@remote.example>: Relay access denied"
EXIM_DENIED = "550 relay not permitted"
WINDOW = 86400  # the Exim fragment's time window, in seconds


def recipe(relative: str, db_base: Path) -> str:
    """A file of config/, its database path pointed at ``db_base`` (no .db)."""
    text = (CONFIG / relative).read_text()
    active = [line for line in text.splitlines() if not line.lstrip().startswith(("#", "dnl"))]
    assert any(RECIPE_PATH in line for line in active), f"{relative} does not use {RECIPE_PATH}"
    return text.replace(RECIPE_PATH, str(db_base))


def store_config(directory: Path, db: Path, ipv6_keys: str) -> str:
    """A relayproxy.ini with only a [store] section, for `vsmtprelay --config`."""
    path = directory / f"store-{ipv6_keys}.ini"
    path.write_text(f"[store]\npath = {db}\nipv6_keys = {ipv6_keys}\n")
    return str(path)


def write_aged(path: Path, text: str) -> None:
    """Write a Postfix config file dated a minute ago.

    Postfix re-reads, 300 ms apart, a main.cf modified within the current
    second (it may be half written): a fresh file costs each command ~2 s.
    """
    path.write_text(text)
    past = time.time() - 60
    os.utime(path, (past, past))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory that unprivileged MTA users can reach, outside world-writable /tmp.

    sendmail refuses maps under a group- or world-writable directory, and
    Exim reads relayers.db as Debian-exim; /run is root's and 0755.
    """
    parent = Path("/run") if os.access("/run", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="relayproxy-mta-", dir=parent))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# --------------------------------------------------------------------------
# sendmail


def build_sendmail_cf(directory: Path, db_base: Path, lines: str | None = None) -> Path:
    """sendmail.cf from a minimal Debian-style .mc plus config/sendmail/relayproxy.mc.

    ``lines``: other .mc lines in its place (another recipe; ``db_base`` unused).
    """
    if not (CF_DIR / "feature" / "drac.m4").exists() or shutil.which("m4") is None:
        pytest.skip("needs sendmail-cf and m4 (make test installs them with apt)")
    mc = directory / "test.mc"
    mc.write_text(
        "divert(-1)dnl\n"
        "divert(0)dnl\n"
        f"include(`{CF_DIR}/m4/cf.m4')dnl\n"
        "OSTYPE(`debian')dnl\n"
        "DOMAIN(`debian-mta')dnl\n"
        + (recipe("sendmail/relayproxy.mc", db_base) if lines is None else lines)
        + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n"
    )
    cf = directory / "test.cf"
    cf.write_text(ok(subprocess.run(["m4", str(mc)], capture_output=True, text=True, timeout=30)))
    return cf


def sendmail_test_mode(cf: Path, commands: list[str]) -> str:
    """`sendmail -C cf -bt` fed ``commands``; a qualified host name avoids its 60 s wait.

    Its exit status is not checked: a bare .cf without a local mailer makes
    it exit 70 after answering.
    """
    if shutil.which("sendmail") is None:
        pytest.skip("needs sendmail-bin (make test installs it with apt)")
    result = subprocess.run(
        [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f"hostname mta.relayproxy.test && exec sendmail -C {cf} -bt",
        ],
        input="".join(f"{command}\n" for command in commands),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ADDRESS TEST MODE" in result.stdout, result.stderr
    return result.stdout


def check_rcpt(cf: Path, *client_addrs: str) -> list[str]:
    """What sendmail's check_rcpt returns for a remote recipient, per ${client_addr}."""
    commands: list[str] = []
    for address in client_addrs:
        commands += [".D{client_addr}" + address, "check_rcpt <user@remote.example>"]
    output = sendmail_test_mode(cf, commands)
    answers = re.findall(r"^check_rcpt +returns: (.*)$", output, re.MULTILINE)
    assert len(answers) == len(client_addrs), output
    return answers


def test_sendmail_drac_relays_for_addresses_vsmtprelay_records(
    vsmtprelay: Run, open_tmp: Path
) -> None:
    db = open_tmp / "relayers.db"
    config = store_config(open_tmp, db, "sendmail")
    cf = build_sendmail_cf(open_tmp, open_tmp / "relayers")
    assert "Kdrac hash -o " + str(open_tmp / "relayers") in cf.read_text()
    ok(vsmtprelay("--config", config, "add", "192.0.2.7"))
    ok(vsmtprelay("--config", config, "add", "2001:db8::7"))
    # The key as stored: lower-case ipv6: and all eight groups.
    dump = ok(vsmtprelay("--config", config, "dump"))
    assert [line.split("\t")[0] for line in dump.splitlines()] == [
        "192.0.2.7",
        "ipv6:2001:db8:0:0:0:0:0:7",
    ]
    # ${client_addr} as sendmail sets it: IPv6: prefix, IPV6_FULL form.
    clients = ("192.0.2.7", "IPv6:2001:db8:0:0:0:0:0:7", "192.0.2.9", "IPv6:2001:db8:0:0:0:0:0:9")
    assert check_rcpt(cf, *clients) == ["RELAY", "RELAY", RELAY_DENIED, RELAY_DENIED]

    ok(vsmtprelay("--config", config, "delete", "192.0.2.7", "2001:db8::7"))
    assert check_rcpt(cf, *clients[:2]) == [RELAY_DENIED, RELAY_DENIED]


def test_sendmail_does_not_find_postfix_style_ipv6_keys(vsmtprelay: Run, open_tmp: Path) -> None:
    db = open_tmp / "relayers.db"
    cf = build_sendmail_cf(open_tmp, open_tmp / "relayers")
    ok(vsmtprelay("--config", store_config(open_tmp, db, "postfix"), "add", "2001:db8::7"))
    assert check_rcpt(cf, "IPv6:2001:db8:0:0:0:0:0:7") == [RELAY_DENIED]
    ok(vsmtprelay("--config", store_config(open_tmp, db, "both"), "add", "2001:db8::7"))
    assert check_rcpt(cf, "IPv6:2001:db8:0:0:0:0:0:7") == ["RELAY"]


NOBODY = 65534  # nobody / nogroup: the daemon's user and group, say

# (directory gid, directory mode, file uid, file gid, file mode): does
# `sendmail -bt`, as root, open the map? The directory is owned by the
# daemon's user, like /var/lib/relayproxy.
SENDMAIL_MAP_ACCESS = {
    (NOBODY, 0o755, 0, 0, 0o600): True,
    (NOBODY, 0o755, 0, NOBODY, 0o640): True,
    (NOBODY, 0o755, NOBODY, 0, 0o600): False,
    (NOBODY, 0o755, NOBODY, 0, 0o640): True,
    (NOBODY, 0o755, NOBODY, NOBODY, 0o600): False,
    (NOBODY, 0o755, NOBODY, NOBODY, 0o640): False,
    (NOBODY, 0o755, NOBODY, NOBODY, 0o644): True,
    (NOBODY, 0o711, NOBODY, NOBODY, 0o644): True,
    (NOBODY, 0o750, NOBODY, NOBODY, 0o644): False,
    (0, 0o750, NOBODY, NOBODY, 0o644): True,
    (NOBODY, 0o775, NOBODY, NOBODY, 0o644): False,
}


def test_sendmail_reads_the_map_only_with_safe_ownership_and_mode(
    vsmtprelay: Run, open_tmp: Path
) -> None:
    """sendmail as root judges a map it does not own as "other" or group root would."""
    declarations = ["V10/Berkeley"]
    commands = []
    for number, (dir_gid, dir_mode, uid, gid, mode) in enumerate(SENDMAIL_MAP_ACCESS):
        directory = open_tmp / f"d{number}"
        directory.mkdir()
        db = directory / "relayers.db"
        ok(vsmtprelay("--db", str(db), "add", "192.0.2.7", "5"))
        os.chown(db, uid, gid)
        db.chmod(mode)
        os.chown(directory, NOBODY, dir_gid)
        directory.chmod(dir_mode)
        declarations.append(f"Km{number} hash -o {directory}/relayers")
        commands.append(f"/map m{number} 192.0.2.7")
    cf = open_tmp / "maps.cf"
    cf.write_text("\n".join(declarations) + "\n")
    output = sendmail_test_mode(cf, commands)
    for number, (case, readable) in enumerate(SENDMAIL_MAP_ACCESS.items()):
        expected = (
            f"map_lookup: m{number} (192.0.2.7) returns 5 (0)"
            if readable
            else f'Map named "m{number}" not open'
        )
        assert expected in output, f"directory gid, mode; file uid, gid, mode: {case}\n{output}"

    # Through FEATURE(drac) the skipped map is silent: relaying is just denied.
    lib = open_tmp / "lib"
    lib.mkdir()
    cf = build_sendmail_cf(open_tmp, lib / "relayers")
    db = lib / "relayers.db"
    ok(vsmtprelay("--db", str(db), "add", "192.0.2.7"))
    os.chown(lib, NOBODY, NOBODY)
    os.chown(db, NOBODY, NOBODY)
    db.chmod(0o640)
    assert check_rcpt(cf, "192.0.2.7") == [RELAY_DENIED]
    db.chmod(0o644)
    assert check_rcpt(cf, "192.0.2.7") == ["RELAY"]


# --------------------------------------------------------------------------
# Postfix and Exim from their Debian packages


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout.endswith(" installed")


def _apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def _missing_libraries(packages: tuple[str, ...]) -> list[str]:
    """The shared-library packages they need, directly or not, that this machine lacks."""
    missing: set[str] = set()
    wanted = list(packages)
    while wanted:
        command = ("apt-cache", "depends", "--no-recommends", "--no-suggests", *wanted)
        result = _apt(*command)
        if result.returncode != 0:  # a fresh machine may have no package lists
            _apt("apt-get", "update")
            result = _apt(*command)
        listing = result.stdout
        found = re.findall(r"^\s+\|?(?:Pre)?Depends: (lib[^\s<>]+)$", listing, re.MULTILINE)
        wanted = sorted({name for name in found if name not in missing and not _installed(name)})
        missing.update(wanted)
    return sorted(missing)


def _cached_deb(package: str) -> Path | None:
    debs = sorted(DEB_CACHE.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


@pytest.fixture(scope="session")
def mta_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """postfix and exim4-daemon-light (and libraries this machine lacks), unpacked.

    The .debs are kept in DEB_CACHE: only the first run on a machine downloads.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs apt-get and dpkg to fetch Postfix and Exim")
    packages = [*MTA_PACKAGES, *_missing_libraries(MTA_PACKAGES)]
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    missing = [package for package in packages if _cached_deb(package) is None]
    if missing:
        result = _apt("apt-get", "download", *missing, cwd=DEB_CACHE)
        if result.returncode != 0:
            _apt("apt-get", "update")
            result = _apt("apt-get", "download", *missing, cwd=DEB_CACHE)
        if result.returncode != 0:
            pytest.skip(f"cannot obtain {' '.join(missing)} (apt-get download): {result.stderr}")
    root = tmp_path_factory.mktemp("mta-root")
    for package in packages:
        deb = _cached_deb(package)
        assert deb is not None, package
        ok(subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True))
    return root


def _library_path(root: Path) -> str:
    dirs = [root / "usr/lib/postfix", *sorted((root / "usr/lib").glob("*-linux-gnu"))]
    return ":".join(str(d) for d in dirs)


def _free_id(taken: set[int]) -> int:
    for candidate in range(64900, 65500):
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise AssertionError("no free uid/gid")


@dataclass(frozen=True)
class MtaUsers:
    """passwd and group (in ``etc``) with the MTA users added, and their ids."""

    etc: Path
    uid: dict[str, int]
    gid: dict[str, int]


@pytest.fixture(scope="session")
def mta_users(tmp_path_factory: pytest.TempPathFactory) -> MtaUsers:
    etc = tmp_path_factory.mktemp("etc")
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    taken = {
        int(line.split(":")[2]) for line in (passwd + group).splitlines() if line.count(":") > 2
    }
    gid: dict[str, int] = {}
    uid: dict[str, int] = {}
    for name in ("Debian-exim", "postfix", "postdrop"):
        found = re.search(rf"^{re.escape(name)}:[^:]*:(\d+):", group, re.MULTILINE)
        gid[name] = int(found.group(1)) if found else _free_id(taken)
        if not found:
            group += f"{name}:x:{gid[name]}:\n"
    for name in ("Debian-exim", "postfix"):
        found = re.search(rf"^{re.escape(name)}:[^:]*:(\d+):", passwd, re.MULTILINE)
        uid[name] = int(found.group(1)) if found else _free_id(taken)
        if not found:
            passwd += f"{name}:x:{uid[name]}:{gid[name]}::/nonexistent:/usr/sbin/nologin\n"
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    return MtaUsers(etc, uid, gid)


class NetnsMTA:
    """tests/mta_netns.py: an MTA on 192.0.2.1 and 2001:db8::1 in namespaces of its own."""

    def __init__(
        self, users: MtaUsers, work: Path, mode: str, argv: list[str], env: dict[str, str]
    ) -> None:
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            pytest.skip("needs ip (iproute2) and unshare (util-linux)")
        self.work = work
        command = [sys.executable, str(NETNS_HELPER), "--etc", str(users.etc)]
        command += ["--server", "192.0.2.1", "--server", "2001:db8::1", mode, "--", *argv]
        with (work / "netns.stderr").open("wb") as stderr:
            self.process = subprocess.Popen(
                ["unshare", "--net", "--mount", *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        assert self._answer() == "ready"

    def log(self) -> str:
        """The helper's stderr and the MTA's log files, for failure messages."""
        texts = []
        for name in ("netns.stderr", "maillog", "spool/mainlog", "spool/paniclog"):
            path = self.work / name
            if path.exists():
                texts.append(f"--- {name}\n{path.read_text(errors='replace')}")
        return "\n".join(texts)

    def _answer(self) -> object:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            raise AssertionError(f"mta_netns.py ended\n{self.log()}")
        return json.loads(line)

    def rcpt(self, source: str) -> str:
        """The server's answer to RCPT TO:<user@remote.example> from ``source``."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{source} user@remote.example\n".encode())
        self.process.stdin.flush()
        replies = self._answer()
        assert isinstance(replies, list)
        assert replies[0].startswith("220 "), (replies, self.log())
        assert replies[2].startswith("250 "), (replies, self.log())
        return str(replies[3])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


# --------------------------------------------------------------------------
# Postfix


def postmap(root: Path, confdir: Path, key: str, table: Path) -> str:
    """What `postmap -q` prints: the value, or nothing (exit 1) for an absent key."""
    result = subprocess.run(
        [str(root / "usr/sbin/postmap"), "-c", str(confdir), "-q", key, f"hash:{table}"],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": _library_path(root)},
        timeout=30,
    )
    assert result.returncode in (0, 1) and not result.stderr, result.stderr
    assert (result.returncode == 0) == bool(result.stdout), result
    return result.stdout


def minimal_postfix_config(directory: Path) -> Path:
    confdir = directory / "postfix"
    confdir.mkdir()
    # Users that base-passwd always has: postfix/postdrop do not exist here.
    write_aged(
        confdir / "main.cf",
        "compatibility_level = 3.6\nmyhostname = mta.relayproxy.test\n"
        "mail_owner = daemon\nsetgid_group = mail\n",
    )
    return confdir


def test_postmap_finds_the_keys_the_store_writes(
    vsmtprelay: Run, mta_root: Path, tmp_path: Path
) -> None:
    db = tmp_path / "relayers.db"
    confdir = minimal_postfix_config(tmp_path)
    postfix_keys = store_config(tmp_path, db, "postfix")
    sendmail_keys = store_config(tmp_path, db, "sendmail")
    ok(vsmtprelay("--config", postfix_keys, "add", "192.0.2.7", "1700000000"))
    ok(vsmtprelay("--config", postfix_keys, "add", "2001:db8::7", "1700000001"))
    ok(vsmtprelay("--config", sendmail_keys, "add", "2001:db8::8", "1700000002"))
    table = tmp_path / "relayers"
    assert postmap(mta_root, confdir, "192.0.2.7", table) == "1700000000\n"
    # smtpd's client_addr for an IPv6 client is the compressed form.
    assert postmap(mta_root, confdir, "2001:db8::7", table) == "1700000001\n"
    # A sendmail-style key is invisible to Postfix, like an absent one.
    assert postmap(mta_root, confdir, "2001:db8::8", table) == ""
    assert postmap(mta_root, confdir, "192.0.2.9", table) == ""


def test_postmap_waits_while_a_writer_holds_the_lock(
    vsmtprelay: Run, mta_root: Path, tmp_path: Path
) -> None:
    """postmap takes flock(LOCK_SH) on the .db, so it cannot read half a batch."""
    db = tmp_path / "relayers.db"
    confdir = minimal_postfix_config(tmp_path)
    ok(vsmtprelay("--db", str(db), "add", "192.0.2.7", "1700000000"))
    command = [str(mta_root / "usr/sbin/postmap"), "-c", str(confdir), "-q", "192.0.2.7"]
    with db.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        reader = subprocess.Popen(
            [*command, f"hash:{tmp_path / 'relayers'}"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "LD_LIBRARY_PATH": _library_path(mta_root)},
        )
        time.sleep(0.5)
        assert reader.poll() is None, "postmap read the file while a writer held LOCK_EX"
    stdout, _ = reader.communicate(timeout=30)
    assert (reader.returncode, stdout) == (0, "1700000000\n")


POSTFIX_MASTER_CF = """\
25        inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
rewrite   unix  -       -       n       -       -       trivial-rewrite
anvil     unix  -       -       n       -       1       anvil
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_instance(
    root: Path, users: MtaUsers, work: Path, db_base: Path, fragment: str | None = None
) -> list[str]:
    """A Postfix instance in ``work`` whose main.cf ends with our fragment: the master argv."""
    if fragment is None:
        fragment = recipe("postfix/main.cf.fragment", db_base)
    confdir = work / "etc"
    confdir.mkdir()
    spool = work / "spool"
    owner, setgid = users.uid["postfix"], users.gid["postdrop"]
    for name, mode in (("", 0o755), ("pid", 0o755), ("public", 0o710), ("maildrop", 0o730)):
        (spool / name).mkdir(exist_ok=True)
        (spool / name).chmod(mode)
        if name in ("public", "maildrop"):
            os.chown(spool / name, owner, setgid)
    for name in ("data", *(f"spool/{d}" for d in ("private", "incoming", "active", "deferred"))):
        (work / name).mkdir()
        (work / name).chmod(0o700)
        os.chown(work / name, owner, 0)
    write_aged(confdir / "master.cf", POSTFIX_MASTER_CF)
    write_aged(
        confdir / "main.cf",
        f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {work}/data
daemon_directory = {root}/usr/lib/postfix/sbin
shlib_directory = {root}/usr/lib/postfix
meta_directory = {root}/etc/postfix
mail_owner = postfix
setgid_group = postdrop
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH
maillog_file = {work}/maillog
maillog_file_prefixes = {work}
myhostname = mta.relayproxy.test
mydestination = $myhostname
mynetworks = 127.0.0.0/8 [::1]/128
inet_interfaces = all
inet_protocols = all
alias_maps =
alias_database =
local_recipient_maps =
# No qmgr here hands out flow-control tokens: do not wait 1 s for one.
in_flow_delay = 0
smtpd_banner = $myhostname ESMTP

"""
        + fragment,
    )
    return [str(root / "usr/lib/postfix/sbin/master"), "-c", str(confdir), "-d"]


def test_postfix_smtpd_relays_for_recorded_clients(
    vsmtprelay: Run, mta_root: Path, mta_users: MtaUsers, open_tmp: Path
) -> None:
    db = open_tmp / "relayers.db"
    config = store_config(open_tmp, db, "postfix")
    ok(vsmtprelay("--config", config, "add", "192.0.2.7"))
    ok(vsmtprelay("--config", config, "add", "2001:db8::7"))
    master = postfix_instance(mta_root, mta_users, open_tmp, open_tmp / "relayers")
    env = {**os.environ, "LD_LIBRARY_PATH": _library_path(mta_root)}
    smtp = NetnsMTA(mta_users, open_tmp, "postfix", master, env)
    try:
        accepted = "250 2.1.5 Ok"
        assert smtp.rcpt("192.0.2.7") == accepted, smtp.log()
        assert smtp.rcpt("2001:db8::7") == accepted, smtp.log()
        assert smtp.rcpt("192.0.2.9") == POSTFIX_DENIED, smtp.log()
        assert smtp.rcpt("2001:db8::9") == POSTFIX_DENIED, smtp.log()
        # The running Postfix sees updates in place: a new login, a deletion.
        ok(vsmtprelay("--config", config, "add", "192.0.2.9"))
        ok(vsmtprelay("--config", config, "delete", "2001:db8::7"))
        assert smtp.rcpt("192.0.2.9") == accepted, smtp.log()
        assert smtp.rcpt("2001:db8::7") == POSTFIX_DENIED, smtp.log()
    finally:
        smtp.close()


def test_postfix_check_client_access_in_recipient_restrictions_alone_relays_nobody(
    vsmtprelay: Run, mta_root: Path, mta_users: MtaUsers, open_tmp: Path
) -> None:
    """Why the recipe uses smtpd_relay_restrictions: its default defers relaying first."""
    db = open_tmp / "relayers.db"
    ok(vsmtprelay("--config", store_config(open_tmp, db, "postfix"), "add", "192.0.2.7"))
    table = open_tmp / "relayers"
    naive = f"smtpd_recipient_restrictions = check_client_access hash:{table}, reject\n"
    master = postfix_instance(mta_root, mta_users, open_tmp, table, fragment=naive)
    env = {**os.environ, "LD_LIBRARY_PATH": _library_path(mta_root)}
    smtp = NetnsMTA(mta_users, open_tmp, "postfix", master, env)
    try:
        assert smtp.rcpt("192.0.2.7") == "454 4.7.1 <user@remote.example>: Relay access denied"
    finally:
        smtp.close()


# --------------------------------------------------------------------------
# Exim

EXIM_CONF = """\
keep_environment =
primary_hostname = mta.relayproxy.test
spool_directory = {work}/spool
log_file_path = {work}/spool/%slog
domainlist local_domains = mta.relayproxy.test
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  accept  domains = +local_domains
{fragment}
  deny    message = relay not permitted
"""


def exim_instance(root: Path, users: MtaUsers, work: Path, db_base: Path) -> list[str]:
    """An Exim configuration whose acl_check_rcpt holds our fragment: the exim argv."""
    spool = work / "spool"
    spool.mkdir()
    os.chown(spool, users.uid["Debian-exim"], users.gid["Debian-exim"])
    conf = work / "exim.conf"
    conf.write_text(
        EXIM_CONF.format(work=work, fragment=recipe("exim/acl_check_rcpt.fragment", db_base))
    )
    return [str(root / "usr/sbin/exim4"), "-C", str(conf)]


def fragment_conditions(db_base: Path) -> list[str]:
    """The ``condition =`` expansions of the Exim fragment, in order."""
    fragment = recipe("exim/acl_check_rcpt.fragment", db_base)
    found = re.findall(r"^\s*(?:accept\s+)?condition\s*=\s*(.+?)\s*$", fragment, re.MULTILINE)
    assert len(found) == 3, fragment
    return found


def exim_be(root: Path, users: MtaUsers, argv: list[str], address: str, *lines: str) -> list[str]:
    """What `exim -be -oMa address` prints for each line (as Exim's users exist)."""
    mounts = 'mount --bind "$0/passwd" /etc/passwd && mount --bind "$0/group" /etc/group'
    namespace = ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', str(users.etc)]
    result = subprocess.run(
        [*namespace, *argv, "-be", "-oMa", address],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": _library_path(root)},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return [line.removeprefix("> ") for line in result.stdout.split("\n")[: len(lines)]]


def acl_statement(answers: list[str]) -> list[str]:
    """The answers an ACL statement uses: up to the first condition that is not true."""
    for number, answer in enumerate(answers):
        if answer != "true":
            return answers[: number + 1]
    return answers


def test_exim_fragment_conditions_under_exim_be(
    vsmtprelay: Run, mta_root: Path, mta_users: MtaUsers, open_tmp: Path
) -> None:
    db = open_tmp / "relayers.db"
    argv = exim_instance(mta_root, mta_users, open_tmp, open_tmp / "relayers")
    conditions = fragment_conditions(open_tmp / "relayers")

    def statement(address: str) -> list[str]:
        return acl_statement(exim_be(mta_root, mta_users, argv, address, *conditions))

    # Before the first login there is no file: not accepted, and no error.
    assert statement("192.0.2.7") == ["true", ""]

    config = store_config(open_tmp, db, "postfix")
    now = int(time.time())
    ok(vsmtprelay("--config", config, "add", "192.0.2.7", str(now - 60)))
    ok(vsmtprelay("--config", config, "add", "2001:db8::7", str(now - 60)))
    ok(vsmtprelay("--config", config, "add", "192.0.2.8", str(now - WINDOW - 60)))
    lookup = f"${{lookup{{$sender_host_address}}dbmnz{{{db}}}}}"
    assert exim_be(mta_root, mta_users, argv, "192.0.2.7", lookup) == [str(now - 60)]
    # dbm (not dbmnz) would look for "192.0.2.7\\0", which relayproxy never writes.
    with_nul = f"${{lookup{{$sender_host_address}}dbm{{{db}}}{{found}}{{absent}}}}"
    assert exim_be(mta_root, mta_users, argv, "192.0.2.7", with_nul) == ["absent"]
    assert statement("192.0.2.7") == ["true", "true", "true"]  # fresh: accept
    assert statement("2001:db8::7") == ["true", "true", "true"]  # fresh: accept
    assert statement("192.0.2.8") == ["true", "true", ""]  # stale: next statement
    assert statement("192.0.2.9") == ["true", "true", ""]  # absent: next statement


def test_exim_acl_relays_for_recently_recorded_clients(
    vsmtprelay: Run, mta_root: Path, mta_users: MtaUsers, open_tmp: Path
) -> None:
    db = open_tmp / "relayers.db"
    config = store_config(open_tmp, db, "postfix")
    now = int(time.time())
    ok(vsmtprelay("--config", config, "add", "192.0.2.7", str(now - 60)))
    ok(vsmtprelay("--config", config, "add", "2001:db8::7", str(now - 60)))
    ok(vsmtprelay("--config", config, "add", "192.0.2.8", str(now - WINDOW - 60)))
    sendmail_keys = store_config(open_tmp, db, "sendmail")
    ok(vsmtprelay("--config", sendmail_keys, "add", "2001:db8::8", str(now - 60)))
    argv = exim_instance(mta_root, mta_users, open_tmp, open_tmp / "relayers")
    env = {**os.environ, "LD_LIBRARY_PATH": _library_path(mta_root)}
    smtp = NetnsMTA(mta_users, open_tmp, "exim", argv, env)
    try:
        accepted = "250 Accepted"
        assert smtp.rcpt("192.0.2.7") == accepted, smtp.log()
        assert smtp.rcpt("2001:db8::7") == accepted, smtp.log()
        assert smtp.rcpt("192.0.2.8") == EXIM_DENIED, smtp.log()  # recorded too long ago
        assert smtp.rcpt("192.0.2.9") == EXIM_DENIED, smtp.log()  # never recorded
        # $sender_host_address is compressed: a sendmail-style key does not match.
        assert smtp.rcpt("2001:db8::8") == EXIM_DENIED, smtp.log()
        assert (
            "H=(client.example) [2001:db8::8] F=<sender@client.example> "
            "rejected RCPT <user@remote.example>: relay not permitted"
        ) in (open_tmp / "spool/mainlog").read_text()
        # Exim reads the file as Debian-exim: one it cannot read defers everyone.
        db.chmod(0o600)
        assert smtp.rcpt("192.0.2.7") == "451 Temporary local problem - please try later"
        db.chmod(0o644)
        assert smtp.rcpt("192.0.2.7") == accepted, smtp.log()
    finally:
        smtp.close()
