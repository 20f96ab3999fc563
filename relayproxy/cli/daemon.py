"""``relayproxy``: the daemon's command line.

Exit statuses: 0 stopped cleanly (or ``--check-config`` found no problem),
1 could not start (a listener could not bind), 2 a bad configuration: every
problem printed, one line each, naming file, section and key.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from relayproxy import systemd
from relayproxy.cli.options import daemon_parser, fail, parse, start_logs
from relayproxy.config import (
    Config,
    ConfigError,
    load_config,
)
from relayproxy.descriptors import SessionBudget, plan_descriptors
from relayproxy.privileges import PrivilegeError, become, target_identity
from relayproxy.service import LISTEN_BACKLOG, ListenError, RelayProxyService, load_tls
from relayproxy.tls import ListenerTLS, TLSConfigError
from relayproxy.workers import Supervisor, Worker, bind_listening

PROG = "relayproxy"
log = Logger(namespace="relayproxy")


def load(path: str) -> tuple[Config, dict[str, ListenerTLS]]:
    """Parse the file and every certificate it names; raises ConfigError or TLSConfigError."""
    config = load_config(path)
    if not config.listeners:
        raise ConfigError([f"{path}: no [listener:NAME] section: nothing to proxy"])
    return config, load_tls(config)


def config_notes(config: Config) -> list[str]:
    """Valid settings an operator should know the cost of (not errors)."""
    notes = []
    for listener in config.listeners:
        if listener.proxy_protocol_out == "none" and not listener.forward_id:
            notes.append(
                f"[listener:{listener.name}] sends no client address to its backend: the "
                "backend logs, and throttles after failed logins, every client as this "
                "proxy; set proxy_protocol_out = v2 (Dovecot: haproxy = yes on that listener)"
            )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = daemon_parser(
        PROG,
        "POP3/IMAP proxy that records successful logins in relayers.db "
        "for POP-before-SMTP relaying.",
    )
    # Set by the supervising parent only ([daemon] workers > 1): "n/N".
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options, path = parse(parser, argv)
    try:
        config, tls = load(path)
    except (ConfigError, TLSConfigError) as exc:
        return fail(PROG, exc.problems, 2)
    if options.check_config:
        for note in config_notes(config):
            print(f"{PROG}: {path}: note: {note}", file=sys.stderr)
        print(f"{PROG}: {path}: OK, {len(config.listeners)} listener(s)")
        return 0
    if options.worker:
        try:
            worker = Worker.from_environment(options.worker, dict(os.environ))
        except ValueError as exc:
            return fail(PROG, [str(exc)], 2)
        os.setpgid(0, 0)  # a Ctrl-C in a terminal reaches the parent, which stops us in order
        return run(worker.share(config), tls, path, worker)
    if config.daemon.workers > 1:
        return supervise(config, path)
    return run(config, tls, path)


def supervise(config: Config, path: str) -> int:
    """``[daemon] workers > 1``: bind every listener once, run the workers on them."""
    try:
        target_identity(config.daemon)  # refuse now, not in every worker
    except PrivilegeError as exc:
        return fail(PROG, [str(exc)], 2)
    sockets = {}
    for listener in config.listeners:
        address = str(listener.listen)
        if address in sockets:
            continue
        try:
            sockets[address] = bind_listening(listener.listen, LISTEN_BACKLOG)
        except CannotListenError as exc:
            return fail(
                PROG, [f"[listener:{listener.name}] listen {address}: {exc.socketError}"], 1
            )
    failed = start_logs(PROG, config)
    if failed is not None:
        return failed
    supervisor = Supervisor(config, path, reactor, sockets)
    reactor.callWhenRunning(supervisor.start)
    reactor.run()
    return 0 if supervisor.clean else 1


def run(
    config: Config, tls: dict[str, ListenerTLS], path: str, worker: Worker | None = None
) -> int:
    try:
        identity = target_identity(config.daemon)
    except PrivilegeError as exc:
        return fail(PROG, [str(exc)], 2)
    # Before anything is opened: the soft limit may have to grow first.
    descriptors = plan_descriptors(sum(listener.max_connections for listener in config.listeners))
    service = RelayProxyService(
        config, reactor, tls, SessionBudget(descriptors.sessions), worker=worker
    )
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
    if descriptors.short:
        log.warn(
            "daemon.descriptors needed={needed} limit={limit} hard_limit={hard} "
            "sessions={sessions} (raise LimitNOFILE= or the hard ulimit -n; sessions "
            "beyond that are refused so that recording keeps its descriptors)",
            needed=descriptors.needed,
            limit=descriptors.soft,
            hard=descriptors.hard,
            sessions=descriptors.sessions,
        )
    # logrotate renames the file, then sends SIGUSR1 (config/logrotate.d). The file
    # target reopens at the path before its next line by itself: this one, logged now,
    # lets go of the renamed file. From the reactor: a signal can land mid-line.
    signal.signal(
        signal.SIGUSR1,
        lambda signum, frame: reactor.callFromThread(log.info, "log.reopened signal=USR1"),  # type: ignore[attr-defined]
    )
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: reactor.callFromThread(_reload, service, path, worker),  # type: ignore[attr-defined]
    )
    if worker is not None:
        worker.attach(reactor, parent_gone=lambda: _parent_gone(worker))
    service.open_spool()  # as the daemon's user: the files are its own
    service.startService()
    # Ready once every listener is bound (above) and the store was opened.
    service.open_store().addCallback(lambda _: _ready(worker))
    reactor.addSystemEventTrigger("before", "shutdown", _stopping, service)
    reactor.run()
    return 0


def tell_systemd(notify: Callable[[], bool]) -> None:
    """sd_notify, with a socket that cannot be reached logged instead of raised."""
    try:
        notify()
    except OSError as exc:
        # Under Type=notify systemd then never sees this state (a missed
        # READY=1 ends in a start timeout): the log must say why.
        log.error("systemd.error error={error}", error=exc.strerror or str(exc))


def _ready(worker: Worker | None) -> None:
    """systemd hears it from the single process; a worker tells its parent instead."""
    if worker is None:
        tell_systemd(systemd.ready)
    else:
        worker.report_ready()


def _parent_gone(worker: Worker) -> None:
    """The supervisor ended without stopping us (killed): drain and stop as at SIGTERM."""
    if reactor.running:
        log.warn("daemon.worker.orphaned worker={worker}", worker=worker.number)
        reactor.stop()


def _stopping(service: RelayProxyService) -> object:
    tell_systemd(systemd.stopping)
    return service.stopService()


def _reload(service: RelayProxyService, path: str, worker: Worker | None = None) -> None:
    """SIGHUP: the new file for new connections, or the old one and the reasons."""
    tell_systemd(systemd.reloading)
    log.info("config.reload path={path}", path=path)
    try:
        config, tls = load(path)
    except (ConfigError, TLSConfigError) as exc:
        for problem in exc.problems:
            log.error("config.reload.failed problem={problem}", problem=problem)
        log.error("config.reload.kept reason={reason}", reason="the running configuration stays")
        _ready(worker)
        return
    if worker is not None:
        config = worker.share(config)
    for section, old, new in (
        ("log", service.config.log, config.log),
        ("daemon", service.config.daemon, config.daemon),
        ("metrics", service.config.metrics, config.metrics),  # bound once, before the switch
    ):
        if old != new:
            log.warn("config.reload.restart_needed section={section}", section=section)
    problems = service.reload(config, tls)
    for problem in problems:
        log.error("config.reload.failed problem={problem}", problem=problem)
    log.info(
        "config.reloaded listeners={listeners} problems={problems}",
        listeners=len(service.listening),
        problems=len(problems),
    )
    _ready(worker)


if __name__ == "__main__":
    sys.exit(main())
