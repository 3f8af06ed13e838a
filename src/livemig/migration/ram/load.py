"""The destination side of the RAM section: decoded records applied to guest RAM.

:class:`RamLoader` checks the block list against this VM, reads every RAM section through
the shared :class:`~livemig.migration.ram.codec.RecordDecoder` and applies what it hands
over. It keeps, per block:

* ``received``: pages for which a record (PAGE or ZERO) or a multifd run arrived;
* ``maybe_data``: pages that may hold data here — what the block held when loading began,
  plus every page written since. A ZERO record needs a write only there (reference 3.8):
  a ZERO record never populates memory that is zero already, pages in holes are left
  alone, and allocated pages are only written if they are not zero already.

Pages are written by this loader straight into guest RAM, unless a :class:`PagePlacer` is
set (postcopy: pages go in with ``UFFDIO_COPY``, never written into registered memory).
Other receivers of pages (multifd channel threads) report what they wrote with
:meth:`RamLoader.mark_data_runs` and hand zero runs to :meth:`RamLoader.zero_runs`, so
these maps and counters have one owner; :attr:`RamLoader.lock` serialises them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.codec import BlockEntry, RecordDecoder, expect_eos, read_block_list
from livemig.migration.ram.prefault import Prefaulter
from livemig.migration.ram.state import TARGET_PAGE_BITS
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

ZERO_CHUNK_PAGES = 1 << 14  # zero runs are checked 64 MiB at a time


class PagePlacer(Protocol):
    """Puts pages into guest RAM in place of the loader (postcopy's userfaultfd)."""

    def place_pages(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None: ...
    def zero_pages(self, block: RAMBlock, pages: np.ndarray) -> None: ...


class RamLoader:
    def __init__(self, blocks: list[RAMBlock]):
        self.blocks = {b.idstr: b for b in blocks}
        self.received = {b.idstr: Bitmap(b.max_length >> TARGET_PAGE_BITS) for b in blocks}
        self.maybe_data = {b.idstr: _initial_data_map(b) for b in blocks}
        self._pages = {b.idstr: b.pages_array(0, b.max_length) for b in blocks}
        self.decoder = RecordDecoder(self.blocks)
        self.lock = threading.Lock()
        self.prefault: Prefaulter | None = None
        self.placer: PagePlacer | None = None
        # multifd: called at each section start (early state is loaded: channel pages may
        # be applied) and at each MULTIFD_FLUSH record (wait until every channel's round
        # is in); None without multifd
        self.on_section: Callable[[], None] | None = None
        self.on_flush: Callable[[int], None] | None = None
        # what a capability adds to each entry of the block list (mapped-ram: the block's
        # place in the file, whose pages it loads there); None: nothing
        self.block_extra: Callable[[QEMUFileReader, BlockEntry], None] | None = None
        # blocks whose memory is not migrated (cpr-transfer hands it over): a record for
        # one of them is an error, as in QEMU
        self.ignored: frozenset[str] = frozenset()
        self.pages_loaded = 0
        self.zero_records = 0
        self.zero_pages_written = 0
        self.bytes_loaded = 0

    # -- set-up ----------------------------------------------------------------------------
    def load_setup(self, r: QEMUFileReader) -> None:
        """MEM_SIZE block list: every block must exist here with the same length."""
        total, entries, end_at = read_block_list(r, after_entry=self.block_extra)  # names are distinct
        for e in entries:
            block = self.blocks.get(e.name)
            if block is None:
                raise StreamError(
                    e.at, f"Unknown ramblock \"{e.name}\", cannot accept migration"
                )
            if e.length != block.used_length:
                raise StreamError(
                    e.at, f"Length mismatch: {e.name}: 0x{e.length:x} in != 0x{block.used_length:x}"
                )
        ours = sum(b.used_length for b in self.blocks.values())
        if sum(e.length for e in entries) != total or total != ours:
            raise StreamError(end_at, f"RAM size mismatch: stream has 0x{total:x} bytes, this VM 0x{ours:x}")
        expect_eos(r)
        self.decoder.start_section()

    # -- iterations ------------------------------------------------------------------------
    def start_section(self) -> None:
        self.decoder.start_section()
        if self.on_section is not None:
            self.on_section()

    def load(self, r: QEMUFileReader) -> None:
        """Load page records up to and including EOS."""
        self.decoder.read_section(r, self)

    # -- RecordConsumer --------------------------------------------------------------------
    def _check_migrated(self, name: str, at: int) -> None:
        if name in self.ignored:
            raise StreamError(at, f"block {name} should not be migrated !")

    def pages(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray, at: int) -> None:
        name = block.idstr
        self._check_migrated(name, at)
        if self.prefault is not None:  # let other cores populate what comes next
            self.prefault.data_arrived(
                name, int(pages[0]) << TARGET_PAGE_BITS, (int(pages[-1]) + 1) << TARGET_PAGE_BITS
            )
        if self.placer is not None:
            self.placer.place_pages(block, pages, data)
        else:
            self._pages[name][pages] = data
        with self.lock:
            self.received[name].set_indices(pages)
            self.maybe_data[name].set_indices(pages)
            self.pages_loaded += len(pages)
            self.bytes_loaded += len(pages) << TARGET_PAGE_BITS

    def zeros(self, block: RAMBlock, pages: np.ndarray, at: int) -> None:
        """Make pages zero without populating memory that is zero already."""
        name = block.idstr
        self._check_migrated(name, at)
        with self.lock:
            self.zero_records += len(pages)
            self.received[name].set_indices(pages)
            if self.placer is None:
                pages = pages[self.maybe_data[name].test_indices(pages)]
        if self.placer is not None:
            self.placer.zero_pages(block, pages)
            return
        if len(pages) == 0:
            return
        view = self._pages[name]
        rows = view[pages]
        nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
        if nz.any():
            view[pages[nz]] = 0
            with self.lock:
                self.zero_pages_written += int(np.count_nonzero(nz))

    def flush(self, at: int) -> None:
        if self.on_flush is not None:
            self.on_flush(at)

    # -- for other receivers of pages (multifd channels) ------------------------------------
    def page_view(self, block: RAMBlock) -> np.ndarray:
        """The block as (pages, page size) rows of guest RAM, for receivers writing into it."""
        return self._pages[block.idstr]

    def mark_data_runs(self, block: RAMBlock, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Runs of pages a receiver wrote into guest RAM itself."""
        with self.lock:
            rec, md = self.received[block.idstr], self.maybe_data[block.idstr]
            for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
                rec.set_range(s, ln)
                md.set_range(s, ln)
            n = int(lengths.sum())
            self.pages_loaded += n
            self.bytes_loaded += n << TARGET_PAGE_BITS

    def zero_runs(self, block: RAMBlock, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Zero pages that arrived as runs: write only where a page may hold data here."""
        name = block.idstr
        with self.lock:
            rec, md = self.received[name], self.maybe_data[name]
            work: list[tuple[int, int]] = []
            for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
                rec.set_range(s, ln)
                ms, ml = md.runs(True, s, ln)
                work += zip(ms.tolist(), ml.tolist(), strict=True)
            self.zero_records += int(lengths.sum())
        view = self._pages[name]
        written = 0
        for s, ln in work:
            for c in range(s, s + ln, ZERO_CHUNK_PAGES):
                rows = view[c : min(c + ZERO_CHUNK_PAGES, s + ln)]
                nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
                if nz.any():
                    rows[nz] = 0
                    written += int(np.count_nonzero(nz))
        if written:
            with self.lock:
                self.zero_pages_written += written

    # -- what arrived ----------------------------------------------------------------------
    def received_in(self, block: RAMBlock, starts: np.ndarray, lengths: np.ndarray) -> int:
        """How many pages of the given runs got a record or a run (discard audit)."""
        rec = self.received[block.idstr]
        return sum(rec.count(s, n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True))


def _initial_data_map(block: RAMBlock) -> Bitmap:
    """Pages that may hold data before loading: the file's data extents (fd-backed), or
    resident pages (private anonymous memory, whose other pages read as zero)."""
    bm = Bitmap(block.max_length >> TARGET_PAGE_BITS)
    if block.fd >= 0:
        for first, end in block.data_extent_pages(0, block.max_length).tolist():
            bm.set_range(first, end - first)
    else:
        bm.set_all()  # anonymous: reading is free (zero page), so check every page
    return bm
