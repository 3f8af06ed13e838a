"""The destination side of the RAM section, with every field validated.

Page records arrive in QEMU's format (one be64 header per page, the block named only when
it changes). Decoding one record at a time in Python would cost more than the network, so
the loader looks at the bytes already buffered: a run of PAGE|CONTINUE records is a
sequence of 4104-byte strides, a run of ZERO|CONTINUE records one of 9-byte strides, and
numpy views over the buffer validate all headers of a run and scatter all its pages into
guest RAM at once.

Rules the destination keeps (reference 3.8):

* a ZERO record never populates memory that is already zero: pages in holes are left
  alone, and allocated pages are only written if they are not zero already;
* nothing is written outside a block's used length; unknown blocks, unknown or
  unsupported flags, bad fill bytes and truncated records stop the load with a message
  naming the problem and the stream offset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.prefault import Prefaulter
from livemig.migration.ram.save import PAGE_RECORD, TARGET_PAGE_BITS, TARGET_PAGE_SIZE, ZERO_RECORD
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

_FLAG_MASK = TARGET_PAGE_SIZE - 1
# a plain int: ``~`` of an IntFlag complements only within the defined members, so it
# would let undefined bits above MULTIFD_FLUSH (0x400, 0x800) through
_KNOWN = int(
    RamFlag.ZERO
    | RamFlag.MEM_SIZE
    | RamFlag.PAGE
    | RamFlag.EOS
    | RamFlag.CONTINUE
    | RamFlag.XBZRLE
    | RamFlag.HOOK
    | RamFlag.MULTIFD_FLUSH
)
_PAGE_C = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_C = int(RamFlag.ZERO | RamFlag.CONTINUE)


class RamLoader:
    def __init__(self, blocks: list[RAMBlock]):
        self.blocks = {b.idstr: b for b in blocks}
        self.received = {b.idstr: Bitmap(b.max_length >> TARGET_PAGE_BITS) for b in blocks}
        # pages that may hold data here: what the block held when loading began, plus every
        # PAGE record since. A ZERO record needs a write only there (no syscall per record).
        self.maybe_data = {b.idstr: _initial_data_map(b) for b in blocks}
        self._pages = {b.idstr: b.pages_array(0, b.max_length) for b in blocks}
        self._block: RAMBlock | None = None
        self.prefault: Prefaulter | None = None
        self.multifd: Any = None  # multifd.MultifdReceiver: pages also arrive on its channels
        # postcopy.PostcopyIncoming after POSTCOPY_LISTEN: pages are placed with UFFDIO_COPY
        # (never written into registered memory), ZERO records only remembered
        self.placer: Any = None
        self.pages_loaded = 0
        self.zero_records = 0
        self.zero_pages_written = 0
        self.bytes_loaded = 0

    # -- setup --------------------------------------------------------------------------------
    def load_setup(self, r: QEMUFileReader) -> None:
        """MEM_SIZE block list: every block must exist here with the same length."""
        at = r.tell()
        hdr = r.get_be64()
        flags = hdr & _FLAG_MASK
        if flags != RamFlag.MEM_SIZE:
            raise StreamError(at, f"RAM setup: expected MEM_SIZE record, got flags 0x{flags:x}")
        total = hdr & ~_FLAG_MASK
        ours = sum(b.used_length for b in self.blocks.values())
        seen: set[str] = set()
        remaining = total
        while remaining > 0:
            at = r.tell()
            name = r.get_counted_string().decode(errors="replace")
            length = r.get_be64()
            block = self.blocks.get(name)
            if block is None:
                raise StreamError(at, f"Unknown ramblock \"{name}\", cannot accept migration")
            if name in seen:
                raise StreamError(at, f"RAM block \"{name}\" listed twice")
            if length != block.used_length:
                raise StreamError(
                    at,
                    f"Length mismatch: {name}: 0x{length:x} in != 0x{block.used_length:x}",
                )
            seen.add(name)
            remaining -= length
        if remaining != 0 or total != ours:
            raise StreamError(
                r.tell(), f"RAM size mismatch: stream has 0x{total:x} bytes, this VM 0x{ours:x}"
            )
        self._expect_eos(r)
        self._block = None

    def _expect_eos(self, r: QEMUFileReader) -> None:
        at = r.tell()
        v = r.get_be64()
        if v & _FLAG_MASK != RamFlag.EOS or v & ~_FLAG_MASK:
            raise StreamError(at, f"RAM section: expected EOS, got 0x{v:016x}")

    # -- iterations -----------------------------------------------------------------------------
    def start_section(self) -> None:
        self._block = None
        if self.multifd is not None:
            self.multifd.section_started()

    def load(self, r: QEMUFileReader) -> None:
        """Load page records up to and including EOS."""
        while True:
            buf = r.fill(8)
            if len(buf) < 8:
                raise StreamError(r.tell(), "truncated stream: RAM record header cut short")
            hdr = int.from_bytes(buf[:8], "big")
            flags = hdr & _FLAG_MASK
            if flags == _PAGE_C and self._block is not None:
                self._load_page_run(r)
                continue
            if flags == _ZERO_C and self._block is not None:
                self._load_zero_run(r)
                continue
            at = r.tell()
            r.consume(8)
            addr = hdr & ~_FLAG_MASK
            if flags & ~_KNOWN:
                raise StreamError(at, f"unknown RAM record flags 0x{flags:x}")
            if flags & RamFlag.EOS:
                if flags != RamFlag.EOS or addr:
                    raise StreamError(at, f"malformed RAM EOS record 0x{hdr:016x}")
                return
            if flags & (RamFlag.XBZRLE | RamFlag.HOOK):
                raise StreamError(at, f"unsupported RAM record flags 0x{flags:x} (XBZRLE/RDMA)")
            if flags & RamFlag.MULTIFD_FLUSH:
                if flags != RamFlag.MULTIFD_FLUSH:
                    raise StreamError(at, f"malformed MULTIFD_FLUSH record 0x{hdr:016x}")
                if self.multifd is not None:  # wait until every channel's round is in
                    self.multifd.flush(at)
                continue
            if flags & RamFlag.MEM_SIZE:
                raise StreamError(at, "MEM_SIZE record outside the RAM setup section")
            kind = flags & ~int(RamFlag.CONTINUE)
            if kind not in (RamFlag.ZERO, RamFlag.PAGE):
                raise StreamError(at, f"RAM record with no type (flags 0x{flags:x})")
            if flags & RamFlag.CONTINUE:
                if self._block is None:
                    raise StreamError(at, "RAM record CONTINUE without a previous block")
                block = self._block
            else:
                name = r.get_counted_string().decode(errors="replace")
                block = self.blocks.get(name)
                if block is None:
                    raise StreamError(at, f"Unknown ramblock \"{name}\"")
                self._block = block
            self._check_offset(at, block, addr)
            page = addr >> TARGET_PAGE_BITS
            if kind == RamFlag.ZERO:
                fill_at = r.tell()
                fill = r.get_u8()
                if fill != 0:
                    raise StreamError(fill_at, f"ZERO record with fill byte 0x{fill:02x} (must be 0)")
                self._zero_pages(block, np.array([page], np.int64))
            else:
                got = len(r.fill(TARGET_PAGE_SIZE))
                if got < TARGET_PAGE_SIZE:  # never write part of a page
                    raise StreamError(
                        r.tell(), f"truncated stream: RAM page of {TARGET_PAGE_SIZE} bytes, got {got}"
                    )
                if self.placer is not None:
                    data = np.frombuffer(r.read_exact(TARGET_PAGE_SIZE), np.uint8).reshape(1, -1)
                    self.placer.place_pages(block, np.array([page], np.int64), data)
                else:
                    r.readinto_exact(memoryview(self._pages[block.idstr][page]))
                self.received[block.idstr].set_range(page, 1)
                self.maybe_data[block.idstr].set_range(page, 1)
                self.pages_loaded += 1
                self.bytes_loaded += TARGET_PAGE_SIZE

    @staticmethod
    def _check_offset(at: int, block: RAMBlock, addr: int) -> None:
        if addr >= block.used_length:
            raise StreamError(
                at,
                f"RAM record offset 0x{addr:x} beyond used length 0x{block.used_length:x} "
                f"of block \"{block.idstr}\"",
            )

    def _run(self, r: QEMUFileReader, stride: int, flags: int) -> tuple[memoryview, np.ndarray, int]:
        buf = r.fill(stride)
        n = len(buf) // stride
        if n == 0:
            raise StreamError(r.tell(), f"truncated stream: RAM record of {stride} bytes cut short")
        hdrs = np.ndarray((n,), ">u8", buf, 0, (stride,))
        bad = (hdrs & np.uint64(_FLAG_MASK)) != np.uint64(flags)
        if bad.any():
            n = int(np.argmax(bad))
            hdrs = hdrs[:n]
        pages = (hdrs >> np.uint64(TARGET_PAGE_BITS)).astype(np.int64)
        assert self._block is not None
        limit = self._block.used_length >> TARGET_PAGE_BITS
        over = pages >= limit
        if over.any():
            i = int(np.argmax(over))
            self._check_offset(r.tell() + i * stride, self._block, int(pages[i]) << TARGET_PAGE_BITS)
        return buf, pages, n

    def _load_page_run(self, r: QEMUFileReader) -> None:
        buf, pages, n = self._run(r, PAGE_RECORD, _PAGE_C)
        assert self._block is not None
        data = np.ndarray((n, TARGET_PAGE_SIZE), np.uint8, buf, 8, (PAGE_RECORD, 1))
        if self.prefault is not None:  # let other cores populate what comes next
            self.prefault.data_arrived(
                self._block.idstr, int(pages[0]) << TARGET_PAGE_BITS, (int(pages[-1]) + 1) << TARGET_PAGE_BITS
            )
        if self.placer is not None:
            self.placer.place_pages(self._block, pages, data)
        else:
            self._pages[self._block.idstr][pages] = data
        _set_bits(self.received[self._block.idstr], pages)
        _set_bits(self.maybe_data[self._block.idstr], pages)
        self.pages_loaded += n
        self.bytes_loaded += n * TARGET_PAGE_SIZE
        r.consume(n * PAGE_RECORD)

    def _load_zero_run(self, r: QEMUFileReader) -> None:
        buf, pages, n = self._run(r, ZERO_RECORD, _ZERO_C)
        fills = np.ndarray((n,), np.uint8, buf, 8, (ZERO_RECORD,))
        if fills.any():
            i = int(np.argmax(fills != 0))
            raise StreamError(
                r.tell() + i * ZERO_RECORD + 8,
                f"ZERO record with fill byte 0x{int(fills[i]):02x} (must be 0)",
            )
        assert self._block is not None
        self._zero_pages(self._block, pages)
        r.consume(n * ZERO_RECORD)

    def _zero_pages(self, block: RAMBlock, pages: np.ndarray) -> None:
        """Make pages zero without populating memory that is zero already."""
        self.zero_records += len(pages)
        _set_bits(self.received[block.idstr], pages)
        if self.placer is not None:
            self.placer.zero_pages(block, pages)
            return
        words = self.maybe_data[block.idstr].words
        pages = pages[((words[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)) != 0]
        if len(pages) == 0:
            return
        view = self._pages[block.idstr]
        rows = view[pages]
        nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
        if nz.any():
            view[pages[nz]] = 0
            self.zero_pages_written += int(np.count_nonzero(nz))


def _set_bits(bm: Bitmap, pages: np.ndarray) -> None:
    np.bitwise_or.at(bm.words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64)))


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

