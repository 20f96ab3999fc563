"""What the three daemons' command lines share: --config, --check-config, --version.

relayproxy, relayproxy-map and relayproxy-mirror read the same INI file and
are run the same way by systemd and by an administrator, so they take it
by the same options, found by the same rule.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from relayproxy import __version__
from relayproxy.config import DEFAULT_CONFIG_PATH, find_config_path


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
