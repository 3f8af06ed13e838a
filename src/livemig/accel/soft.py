"""The software accelerator: guest "vCPUs" as host threads, with TCG-like write tracking.

KVM marks pages dirty in the kernel; a software guest has no MMU to do that, so every guest
write goes through :meth:`SoftAccel.write_pages`, which performs the write in bulk (one
``memmove`` per run of pages, with the GIL released, so a vCPU that faults on a page that
postcopy has not brought yet blocks only itself) and then sets the pages' bits in a
:class:`~livemig.memory.dirty_log.BitmapDirtyLog` — what QEMU's TCG does with its dirty
memory bitmap.

The accelerator also checks every write against the RamDiscardManager of the target
region: a write into discarded memory is allowed (a misbehaving guest can do it, and
migration must then still carry that memory, reference 3.4) but it is counted, so tests can
prove that a well-behaved workload never touched unplugged blocks.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import numpy as np

from livemig.accel.throttle import VcpuThrottle
from livemig.devices.state import StateRegistry
from livemig.memory import hostmem
from livemig.memory.dirty_log import BitmapDirtyLog
from livemig.memory.discard_manager import Section
from livemig.memory.region import GuestMemoryMap, MemoryRegion


class VcpuPauser:
    """Lets a controller stop all vCPU threads at a safe point (between write batches).

    vCPU threads call :meth:`checkpoint` between batches; :meth:`pause` returns only once
    every registered vCPU is parked, so no guest write is in flight afterwards — which is
    what "the guest is stopped" must mean for the final dirty sync.

    The checkpoint is also where a throttled vCPU sleeps its share
    (:class:`~livemig.accel.throttle.VcpuThrottle`, bound to the thread by :meth:`bind`);
    :meth:`pause` and :meth:`stop` end such a sleep at once.
    """

    def __init__(self, throttle: VcpuThrottle | None = None) -> None:
        self.throttle = throttle if throttle is not None else VcpuThrottle()
        self._local = threading.local()
        self._cond = threading.Condition()
        self._paused = True
        self._parked = 0
        self._members = 0
        self._stopping = False

    def join(self) -> None:
        with self._cond:
            self._members += 1

    def leave(self) -> None:
        with self._cond:
            self._members -= 1
            self._cond.notify_all()

    def bind(self, index: int) -> None:
        """On a vCPU thread: its checkpoints pace vCPU ``index`` of the throttle."""
        self._local.index = index

    def index(self) -> int | None:
        """The vCPU the calling thread runs, or None (not a vCPU thread)."""
        return getattr(self._local, "index", None)

    def checkpoint(self) -> bool:
        """Sleep the throttle's share, park while paused; False when the vCPU should exit."""
        index = self.index()
        if index is not None:
            self.throttle.pace(index)
        with self._cond:
            if self._paused and not self._stopping:
                self._parked += 1
                self._cond.notify_all()
                while self._paused and not self._stopping:
                    self._cond.wait()
                self._parked -= 1
            return not self._stopping

    def pause(self, timeout: float = 10.0) -> None:
        self.throttle.wake()
        with self._cond:
            self._paused = True
            if not self._cond.wait_for(lambda: self._parked >= self._members, timeout):
                raise TimeoutError("vCPUs did not stop in time")

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self) -> None:
        self.throttle.wake()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused


