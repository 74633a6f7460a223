"""The descriptor limit: raised once in the master (workers inherit it), and the connection
limit a worker derives from it when ``max_connections`` is not set."""

from __future__ import annotations

import resource

FD_RESERVE = 64  # descriptors kept for modules, outgoing connections and the framework


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (called in the master, so workers inherit
    it); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections() -> int:
    """Without ``max_connections``: the descriptor limit less a reserve, so that a flood meets
    mpnet's own counted and logged limit before the kernel's EMFILE (which libuv survives by
    closing the excess connections, but silently)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, soft - FD_RESERVE)
