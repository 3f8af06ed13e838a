"""The source's RAM state: one migration bitmap per block, and the one walk over it.

What happens, in the order that matters (reference 3.2-3.5):

1. every block's migration bitmap starts all ones over its *used* pages;
2. the dirty log starts and is synced once (unless background snapshot);
3. *then* every range the RamDiscardManager reports discarded is cleared from the migration
   bitmap, and from the dirty log below it one clear-chunk at a time — after the sync, so
   that bits the sync left set in the log are really gone;
4. pages are taken out of the bitmap in batches (:meth:`RamState.next_batch`); before the
   first page of a clear-chunk is handed out, that chunk of the dirty log is re-armed (lazy
   clear), so a write after the read is seen again;
5. later syncs add dirty bits without consulting the discard manager: a guest that writes
   unplugged memory after the start gets that memory migrated (reference 3.4). Bits
   beyond a block's used length are masked off: that memory is not part of the block
   (QEMU's ``used_length`` vs ``max_length``) and the destination would refuse it.

Every mode takes its pages from here — precopy, multifd, the postcopy background push and
urgent requests, the snapshot writer and its write faults — so a page is taken out of the
bitmap exactly once per dirtying, whoever sends it. One lock (:attr:`RamState.lock`)
covers every change of the bitmaps and of the dirty count, because postcopy and
snapshots have a second thread taking pages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.dirty_log import CLEAR_ALIGN_PAGES, DirtyLog
from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import MemoryRegion

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
CLEAR_BITMAP_SHIFT_MIN = 6
CLEAR_BITMAP_SHIFT_DEFAULT = 18
CLEAR_BITMAP_SHIFT_MAX = 31
BATCH_PAGES = 1024
"""Pages handed out per batch: enough for numpy to amortise, small enough to interleave."""

ClaimFn = Callable[["BlockState", np.ndarray], None]


@dataclass
class RamStats:
    """Counters behind query-migrate's ``ram`` member."""

    transferred: int = 0
    duplicate: int = 0  # zero pages sent as ZERO records (or zero runs)
    normal: int = 0  # pages sent with content
    pages_read: int = 0  # pages whose content was read from host memory
    holes_skipped: int = 0  # pages sent as zero without reading (holes of fd-backed RAM)
    discarded_bytes: int = 0  # bytes of discarded ranges left out of the bitmap
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    postcopy_requests: int = 0

    @property
    def normal_bytes(self) -> int:
        return self.normal * TARGET_PAGE_SIZE


