"""The RAM section, read through the engine's record decoder and counted, never applied.

:class:`RamRecords` is the inspector's
:class:`~livemig.migration.ram.codec.RecordConsumer`: the same
:class:`~livemig.migration.ram.codec.RecordDecoder` that feeds the destination's loader
hands it runs of records, and it counts ZERO and PAGE records per block and per section
and remembers which pages got one (a :class:`~livemig.inspect.report.PageSet` per block).
What the loader refuses but a QEMU stream may hold (XBZRLE, the compressed pages of QEMU
before 9.1) comes through the decoder's ``on_encoded`` hook and is counted too. The page
size and the block list are the stream's own: the configuration's target page size, and
the MEM_SIZE list of the set-up section.

On the discard check's second pass (``watch``), it also notes the stream offset and kind
of every record that falls in a flagged page. A run's records start at ``at`` with a
fixed stride, so the offsets of a whole run come from one numpy expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livemig.inspect.report import (
    MAX_VIOLATIONS,
    RamBlockReport,
    SectionReport,
    Stop,
    StreamReport,
)
from livemig.memory.bitmap import Bitmap
from livemig.migration.mapped_ram.layout import scan_block
from livemig.migration.ram.codec import ZERO_RECORD, BlockEntry, RecordDecoder, read_block_list
from livemig.migration.stream.format import RAM_FLAG_REMOVED_COMPRESS_PAGE, RamFlag
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

MAX_PAGE_SIZE = 64 << 10
"""The largest target page of any QEMU target: a configuration announcing more is read no
further than its RAM section (a page record would otherwise need a buffer that large)."""

_XBZRLE = int(RamFlag.XBZRLE)


@dataclass(frozen=True)
class Hit:
    """A record in a page the discard check flagged."""

    stream_offset: int
    block: str
    page: int
    kind: str  # ZERO, PAGE, XBZRLE or COMPRESSED


class RamRecords:
    """Counts the RAM section's records per block and per section; touches no memory."""

    def __init__(self, report: StreamReport, watch: dict[str, np.ndarray] | None) -> None:
        self.report = report
        self.watch = watch or {}
        self.hits: list[Hit] = []
        self.hit_total = 0
        # set by the walk from the records before the RAM section
        self.postcopy_advised = False
        self.ignore_shared = False
        self.mapped_ram = False  # each block entry has a mapped-ram header; no page records
        self._present: dict[str, Bitmap] = {}  # mapped-ram: the pages in the file, per block
        self.decoder: RecordDecoder | None = None  # made at the set-up, with the page size
        self._page_stride = 0

    # -- the set-up section: block list, then records up to EOS -----------------------------
    def setup(self, r: QEMUFileReader, sec: SectionReport) -> None:
        rep = self.report
        ps = rep.page_size
        if ps > MAX_PAGE_SIZE:
            raise Stop(sec.offset, f"target pages of 0x{ps:x} bytes: larger than any QEMU target's")
        bits = ps.bit_length() - 1
        total, entries, _ = read_block_list(
            r, page_bits=bits, postcopy=self.postcopy_advised, ignore_shared=self.ignore_shared,
            after_entry=self._mapped_ram_entry if self.mapped_ram else None,
        )
        remaining = total
        for e in entries:
            if e.length > remaining:
                raise StreamError(
                    e.length_at,
                    f'RAM block "{e.name}": length 0x{e.length:x} exceeds the 0x{remaining:x} '
                    f"bytes left of the MEM_SIZE total 0x{total:x}",
                )
            remaining -= e.length
            rep.ram_blocks[e.name] = block = RamBlockReport(e.name, e.length, e.page_size, e.addr)
            present = self._present.get(e.name)
            if present is not None:  # mapped-ram: the bitmap says which pages are in the file
                block.normal = present.count()
                block.touched.words = present.words.copy()
        rep.ram_total = total
        self.decoder = RecordDecoder(rep.ram_blocks, page_bits=bits, on_encoded=self.encoded)
        self._page_stride = self.decoder.page_record
        self.load(r, sec)

    def _mapped_ram_entry(self, r: QEMUFileReader, e: BlockEntry) -> None:
        self._present[e.name] = scan_block(r, e.name, e.length)[1]

    # -- every RAM section ------------------------------------------------------------------
    def load(self, r: QEMUFileReader, sec: SectionReport) -> None:
        """Records up to and including EOS.

        The decoder keeps the current block from one section to the next, as QEMU's loader
        does: a QEMU stream may CONTINUE the block of the previous section.
        """
        if self.decoder is None:
            raise StreamError(sec.offset, "RAM section before the RAM set-up section")
        rep = self.report
        z0, n0 = rep.zero_pages, rep.normal_pages
        try:
            self.decoder.read_section(r, self)
        finally:  # a damaged section still shows what it held up to the damage
            sec.zero += rep.zero_pages - z0
            sec.normal += rep.normal_pages - n0
        rep.eos += 1

    # -- RecordConsumer: one call per run, or per record where runs are one record long -------
    def pages(self, block: RamBlockReport, pages: np.ndarray, data: np.ndarray, at: int) -> None:
        if len(pages) == 1:
            block.normal += 1
            block.touched.add_one(int(pages[0]))
        else:
            block.normal += len(pages)
            block.touched.add(pages)
        if self.watch:
            self._watch(block, pages, at, self._page_stride, "PAGE")

    def zeros(self, block: RamBlockReport, pages: np.ndarray, at: int) -> None:
        if len(pages) == 1:
            block.zero += 1
            block.touched.add_one(int(pages[0]))
        else:
            block.zero += len(pages)
            block.touched.add(pages)
        if self.watch:
            self._watch(block, pages, at, ZERO_RECORD, "ZERO")

    def flush(self, at: int) -> None:
        self.report.multifd_flush += 1

    def encoded(self, block: RamBlockReport, page: int, kind: int, at: int) -> None:
        """The decoder's ``on_encoded`` hook: XBZRLE and compressed pages are counted."""
        if kind == _XBZRLE:
            block.xbzrle += 1
            name = "XBZRLE"
        else:
            assert kind == RAM_FLAG_REMOVED_COMPRESS_PAGE
            block.compressed += 1
            name = "COMPRESSED"
        block.touched.add_one(page)
        if self.watch:
            self._watch(block, np.array([page], np.int64), at, 0, name)

    # -- the discard check's second pass: records in flagged pages --------------------------
    def _watch(
        self, block: RamBlockReport, pages: np.ndarray, at: int, stride: int, kind: str
    ) -> None:
        words = self.watch.get(block.name)
        if words is None:
            return
        hit = (words[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)
        idx = np.flatnonzero(hit)
        if not len(idx):
            return
        self.hit_total += len(idx)
        keep = idx[: max(MAX_VIOLATIONS - len(self.hits), 0)]
        offsets = at + keep * stride
        self.hits += [
            Hit(o, block.name, p, kind)
            for o, p in zip(offsets.tolist(), pages[keep].tolist(), strict=True)
        ]
