"""``vsmtprelay``: the administrator's command over the relayer set.

Owns the command line and its exit statuses (0 done, 1 failed or an address
was absent, 2 bad usage: nothing written). Every argument is validated
before the store is opened, so a typo never changes it. The store is the
one ``[store]`` of the configuration names (relayers.db, or Redis with
``backend = redis``); ``--db`` always names a file.

Before a command reads or changes the store, logins that a stopped daemon
left in its spool are applied to it (``relayproxy.spool.apply_leftovers``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from relayproxy import __version__
from relayproxy.addresses import (
    AddressError,
    IPAddress,
    IPv6KeyStyle,
    all_relayer_keys,
    parse_client_address,
    relayer_keys,
)
from relayproxy.config import ConfigError, StoreConfig, find_config_path, load_config
from relayproxy.spool import SpoolError, apply_leftovers
from relayproxy.store import Entry, StoreError, StoreMissingError
from relayproxy.stores import Store, open_store

PROG = "vsmtprelay"
CLASSIC_PATH = os.path.join("~", "etc", "relayers.db")

# Exim's recipe compares the stored seconds as a signed 64-bit integer
# (${if >{...}{...}}): a larger value is an expansion error there. Minutes
# are bounded so that the cutoff (now - 60 n) is one too: the journal
# stores it as one.
MAX_TICKS = 2**63 - 1
MAX_MINUTES = MAX_TICKS // 60
# An argument longer than this is quoted cut short in an error line. No
# address is longer ("IPv6:" and 45 characters of IPv4-mapped IPv6).
MAX_SHOWN = 64
PATH_MAX = 4096  # Linux's, with its NUL: a longer path fails every open() anyway

USAGE = f"""\
{PROG} {__version__}
usage: {PROG} [--db PATH | --config PATH] command [arg] [...]
  add ip [ticks]     insert address with current timestamp (or ticks)
  delete ip [...]    remove specified address(es)
  expire [n]         expire all old (or older than n minutes) entries
  list [n]           list all old (or older than n minutes) entries
  dump               list every entry, including the future timestamped
"""

HELP = (
    USAGE
    + """
options:
  --db PATH          the database file (default: [store] path of the config
                     file, else ~/etc/relayers.db)
  --config PATH      the relayproxy INI file (default: $RELAYPROXY_CONFIG,
                     else /etc/relayproxy/relayproxy.ini when it exists); with
                     [store] backend = redis (and no --db) the commands work
                     on Redis
  -h, --help         show this help
  --version          show the version

list and dump print IP<TAB>seconds lines, sorted by address; `makemap hash`
rebuilds the same map from them. An entry with a future timestamp is pinned:
list and expire leave it alone. ticks is at most 9223372036854775807 (2**63-1),
n at most 153722867280912930.

