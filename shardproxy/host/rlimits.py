"""What the process's descriptor limit allows.

A tunnel costs a worker two descriptors (client and backend socket); a worker
keeps :data:`FD_RESERVE` for itself (listen sockets, control channel, epoll,
trio's wake-up pipe, log file, sockets of handshakes being answered).
"""

from __future__ import annotations

import resource

FD_RESERVE = 64


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if soft < hard else soft


def fd_capacity(nofile: int) -> int:
    """Connections one worker can hold with ``nofile`` descriptors."""
    return max(0, (nofile - FD_RESERVE) // 2)
