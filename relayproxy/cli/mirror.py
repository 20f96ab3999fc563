"""``relayproxy-mirror``: a local relayers.db kept in step with the relayer set on Redis.

Reads Redis from ``[store]`` (``backend = redis``) and writes ``[mirror]
path``, for MTAs that read a hash file. Exit statuses: 0 stopped cleanly
(or ``--check-config`` found no problem), 1 could not start (the log
target), 2 a bad configuration: every problem printed, one line each.
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
from relayproxy.mirror_service import MirrorLoop, build_mirror
from relayproxy.redis_store import display_name

PROG = "relayproxy-mirror"
log = Logger(namespace="relayproxy")


def load(path: str) -> Config:
    """Parse the file; raises ConfigError when it has no ``[mirror]`` to write."""
    config = load_config(path)
    if config.mirror.path is None:
        raise ConfigError([f"{path}: no [mirror] section: no file to keep in step with Redis"])
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = daemon_parser(
        PROG,
        "Keep a local relayers.db (Berkeley DB hash, for the MTAs) in step "
        "with the relayer set on Redis.",
    )
    options, path = parse(parser, argv)
    try:
        config = load(path)
    except ConfigError as exc:
        return fail(PROG, exc.problems, 2)
    if options.check_config:
        print(f"{PROG}: {path}: OK, {display_name(config.store)} -> {config.mirror.path}")
        return 0
    return run(config, path)


def run(config: Config, path: str) -> int:
    failed = start_logs(PROG, config)
    if failed is not None:
        return failed
    loop = MirrorLoop(build_mirror(config), reactor, expire_interval=config.mirror.expire_interval)
    log.info(
        "mirror.start redis={redis} stream={stream} path={path}",
        redis=display_name(config.store),
        stream=config.store.redis_stream,
        path=config.mirror.path,
    )
    # From the reactor: a signal can land mid-line (see relayproxy.cli.daemon).
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: reactor.callFromThread(log.info, "log.reopened signal=USR1"),  # type: ignore[attr-defined]
    )
    current = [config]
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: reactor.callFromThread(_reload, loop, current, path),  # type: ignore[attr-defined]
    )
    reactor.callWhenRunning(loop.start)
    loop.started.addCallback(lambda _: tell_systemd(systemd.ready))
    reactor.addSystemEventTrigger("before", "shutdown", _stopping, loop)
    reactor.run()
    log.info("mirror.stop")
    return 0


def _stopping(loop: MirrorLoop) -> object:
    tell_systemd(systemd.stopping)
    return loop.stop()


def _reload(loop: MirrorLoop, current: list[Config], path: str) -> None:
    """SIGHUP: a new Redis connection and file (and a resync) when their settings changed."""
    tell_systemd(systemd.reloading)
    log.info("config.reload path={path}", path=path)
    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config.reload.failed problem={problem}", problem=problem)
        log.error("config.reload.kept reason={reason}", reason="the running configuration stays")
        tell_systemd(systemd.ready)
        return
    old, current[0] = current[0], config
    for key, was, now in (
        ("[log]", old.log, config.log),
        ("[mirror] expire_interval", old.mirror.expire_interval, config.mirror.expire_interval),
    ):
        if was != now:
            log.warn("config.reload.restart_needed setting={setting}", setting=key)
    changed = old.store != config.store or old.mirror != config.mirror
    if changed:
        mirror = build_mirror(config)
        mirror.gap = "reload"
        loop.replace(mirror)
    log.info("config.reloaded changed={changed}", changed="yes" if changed else "no")
    tell_systemd(systemd.ready)


if __name__ == "__main__":
    sys.exit(main())