Before any command, the logins a stopped relayproxy left in its spool
(PATH.spool-a and .spool-b, and each worker's .spool-N-a and .spool-N-b)
are stored and the spool emptied.
"""
)


class UsageError(Exception):
    """Bad command line: one line of explanation, exit status 2."""


def _shown(word: str) -> str:
    """``word`` quoted for an error line: a 10 KB argument must not become a 10 KB line."""
    if len(word) <= MAX_SHOWN:
        return repr(word)
    return f"{word[:MAX_SHOWN]!r}... ({len(word)} characters)"


def _fail_usage(message: str | None = None) -> NoReturn:
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    else:
        sys.stderr.write(USAGE)
    raise SystemExit(2)


def _bounded(word: str, what: str, limit: int) -> int:
    digits = word.lstrip("0") or "0"
    # Compared as text first: int() refuses (ValueError) past 4300 digits.
    if (
        not word.isascii()
        or not word.isdigit()
        or len(digits) > len(str(limit))
        or int(digits) > limit
    ):
        raise UsageError(f"{what} must be a whole number from 0 to {limit}, not {_shown(word)}")
    return int(digits)


def _client_address(word: str) -> IPAddress:
    # The parser's messages quote parts of the word: only a short one reaches it.
    if len(word) > MAX_SHOWN:
        raise UsageError(f"invalid address {_shown(word)}: too long to be an IP address")
    try:
        return parse_client_address(word)
    except AddressError as exc:
        raise UsageError(f"invalid address {word!r}: {exc}") from None


def _address(word: str) -> tuple[str, ...]:
    return all_relayer_keys(_client_address(word))


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class _Tool:
    def __init__(self, store: Store, ipv6_keys: IPv6KeyStyle, now: int) -> None:
        self.store = store
        self.ipv6_keys = ipv6_keys
        self.now = now

    def add(self, args: Sequence[str]) -> Callable[[], int]:
        if not 1 <= len(args) <= 2:
            raise UsageError("add takes an address and an optional timestamp (ticks)")
        keys = relayer_keys(_client_address(args[0]), self.ipv6_keys)
        seconds = _bounded(args[1], "ticks", MAX_TICKS) if len(args) == 2 else self.now

        def run() -> int:
            self.store.record((key, seconds) for key in keys)
            return 0

        return run

    def delete(self, args: Sequence[str]) -> Callable[[], int]:
        if not args:
            raise UsageError("delete needs at least one address")
        groups = [(word, _address(word)) for word in args]

        def run() -> int:
            absent = self.store.delete(key for _, keys in groups for key in keys)
            missing = [word for word, keys in groups if absent.issuperset(keys)]
            for word in missing:
                print(f"{PROG}: {word}: not in {self.store.path}", file=sys.stderr)
            return 1 if missing else 0

        return run

    def expire(self, args: Sequence[str]) -> Callable[[], int]:
        cutoff = self._cutoff(args, "expire")

        def run() -> int:
            removed = self.store.expire(cutoff)
            print(
                f"{PROG}: expired {removed} entr{'y' if removed == 1 else 'ies'}", file=sys.stderr
            )
            return 0

        return run

    def list(self, args: Sequence[str]) -> Callable[[], int]:
        cutoff = self._cutoff(args, "list")
        return lambda: self._print(lambda e: e.seconds is not None and e.seconds <= cutoff)

    def dump(self, args: Sequence[str]) -> Callable[[], int]:
        if args:
            raise UsageError("dump takes no arguments")
        return lambda: self._print(lambda e: True)

    def _cutoff(self, args: Sequence[str], command: str) -> int:
        if len(args) > 1:
            raise UsageError(f"{command} takes at most one argument (minutes)")
        minutes = _bounded(args[0], "n (minutes)", MAX_MINUTES) if args else 0
        return self.now - 60 * minutes

    def _print(self, keep: Callable[[Entry], bool]) -> int:
        out = sys.stdout.buffer

        def checked(entry: Entry) -> bool:
            if entry.seconds is None:
                _warn(f"{entry.key!r} has a value that is not a timestamp: {entry.value!r}")
            return keep(entry)

        try:
            for entry in self.store.sorted_entries(checked):
                out.write(entry.key + b"\t" + entry.value + b"\n")
        except StoreMissingError:
            _warn(f"{self.store.path} does not exist; nothing to list")
        out.flush()
        return 0


COMMANDS = ("add", "delete", "expire", "list", "dump")


def _store_settings(db: str | None, config: str | None) -> StoreConfig:
    path = find_config_path(config)
    if db is not None:
        settings = StoreConfig(path=db)
        if path is None:
            return settings
    elif path is None:
        return StoreConfig(path=os.path.expanduser(CLASSIC_PATH))
    try:
        loaded = load_config(path).store
    except ConfigError as exc:
        if config is None and db is not None:
            return StoreConfig(path=db)
        for line in exc.problems:
            print(f"{PROG}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    if db is None:
        return loaded
    # Every other [store] setting kept; --db names a file even beside a Redis store.
    return dataclasses.replace(loaded, path=db, backend="file")


def _path_problem(path: str) -> str | None:
    """Why ``path`` can never name a file, whatever is on disk."""
    if "\x00" in path:
        return f"the database path {_shown(path)} contains a NUL byte"
    size = len(os.fsencode(path))
    if size >= PATH_MAX:
        return f"the database path {_shown(path)} is too long (at most {PATH_MAX - 1} bytes)"
    return None


def _not_a_database(path: str) -> str | None:
    """Why the file at ``path`` cannot be the database, when stat() already says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent (created or reported so) or out of reach: the store says which
    if stat.S_ISDIR(mode):
        # Said here, or Berkeley DB says it twice and names the path twice.
        return f"cannot open {path}: {os.strerror(errno.EISDIR)}"
    if not stat.S_ISREG(mode):
        # A FIFO would block the open() for ever; no device is a hash file.
        return f"cannot open {path}: not a regular file"
    return None


def _apply_spool(store: Store, spool_path: str, *, reading: bool) -> None:
    """Apply what a stopped daemon left in the spool, before the command sees the store."""
    try:
        applied = apply_leftovers(store, spool_path)
    except SpoolError as exc:
        _warn(f"{exc}; logins left in the spool are not applied")
        return
    except StoreError as exc:
        if not reading:
            raise  # the command itself needs the same store: one error, its own
        _warn("logins left in the spool are not applied: " + str(exc))
        return
    if applied:
        print(
            f"{PROG}: applied {applied} entr{'y' if applied == 1 else 'ies'} left in the spool "
            "by a stopped relayproxy",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)

    def parser_error(message: str) -> NoReturn:
        # argparse quotes the words it did not expect in full.
        for word in words:
            if len(word) > MAX_SHOWN:
                message = message.replace(word, _shown(word))
        _fail_usage(message)

    parser = argparse.ArgumentParser(prog=PROG, add_help=False, usage=argparse.SUPPRESS)
    parser.add_argument("--db")
    parser.add_argument("--config")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("command", nargs="?")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.error = parser_error  # type: ignore[method-assign]
    options = parser.parse_args(words)
    if options.help:
        sys.stdout.write(HELP)
        return 0
    if options.version:
        print(f"{PROG} {__version__}")
        return 0
    if options.command not in COMMANDS:
        if options.command is not None:
            print(f"{PROG}: unknown command {_shown(options.command)}", file=sys.stderr)
        _fail_usage()
    settings = _store_settings(options.db, options.config)
    problem = _path_problem(settings.path)
    if problem:
        _fail_usage(problem)
    # Opens nothing yet: a Redis store connects at its first call.
    store = open_store(settings, _warn)
    tool = _Tool(store, settings.ipv6_keys, int(time.time()))
    try:
        run = getattr(tool, options.command)(options.args)
    except UsageError as exc:
        _fail_usage(str(exc))
    problem = _not_a_database(settings.path) if settings.backend == "file" else None
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    try:
        # First, so that a delete or an expire is not undone by the daemon's
        # next start replaying the spool, and list shows every login.
        _apply_spool(store, settings.path, reading=options.command in ("list", "dump"))
        return int(run())
    except StoreError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
