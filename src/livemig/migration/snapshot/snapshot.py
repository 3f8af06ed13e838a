"""Background snapshot: QEMU's ``background-snapshot`` capability (reference 3.10, 5.2).

The stream is a snapshot of the VM *as it was when the snapshot started*, while the guest
keeps running. It is an ordinary precopy stream — any destination (``migrate-incoming``,
``livemig vm --incoming file:PATH``) restores it:

    header, configuration, START ram (block list), FULL virtio-mem-early   guest running
    --- guest stopped: device state encoded into a buffer, RAM write-protected ---
    --- guest running again ---
    PART ram ...  (every page with its content at the stop)
    END ram, <the device-state buffer: FULL sections, EOF, VMDESCRIPTION>

Order (reference 3.10): populate-read plugged memory; header and RAM setup (migration
bitmap without dirty log and sync, discarded ranges still cleared); stop; device state to
a buffer; write-protect plugged ranges; resume; write RAM out. A guest write to a page not
yet saved faults; the page's old content is saved before the write goes on; a page is
un-protected as soon as it has been saved.

**Where faults are handled, and why nothing can deadlock.** A software guest writes RAM
with numpy while holding the GIL. A write-protect fault taken there blocks that thread —
and with it every Python thread of the VM process — until someone resolves the fault. So
the resolver must not need this interpreter. The whole RAM phase therefore runs in a
*forked child process* (the "snapshot writer"):

* the userfaultfd context is created by the VM process (it is bound to the VM's memory)
  before the fork; the child inherits the descriptor and resolves faults on the VM's
  memory through it (``UFFDIO_WRITEPROTECT`` on the creator's mm);
* guest RAM is ``MADV_DONTFORK`` across the fork, so the child has no mapping of it and
  its memory is not copy-on-write shared (a VM writing pages after the fork would
  otherwise copy them). The child reads pages with ``process_vm_readv`` from the VM
  process, which goes through the VM's page tables and never triggers a write fault;
* the child owns the stream from the fork to the end; the VM process only waits for it;
* in the child, a *fault thread* waits on the userfaultfd. On a fault it copies the old
  page — and the other unsaved pages of the aligned 256 KiB around it — into its own
  memory (the urgent queue), clears them from the migration bitmap and un-protects them,
  which wakes the faulting thread. The *main thread* writes the urgent queue first, then
  the next batch of the bitmap: batch out of the bitmap, copied, un-protected, written.
  A fault on a page of the batch being copied waits for that batch's un-protect;
* nothing the fault thread does waits for the stream or for the VM process: a full
  socket, a slow disk or a receiver inside the VM process itself (which needs the very
  GIL a faulting vCPU holds) cannot hold a fault up. Only a full urgent queue
  (``URGENT_PAGES_MAX``) makes a fault wait until the main thread has written some out;
* the VM process drops its own copy of the userfaultfd as soon as protection is on. If
  the child dies — crash, ``migrate_cancel`` (SIGKILL), VM exit (``PR_SET_PDEATHSIG``) —
  the last reference goes, the kernel unregisters the ranges and wakes every waiting
  fault: the guest can never be left blocked.

**Holes.** Reading a hole of memfd memory allocates it (platform notes, section 1), and
QEMU's populate-read would fill every hole of plugged memfd memory. livemig does not need
to: file-backed write protection installs a marker in an empty page-table entry, so a
write into a hole faults like any other write (measured: ``docs/snapshot.md``). So:

* memfd blocks: only the *data extents* of plugged ranges are populated (mapping pages
  that exist, allocating nothing); holes are protected by markers and sent as ZERO
  records without being read, in the background pass and when saved around a fault;
* private anonymous blocks: with ``UFFD_FEATURE_WP_UNPOPULATED`` the same markers cover
  empty entries and nothing is populated; without it, plugged ranges are populated with
  reads (the shared zero page: no memory);
* unplugged ranges are never read, populated, protected or sent (reference 7.6).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import select
import signal
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from livemig.machine import Machine
from livemig.memory import hostmem
from livemig.memory import userfaultfd as uf
from livemig.memory.discard_manager import Section
from livemig.memory.region import MemoryRegion
from livemig.migration.channels import MigrationURI
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities, Parameters
from livemig.migration.outgoing import (
    RATE_WINDOW,
    SLICE_BYTES,
    MigrationCancelled,
    OutgoingMigration,
)
from livemig.migration.ram.save import (
    BATCH_PAGES,
    PAGE_RECORD,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
    BlockSaveState,
    RamSaver,
)
from livemig.migration.stream import savevm
from livemig.migration.stream.format import RamFlag, SectionType
from livemig.migration.stream.qemu_file import BytesWriter, QEMUFileWriter

log = logging.getLogger(__name__)

MADV_DONTFORK = 10
MADV_DOFORK = 11
PR_SET_PDEATHSIG = 1
IOV_MAX = 1024
WRITE_CHUNK = 16 << 20  # bytes per write() of a file stream
FAULT_AHEAD_PAGES = 64  # pages saved per write fault: the aligned 256 KiB around it
URGENT_PAGES_MAX = 65536  # 256 MiB of saved-but-unsent pages before a fault has to wait
NOT_SUPPORTED = "Background-snapshot is not supported by host kernel"
NOT_COMPATIBLE = "Background-snapshot is not compatible with guest memory configuration"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


class SnapshotError(RuntimeError):
    pass


# -- write tracking: support query, prepare, start ------------------------------------------------


def _features_for(blocks: list[Any], supported: int) -> int:
    features = uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    if any(b.fd >= 0 for b in blocks):
        features |= uf.UFFD_FEATURE_WP_HUGETLBFS_SHMEM & supported
    features |= uf.UFFD_FEATURE_WP_UNPOPULATED & supported
    return features


def write_tracking_problem(blocks: list[Any]) -> str | None:
    """QEMU's ``migrate_query_write_tracking`` as an error message, or None if usable.

    The kernel must offer write-protect faults, and every guest RAM block must accept a
    write-protect registration that allows ``UFFDIO_WRITEPROTECT`` (memfd memory needs
    ``UFFD_FEATURE_WP_HUGETLBFS_SHMEM``). The probe registers and unregisters on a
    throw-away context; nothing is protected.
    """
    supported = uf.supported_features()
    if not supported & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        return NOT_SUPPORTED
    if any(b.fd >= 0 for b in blocks) and not supported & uf.UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
        return NOT_COMPATIBLE
    try:
        fd = uf.open_uffd(_features_for(blocks, supported))
    except OSError:
        return NOT_SUPPORTED
    try:
        for b in blocks:
            ioctls = uf.register_wp(fd, b.host, b.max_length)
            uf.unregister(fd, b.host, b.max_length)
            if not ioctls & uf.IOCTL_WRITEPROTECT:
                return NOT_COMPATIBLE
    except OSError:
        return NOT_COMPATIBLE
    finally:
        os.close(fd)
    return None


def plugged_runs(mr: MemoryRegion) -> list[tuple[int, int]]:
    """(offset, length) of the parts of ``mr`` that are not discarded (all of it without an rdm)."""
    if mr.rdm is None:
        return [(0, mr.block.used_length)]
    offs, sizes = mr.rdm.populated_runs(Section(mr, 0, mr.block.used_length))
    return [(int(o), int(s)) for o, s in zip(offs, sizes, strict=True)]


class WriteTracking:
    """The VM-process side of write tracking (QEMU's ``ram_write_tracking_*``)."""

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = regions
        blocks = [mr.block for mr in regions]
        supported = uf.supported_features()
        if not supported & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise SnapshotError(NOT_SUPPORTED)
        self.features = _features_for(blocks, supported)
        try:
            self.fd = uf.open_uffd(self.features)
        except OSError as e:
            raise SnapshotError(f"{NOT_SUPPORTED} ({e.strerror})") from e
        self.protect = uf.WriteProtector(self.fd)
        self.unpopulated = bool(self.features & uf.UFFD_FEATURE_WP_UNPOPULATED)
        self.registered: list[MemoryRegion] = []
        self.protected_bytes = 0
        self.populated_bytes = 0
        self.protect_time = 0.0

    def prepare(self) -> None:
        """``ram_write_tracking_prepare``: populate-read plugged memory — never a hole.

        memfd: only the data extents inside plugged ranges (reading a hole would allocate
        it; holes are covered by write-protect markers). Anonymous memory: nothing with
        ``WP_UNPOPULATED``, else the plugged ranges (reads map the shared zero page).
        """
        for mr in self.regions:
            block = mr.block
            if block.fd < 0 and self.unpopulated:
                continue
            for off, length in plugged_runs(mr):
                ranges = block.data_extents(off, length) if block.fd >= 0 else [(off, off + length)]
                for s, e in ranges:
                    hostmem.madvise(block.host + s, e - s, hostmem.MADV_POPULATE_READ)
                    self.populated_bytes += e - s

    def start(self) -> None:
        """``ram_write_tracking_start``: register every block, protect only plugged ranges."""
        assert self.fd >= 0
        t = time.monotonic()
        try:
            for mr in self.regions:
                block = mr.block
                ioctls = uf.register_wp(self.fd, block.host, block.max_length)
                self.registered.append(mr)
                if not ioctls & uf.IOCTL_WRITEPROTECT:
                    raise SnapshotError(NOT_COMPATIBLE)
                for off, length in plugged_runs(mr):
                    self.protect(block.host + off, length, True)
                    self.protected_bytes += length
        except BaseException:
            self.stop()
            raise
        self.protect_time = time.monotonic() - t

    def stop(self) -> None:
        """Unregister what this process registered (waking any waiter) and drop the fd."""
        if self.fd < 0:
            return
        for mr in self.registered:
            try:
                uf.unregister(self.fd, mr.block.host, mr.block.max_length)
            except OSError:
                pass
        self.registered.clear()
        self.release()

    def release(self) -> None:
        """Close this process's descriptor; the kernel unregisters with the last one."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- statistics shared between the VM process and the snapshot writer -----------------------------


class SharedStats:
    """Counters the child writes and ``query-migrate`` reads: one shared anonymous page."""

    FIELDS = ("state", "transferred", "remaining", "normal", "duplicate", "pages_read",
              "holes_skipped", "wp_faults", "urgent_pages", "urgent_peak", "unprotect_calls",
              "partial_reads")
    RUNNING, DONE, FAILED = 1, 2, 3
    _MSG_OFF = 1024

    def __init__(self) -> None:
        import mmap

        self._m = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: survives fork shared
        self._a = np.frombuffer(self._m, np.int64, count=len(self.FIELDS))
        self._idx = {n: i for i, n in enumerate(self.FIELDS)}

    def __getitem__(self, name: str) -> int:
        return int(self._a[self._idx[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self._a[self._idx[name]] = value

    def fail(self, message: str) -> None:
        data = message.encode(errors="replace")[: 4096 - self._MSG_OFF - 4]
        struct.pack_into("<I", self._m, self._MSG_OFF, len(data))
        self._m[self._MSG_OFF + 4 : self._MSG_OFF + 4 + len(data)] = data
        self["state"] = self.FAILED

    @property
    def message(self) -> str:
        (n,) = struct.unpack_from("<I", self._m, self._MSG_OFF)
        return bytes(self._m[self._MSG_OFF + 4 : self._MSG_OFF + 4 + n]).decode(errors="replace")


# -- the snapshot writer (runs in the forked child) -----------------------------------------------


class _ParentMemory:
    """Reads the VM process's memory with ``process_vm_readv`` (no mapping, no write fault)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.partial_reads = 0

    def read_runs(self, addrs: np.ndarray, lengths: np.ndarray, dst: int) -> None:
        """Copy the remote runs ``addrs[i], lengths[i]`` back to back into ``dst``.

        The kernel may copy less than asked when a page of the VM is being changed at that
        moment (a page-table update racing with the pinning); the rest is asked again.
        """
        addrs = addrs.astype(np.uint64)
        lengths = lengths.astype(np.uint64)
        remote = np.empty((IOV_MAX, 2), np.uint64)  # per call: two threads read at once
        local = np.empty(2, np.uint64)
        i, stalls = 0, 0
        while i < len(addrs):
            k = min(IOV_MAX, len(addrs) - i)
            remote[:k, 0] = addrs[i : i + k]
            remote[:k, 1] = lengths[i : i + k]
            want = int(np.sum(lengths[i : i + k]))
            local[0], local[1] = dst, want
            got = _libc.process_vm_readv(self.pid, local.ctypes.data, 1, remote.ctypes.data, k, 0)
            if got == want:
                i += k
                dst += want
                stalls = 0
                continue
            err = ctypes.get_errno() if got < 0 else 0
            self.partial_reads += 1
            if got <= 0:
                stalls += 1
                if stalls > 1000 or err not in (0, errno.EFAULT, errno.EAGAIN, errno.EINTR):
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
            i += whole
            dst += got
            addrs = addrs.copy() if whole < k and part else addrs
            lengths = lengths.copy() if whole < k and part else lengths
            if part:
                addrs[i] += np.uint64(part)
                lengths[i] -= np.uint64(part)
            stalls = 0


    def read_scattered(self, addrs: np.ndarray, lengths: np.ndarray, local_iov: np.ndarray) -> bool:
        """One call: the remote runs into the local iovecs ``local_iov`` ((n, 2) base,
        length). False if the kernel copied less (the caller then uses :meth:`read_runs`)."""
        remote = np.empty((len(addrs), 2), np.uint64)
        remote[:, 0] = addrs
        remote[:, 1] = lengths
        want = int(np.sum(lengths))
        got = _libc.process_vm_readv(self.pid, local_iov.ctypes.data, len(local_iov),
                                     remote.ctypes.data, len(remote), 0)
        if got == want:
            return True
        self.partial_reads += 1
        return False


class SnapshotSaver(RamSaver):
    """The RAM saver of a background snapshot, used inside the snapshot writer process.

    Two threads share it. The main thread walks the migration bitmap once (set up in the
    VM process before the fork): it takes a batch of pages out of the bitmap, copies them
    out of the VM with ``process_vm_readv`` (holes of memfd memory are not read),
    un-protects the span the batch covers and writes the records. The fault thread
    (:meth:`fault_loop`) waits on the userfaultfd and saves each faulting page at once
    (:meth:`_save_fault`). Neither ever waits for the VM process.

    The one rule that keeps the snapshot exact: a page is un-protected only after its
    content was copied into this process. A fault on a page of the batch being copied
    (the *in-flight* span: out of the bitmap, not yet copied) is left waiting; the span's
    un-protect right after the copy wakes it.
    """

    def __init__(self, regions: list[MemoryRegion], clear_bitmap_shift: int):
        super().__init__(regions, None, clear_bitmap_shift=clear_bitmap_shift, log_clear=False)
        self.uffd = -1
        self._wp: uf.WriteProtector | None = None
        self.mem: _ParentMemory | None = None
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.stopping = False
        self.fault_error: BaseException | None = None
        self.wp_faults = 0
        self.urgent_pages = 0
        self.urgent_peak = 0
        self.unprotect_calls = 0
        self._inflight: tuple[int, int, int] | None = None  # block index, first, last page
        self._urgent = np.empty((0, TARGET_PAGE_SIZE), np.uint8)
        self._urgent_where: list[tuple[int, int, bool]] = []  # (block index, page, was read)
        self._pending: list[int] = []  # fault addresses waiting for room in the queue
        starts = np.array([b.block.host for b in self.blocks], np.int64)
        self._order = np.argsort(starts)
        self._starts = starts[self._order]
        self._ends = np.array([self.blocks[i].block.host + self.blocks[i].block.max_length
                               for i in self._order], np.int64)
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        # data extents of fd-backed blocks once protection is on. A page whose bit is still
        # set has not been written since (a write would have faulted and saved it), so a
        # hole in these extents is still a hole: zero, not to be read.
        self.start_extents: dict[int, np.ndarray] = {}
        # iovecs of the page slots of PAGE records in the staging buffer (read targets)
        self._slot_iov = np.empty((BATCH_PAGES, 2), np.uint64)
        self._slot_iov[:, 0] = self._page_buf.ctypes.data + 8 + np.arange(BATCH_PAGES) * PAGE_RECORD
        self._slot_iov[:, 1] = TARGET_PAGE_SIZE

    def attach(self, uffd: int, vm_pid: int) -> None:
        """In the writer: the inherited userfaultfd and the VM process to read from."""
        self.uffd = uffd
        self._wp = uf.WriteProtector(uffd)
        self.mem = _ParentMemory(vm_pid)
        self._wake_r, self._wake_w = os.pipe()
        for b in self.blocks:
            b.pages = None  # type: ignore[assignment]  # not mapped here (MADV_DONTFORK)

    # -- reading ------------------------------------------------------------------------------
    @staticmethod
    def _runs(b: BlockSaveState, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host addresses and byte lengths of the runs of consecutive pages in ``idx``."""
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        first = idx[np.r_[0, brk]]
        last = idx[np.r_[brk - 1, len(idx) - 1]]
        addrs = (first.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) + np.uint64(b.block.host)
        lengths = (last - first + 1).astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)
        return addrs, lengths

    def _read(self, b: BlockSaveState, idx: np.ndarray, out: np.ndarray) -> None:
        """Copy pages ``idx`` of ``b`` out of the VM into the contiguous rows ``out``."""
        assert self.mem is not None
        if len(idx):
            self.mem.read_runs(*self._runs(b, idx), out.ctypes.data)

    def _read_into_records(self, b: BlockSaveState, idx: np.ndarray) -> None:
        """Copy pages ``idx`` straight into the PAGE-record slots of the staging buffer."""
        assert self.mem is not None
        n = len(idx)
        if not n:
            return
        addrs, lengths = self._runs(b, idx)
        if not self.mem.read_scattered(addrs, lengths, self._slot_iov[:n]):
            rows = self._gather[:n]
            self.mem.read_runs(addrs, lengths, rows.ctypes.data)
            self._page_data[:n] = rows

    def _unprotect(self, b: BlockSaveState, first: int, npages: int) -> None:
        assert self._wp is not None
        self._wp(b.block.host + (first << TARGET_PAGE_BITS), npages << TARGET_PAGE_BITS, False)
        self.unprotect_calls += 1

    # -- background sending (main thread) -----------------------------------------------------
    def _dirty_words(self, b: BlockSaveState) -> np.ndarray:
        # The fault thread clears bits meanwhile; numpy scans the words without the GIL and
        # fails ("number of non-zero array elements changed") if they change under it.
        with self.lock:
            return super()._dirty_words(b)

    def _send_batch(self, w: QEMUFileWriter, b: BlockSaveState, nzw: np.ndarray, pos: int) -> int:
        self.check_faults()
        self.send_urgent(w)
        with self.lock:  # taking pages out of the bitmap is atomic with respect to faults
            counts = np.bitwise_count(b.bmap.words[nzw[pos : pos + BATCH_PAGES]])
            take = max(int(np.searchsorted(np.cumsum(counts), BATCH_PAGES, side="right")), 1)
            widx = nzw[pos : pos + take]
            bits = np.unpackbits(b.bmap.words[widx].view(np.uint8), bitorder="little").reshape(-1, 64)
            r, c = np.nonzero(bits)
            idx = widx[r].astype(np.int64) * 64 + c
            if len(idx) == 0:
                return pos + take
            b.bmap.words[widx] = 0
            self.dirty_pages -= len(idx)
            self._inflight = (self._index[id(b)], int(idx[0]), int(idx[-1]))
        self.send_pages(w, b, idx)
        return pos + take

    def send_pages(self, w: QEMUFileWriter, b: BlockSaveState, idx: np.ndarray) -> None:
        in_data = b.data_mask(idx, b.extents)
        hole_idx, data_idx = idx[~in_data], idx[in_data]
        try:
            self._read_into_records(b, data_idx)
        finally:
            # copied: the guest may write these pages now. Every page of the span that is
            # not in this batch was saved earlier or never protected (unplugged, past
            # used_length). Un-protecting wakes the faults deferred on the span.
            with self.lock:
                first = int(idx[0])
                self._unprotect(b, first, int(idx[-1]) - first + 1)
                self._inflight = None
        self._emit_batch(w, b, hole_idx, data_idx)

    def _emit_batch(self, w: QEMUFileWriter, b: BlockSaveState, hole_idx: np.ndarray,
                    data_idx: np.ndarray) -> None:
        """Records for a batch read into the record slots: no copy unless some are zero."""
        self.stats.holes_skipped += len(hole_idx)
        n = len(data_idx)
        self.stats.pages_read += n
        rows = self._page_data[:n]
        nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
        zero_idx = np.sort(np.concatenate((hole_idx, data_idx[~nz])))
        if len(zero_idx):
            self._emit_zero(w, b.block, zero_idx)
        k = int(np.count_nonzero(nz))
        if not k:
            return
        idx = data_idx
        if k < n:
            sel = np.flatnonzero(nz)
            self._page_data[:k] = rows[sel]
            idx = data_idx[sel]
        block = b.block
        start = 0
        if self._name_block(w, block, int(idx[0]), RamFlag.PAGE):
            w.write_view(memoryview(self._page_data[0]))
            self.stats.transferred += 9 + len(block.idstr) + TARGET_PAGE_SIZE
            self.stats.normal += 1
            start = 1
        if k > start:
            self._page_hdr[start:k] = self._header_words(idx[start:], RamFlag.PAGE)
            w.write_view(memoryview(self._page_buf[start * PAGE_RECORD : k * PAGE_RECORD]))
            self.stats.normal += k - start
            self.stats.transferred += (k - start) * PAGE_RECORD

    def emit(self, w: QEMUFileWriter, b: BlockSaveState, hole_idx: np.ndarray,
             data_idx: np.ndarray, rows: np.ndarray) -> None:
        """Records for pages already copied: holes and zero pages as ZERO, the rest as PAGE."""
        self.stats.holes_skipped += len(hole_idx)
        n = len(data_idx)
        self.stats.pages_read += n
        nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0 if n else np.zeros(0, bool)
        zero_idx = np.sort(np.concatenate((hole_idx, data_idx[~nz]))) if n else hole_idx
        if len(zero_idx):
            self._emit_zero(w, b.block, zero_idx)
        k = int(np.count_nonzero(nz))
        if k:
            self._emit_pages(w, b.block, data_idx[nz], rows if k == n else rows[nz])

    def send_urgent(self, w: QEMUFileWriter) -> None:
        """Write the pages saved on faults (the fault thread keeps saving meanwhile)."""
        while True:
            with self.lock:
                if not self._urgent_where:
                    return
                where, self._urgent_where = self._urgent_where, []
                data = self._urgent[: len(where)].copy()
                self.drained.notify_all()
            arr = np.array(where, np.int64)
            for bi in np.unique(arr[:, 0]):
                sel = np.flatnonzero(arr[:, 0] == bi)
                sel = sel[np.argsort(arr[sel, 1])]
                b = self.blocks[int(bi)]
                for s in range(0, len(sel), BATCH_PAGES):
                    part = sel[s : s + BATCH_PAGES]
                    read = arr[part, 2] != 0
                    self.emit(w, b, arr[part[~read], 1], arr[part[read], 1], data[part[read]])

    @property
    def busy(self) -> bool:
        with self.lock:
            return bool(self._urgent_where or self._pending)

    def check_faults(self) -> None:
        if self.fault_error is not None:
            raise SnapshotError(f"write-fault handler failed: {self.fault_error}")

    # -- faults (fault thread) ------------------------------------------------------------------
    def fault_loop(self) -> None:
        """Wait for write faults and save each faulting page; until :attr:`stopping`."""
        p = select.poll()
        p.register(self.uffd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        try:
            while not self.stopping:
                p.poll(1000)
                self.serve_faults()
                with self.lock:
                    while self._pending and not self.stopping:  # queue full: wait for room
                        self.drained.wait(0.05)
                        self._retry_pending()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.fault_error = e

    def stop(self) -> None:
        """End :meth:`fault_loop` (from the main thread)."""
        self.stopping = True
        os.write(self._wake_w, b"x")

    def serve_faults(self) -> None:
        """Read pending fault events and save every faulting page (never blocks)."""
        while True:
            try:
                buf = os.read(self.uffd, uf.MSG_SIZE * 256)
            except BlockingIOError:
                return
            faults = uf.parse_faults(buf)
            with self.lock:
                self.wp_faults += len(faults)
                self._pending.extend(addr for addr, _flags, _ptid in faults)
                self._retry_pending()

    def _retry_pending(self) -> None:
        pending, self._pending = self._pending, []
        for i, addr in enumerate(pending):
            if not self._save_fault(addr):
                self._pending = pending[i:]
                return

    def _save_fault(self, addr: int) -> bool:
        """With the lock: save the old page, then un-protect it. False: the queue is full.

        The unsaved pages of the aligned :data:`FAULT_AHEAD_PAGES` chunk around the fault
        are saved with it (one copy, one un-protect): a guest that writes a page often
        writes its neighbours next, and each avoided fault is a round trip between the two
        processes. Holes of memfd memory in the chunk are saved as zeros without a read.
        """
        i = int(np.searchsorted(self._starts, addr, side="right")) - 1
        if i < 0 or addr >= self._ends[i]:
            raise SnapshotError(f"write fault at 0x{addr:x} outside guest RAM")
        bi = int(self._order[i])
        b = self.blocks[bi]
        page = (addr - b.block.host) >> TARGET_PAGE_BITS
        fl = self._inflight
        busy = fl is not None and fl[0] == bi
        if not b.bmap.test(page):
            if busy and fl[1] <= page <= fl[2]:  # type: ignore[index]
                return True  # being copied right now: the span's un-protect wakes it
            self._unprotect(b, page, 1)  # saved already (a late event): just wake it
            return True
        lo = page & ~(FAULT_AHEAD_PAGES - 1)
        hi = min(lo + FAULT_AHEAD_PAGES, b.used_pages)
        if busy and fl[1] < hi and lo <= fl[2]:  # type: ignore[index]
            lo, hi = page, page + 1  # never un-protect a page of the batch being copied
        words = b.bmap.words[lo >> 6 : ((hi - 1) >> 6) + 1]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[lo & 63 : (lo & 63) + hi - lo]
        pages = lo + np.flatnonzero(bits).astype(np.int64)
        n = len(self._urgent_where)
        if n + len(pages) > URGENT_PAGES_MAX:
            if n >= URGENT_PAGES_MAX:
                return False
            lo, hi, pages = page, page + 1, np.array([page], np.int64)
        k = len(pages)
        if n + k > len(self._urgent):
            size = min(max(256, 2 * len(self._urgent), n + k), URGENT_PAGES_MAX)
            grown = np.empty((size, TARGET_PAGE_SIZE), np.uint8)
            grown[:n] = self._urgent[:n]
            self._urgent = grown
        out = self._urgent[n : n + k]
        if b.block.fd >= 0 and k > 1:
            extents = self.start_extents.get(bi)
            if extents is None:  # a fault before the writer looked the extents up
                extents = b.block.data_extent_pages(lo << TARGET_PAGE_BITS, (hi - lo) << TARGET_PAGE_BITS)
            data = b.block.pages_in_extents(pages, extents)
            data[pages == page] = True  # the faulting page: read whatever it holds
            out[~data] = 0  # holes: zero, not read (reading would allocate them)
            if data.all():
                self._read(b, pages, out)
            else:
                tmp = np.empty((int(np.count_nonzero(data)), TARGET_PAGE_SIZE), np.uint8)
                self._read(b, pages[data], tmp)
                out[data] = tmp
        else:
            self._read(b, pages, out)
        read = data if b.block.fd >= 0 and k > 1 else np.ones(k, bool)
        for p, r in zip(pages.tolist(), read.tolist(), strict=True):
            b.bmap.clear_range(p, 1)
            self._urgent_where.append((bi, p, r))
        self.dirty_pages -= k
        self.urgent_pages += k
        self.urgent_peak = max(self.urgent_peak, n + k)
        self._unprotect(b, lo, hi - lo)  # wakes the writer
        return True


class _FileTransport:
    """The child's end of a ``file:`` stream (blocking writes; faults have their own thread)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, view: memoryview) -> int:
        return os.write(self.fd, view[:WRITE_CHUNK])


# -- the VM-process side --------------------------------------------------------------------------


class BackgroundSnapshot(OutgoingMigration):
    """``migrate`` with the ``background-snapshot`` capability."""

    stopped_hooks: ClassVar[tuple[Callable[[BackgroundSnapshot], None], ...]] = ()
    """Called with the guest stopped, after the device state was taken and before write
    protection starts: what a hook sees of guest memory is what the snapshot holds."""

    def __init__(
        self,
        machine: Machine,
        uri: MigrationURI,
        caps: Capabilities,
        params: Parameters,
        emit: status.EventFn = status.no_events,
    ):
        super().__init__(machine, uri, caps, params, emit)
        self.saver = SnapshotSaver(machine.memory.regions, params.x_clear_bitmap_shift)
        self.tracking: WriteTracking | None = None
        self.shared = SharedStats()
        self.child_pid = 0
        self._ctl_w = -1
        self._start_offset = 0
        self.vm_pid = os.getpid()
        self.protected = threading.Event()  # set once write protection is on

    # -- setup (guest running) --------------------------------------------------------------------
    def _setup(self) -> None:
        w = self._w
        assert w is not None
        self.tracking = WriteTracking(self.machine.memory.regions)
        self.tracking.prepare()
        savevm.write_header(w)
        self._config_desc = savevm.write_configuration(w, self.machine_type)
        self._write_ram_start(w, log=False)  # no log, no sync; discarded cleared

    # -- stop, device state, protect, resume; then wait for the writer -----------------------------
    def _iterate(self) -> None:
        w = self._w
        assert w is not None and self.tracking is not None
        self._check_cancel()
        self._start_offset = w.bytes_written
        self._fork_writer()
        machine = self.machine
        self._was_running = machine.running
        old_state = machine.runstate
        stop_at = time.monotonic()
        self._stopped_guest = True
        machine.stop("paused")
        dev = BytesWriter()
        savevm.start_section(dev, SectionType.END, self._ram_id)
        dev.put_be64(RamFlag.EOS)  # END ram carries no page: all go after the resume
        savevm.write_footer(dev, self._ram_id)
        self.sections.write_late(dev)
        savevm.write_eof(dev)
        savevm.write_vmdesc(dev, self._vmdesc())
        for hook in self.stopped_hooks:
            hook(self)
        self.tracking.start()
        self.protected.set()
        self._go(dev.getvalue())
        self.tracking.release()  # the writer holds the only descriptor from here on
        if self._was_running:
            machine.cont()
        else:
            machine.set_runstate(old_state)
        self._stopped_guest = False
        self.downtime = int((time.monotonic() - stop_at) * 1000)
        self._wait_writer()

    def _complete(self) -> None:
        self.saver.stats.precopy_bytes = self.shared["transferred"]
        self._set_status(status.COMPLETED)

    def _fork_writer(self) -> None:
        regions = self.machine.memory.regions
        r, wfd = os.pipe()
        for mr in regions:
            hostmem.madvise(mr.block.host, mr.block.max_length, MADV_DONTFORK)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
                pid = os.fork()
        finally:
            if os.getpid() == self.vm_pid:
                for mr in regions:
                    hostmem.madvise(mr.block.host, mr.block.max_length, MADV_DOFORK, check=False)
        if pid == 0:  # pragma: no cover - runs in the child, reported through SharedStats
            os.close(wfd)
            self._writer_main(r)
        os.close(r)
        self.child_pid = pid
        self._ctl_w = wfd

    def _go(self, device_state: bytes) -> None:
        msg = b"G" + struct.pack("<Q", len(device_state)) + device_state
        try:
            view = memoryview(msg)
            while len(view):
                view = view[os.write(self._ctl_w, view):]
        except BrokenPipeError:
            pass  # the writer is gone; _wait_writer reports why
        os.close(self._ctl_w)
        self._ctl_w = -1

    def _wait_writer(self) -> None:
        pidfd = os.pidfd_open(self.child_pid)
        try:
            p = select.poll()
            p.register(pidfd, select.POLLIN)  # readable once the writer has exited
            while True:
                p.poll(50)
                pid, code = os.waitpid(self.child_pid, os.WNOHANG)
                if pid:
                    self.child_pid = 0
                    break
                if self._cancel.is_set():
                    self._kill_writer()
                    raise MigrationCancelled()
        finally:
            os.close(pidfd)
        st = self.shared
        if st["state"] != SharedStats.DONE:
            why = st.message if st["state"] == SharedStats.FAILED else (
                f"snapshot writer died ({_exit_reason(code)})")
            raise SnapshotError(why)

    def _kill_writer(self) -> None:
        if self.child_pid:
            try:
                os.kill(self.child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.child_pid, 0)
            self.child_pid = 0

    def _fail(self, final: str, desc: str | None) -> None:
        self._kill_writer()  # its descriptor closes: every protected range is released
        if self._ctl_w >= 0:
            os.close(self._ctl_w)
            self._ctl_w = -1
        if self.tracking is not None:
            self.tracking.stop()
        super()._fail(final, desc)

    # -- the child ------------------------------------------------------------------------------
    def _writer_main(self, ctl: int) -> None:  # pragma: no cover - child process
        code = 1
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.vm_pid:
                os._exit(1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            gc.disable()
            self._writer_run(ctl)
            self.shared["state"] = SharedStats.DONE
            code = 0
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            self.shared.fail(str(e) or type(e).__name__)
        finally:
            os._exit(code)

    def _writer_run(self, ctl: int) -> None:  # pragma: no cover - child process
        assert self.tracking is not None and self.tracking.fd >= 0
        saver = self.saver
        saver.attach(self.tracking.fd, self.vm_pid)
        sys.setswitchinterval(0.0002)  # the fault thread gets the GIL within 0.2 ms
        faults = threading.Thread(target=saver.fault_loop, name="snapshot-faults", daemon=True)
        faults.start()  # before "go": protection may already be on
        st = self.shared
        st["state"] = SharedStats.RUNNING
        device_state = self._wait_go(ctl)
        for bi, b in enumerate(saver.blocks):
            if b.block.fd >= 0:
                saver.start_extents[bi] = b.block.data_extent_pages()
        if self._sock is None:
            w = QEMUFileWriter(_FileTransport(self._fd), 4 << 20)
        else:
            w = QEMUFileWriter(self._sock, 4 << 20)
        base = self._start_offset

        def publish() -> None:
            s = saver.stats
            st["transferred"] = base + w.bytes_written
            st["remaining"] = saver.dirty_pages + len(saver._urgent_where) + len(saver._pending)
            st["normal"], st["duplicate"] = s.normal, s.duplicate
            st["pages_read"], st["holes_skipped"] = s.pages_read, s.holes_skipped
            st["wp_faults"], st["urgent_pages"] = saver.wp_faults, saver.urgent_pages
            st["urgent_peak"], st["unprotect_calls"] = saver.urgent_peak, saver.unprotect_calls
            st["partial_reads"] = saver.mem.partial_reads if saver.mem else 0

        bw = self.params.max_bandwidth  # bytes/s, 0: unlimited
        slice_bytes = max(int(bw * RATE_WINDOW), TARGET_PAGE_SIZE) if bw else SLICE_BYTES
        t0 = time.monotonic()
        try:
            while True:
                savevm.start_section(w, SectionType.PART, self._ram_id)
                saver.start_section()
                done = saver.send(w, slice_bytes)
                saver.send_urgent(w)
                saver.write_eos(w)
                savevm.write_footer(w, self._ram_id)
                w.flush()
                publish()
                saver.check_faults()
                if bw:  # faults are saved meanwhile: the fault thread does not wait for us
                    ahead = w.bytes_written / bw - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                if done and not saver.busy:
                    break
                if done:  # faults still waiting for room in the queue
                    time.sleep(0.001)
        finally:
            saver.stop()
            faults.join()
        saver.check_faults()
        # every page was saved and un-protected; drop the registration before the end
        for mr in self.machine.memory.regions:
            try:
                uf.unregister(saver.uffd, mr.block.host, mr.block.max_length)
            except OSError:
                pass
        w.put_bytes(device_state)  # END ram, device sections, EOF, VMDESCRIPTION
        w.flush()
        publish()

    def _wait_go(self, ctl: int) -> bytes:  # pragma: no cover - child process
        """Read the go message: the device-state buffer, sent once protection is on."""
        buf = b""
        need = 9
        while len(buf) < need:
            data = os.read(ctl, max(need - len(buf), 1 << 16))
            if not data:
                raise SnapshotError("snapshot cancelled before the guest was stopped")
            buf += data
            if len(buf) >= 9:
                if buf[:1] != b"G":
                    raise SnapshotError("bad control message")
                need = 9 + struct.unpack_from("<Q", buf, 1)[0]
        os.close(ctl)
        return buf[9:need]

    # -- query-migrate ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out = super().info()
        ram = out.get("ram")
        if ram is None or self.shared["state"] == 0:
            return out
        st = self.shared
        ram["transferred"] = st["transferred"]
        ram["remaining"] = st["remaining"] * TARGET_PAGE_SIZE
        ram["normal"], ram["duplicate"] = st["normal"], st["duplicate"]
        ram["normal-bytes"] = st["normal"] * TARGET_PAGE_SIZE
        ram["pages-read"], ram["hole-pages-skipped"] = st["pages_read"], st["holes_skipped"]
        ram["precopy-bytes"] = st["transferred"]
        secs = max((self.end_time or time.monotonic()) - self.start_time, 1e-6)
        ram["pages-per-second"] = int((st["normal"] + st["duplicate"]) / secs)
        ram["mbps"] = round(st["transferred"] * 8 / secs / 1e6, 3)
        ram["write-faults"] = st["wp_faults"]
        ram["write-fault-pages"] = st["urgent_pages"]
        ram["x-write-fault-queue-peak"] = st["urgent_peak"]
        ram["x-unprotect-calls"] = st["unprotect_calls"]
        ram["x-partial-reads"] = st["partial_reads"]
        if self.tracking is not None:
            ram["write-protected-bytes"] = self.tracking.protected_bytes
        return out


def _exit_reason(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"signal {os.WTERMSIG(code)}"
    return f"exit status {os.WEXITSTATUS(code)}"
