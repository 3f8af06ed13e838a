"""Page data between guest RAM and a channel socket through a pipe, without user-space copies.

Two directions, usable by the multifd channels (``multifd.py``) on plain tcp and unix
sockets when ``LIVEMIG_SPLICE`` asks for them (TLS needs the bytes in user space):

* **Send** (:meth:`PipeSplicer.send_from_memory`): ``vmsplice`` puts references to guest
  RAM pages into the pipe, ``splice`` hands them to the socket. The kernel does not copy
  the data into socket buffers; on loopback the receiver copies straight out of the
  source's pages. The pages are read when the receiver copies them, not when the call
  returns: a guest write in between makes the receiver get the newer content, which
  precopy allows because the dirty log was cleared before the page was queued, so that
  write is also logged and the page is sent again. During the final stage the guest is
  stopped.
* **Receive** (:meth:`PipeSplicer.recv_to_file`): ``splice`` moves the socket's buffers
  into the pipe and copies them into the memfd's pages. A page the file does not have yet
  is allocated for a full-page write and not cleared first, and no page table of this
  process is touched: on this machine that is what a received byte costs most (a page
  fault, clearing the page, then copying into it). The guest's mapping finds the pages
  later in the page cache.

Every call releases the GIL (``os.splice``; ``vmsplice`` through ctypes).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
from contextlib import nullcontext
from typing import Any

PIPE_SIZE = 1 << 20  # the default fs.pipe-max-size
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
WAIT_SLICE = 1.0  # seconds per poll while a non-blocking socket is not ready


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_uint]
_libc.vmsplice.restype = ctypes.c_ssize_t


def enabled(direction: str) -> bool:
    """``LIVEMIG_SPLICE``: ``none`` (default), ``recv``, ``send`` or ``both``.

    Off by default because on this machine neither direction won in both of the
    destination-memory conditions the benchmarks compare (docs/multifd.md has the
    figures): receiving through a pipe was up to 10% faster into warm host memory and
    about 30% slower into cold host memory, where parallel populate threads take the
    first-touch faults outside the file's lock; sending through a pipe saved the source
    CPU but cost the loopback destination more.
    """
    v = os.environ.get("LIVEMIG_SPLICE", "none")
    return v == "both" or v == direction


def usable(sock: Any, direction: str) -> bool:
    """Only a plain kernel socket can be spliced (not a TLS wrapper)."""
    return enabled(direction) and type(sock) is socket.socket


class PipeSplicer:
    """One pipe per channel; not thread-safe (a channel has one thread)."""

    def __init__(self, sock: socket.socket):
        self.sfd = sock.fileno()
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more calls
        self.size = fcntl.fcntl(self.w, F_GETPIPE_SZ)

    def _wait(self, read: bool) -> None:
        """The socket has a timeout, so it is non-blocking: wait until it is ready."""
        if read:
            select.select([self.sfd], [], [], WAIT_SLICE)
        else:
            select.select([], [self.sfd], [], WAIT_SLICE)

    def send_from_memory(self, addr: int, n: int) -> None:
        """Send ``n`` bytes of memory at host address ``addr`` (see the module docstring)."""
        done = 0
        while done < n:
            iov = _IoVec(addr + done, min(self.size, n - done))
            k = _libc.vmsplice(self.w, ctypes.byref(iov), 1, 0)
            if k < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"vmsplice: {os.strerror(e)}")
            done += k
            while k:
                try:
                    k -= os.splice(self.r, self.sfd, k, flags=os.SPLICE_F_MOVE)
                except BlockingIOError:
                    self._wait(read=False)

    def recv_to_file(self, fd: int, off: int, n: int, file_lock: Any = None) -> int:
        """Move ``n`` bytes of the stream into file ``fd`` at ``off``; fewer only at its end.

        ``file_lock`` (a lock per file, shared by the channels): a write to a shmem file
        holds the inode's lock, and a second writer spins on it, burning the CPU that
        the other side of a loopback migration needs; waiting on our own lock sleeps.
        """
        done = 0
        while done < n:
            try:
                k = os.splice(self.sfd, self.w, min(self.size, n - done), flags=os.SPLICE_F_MOVE)
            except BlockingIOError:
                self._wait(read=True)
                continue
            if not k:
                return done
            with file_lock or nullcontext():
                end = done + k
                while done < end:  # the pipe holds k bytes: empty it into the file
                    done += os.splice(self.r, fd, end - done, offset_dst=off + done, flags=os.SPLICE_F_MOVE)
        return done

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