class SoftAccel:
    """Owns guest-memory writes and the dirty log for a software guest."""

    name = "soft"

    def __init__(self, memory: GuestMemoryMap):
        self.memory = memory
        self.dirty_log = BitmapDirtyLog(memory.blocks)
        # auto-converge / dirty-limit (accel.throttle); write_pages counts per-vCPU dirtying
        self.throttle = VcpuThrottle(counts_dirty=True)
        self.pauser = VcpuPauser(self.throttle)
        self.discarded_writes = 0  # pages written while discarded (misbehaving guest)
        self._threads: list[threading.Thread] = []

    def register_state(self, registry: StateRegistry) -> None:
        """The software guest's vCPUs have no architectural state to migrate."""

    def write_pages(self, mr: MemoryRegion, pages: np.ndarray, data: np.ndarray) -> None:
        """Write whole pages of one region: ``data`` is (len(pages), page_size) or broadcastable."""
        if len(pages) == 0:
            return
        block = mr.block
        if mr.rdm is not None:
            lo, hi = int(pages.min()), int(pages.max()) + 1
            ps = block.page_size
            if not mr.rdm.is_populated(Section(mr, lo * ps, (hi - lo) * ps)):
                self.discarded_writes += self._count_discarded(mr, pages)
        first, n = int(pages[0]), len(pages)
        _store_pages(block, pages, data)  # GIL released: see _store_pages
        vcpu = self.pauser.index()
        if vcpu is not None:
            self.throttle.count_dirty(vcpu, n)
        if int(pages[-1]) - first + 1 == n:
            self.dirty_log.mark_range(block, first, n)
        else:
            self.dirty_log.mark(block, pages)

    @staticmethod
    def _count_discarded(mr: MemoryRegion, pages: np.ndarray) -> int:
        assert mr.rdm is not None
        ps = mr.block.page_size
        offs, sizes = mr.rdm.discarded_runs(Section(mr, 0, mr.size))
        if not len(offs):
            return 0
        starts = np.asarray(offs, np.int64) // ps
        ends = starts + np.asarray(sizes, np.int64) // ps
        i = np.searchsorted(starts, pages, side="right") - 1
        return int(np.count_nonzero((i >= 0) & (pages < ends[np.maximum(i, 0)])))

    def write(self, gpa: int, data: bytes) -> None:
        """Write bytes at a guest-physical address (any guest access that is not a workload)."""
        mr, off = self.memory.lookup(gpa)
        block = mr.block
        end = off + len(data)
        if end > mr.size:
            raise ValueError(f"write at 0x{gpa:x}+{len(data)} crosses the end of {mr.name}")
        first, last = off // block.page_size, (end - 1) // block.page_size
        pages = np.arange(first, last + 1, dtype=np.int64)
        if mr.rdm is not None and mr.is_discarded(first * block.page_size, len(pages) * block.page_size):
            self.discarded_writes += self._count_discarded(mr, pages)
        hostmem.store(block.host + off, data)
        self.dirty_log.mark(block, pages)

    def read(self, gpa: int, length: int) -> bytes:
        mr, off = self.memory.lookup(gpa)
        return hostmem.load(mr.block.host + off, length)  # GIL released

    def read_pages(self, mr: MemoryRegion, pages: np.ndarray) -> np.ndarray:
        """Copies of whole pages (sorted indices) of one region, read without the GIL."""
        block = mr.block
        ps = block.page_size
        out = np.empty((len(pages), ps), np.uint8)
        for i, e in _runs(pages):
            hostmem.memmove(out.ctypes.data + i * ps, block.host + int(pages[i]) * ps, (e - i) * ps)
        return out

    def vcpu_native_ids(self) -> list[int]:
        """Kernel thread ids of the vCPU threads (postcopy blocktime is per vCPU)."""
        return [t.native_id for t in self._threads if t.native_id is not None]

    # -- vCPU threads ---------------------------------------------------------------------
    def start_vcpus(self, count: int, body: Callable[[int, VcpuPauser], None]) -> None:
        for i in range(count):
            t = threading.Thread(target=self._vcpu_main, args=(i, body), name=f"vcpu{i}", daemon=True)
            self._threads.append(t)
            self.pauser.join()
            t.start()

    def _vcpu_main(self, index: int, body: Callable[[int, VcpuPauser], None]) -> None:
        self.pauser.bind(index)
        try:
            body(index, self.pauser)
        finally:
            self.pauser.leave()

    def pause(self) -> None:
        self.pauser.pause()

    def resume(self) -> None:
        self.pauser.resume()

    def shutdown(self) -> None:
        self.pauser.stop()
        for t in self._threads:
            t.join(timeout=5)


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """[i, e) index ranges of ``pages`` (sorted) that are consecutive page numbers."""
    n = len(pages)
    if n == 0:
        return []
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    return list(zip(np.r_[0, brk].tolist(), np.r_[brk, n].tolist(), strict=True))


def _store_pages(block: object, pages: np.ndarray, data: np.ndarray | int) -> None:
    """Copy whole pages into guest RAM with ctypes ``memmove``/``memset``, one call per run.

    ctypes releases the GIL for the call, so a store that faults on a page postcopy has
    not brought yet blocks this vCPU thread only; the process (and the postcopy fault
    handler, the loader, QMP) keeps running. A numpy assignment would fault while holding
    the GIL (docs/postcopy.md).
    """
    ps = block.page_size  # type: ignore[attr-defined]
    host = block.host  # type: ignore[attr-defined]
    if np.ndim(data) == 0:
        value = int(data) & 0xFF  # type: ignore[arg-type]
        for i, e in _runs(pages):
            ctypes.memset(host + int(pages[i]) * ps, value, (e - i) * ps)
        return
    arr = np.ascontiguousarray(np.broadcast_to(np.asarray(data, np.uint8), (len(pages), ps)))
    base = arr.ctypes.data
    for i, e in _runs(pages):
        hostmem.memmove(host + int(pages[i]) * ps, base + i * ps, (e - i) * ps)
