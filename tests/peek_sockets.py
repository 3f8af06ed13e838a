"""The TCP sockets of a running process, and the liveness options set on each.

A test that wants to know whether *every* migration socket got keepalive and a user
timeout cannot rely on a fault alone: one channel that notices a silent link is enough to
fail or pause a whole migration, and would hide a channel that never would. So this
looks at each socket itself: ``pidfd_getfd(2)`` (Linux 5.6) copies a descriptor out of
the running process (the same open socket, not a new one) and ``getsockopt`` reads its
options. Needs ptrace rights over the process (root, or its parent).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from dataclasses import dataclass
from pathlib import Path

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class TcpSocket:
    pid: int
    fd: int
    local: tuple
    peer: tuple
    keepalive: bool
    keepidle: int
    keepintvl: int
    user_timeout_ms: int


def _getfd(pidfd: int, fd: int) -> int:
    got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(got)


def connected_tcp_sockets(pid: int) -> list[TcpSocket]:
    """Every connected TCP socket ``pid`` holds (listeners are left out)."""
    out = []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if not os.readlink(entry).startswith("socket:"):
                    continue
                fd = int(entry.name)
                mine = _getfd(pidfd, fd)
            except (FileNotFoundError, ProcessLookupError, OSError):
                continue  # closed meanwhile
            s = socket.socket(fileno=mine)
            try:
                if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                    continue
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                try:
                    peer = s.getpeername()
                except OSError:
                    continue  # not connected (any more)
                out.append(TcpSocket(
                    pid, fd, s.getsockname(), peer,
                    bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                ))
            finally:
                s.close()  # our copy only: the process's descriptor stays open
    finally:
        os.close(pidfd)
    return out


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from every one of its threads)."""
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def descendants(pid: int) -> list[int]:
    """Children, their children, ... (a VM's helpers are forks of its helper launcher)."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out
