"""Write faults in the snapshot writer: save the old page, then let the write go on.

The writer's *fault thread* waits on the userfaultfd. For a fault on page *p* it takes the
unsaved pages of the aligned :data:`FAULT_AHEAD_PAGES` chunk around *p* out of the
migration bitmap (:meth:`~livemig.migration.ram.state.RamState.take_range`: the one
bitmap, so every page is saved exactly once, by whichever thread gets it first), copies
their content out of the VM into its *saved queue* (holes of memfd memory are not read:
zero), and un-protects the chunk, which wakes the faulting thread. The main thread writes
the queue out with the next section (:meth:`FaultServer.take_saved`).

**The rule that keeps the snapshot exact: a page is un-protected only after its content
was copied.** The main thread takes a batch out of the bitmap (its *claim*, under the
RAM state's lock, marks the batch's span in flight), copies it, then un-protects the span
(:meth:`FaultServer.copied`). So:

* a fault on a page in flight is left waiting: the span's un-protect wakes it;
* a fault's chunk that overlaps the span in flight is un-protected only where the fault
  thread took pages itself, never over the batch being copied;
* :attr:`FaultServer.lock` is held by the fault thread from taking pages until they are
  copied and un-protected, and by the main thread for a span's un-protect, so the span's
  un-protect cannot release pages a fault took but has not copied yet (a span may
  straddle them: they left the bitmap before the batch was taken).

**Nothing here waits for the stream or for the VM process.** Copies are
``process_vm_readv`` calls; the queue is this process's memory. Only a full queue
(:data:`URGENT_PAGES_MAX` pages) makes a fault wait until the main thread has taken it.
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass

import numpy as np

from livemig.memory import userfaultfd as uf
from livemig.memory.bitmap import index_runs
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE, BlockState, RamState
from livemig.migration.snapshot.remote_memory import RemoteMemory
from livemig.migration.snapshot.tracking import SnapshotError

FAULT_AHEAD_PAGES = 64  # pages saved per write fault: the aligned 256 KiB around it
URGENT_PAGES_MAX = 65536  # 256 MiB of saved-but-unsent pages before a fault has to wait
_EMPTY_ROWS = np.empty((0, TARGET_PAGE_SIZE), np.uint8)


@dataclass
class SavedChunk:
    """Pages saved on one fault: ``idx`` (sorted) of ``b``; ``was_read[i]`` says whether
    page ``idx[i]`` was copied (else a hole: zero). The copied ones are rows
    ``first_row ...`` of the queue buffer, in order."""

    b: BlockState
    idx: np.ndarray
    was_read: np.ndarray
    first_row: int


class FaultServer:
    """The fault thread (:meth:`run`) and what the main thread asks of it (module docstring)."""

    def __init__(self, ram: RamState, uffd: int, reader: RemoteMemory):
        self.ram = ram
        self.protect = uf.WriteProtector(uffd)
        self.uffd = uffd
        self.reader = reader  # this thread's own: readers keep buffers
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.inflight: tuple[BlockState, int, int] | None = None  # block, first, last page
        self.stopping = False
        self.error: BaseException | None = None
        self.wp_faults = 0
        self.urgent_pages = 0
        self.urgent_peak = 0
        self.unprotect_calls = 0
        self.queued_pages = 0
        self._queue: list[SavedChunk] = []
        self._rows = _EMPTY_ROWS
        self._nrows = 0
        self._spare = _EMPTY_ROWS  # double buffering: faults fill one while the other is written
        self._lent = _EMPTY_ROWS
        self._pending: list[int] = []  # fault addresses waiting for room in the queue
        by_host = sorted(ram.blocks, key=lambda b: b.block.host)
        self._blocks = by_host
        self._starts = np.array([b.block.host for b in by_host], np.int64)
        self._ends = np.array([b.block.host + b.block.max_length for b in by_host], np.int64)
        self._wake_r, self._wake_w = os.pipe()

    # -- the main thread's side -----------------------------------------------------------------
    def claim(self, b: BlockState, idx: np.ndarray) -> None:
        """``RamState.next_batch``'s claim: the batch is in flight until :meth:`copied`."""
        self.inflight = (b, int(idx[0]), int(idx[-1]))

    def copied(self, b: BlockState, idx: np.ndarray) -> None:
        """The batch's content is in this process: un-protect its span, waking the faults
        deferred on it. Every other page of the span was saved earlier or never protected
        (unplugged, past the used length)."""
        with self.lock:
            first = int(idx[0])
            self._unprotect(b, first, int(idx[-1]) - first + 1)
            self.inflight = None

    def take_saved(self) -> tuple[list[SavedChunk], np.ndarray] | None:
        """The queue so far and its rows; the fault thread goes on in the other buffer.
        :meth:`give_back` once the rows are written."""
        with self.lock:
            if not self._queue:
                return None
            queue, rows = self._queue, self._rows[: self._nrows]
            self._lent = self._rows
            self._queue, self._nrows, self.queued_pages = [], 0, 0
            self._rows, self._spare = self._spare, _EMPTY_ROWS
            self.drained.notify_all()
        return queue, rows

    def give_back(self) -> None:
        """The rows of :meth:`take_saved` were written: their buffer is the next spare."""
        with self.lock:
            if len(self._lent) > len(self._spare):
                self._spare = self._lent
            self._lent = _EMPTY_ROWS

    @property
    def busy(self) -> bool:
        """Saved pages not taken yet, or faults waiting for room."""
        with self.lock:
            return bool(self._queue or self._pending)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def check(self) -> None:
        if self.error is not None:
            raise SnapshotError(f"write-fault handler failed: {self.error}")

    def stop(self) -> None:
        """End :meth:`run` (from the main thread)."""
        self.stopping = True
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the fault thread -----------------------------------------------------------------------
    def run(self) -> None:
        """Wait for write faults and save each faulting page; until :meth:`stop`."""
        p = select.poll()
        p.register(self.uffd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        try:
            while not self.stopping:
                p.poll(1000)
                self._serve()
                with self.lock:
                    while self._pending and not self.stopping:  # queue full: wait for room
                        self.drained.wait(0.05)
                        self._retry_pending()
        except BaseException as e:  # noqa: BLE001 - the main thread reports it
            self.error = e

    def _serve(self) -> None:
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
            if not self._save(addr):
                self._pending = pending[i:]
                return

    def _block_at(self, addr: int) -> BlockState:
        i = int(np.searchsorted(self._starts, addr, side="right")) - 1
        if i < 0 or addr >= self._ends[i]:
            raise SnapshotError(f"write fault at 0x{addr:x} outside guest RAM")
        return self._blocks[i]

    def _save(self, addr: int) -> bool:
        """With :attr:`lock`: save the fault's chunk, un-protect it. False: queue full."""
        b = self._block_at(addr)
        page = (addr - b.block.host) >> TARGET_PAGE_BITS
        lo = page & ~(FAULT_AHEAD_PAGES - 1)
        hi = max(min(lo + FAULT_AHEAD_PAGES, b.used_pages), page + 1)
        with self.ram.lock:  # an upper bound of what take_range returns: bits only go
            want = b.bmap.count(lo, hi - lo)
        if self.queued_pages + want > URGENT_PAGES_MAX:
            if self.queued_pages >= URGENT_PAGES_MAX:
                return False
            lo, hi = page, page + 1
        idx = self.ram.take_range(b, lo, hi - lo)
        # read after the take: a batch claimed later holds no page of [lo, hi)
        fl = self.inflight
        overlaps = fl is not None and fl[0] is b and fl[1] < hi and lo <= fl[2]
        if len(idx):
            self._copy(b, idx, page, lo, hi)
        if not overlaps:
            self._unprotect(b, lo, hi - lo)  # one call; wakes the faulting thread
            return True
        assert fl is not None
        starts, counts = index_runs(idx)  # never un-protect the batch being copied
        for s, n in zip(starts.tolist(), counts.tolist(), strict=True):
            self._unprotect(b, s, n)
        if not len(idx) or page not in idx:
            if not fl[1] <= page <= fl[2]:  # saved earlier (a late event): just wake it
                self._unprotect(b, page, 1)
            # else: in flight, the span's un-protect wakes it
        return True

    def _copy(self, b: BlockState, idx: np.ndarray, page: int, lo: int, hi: int) -> None:
        """Copy pages ``idx`` out of the VM into the queue; holes are zero, not read.

        A page whose bit was still set has not been written since protection started (a
        write would have faulted and saved it), so a hole there is a hole of the
        snapshot. The faulting page is read whatever it is: its write is held until the
        un-protect, so it still reads as it was.
        """
        extents = b.extents
        if extents is None and b.block.fd >= 0:  # the walk has not reached this block
            extents = b.block.data_extent_pages(lo << TARGET_PAGE_BITS, (hi - lo) << TARGET_PAGE_BITS)
        was_read = b.data_mask(idx, extents)
        was_read[idx == page] = True
        k = int(np.count_nonzero(was_read))
        if self._nrows + k > len(self._rows):
            size = min(max(256, 2 * len(self._rows), self._nrows + k), URGENT_PAGES_MAX)
            grown = np.empty((size, TARGET_PAGE_SIZE), np.uint8)
            grown[: self._nrows] = self._rows[: self._nrows]
            self._rows = grown
        self.reader.read(b, idx[was_read], self._rows[self._nrows : self._nrows + k])
        self._queue.append(SavedChunk(b, idx, was_read, self._nrows))
        self._nrows += k
        self.queued_pages += len(idx)
        self.urgent_pages += len(idx)
        self.urgent_peak = max(self.urgent_peak, self.queued_pages)

    def _unprotect(self, b: BlockState, first: int, npages: int) -> None:
        self.protect(b.block.host + (first << TARGET_PAGE_BITS), npages << TARGET_PAGE_BITS, False)
        self.unprotect_calls += 1
