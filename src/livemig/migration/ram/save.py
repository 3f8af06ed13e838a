"""The source side of the RAM section (``ram``, version 4), discard-aware.

What happens, in the order that matters (reference 3.2-3.5):

1. every block's migration bitmap starts all ones over its used pages;
2. the dirty log starts and is synced once (unless background snapshot);
3. *then* every range the RamDiscardManager reports discarded is cleared from the migration
   bitmap, and from the dirty log below it one clear-chunk at a time — after the sync, so
   that bits the sync left set in the log are really gone;
4. iterations send dirty pages; before the first page of a clear-chunk is read, that chunk
   of the dirty log is re-armed (lazy clear), so a write after the read is seen again;
5. later syncs add dirty bits without consulting the discard manager: a guest that writes
   unplugged memory after the start gets that memory migrated (reference 3.4).

One step beyond QEMU: pages in holes of fd-backed RAM are sent as ZERO records without
being read, because reading a hole of a memfd allocates it. A migration must not grow the
source's memory.

The data path never loops per page in Python: pages are found by unpacking bitmap words,
classified with ``searchsorted`` against the file's data extents, zero-checked with one
``bitwise_or.reduce`` and encoded into a staging buffer with numpy strided views.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.dirty_log import CLEAR_ALIGN_PAGES, DirtyLog
from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import MemoryRegion
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileWriter

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
CLEAR_BITMAP_SHIFT_MIN = 6
CLEAR_BITMAP_SHIFT_DEFAULT = 18
CLEAR_BITMAP_SHIFT_MAX = 31
PAGE_RECORD = 8 + TARGET_PAGE_SIZE
ZERO_RECORD = 9
BATCH_PAGES = 1024


@dataclass
class RamStats:
    """Counters behind query-migrate's ``ram`` member."""

    transferred: int = 0
    duplicate: int = 0  # zero pages sent as ZERO records
    normal: int = 0  # pages sent with content
    pages_read: int = 0  # pages whose content was read from host memory
    holes_skipped: int = 0  # pages sent as ZERO without reading (holes of fd-backed RAM)
    discarded_bytes: int = 0  # bytes of discarded ranges left out of the bitmap
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    postcopy_requests: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def normal_bytes(self) -> int:
        return self.normal * TARGET_PAGE_SIZE


class BlockSaveState:
    """Per-RAMBlock bitmaps: QEMU's ``bmap`` and ``clear_bmap``."""

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
        self.pages = self.block.pages_array(0, self.block.max_length)
        self.used_mask: np.ndarray | None = None
        self.extents: np.ndarray | None = None  # data extents of this pass (fd-backed)
        self.scratch = np.empty(len(self.bmap.words), np.uint64)  # reused by every sync

    def data_mask(self, idx: np.ndarray, extents: np.ndarray | None) -> np.ndarray:
        """For sorted pages: True where a page may hold data, False in a hole.

        Holes of fd-backed memory are never read (reading would allocate them); they are
        zero. ``extents`` are the block's data extents if the caller looked them up already.
        """
        block = self.block
        if block.fd < 0:
            return np.ones(len(idx), bool)
        if extents is None:
            extents = block.data_extent_pages()
        return block.pages_in_extents(idx, extents)
        if self.used_pages != self.total_pages:
            m = Bitmap(self.total_pages)
            m.set_range(0, self.used_pages)
            self.used_mask = m.words