class BlockState:
    """One RAM block's migration state: QEMU's ``bmap`` and ``clear_bmap``."""

    def __init__(self, mr: MemoryRegion, shift: int):
        self.mr = mr
        self.block: RAMBlock = mr.block
        if self.block.page_size != TARGET_PAGE_SIZE:
            raise ValueError(f"{self.block.idstr}: only {TARGET_PAGE_SIZE}-byte pages are supported")
        self.total_pages = self.block.max_length >> TARGET_PAGE_BITS
        self.used_pages = self.block.used_length >> TARGET_PAGE_BITS
        self.bmap = Bitmap(self.total_pages)
        self.shift = shift
        self.clear_bmap = Bitmap((self.total_pages + (1 << shift) - 1) >> shift)
        # sync results are masked with this: pages past used_length are not the block's
        self.used_mask: np.ndarray | None = None
        if self.used_pages != self.total_pages:
            m = Bitmap(self.total_pages)
            m.set_range(0, self.used_pages)
            self.used_mask = m.words
        self.extents: np.ndarray | None = None  # data extents of this pass (fd-backed)
        self.scratch = np.empty(len(self.bmap.words), np.uint64)  # reused by every sync

    @property
    def idstr(self) -> str:
        return self.block.idstr

    def data_mask(self, idx: np.ndarray, extents: np.ndarray | None = None) -> np.ndarray:
        """For sorted pages: True where a page may hold data, False in a hole.

        Holes of fd-backed memory are never read (reading would allocate them); they are
        zero. ``extents`` default to this pass's (:meth:`RamState.next_batch` looks them
        up once per block and pass).
        """
        block = self.block
        if block.fd < 0:
            return np.ones(len(idx), bool)
        if extents is None:
            extents = self.extents if self.extents is not None else block.data_extent_pages()
        return block.pages_in_extents(idx, extents)

    def discarded_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(first page, page count) of the block's discarded runs (none without an rdm)."""
        rdm = self.mr.rdm
        if rdm is None:
            e = np.zeros(0, np.int64)
            return e, e
        offs, sizes = rdm.discarded_runs(Section(self.mr, 0, self.block.used_length))
        return (np.asarray(offs, np.int64) >> TARGET_PAGE_BITS,
                np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS)

    def populated_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(first page, page count) of the parts that are not discarded."""
        rdm = self.mr.rdm
        if rdm is None:
            return np.array([0], np.int64), np.array([self.used_pages], np.int64)
        offs, sizes = rdm.populated_runs(Section(self.mr, 0, self.block.used_length))
        return (np.asarray(offs, np.int64) >> TARGET_PAGE_BITS,
                np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS)


class RamState:
    """Migration bitmaps, dirty-log coordination and the walk (module docstring)."""

    def __init__(
        self,
        regions: list[MemoryRegion],
        dirty_log: DirtyLog | None,
        clear_bitmap_shift: int = CLEAR_BITMAP_SHIFT_DEFAULT,
        log_clear: bool = True,
    ):
        shift = min(max(clear_bitmap_shift, CLEAR_BITMAP_SHIFT_MIN), CLEAR_BITMAP_SHIFT_MAX)
        self.blocks = [BlockState(mr, shift) for mr in regions]
        self.by_name = {b.idstr: b for b in self.blocks}
        self.dirty_log = dirty_log
        self.log_clear = log_clear and dirty_log is not None
        self.stats = RamStats()
        self.lock = threading.Lock()
        self.dirty_pages = 0
        self.last_stage = False  # the guest is stopped: no lazy log clear any more
        self._cursor = 0
        self._pass_words: np.ndarray | None = None
        self._pass_pos = 0
        self._sync_time = time.monotonic()
        self._period_new = 0

    # -- totals ----------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """``ram_bytes_total()``: used length of every block, discarded memory included."""
        return sum(b.block.used_length for b in self.blocks)

    @property
    def remaining_bytes(self) -> int:
        return self.dirty_pages * TARGET_PAGE_SIZE

    # -- set-up ----------------------------------------------------------------------------
    def init_bitmaps(self, start_log: bool = True, sync: bool = True) -> None:
        """Steps 1-3 of the module docstring.

        A background snapshot neither starts the log nor syncs (``sync=False``); a caller
        whose log is already running skips only the start.
        """
        with self.lock:
            self.dirty_pages = 0
            for b in self.blocks:
                b.bmap.set_range(0, b.used_pages)
                if b.used_pages < b.total_pages:
                    b.bmap.clear_range(b.used_pages, b.total_pages - b.used_pages)
                b.clear_bmap.clear_all()
                self.dirty_pages += b.used_pages
        if self.dirty_log is not None:
            if start_log:
                self.dirty_log.start()
            if sync:
                self.sync()
        self.clear_discarded()

    def clear_discarded(self) -> int:
        """Drop discarded ranges from the migration bitmap (and, lazily-chunked, the log).

        Runs on arrays: one bitmap pass for all runs of a block, and one log clear per
        clear-chunk that any run touches — never a Python loop per run or per page.
        """
        total = 0
        with self.lock:
            for b in self.blocks:
                starts, lengths = b.discarded_runs()
                if not len(starts):
                    continue
                if self.log_clear:
                    c0 = starts >> b.shift
                    c1 = (starts + lengths - 1) >> b.shift
                    diff = np.zeros(b.clear_bmap.nbits + 1, np.int32)
                    np.add.at(diff, c0, 1)
                    np.add.at(diff, c1 + 1, -1)
                    self._clear_chunks(b, np.flatnonzero(np.cumsum(diff[:-1]) > 0))
                total += b.bmap.clear_runs(starts, lengths)
                self.stats.discarded_bytes += int(lengths.sum()) << TARGET_PAGE_BITS
            self.dirty_pages -= total
        return total

    def _clear_chunks(self, b: BlockState, chunks: np.ndarray) -> None:
        """Clear the dirty log of the given clear-chunks whose ``clear_bmap`` bit is set."""
        assert self.dirty_log is not None
        if not len(chunks):
            return
        pending = chunks[b.clear_bmap.test_indices(chunks)]
        chunk = 1 << b.shift
        # A chunk in which the last sync saw no bit has nothing to re-arm: the log only
        # clears what a sync reported, and a sync returns every bit not yet cleared.
        if len(pending) > 1 and (chunk >> 6) * b.clear_bmap.nbits == len(b.scratch):
            seen = b.scratch.reshape(b.clear_bmap.nbits, chunk >> 6).any(axis=1)[pending]
            for c in pending[~seen].tolist():
                b.clear_bmap.clear_range(c, 1)
            pending = pending[seen]
        for c in pending.tolist():
            first = c * chunk
            n = min(chunk, b.total_pages - first)
            n = n if first + n == b.total_pages else n - n % CLEAR_ALIGN_PAGES
            self.dirty_log.clear(b.block, first, n)
            b.clear_bmap.clear_range(c, 1)

    # -- sync ------------------------------------------------------------------------------
    def sync(self) -> int:
        """Fetch the dirty log into the migration bitmaps; returns newly dirty pages.

        A new pass starts: the walk begins again at the first block.
        """
        if self.dirty_log is None:
            return 0
        new = 0
        with self.lock:
            for b in self.blocks:
                words = self.dirty_log.sync(b.block, b.scratch)
                if b.used_mask is not None:
                    words &= b.used_mask
                new += b.bmap.or_words(words)
                if self.log_clear:
                    b.clear_bmap.set_all()
            self.dirty_pages += new
            self.stats.dirty_sync_count += 1
            self._restart_walk()
        now = time.monotonic()
        self._period_new += new
        if now - self._sync_time >= 1.0:
            self.stats.dirty_pages_rate = int(self._period_new / (now - self._sync_time))
            self._sync_time, self._period_new = now, 0
        return new

    def _restart_walk(self) -> None:
        self._cursor, self._pass_words, self._pass_pos = 0, None, 0

    def restart_walk(self) -> None:
        """Walk from the first block again (after the bitmaps were rebuilt)."""
        with self.lock:
            self._restart_walk()

    # -- the walk --------------------------------------------------------------------------
    def next_batch(
        self, max_pages: int = BATCH_PAGES, claim: ClaimFn | None = None
    ) -> tuple[BlockState, np.ndarray] | None:
        """Take about ``max_pages`` dirty pages of one block out of the bitmap, sorted.

        None when this pass has visited every block. The dirty log of the clear-chunks
        the batch touches is re-armed first, so a write after the caller reads a page is
        logged again. A block's data extents are looked up once per pass, when the walk
        enters it: a hole that fills in during the pass is a write, whose dirty bit
        survives the lazy clear (only synced bits are re-armed), so it is sent again
        after the next sync. ``claim(b, idx)`` runs under :attr:`lock` right after the
        pages left the bitmap (the snapshot writer marks them in flight there).
        """
        with self.lock:
            while self._cursor < len(self.blocks):
                b = self.blocks[self._cursor]
                if self._pass_words is None:
                    self._pass_words = np.flatnonzero(b.bmap.words)
                    self._pass_pos = 0
                    has_work = len(self._pass_words) > 0
                    b.extents = b.block.data_extent_pages() if b.block.fd >= 0 and has_work else None
                nzw = self._pass_words
                while self._pass_pos < len(nzw):
                    pos = self._pass_pos
                    counts = np.bitwise_count(b.bmap.words[nzw[pos : pos + max_pages]])
                    take = max(int(np.searchsorted(np.cumsum(counts), max_pages, side="right")), 1)
                    self._pass_pos = pos + take
                    idx = b.bmap.take_words(nzw[pos : pos + take])
                    if not len(idx):
                        continue  # taken meanwhile (an urgent request or a write fault)
                    if self.log_clear and not self.last_stage:
                        first, last = int(idx[0]), int(idx[-1])
                        self._clear_chunks(b, np.arange(first >> b.shift, (last >> b.shift) + 1))
                    self.dirty_pages -= len(idx)
                    if claim is not None:
                        claim(b, idx)
                    return b, idx
                self._cursor += 1
                self._pass_words = None
        return None

    def take_range(self, b: BlockState, first: int, npages: int) -> np.ndarray:
        """Take the dirty pages of ``[first, first+npages)`` of ``b`` out of the bitmap.

        For a page wanted out of turn (a postcopy request, a write fault): returns the
        pages that were still dirty, in order; their bits are cleared and their log chunk
        re-armed as in :meth:`next_batch`.
        """
        with self.lock:
            bits = b.bmap.test_indices(np.arange(first, first + npages, dtype=np.int64))
            idx = first + bits.nonzero()[0]  # int64; np.flatnonzero's wrapper costs ~1.5 us
            if not len(idx):
                return idx
            b.bmap.clear_range(first, npages)
            if self.log_clear and not self.last_stage:
                self._clear_chunks(b, np.arange(first >> b.shift, ((first + npages - 1) >> b.shift) + 1))
            self.dirty_pages -= len(idx)
            return idx

    # -- rebuilding ------------------------------------------------------------------------
    def rebuild(self, b: BlockState, received: np.ndarray) -> None:
        """Postcopy recovery (reference 5.1): everything the destination did not receive
        (``received``: one bool per used page) is dirty again, except discarded ranges."""
        dirty = np.zeros(len(b.bmap.words) * 64, bool)
        dirty[: b.used_pages] = ~received[: b.used_pages]
        with self.lock:
            b.bmap.words[:] = np.packbits(dirty, bitorder="little").view(np.uint64)
            starts, lengths = b.discarded_runs()
            if len(starts):
                b.bmap.clear_runs(starts, lengths)

    def recount(self) -> None:
        """Recompute the dirty count from the bitmaps and restart the walk."""
        with self.lock:
            self.dirty_pages = sum(b.bmap.count() for b in self.blocks)
            self._restart_walk()

    def dirty_runs(self, b: BlockState) -> tuple[np.ndarray, np.ndarray]:
        """(first page, count) of the runs still dirty in ``b`` (postcopy's discard list)."""
        with self.lock:
            return b.bmap.runs(True, 0, b.used_pages)
