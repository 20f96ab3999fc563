"""``vsmtprelay``: the administrator's command over relayers.db.

Owns the command line and its exit statuses (0 done, 1 failed or an address
was absent, 2 bad usage: nothing written). Every argument is validated
before the database is opened, so a typo never changes the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from relayproxy import __version__
from relayproxy.addresses import (
    AddressError,
    IPv6KeyStyle,
    all_relayer_keys,
    parse_client_address,
    relayer_keys,
)
from relayproxy.config import ConfigError, StoreConfig, find_config_path, load_config
from relayproxy.store import Entry, RelayStore, StoreError, StoreMissingError

PROG = "vsmtprelay"
CLASSIC_PATH = os.path.join("~", "etc", "relayers.db")

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
  --db PATH          the database (default: [store] path of the config file,
                     else ~/etc/relayers.db)
  --config PATH      the relayproxy INI file (default: $RELAYPROXY_CONFIG,
                     else /etc/relayproxy/relayproxy.ini when it exists)
  -h, --help         show this help
  --version          show the version

list and dump print IP<TAB>seconds lines, sorted by address; `makemap hash`
rebuilds the same map from them. An entry with a future timestamp is pinned:
list and expire leave it alone.
"""
)


class UsageError(Exception):
    """Bad command line: one line of explanation, exit status 2."""


def _fail_usage(message: str | None = None) -> NoReturn:
    if message:
        print(f"{PROG}: {message}", file=sys.stderr)
    else:
        sys.stderr.write(USAGE)
    raise SystemExit(2)


def _non_negative(word: str, what: str) -> int:
    if not word.isascii() or not word.isdigit():
        raise UsageError(f"{what} must be a non-negative whole number, not {word!r}")
    return int(word)


def _address(word: str) -> tuple[str, ...]:
    try:
        return all_relayer_keys(parse_client_address(word))
    except AddressError as exc:
        raise UsageError(f"invalid address {word!r}: {exc}") from None


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class _Tool:
    def __init__(self, store: RelayStore, ipv6_keys: IPv6KeyStyle, now: int) -> None:
        self.store = store
        self.ipv6_keys = ipv6_keys
        self.now = now

    def add(self, args: Sequence[str]) -> Callable[[], int]:
        if not 1 <= len(args) <= 2:
            raise UsageError("add takes an address and an optional timestamp (ticks)")
        try:
            keys = relayer_keys(parse_client_address(args[0]), self.ipv6_keys)
        except AddressError as exc:
            raise UsageError(f"invalid address {args[0]!r}: {exc}") from None
        seconds = _non_negative(args[1], "ticks") if len(args) == 2 else self.now

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
        minutes = _non_negative(args[0], "n (minutes)") if args else 0
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
    return StoreConfig(
        path=db,
        mode=loaded.mode,
        group=loaded.group,
        ipv6_keys=loaded.ipv6_keys,
        lock_timeout=loaded.lock_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False, usage=argparse.SUPPRESS)
    parser.add_argument("--db")
    parser.add_argument("--config")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("command", nargs="?")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.error = _fail_usage  # type: ignore[method-assign]
    options = parser.parse_args(argv)
    if options.help:
        sys.stdout.write(HELP)
        return 0
    if options.version:
        print(f"{PROG} {__version__}")
        return 0
    if options.command not in COMMANDS:
        if options.command is not None:
            print(f"{PROG}: unknown command {options.command!r}", file=sys.stderr)
        _fail_usage()
    settings = _store_settings(options.db, options.config)
    store = RelayStore(
        settings.path,
        mode=settings.mode,
        group=settings.group,
        lock_timeout=settings.lock_timeout,
        notice=_warn,
    )
    tool = _Tool(store, settings.ipv6_keys, int(time.time()))
    try:
        run = getattr(tool, options.command)(options.args)
    except UsageError as exc:
        _fail_usage(str(exc))
    try:
        return int(run())
    except StoreMissingError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