class RamSaver:
    def __init__(
        self,
        regions: list[MemoryRegion],
        dirty_log: DirtyLog | None,
        clear_bitmap_shift: int = CLEAR_BITMAP_SHIFT_DEFAULT,
        log_clear: bool = True,
    ):
        shift = min(max(clear_bitmap_shift, CLEAR_BITMAP_SHIFT_MIN), CLEAR_BITMAP_SHIFT_MAX)
        self.blocks = [BlockSaveState(mr, shift) for mr in regions]
        self.dirty_log = dirty_log
        self.log_clear = log_clear and dirty_log is not None
        self.stats = RamStats()
        self.dirty_pages = 0
        self.last_stage = False
        self._last_block: RAMBlock | None = None
        self._cursor_block = 0
        self._pass_words: np.ndarray | None = None
        self._pass_pos = 0
        self._sync_time = time.monotonic()
        self._period_new = 0
        buf = np.empty(BATCH_PAGES * PAGE_RECORD, np.uint8)
        self._page_buf = buf
        self._page_hdr = np.ndarray((BATCH_PAGES,), ">u8", buf, 0, (PAGE_RECORD,))
        self._page_data = np.ndarray(
            (BATCH_PAGES, TARGET_PAGE_SIZE), np.uint8, buf, 8, (PAGE_RECORD, 1)
        )
        zbuf = np.zeros(BATCH_PAGES * ZERO_RECORD, np.uint8)
        self._zero_buf = zbuf
        self._zero_hdr = np.ndarray((BATCH_PAGES,), ">u8", zbuf, 0, (ZERO_RECORD,))
        self._gather = np.empty((BATCH_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self.multifd: Any = None  # multifd.MultifdSender: pages go to its channels

    # -- totals -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """``ram_bytes_total()``: used length of every block, discarded memory included."""
        return sum(b.block.used_length for b in self.blocks)

    @property
    def remaining_bytes(self) -> int:
        return self.dirty_pages * TARGET_PAGE_SIZE

    # -- setup ----------------------------------------------------------------------------------
    def write_setup(self, w: QEMUFileWriter) -> None:
        """The START payload: MEM_SIZE with the block list, then EOS."""
        w.put_be64(self.total_bytes | RamFlag.MEM_SIZE)
        for b in self.blocks:
            w.put_counted_string(b.block.idstr.encode())
            w.put_be64(b.block.used_length)
        w.put_be64(RamFlag.EOS)

    def init_bitmaps(self, start_log: bool = True, sync: bool = True) -> None:
        """Steps 1-3 of the module docstring.

        A background snapshot neither starts the log nor syncs (``sync=False``); a caller
        whose log is already running skips only the start.
        """
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
        for b in self.blocks:
            rdm = b.mr.rdm
            if rdm is None:
                continue
            offs, sizes = rdm.discarded_runs(Section(b.mr, 0, b.block.used_length))
            if not len(offs):
                continue
            starts = np.asarray(offs, np.int64) >> TARGET_PAGE_BITS
            lengths = np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS
            if self.log_clear:
                c0 = starts >> b.shift
                c1 = (starts + lengths - 1) >> b.shift
                diff = np.zeros(b.clear_bmap.nbits + 1, np.int32)
                np.add.at(diff, c0, 1)
                np.add.at(diff, c1 + 1, -1)
                self._clear_chunks(b, np.flatnonzero(np.cumsum(diff[:-1]) > 0))
            total += b.bmap.clear_runs(starts, lengths)
            self.stats.discarded_bytes += int(np.sum(np.asarray(sizes, np.int64)))
        self.dirty_pages -= total
        return total

    def _clear_log_chunks(self, b: BlockSaveState, start: int, npages: int) -> None:
        """Re-arm every clear-chunk touched by [start, start+npages) whose bit is pending."""
        c0 = start >> b.shift
        c1 = (start + npages - 1) >> b.shift
        self._clear_chunks(b, np.arange(c0, c1 + 1))

    def _clear_chunks(self, b: BlockSaveState, chunks: np.ndarray) -> None:
        """Clear the dirty log of the given clear-chunks whose ``clear_bmap`` bit is set."""
        assert self.dirty_log is not None
        if not len(chunks):
            return
        words = b.clear_bmap.words
        pending = chunks[((words[chunks >> 6] >> (chunks & 63).astype(np.uint64)) & np.uint64(1)) != 0]
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

    # -- sync -------------------------------------------------------------------------------------
    def sync(self) -> int:
        """Fetch the dirty log into the migration bitmaps; returns newly dirty pages."""
        if self.dirty_log is None:
            return 0
        new = 0
        for b in self.blocks:
            words = self.dirty_log.sync(b.block, b.scratch)
            if b.used_mask is not None:
                words &= b.used_mask
            new += b.bmap.or_words(words)
            if self.log_clear:
                b.clear_bmap.set_all()
        self.dirty_pages += new
        self.stats.dirty_sync_count += 1
        now = time.monotonic()
        self._period_new += new
        if now - self._sync_time >= 1.0:
            self.stats.dirty_pages_rate = int(self._period_new / (now - self._sync_time))
            self._sync_time, self._period_new = now, 0
        self._pass_words = None
        self._cursor_block = 0
        return new

    # -- sending ----------------------------------------------------------------------------------
    def start_section(self) -> None:
        """Each section names its first block again, so a reader can start at any section."""
        self._last_block = None

    def send(self, w: QEMUFileWriter, max_bytes: int | None = None) -> bool:
        """Send dirty pages until the pass is done (True) or ``max_bytes`` were written."""
        start_bytes = w.bytes_written
        while self._cursor_block < len(self.blocks):
            b = self.blocks[self._cursor_block]
            if self._pass_words is None:
                self._pass_words = self._dirty_words(b)
                self._pass_pos = 0
                # Holes are looked up once per pass: a hole that fills in during the pass
                # is a write, whose dirty bit survives the lazy clear (only synced bits are
                # re-armed), so it is sent again after the next sync.
                b.extents = b.block.data_extent_pages() if b.block.fd >= 0 and len(self._pass_words) else None
            nzw = self._pass_words
            while self._pass_pos < len(nzw):
                if max_bytes is not None and w.bytes_written - start_bytes >= max_bytes:
                    return False
                self._pass_pos = self._send_batch(w, b, nzw, self._pass_pos)
            self._cursor_block += 1
            self._pass_words = None
        if self.multifd is not None:  # the round is complete: SYNC channels, MULTIFD_FLUSH
            self.multifd.flush(w, self.stats)
        return True

    def _dirty_words(self, b: BlockSaveState) -> np.ndarray:
        """Indices of the words of ``b``'s migration bitmap with a bit set: one pass's work."""
        return np.flatnonzero(b.bmap.words)

    def _send_batch(self, w: QEMUFileWriter, b: BlockSaveState, nzw: np.ndarray, pos: int) -> int:
        # take words until about BATCH_PAGES bits
        counts = np.bitwise_count(b.bmap.words[nzw[pos : pos + BATCH_PAGES]])
        take = int(np.searchsorted(np.cumsum(counts), BATCH_PAGES, side="right"))
        take = max(take, 1)
        widx = nzw[pos : pos + take]
        words = b.bmap.words[widx]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(-1, 64)
        r, c = np.nonzero(bits)
        idx = widx[r].astype(np.int64) * 64 + c
        if len(idx) == 0:
            return pos + take
        if self.log_clear and not self.last_stage:
            self._clear_log_chunks(b, int(idx[0]), int(idx[-1]) - int(idx[0]) + 1)
        b.bmap.words[widx] = 0
        self.dirty_pages -= len(idx)
        if self.multifd is not None:
            self.multifd.queue_pages(w, b, idx)
        else:
            self.send_pages(w, b, idx)
        return pos + take

    def send_pages(self, w: QEMUFileWriter, b: BlockSaveState, idx: np.ndarray) -> None:
        """Read, classify and send the pages ``idx`` (sorted) of one block."""
        block = b.block
        in_data = b.data_mask(idx, b.extents)
        hole_idx, data_idx = idx[~in_data], idx[in_data]
        self.stats.holes_skipped += len(hole_idx)
        n = len(data_idx)
        if n:
            first, last = int(data_idx[0]), int(data_idx[-1])
            if last - first + 1 == n:
                rows = b.pages[first : last + 1]
            else:
                rows = self._gather[:n]
                np.take(b.pages, data_idx, axis=0, out=rows)
            nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
            self.stats.pages_read += n
        else:
            rows = self._gather[:0]
            nz = np.zeros(0, bool)
        zero_idx = np.concatenate((hole_idx, data_idx[~nz])) if n else hole_idx
        if len(zero_idx):
            self._emit_zero(w, block, zero_idx)
        k = int(np.count_nonzero(nz))
        if k:
            self._emit_pages(w, block, data_idx[nz], rows if k == n else rows[nz])

    @staticmethod
    def _header_words(idx: np.ndarray, flag: int) -> np.ndarray:
        return (idx.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) | np.uint64(
            flag | RamFlag.CONTINUE
        )

    def _name_block(self, w: QEMUFileWriter, block: RAMBlock, page: int, flag: int) -> bool:
        """Write the header of a record that names its block; True if one was needed."""
        if self._last_block is block:
            return False
        w.put_be64((page << TARGET_PAGE_BITS) | flag)
        w.put_counted_string(block.idstr.encode())
        self._last_block = block
        return True

    def _emit_zero(self, w: QEMUFileWriter, block: RAMBlock, idx: np.ndarray) -> None:
        if self._name_block(w, block, int(idx[0]), RamFlag.ZERO):
            w.put_u8(0)
            self.stats.transferred += 10 + len(block.idstr)
            idx = idx[1:]
            self.stats.duplicate += 1
        for s in range(0, len(idx), BATCH_PAGES):
            part = idx[s : s + BATCH_PAGES]
            k = len(part)
            self._zero_hdr[:k] = self._header_words(part, RamFlag.ZERO)
            w.put_bytes(memoryview(self._zero_buf[: k * ZERO_RECORD]))
            self.stats.duplicate += k
            self.stats.transferred += k * ZERO_RECORD

    def _emit_pages(self, w: QEMUFileWriter, block: RAMBlock, idx: np.ndarray, rows: np.ndarray) -> None:
        if self._name_block(w, block, int(idx[0]), RamFlag.PAGE):
            w.write_view(memoryview(np.ascontiguousarray(rows[0])))
            self.stats.transferred += 9 + len(block.idstr) + TARGET_PAGE_SIZE
            self.stats.normal += 1
            idx, rows = idx[1:], rows[1:]
        k = len(idx)
        if k == 0:
            return
        self._page_hdr[:k] = self._header_words(idx, RamFlag.PAGE)
        self._page_data[:k] = rows
        w.write_view(memoryview(self._page_buf[: k * PAGE_RECORD]))
        self.stats.normal += k
        self.stats.transferred += k * PAGE_RECORD

    def write_eos(self, w: QEMUFileWriter) -> None:
        w.put_be64(RamFlag.EOS)
        self.stats.transferred += 8

