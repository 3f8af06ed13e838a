"""Reading the VM's guest memory from the snapshot writer: ``process_vm_readv``.

The writer never maps guest RAM (a mapping would fault on write protection, and a
private anonymous mapping cannot be shared with another process anyway). It copies pages
out of the VM process with ``process_vm_readv``, which walks the VM's page tables for
reading: it never triggers a write-protect fault, and it needs nothing from the VM
process (no thread there has to run). :class:`RemoteMemory` is the writer's
:class:`~livemig.migration.ram.pages.PageReader`, so the page pipeline (holes never read,
zero check) is the same as every other sender's.

A batch becomes one system call where possible: the runs of consecutive pages are the
remote iovecs, and the local iovecs are the PAGE-record slots of the encoder, so the pages
land where the records are written from (no second copy).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

import numpy as np

from livemig.memory.bitmap import index_runs
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE, BlockState
from livemig.migration.snapshot.tracking import SnapshotError

IOV_MAX = 1024  # iovecs per call, each side (UIO_MAXIOV)
MAX_STALLS = 1000  # calls in a row that copy nothing before a read is an error

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


def page_runs(b: BlockState, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host addresses (in the VM process) and byte lengths of the runs of pages ``idx``."""
    starts, counts = index_runs(idx)
    addrs = (starts.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) + np.uint64(b.block.host)
    return addrs, counts.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)


class RemoteMemory:
    """A :class:`~livemig.migration.ram.pages.PageReader` of another process's memory.

    Keeps a gather buffer, so one reader belongs to one thread (the writer has one for
    its main thread and one for its fault thread).
    """

    def __init__(self, pid: int, max_pages: int = IOV_MAX):
        self.pid = pid
        self.partial_reads = 0  # calls that copied less than asked (retried)
        self._gather = np.empty((max_pages, TARGET_PAGE_SIZE), np.uint8)
        self._local = np.empty((IOV_MAX, 2), np.uint64)
        self._remote = np.empty((IOV_MAX, 2), np.uint64)

    def read(self, b: BlockState, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Pages ``idx`` (sorted) of ``b`` into ``out`` (rows, possibly strided) or a
        buffer of this reader; returns the filled rows."""
        n = len(idx)
        if out is None:
            if n > len(self._gather):
                self._gather = np.empty((n, TARGET_PAGE_SIZE), np.uint8)
            out = self._gather
        rows = out[:n]
        if n == 0:
            return rows
        addrs, lengths = page_runs(b, idx)
        if rows.flags.c_contiguous:
            self.read_runs(addrs, lengths, rows.ctypes.data)
        elif not self._read_into_rows(addrs, lengths, rows):
            tmp = self.read(b, idx)  # the kernel copied part: the careful way, then copy
            rows[:] = tmp
        return rows

    def _read_into_rows(self, addrs: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> bool:
        """One call: the remote runs into the rows of ``rows`` (each row contiguous, rows
        strided, like the record slots). False if the kernel copied less than all."""
        n, k = len(rows), len(addrs)
        if n > IOV_MAX or k > IOV_MAX or rows.strides[1] != 1:
            return False
        local, remote = self._local, self._remote
        local[:n, 0] = rows.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(rows.strides[0])
        local[:n, 1] = TARGET_PAGE_SIZE
        remote[:k, 0] = addrs
        remote[:k, 1] = lengths
        got = _libc.process_vm_readv(self.pid, local.ctypes.data, n, remote.ctypes.data, k, 0)
        if got == n * TARGET_PAGE_SIZE:
            return True
        self.partial_reads += 1
        return False

    def read_runs(self, addrs: np.ndarray, lengths: np.ndarray, dst: int) -> None:
        """Copy the remote runs ``addrs[i], lengths[i]`` back to back to address ``dst``.

        The kernel may copy less than asked when a page of the VM is being changed at that
        moment (a page-table update racing with the pinning): the rest is asked again.
        """
        addrs = addrs.astype(np.uint64)  # copies: shortened below when a run was cut
        lengths = lengths.astype(np.uint64)
        remote = np.empty((IOV_MAX, 2), np.uint64)  # not self._remote: used by read() too
        local = np.empty(2, np.uint64)
        i, stalls = 0, 0
        while i < len(addrs):
            k = min(IOV_MAX, len(addrs) - i)
            remote[:k, 0] = addrs[i : i + k]
            remote[:k, 1] = lengths[i : i + k]
            want = int(lengths[i : i + k].sum())
            local[0], local[1] = dst, want
            got = _libc.process_vm_readv(self.pid, local.ctypes.data, 1, remote.ctypes.data, k, 0)
            if got == want:
                i, dst, stalls = i + k, dst + want, 0
                continue
            self.partial_reads += 1
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else 0
                stalls += 1
                if stalls > MAX_STALLS or err not in (0, errno.EFAULT, errno.EAGAIN, errno.EINTR):
                    raise SnapshotError(
                        f"process_vm_readv of 0x{int(addrs[i]):x} from the VM failed"
                        + (f": {os.strerror(err)}" if err else "")
                    )
                time.sleep(0)
                continue
            # skip the runs copied whole, shorten the one copied in part
            done = np.cumsum(lengths[i : i + k])
            whole = int(np.searchsorted(done, got, side="right"))
            part = got - (int(done[whole - 1]) if whole else 0)
            i, dst, stalls = i + whole, dst + got, 0
            if part:
                addrs[i] += np.uint64(part)
                lengths[i] -= np.uint64(part)
