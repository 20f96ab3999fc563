"""What the three daemons' command lines share: --config, --check-config, --version, errors.

relayproxy, relayproxy-map and relayproxy-mirror read the same INI file and
are run the same way by systemd and by an administrator, so they take it
by the same options, found by the same rule.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from relayproxy import __version__
from relayproxy.config import DEFAULT_CONFIG_PATH, Config, find_config_path
from relayproxy.logs import start_logging


def daemon_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the shared options; a daemon may add its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"the INI file (default: $RELAYPROXY_CONFIG, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit 0 or 2"
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, str]:
    """The options, and the configuration file they name (or the default one)."""
    options = parser.parse_args(argv)
    return options, find_config_path(options.config) or DEFAULT_CONFIG_PATH


def fail(prog: str, lines: Sequence[str], status: int) -> int:
    """Each line on stderr after the program's name; ``status``, for ``main`` to return."""
    for line in lines:
        print(f"{prog}: {line}", file=sys.stderr)
    return status


def start_logs(prog: str, config: Config) -> int | None:
    """Open ``[log] target``; None when done, else the exit status after one line on stderr."""
    try:
        start_logging(config.log)
    except OSError as exc:
        return fail(
            prog, [f"{config.source}: [log] target: {config.log.target}: {exc.strerror}"], 1
        )
    return None
