"""``relayproxy-map``: the socketmap server's command line.

Exit statuses, as the daemon's: 0 stopped cleanly (or ``--check-config``
found no problem), 1 could not start (``[map] listen`` could not bind),
2 a bad configuration, every problem printed one a line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from twisted.internet import reactor
from twisted.logger import Logger

from relayproxy import systemd
from relayproxy.cli.daemon import tell_systemd
from relayproxy.cli.options import daemon_parser, fail, parse, start_logs
from relayproxy.config import (
    Config,
    ConfigError,
    load_config,
)
from relayproxy.mapserver import MapService
from relayproxy.privileges import PrivilegeError, become, target_identity
from relayproxy.service import ListenError

PROG = "relayproxy-map"
log = Logger(namespace="relayproxy")


def load(path: str) -> Config:
    """The configuration, with the ``[map]`` section this program needs; raises ConfigError."""
    config = load_config(path)
    if config.map.listen is None:
        raise ConfigError([f"{path}: [map] listen: missing (where {PROG} answers the MTAs)"])
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = daemon_parser(
        PROG,
        "Socketmap server answering sendmail's and Postfix's relay lookups "
        "from the relayer store (a local relayers.db or Redis).",
    )
    options, path = parse(parser, argv)
    try:
        config = load(path)
    except ConfigError as exc:
        return fail(PROG, exc.problems, 2)
    if options.check_config:
        print(f"{PROG}: {path}: OK, answering on {config.map.listen}")
        return 0
    return run(config, path)


def run(config: Config, path: str) -> int:
    try:
        identity = target_identity(config.daemon)
    except PrivilegeError as exc:
        return fail(PROG, [str(exc)], 2)
    service = MapService(config, reactor)
    try:
        service.listen()
    except ListenError as exc:
        return fail(PROG, [str(exc)], 1)
    failed = start_logs(PROG, config)  # the log file is opened before the switch
    if failed is not None:
        return failed
    if identity is not None:
        try:
            become(identity)
        except (OSError, PrivilegeError) as exc:
            return fail(PROG, [f"cannot become {identity.user}:{identity.group}: {exc}"], 1)
        log.info(
            "daemon.identity user={user} group={group}", user=identity.user, group=identity.group
        )
    # From the reactor: a signal can land mid-line (see relayproxy.cli.daemon).
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: reactor.callFromThread(log.info, "log.reopened signal=USR1"),  # type: ignore[attr-defined]
    )
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: reactor.callFromThread(_reload, service, path),  # type: ignore[attr-defined]
    )
    service.startService()
    # Ready once bound and the store was read once (a store that is down is
    # logged, and answered TEMP, but does not keep the MTAs' lookups waiting).
    service.check_store().addCallback(lambda _: tell_systemd(systemd.ready))
    reactor.addSystemEventTrigger("before", "shutdown", _stopping, service)
    reactor.run()
    return 0


def _stopping(service: MapService) -> object:
    tell_systemd(systemd.stopping)
    return service.stopService()


def _reload(service: MapService, path: str) -> None:
    """SIGHUP: the new file's [map] and [store], or the old ones and the reasons."""
    tell_systemd(systemd.reloading)
    log.info("config.reload path={path}", path=path)
    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config.reload.failed problem={problem}", problem=problem)
        log.error("config.reload.kept reason={reason}", reason="the running configuration stays")
    else:
        for section in ("log", "daemon"):
            if getattr(service.config, section) != getattr(config, section):
                log.warn("config.reload.restart_needed section={section}", section=section)
        service.reload(config)
        log.info("config.reloaded max_age={max_age}", max_age=config.map.max_age)
    tell_systemd(systemd.ready)


if __name__ == "__main__":
    sys.exit(main())
