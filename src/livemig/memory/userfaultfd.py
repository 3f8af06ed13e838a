"""userfaultfd through ctypes: what every mode shares, and write protection for snapshots.

Opening, the API handshake, registration, unregister, wake and fault messages serve both
users; postcopy's MISSING-mode placement builds on them in :mod:`livemig.migration.postcopy.placer`.

A userfaultfd context is bound to the memory of the process that *created* it, whoever
later holds the descriptor: another process that received the descriptor (``SCM_RIGHTS``)
reads the fault events and answers them (``UFFDIO_WRITEPROTECT``, ``UFFDIO_COPY``) on the
creator's memory. That is what lets the snapshot writer
(:mod:`livemig.migration.snapshot.writer`) and postcopy's fault handler resolve faults
in another process.

Only the standard library is used. Numbers are the kernel's (``<linux/userfaultfd.h>``,
x86-64; platform notes section 3). ctypes releases the GIL during each ioctl.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA

UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_WRITEPROTECT = 0xC018AA06

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12  # write protection of shmem (memfd) and hugetlbfs
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # markers in empty entries of anonymous memory too
UFFD_FEATURE_WP_ASYNC = 1 << 15

IOCTL_WRITEPROTECT = 1 << 0x06  # bit of the ioctls mask UFFDIO_REGISTER returns

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_WP = 2

MSG_SIZE = 32  # struct uffd_msg
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


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class UffdError(OSError):
    pass


def _err(what: str) -> UffdError:
    e = ctypes.get_errno()
    return UffdError(e, f"{what}: {os.strerror(e)}")


def _new_fd() -> int:
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise _err("userfaultfd")
    return int(fd)


def supported_features() -> int:
    """Features the kernel offers (``UFFDIO_API`` reports all of them); 0 if none works."""
    try:
        fd = _new_fd()
    except OSError:
        return 0
    try:
        api = _Api(UFFD_API, 0, 0)
        if _libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
            return 0
        return int(api.features)
    finally:
        os.close(fd)


def open_uffd(features: int) -> int:
    """A new non-blocking, close-on-exec userfaultfd with ``features`` negotiated."""
    fd = _new_fd()
    api = _Api(UFFD_API, features, 0)
    if _libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
        err = _err("UFFDIO_API")
        os.close(fd)
        raise err
    return fd


def register_missing(fd: int, start: int, length: int) -> None:
    """Register a range for missing-page faults (postcopy)."""
    reg = _Register(_Range(start, length), UFFDIO_REGISTER_MODE_MISSING, 0)
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
        raise _err(f"UFFDIO_REGISTER 0x{start:x}+0x{length:x}")


def register_wp(fd: int, start: int, length: int) -> int:
    """Register a range for write-protect faults; returns the allowed-ioctls mask."""
    reg = _Register(_Range(start, length), UFFDIO_REGISTER_MODE_WP, 0)
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
        raise _err(f"UFFDIO_REGISTER(WP) 0x{start:x}+0x{length:x}")
    return int(reg.ioctls)


def unregister(fd: int, start: int, length: int) -> None:
    """Unregister a range; the kernel wakes every thread still waiting in it."""
    rng = _Range(start, length)
    if _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(rng)) != 0:
        raise _err(f"UFFDIO_UNREGISTER 0x{start:x}+0x{length:x}")


def wake(fd: int, start: int, length: int) -> None:
    rng = _Range(start, length)
    _libc.ioctl(fd, UFFDIO_WAKE, ctypes.addressof(rng))


class WriteProtector:
    """``UFFDIO_WRITEPROTECT`` with a reused argument block. Un-protecting wakes waiters."""

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


def parse_faults(buf: bytes | bytearray | memoryview) -> list[tuple[int, int, int]]:
    """``(address, flags, ptid)`` of each PAGEFAULT message in ``buf`` (other events skipped)."""
    out = []
    for off in range(0, len(buf) - MSG_SIZE + 1, MSG_SIZE):
        event, flags, address, ptid = _MSG.unpack_from(buf, off)
        if event == UFFD_EVENT_PAGEFAULT:
            out.append((address, flags, ptid))
    return out


# -- write tracking: can guest memory be write-protected here? -----------------------------
NOT_SUPPORTED = "Background-snapshot is not supported by host kernel"
NOT_COMPATIBLE = "Background-snapshot is not compatible with guest memory configuration"


def wp_features_for(blocks: list[Any], supported: int) -> int:
    features = UFFD_FEATURE_PAGEFAULT_FLAG_WP
    if any(b.fd >= 0 for b in blocks):
        features |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM & supported
    features |= UFFD_FEATURE_WP_UNPOPULATED & supported
    return features


def write_tracking_problem(blocks: list[Any]) -> str | None:
    """QEMU's ``migrate_query_write_tracking`` as an error message, or None if usable.

    The kernel must offer write-protect faults, and every guest RAM block must accept a
    write-protect registration that allows ``UFFDIO_WRITEPROTECT`` (memfd memory needs
    ``UFFD_FEATURE_WP_HUGETLBFS_SHMEM``). The probe registers and unregisters on a
    throw-away context; nothing is protected.
    """
    supported = supported_features()
    if not supported & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        return NOT_SUPPORTED
    if any(b.fd >= 0 for b in blocks) and not supported & UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
        return NOT_COMPATIBLE
    try:
        fd = open_uffd(wp_features_for(blocks, supported))
    except OSError:
        return NOT_SUPPORTED
    try:
        for b in blocks:
            ioctls = register_wp(fd, b.host, b.max_length)
            unregister(fd, b.host, b.max_length)
            if not ioctls & IOCTL_WRITEPROTECT:
                return NOT_COMPATIBLE
    except OSError:
        return NOT_COMPATIBLE
    finally:
        os.close(fd)
    return None
