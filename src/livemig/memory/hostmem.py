"""Thin ctypes wrappers over the host memory system calls livemig needs.

``mmap.madvise`` holds the GIL while it runs, which deadlocks when a userfaultfd handler
in the same process needs the GIL to answer the REMOVE event it triggers (platform notes,
section 3); the ctypes calls here release the GIL.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memmove.restype = ctypes.c_void_p

PAGE = os.sysconf("SC_PAGE_SIZE")


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int, check: bool = True) -> None:
    if _libc.madvise(addr, length, advice) != 0 and check:
        _raise(f"madvise(0x{addr:x}, 0x{length:x}, {advice})")


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        _raise(f"fallocate(PUNCH_HOLE, 0x{offset:x}, 0x{length:x})")


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of [addr, addr+length) resident in this process (``mincore``)."""
    if length == 0:
        return 0
    npages = (length + PAGE - 1) // PAGE
    vec = np.zeros(npages, np.uint8)
    if _libc.mincore(addr, length, vec.ctypes.data) != 0:
        _raise("mincore")
    return int(np.count_nonzero(vec & 1)) * PAGE


def memmove(dst: int, src: int, length: int) -> None:
    """Copy host memory without holding the GIL."""
    _libc.memmove(dst, src, length)


def store(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Copy ``data`` to host address ``addr`` without holding the GIL.

    Guest RAM may be registered with userfaultfd (postcopy, snapshots): a store that
    faults waits for a thread or process that may need the GIL, so it must not hold it.
    """
    n = len(data)
    if n:
        buf = (ctypes.c_char * n).from_buffer_copy(data)
        _libc.memmove(addr, ctypes.addressof(buf), n)


def load(addr: int, length: int) -> bytes:
    """Copy ``length`` bytes from host address ``addr`` without holding the GIL (see store)."""
    out = ctypes.create_string_buffer(length)
    if length:
        _libc.memmove(ctypes.addressof(out), addr, length)
    return out.raw
