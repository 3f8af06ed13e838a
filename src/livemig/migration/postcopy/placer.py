"""userfaultfd MISSING mode through ctypes, for postcopy: register, place pages, faults.

What MISSING and write-protect mode share (opening, the API handshake, registration,
unregister, wake, fault messages) lives in :mod:`livemig.memory.userfaultfd`; this module
adds only what postcopy needs on top: placing pages.

Only the standard library is used, so the postcopy fault-handler process
(:mod:`livemig.migration.postcopy.handler`) can import this module without numpy: the helper
launcher preloads the handler in a few milliseconds.

Numbers are the kernel's (``<linux/userfaultfd.h>``, x86-64, checked on this platform in
``platform-notes.md`` section 3). Every ioctl goes through ``ctypes``, which releases the
GIL for the duration of the call: a thread placing a page never blocks other Python
threads of its process.

Page placement follows the kernel's contract: ``UFFDIO_COPY`` and ``UFFDIO_ZEROPAGE``
atomically install a page that is missing and wake every thread waiting on it; a page that
is already present is left alone and reported as ``EEXIST``. That is what makes "nothing
is placed twice" hold even when two placers race for one page: the loser learns it lost.
"""

from __future__ import annotations

import ctypes
import errno
import os

from livemig.memory.userfaultfd import (
    MSG_SIZE,
    UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_THREAD_ID,
    UffdError,
    parse_faults,
    register_missing,
    unregister,
    wake,
)
from livemig.memory.userfaultfd import open_uffd as _open_uffd

__all__ = [
    "MSG_SIZE",
    "Placer",
    "UffdError",
    "available",
    "open_uffd",
    "parse_faults",
    "register_missing",
    "unregister",
    "wake",
]

UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_COPY_MODE_DONTWAKE = 1

POSTCOPY_FEATURES = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class _ZeroPage(ctypes.Structure):  # struct uffdio_zeropage: its range flattened
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("zeropage", ctypes.c_int64),
    ]


def open_uffd(features: int = POSTCOPY_FEATURES) -> int:
    """A new non-blocking, close-on-exec userfaultfd for postcopy.

    Kernel-mode faults are included (no ``UFFD_USER_MODE_ONLY``): a page missing under
    ``recv_into`` or ``KVM_RUN`` must be handled like one missing under a guest store.
    """
    return _open_uffd(features)


def available() -> str | None:
    """None if userfaultfd with shmem MISSING support works here, else why not."""
    try:
        fd = open_uffd()
    except OSError as e:
        return str(e)
    os.close(fd)
    return None


class Placer:
    """Reusable ioctl argument blocks for one thread (no allocation per page)."""

    def __init__(self, fd: int, page_size: int = 4096):
        self.fd = fd
        self.page_size = page_size
        self._copy = _Copy()
        self._copy_addr = ctypes.addressof(self._copy)
        self._zero = _ZeroPage()
        self._zero_addr = ctypes.addressof(self._zero)

    def copy(self, dst: int, src: int, length: int) -> tuple[int, int]:
        """Copy ``length`` bytes of pages from ``src`` to missing pages at ``dst``.

        Returns ``(placed, existed)`` in bytes: pages that were already present are
        skipped (never overwritten) and counted as existed. Any other error raises.
        """
        ps = self.page_size
        cp = self._copy
        placed = existed = 0
        done = 0
        while done < length:
            cp.dst, cp.src, cp.len, cp.mode, cp.copy = dst + done, src + done, length - done, 0, 0
            if _libc.ioctl(self.fd, UFFDIO_COPY, self._copy_addr) == 0:
                placed += length - done
                return placed, existed
            e = ctypes.get_errno()
            n = cp.copy
            if n > 0:  # partial progress, then the page at dst+done+n failed
                placed += n
                done += n
                continue
            if e == errno.EEXIST or n == -errno.EEXIST:
                existed += ps
                done += ps
                continue
            if e == errno.EAGAIN:  # mm changing under us (fork, mremap): retry
                continue
            raise UffdError(e, f"UFFDIO_COPY 0x{dst + done:x}+0x{length - done:x}: {os.strerror(e)}")
        return placed, existed

    def zeropage(self, dst: int, length: int) -> tuple[int, int]:
        """Map zero pages at missing pages of [dst, dst+length); ``(placed, existed)``."""
        ps = self.page_size
        z = self._zero
        placed = existed = 0
        done = 0
        while done < length:
            z.start, z.len, z.mode, z.zeropage = dst + done, length - done, 0, 0
            if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, self._zero_addr) == 0:
                placed += length - done
                return placed, existed
            e = ctypes.get_errno()
            n = z.zeropage
            if n > 0:
                placed += n
                done += n
                continue
            if e == errno.EEXIST or n == -errno.EEXIST:
                existed += ps
                done += ps
                wake(self.fd, dst + done - ps, ps)
                continue
            if e == errno.EAGAIN:
                continue
            raise UffdError(e, f"UFFDIO_ZEROPAGE 0x{dst + done:x}: {os.strerror(e)}")
        return placed, existed
