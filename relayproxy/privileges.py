"""Who the daemon runs as: bind as root, then become an unprivileged user.

Owns the decision to refuse running as root and the switch itself. Never
imports Twisted; called once, after every listener is bound and the log
file opened, before the first connection is accepted.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from relayproxy.config import DaemonConfig


class PrivilegeError(Exception):
    """The daemon cannot run as configured; the message says why and what to set."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    group: str
    gid: int


def target_identity(settings: DaemonConfig) -> Identity | None:
    """The identity to switch to, or None to stay as we are; raises PrivilegeError."""
    euid = os.geteuid()
    if settings.user is None:
        if euid == 0 and not settings.allow_root:
            raise PrivilegeError(
                "refusing to run as root: set [daemon] user (the daemon binds its "
                "ports first, then switches), or allow_root = yes"
            )
        return None
    account = pwd.getpwnam(settings.user)
    group = grp.getgrnam(settings.group) if settings.group else grp.getgrgid(account.pw_gid)
    if euid != 0:
        if account.pw_uid != euid:
            raise PrivilegeError(
                f"[daemon] user = {settings.user}: not started as root, so cannot become "
                f"that user (running as uid {euid})"
            )
        return None
    if account.pw_uid == 0 and not settings.allow_root:
        raise PrivilegeError("[daemon] user is root: set allow_root = yes to mean it")
    return Identity(settings.user, account.pw_uid, group.gr_name, group.gr_gid)


def become(identity: Identity) -> None:
    """Switch to ``identity`` for good (supplementary groups dropped first)."""
    os.setgroups([identity.gid])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError("could regain root after switching users: refusing to run")
