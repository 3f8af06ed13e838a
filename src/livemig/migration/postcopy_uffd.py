"""userfaultfd MISSING mode through ctypes, for postcopy: open, register, place pages, faults.

Only the standard library is used, so the postcopy fault-handler process
(:mod:`livemig.migration.postcopy_handler`) can import this module without numpy and
start in a few tens of milliseconds.

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
import struct

SYS_USERFAULTFD = 323  # x86-64
USERFAULTFD_IOC_NEW = 0xAA00
UFFD_API = 0xAA

UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_COPY_MODE_DONTWAKE = 1

UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1

MSG_SIZE = 32
_MSG = struct.Struct("<B7xQQI4x")  # event, flags, address, ptid

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class _ZeroPage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdError(OSError):
    pass


def _err(what: str) -> UffdError:
    e = ctypes.get_errno()
    return UffdError(e, f"{what}: {os.strerror(e)}")


def open_uffd(features: int = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID) -> int:
    """A new non-blocking, close-on-exec userfaultfd with ``features`` negotiated.

    Kernel-mode faults are included (no ``UFFD_USER_MODE_ONLY``): a page missing under
    ``recv_into`` or ``KVM_RUN`` must be handled like one missing under a guest store.
    """
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise _err("userfaultfd")
    api = _Api(UFFD_API, features, 0)
    if _libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
        err = _err("UFFDIO_API")
        os.close(fd)
        raise err
    return fd


def available() -> str | None:
    """None if userfaultfd with shmem MISSING support works here, else why not."""
    try:
        fd = open_uffd()
    except OSError as e:
        return str(e)
    os.close(fd)
    return None


def register_missing(fd: int, start: int, length: int) -> None:
    reg = _Register(_Range(start, length), UFFDIO_REGISTER_MODE_MISSING, 0)
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
        raise _err(f"UFFDIO_REGISTER 0x{start:x}+0x{length:x}")


def unregister(fd: int, start: int, length: int) -> None:
    """Unregister a range; the kernel wakes every thread still waiting in it."""
    rng = _Range(start, length)
    if _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(rng)) != 0:
        raise _err(f"UFFDIO_UNREGISTER 0x{start:x}+0x{length:x}")


def wake(fd: int, start: int, length: int) -> None:
    rng = _Range(start, length)
    _libc.ioctl(fd, UFFDIO_WAKE, ctypes.addressof(rng))


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
            z.range.start, z.range.len, z.mode, z.zeropage = dst + done, length - done, 0, 0
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


def parse_faults(buf: bytes | bytearray | memoryview) -> list[tuple[int, int, int]]:
    """``(address, flags, ptid)`` of each PAGEFAULT message in ``buf`` (other events skipped)."""
    out = []
    for off in range(0, len(buf) - MSG_SIZE + 1, MSG_SIZE):
        event, flags, address, ptid = _MSG.unpack_from(buf, off)
        if event == UFFD_EVENT_PAGEFAULT:
            out.append((address, flags, ptid))
    return out


# -- write protection (background snapshot, migration.snapshot) ----------------------------------

UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12  # WP on shmem (memfd) and hugetlbfs
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # WP markers in empty entries of anonymous memory
UFFD_PAGEFAULT_FLAG_WP = 2
IOCTL_WRITEPROTECT = 1 << 0x06  # in the ioctls mask UFFDIO_REGISTER returns


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


def supported_features() -> int:
    """Features the kernel offers (``UFFDIO_API`` reports all of them); 0 if none works."""
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return 0
    try:
        api = _Api(UFFD_API, 0, 0)
        if _libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
            return 0
        return int(api.features)
    finally:
        os.close(fd)


def register_wp(fd: int, start: int, length: int) -> int:
    """Register a range for write-protect faults; returns the allowed-ioctls mask."""
    reg = _Register(_Range(start, length), UFFDIO_REGISTER_MODE_WP, 0)
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
        raise _err(f"UFFDIO_REGISTER(WP) 0x{start:x}+0x{length:x}")
    return int(reg.ioctls)


class WriteProtector:
    """``UFFDIO_WRITEPROTECT`` with a reused argument block. Un-protecting wakes waiters.

    Works from any process holding the descriptor: the ranges are in the memory of the
    process that created it.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self._wp = _WriteProtect()
        self._addr = ctypes.addressof(self._wp)

    def __call__(self, start: int, length: int, protect: bool, dontwake: bool = False) -> None:
        wp = self._wp
        wp.range.start, wp.range.len = start, length
        wp.mode = (UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        while _libc.ioctl(self.fd, UFFDIO_WRITEPROTECT, self._addr) != 0:
            e = ctypes.get_errno()
            if e != errno.EAGAIN:  # EAGAIN: the mm is changing under us, retry
                raise UffdError(e, f"UFFDIO_WRITEPROTECT 0x{start:x}+0x{length:x} "
                                   f"wp={protect}: {os.strerror(e)}")
