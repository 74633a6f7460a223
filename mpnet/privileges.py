"""Running as the service's account: the switch from root, and the refusal to run modules as
root by accident.

The master keeps root (it binds ports and re-binds them on reload); each worker and the checker
switch to ``user``/``group`` right after the fork, before any module code runs. Under the shipped
unit (``DynamicUser=yes``) systemd has already done it and the switch does nothing.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd

from .pure.config import Config, ConfigError

logger = logging.getLogger("mpnet.privileges")


def become_service_user(config: Config) -> None:
    """Become ``user``/``group`` before any module code runs; refuse root unless allowed.

    Called in workers and in the checker, so a start fails early, with the same message, when
    the account is missing or the modules cannot load as that user.
    """
    if config["user"]:
        try:
            drop_privileges(config["user"], config["group"])
        except (LookupError, PermissionError) as exc:
            raise ConfigError(f"{config.path}: key 'user': {exc}") from None
    elif config["group"]:
        raise ConfigError(f"{config.path}: key 'group' needs 'user' as well")
    if os.geteuid() == 0 and not config["allow_root"]:
        raise ConfigError(
            f'{config.path}: refusing to run workers as root; set user = "<account>" '
            f"(the master binds the ports first) or allow_root = true"
        )


def running_as_root() -> bool:
    """True when the effective user is root, i.e. privileges could be dropped."""
    return os.geteuid() == 0


def drop_privileges(user: str, group: str | None = None) -> None:
    """Switch the whole process to ``user`` (and ``group``, default: its primary group).

    Called in a freshly forked worker or checker of a master started as root
    (the master binds the ports, < 1024 needing root or CAP_NET_BIND_SERVICE,
    and keeps root for reloads).  The order matters: supplementary groups
    (``initgroups``) and the group need root, so they come before ``setuid``.
    Real, effective and saved IDs all change, so root cannot be regained;
    that is checked.

    If the process already runs as that user and group (systemd applied
    ``User=``/``DynamicUser=``), this does nothing.  Raises ``LookupError``
    naming the account when the user or group does not exist, and
    ``PermissionError`` when a switch is needed but we are not root.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"cannot drop privileges: no such user {user!r}") from None
    if group is None:
        gid = pw.pw_gid
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"cannot drop privileges: no such group {group!r}") from None
    uid = pw.pw_uid

    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        return
    if not running_as_root():
        raise PermissionError(
            errno.EPERM,
            f"cannot switch to user {user!r} (uid {uid}, gid {gid}): "
            f"running as uid {os.geteuid()}, not root",
        )
    os.initgroups(user, gid)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("drop_privileges: root privileges could be regained")
    logger.info("dropped privileges to user %s (uid %d, gid %d)", user, uid, gid)
