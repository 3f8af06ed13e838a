"""RAM records of the ``ram`` section (version 4): one encoder, one decoder.

A record is a be64 header — page offset in the block | flags — then, unless CONTINUE is
set, the block's name (u8 length, bytes), then the payload: one fill byte (0) for ZERO, the
page for PAGE. EOS ends a section's RAM part; MEM_SIZE opens the set-up with the block
list; MULTIFD_FLUSH marks the end of a multifd round in the main stream.

Encoding or decoding one record at a time in Python would cost more than the network, so
both sides work on runs: the encoder writes a batch's records into a staging buffer
through strided numpy views (8-byte header + page per PAGE record, 9 bytes per ZERO
record), and the decoder looks at the bytes already buffered: a run of PAGE|CONTINUE
records is a sequence of 4104-byte strides, a run of ZERO|CONTINUE records one of 9-byte
strides, and numpy views validate all headers of a run at once and hand all its pages to
the consumer in one call. The destination's loader and ``livemig inspect`` both read RAM
through :class:`RecordDecoder`; every sender writes through :class:`RecordEncoder`.

Validation (reference 3.8): nothing beyond a block's used length, no unknown block, no
unknown or unsupported flag, a zero fill byte, no truncated record; each problem is a
:class:`~livemig.migration.stream.qemu_file.StreamError` naming it and the offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.pages import PageBatch
from livemig.migration.ram.state import BATCH_PAGES, TARGET_PAGE_BITS, TARGET_PAGE_SIZE, RamStats
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError

PAGE_RECORD = 8 + TARGET_PAGE_SIZE
ZERO_RECORD = 9
FLAG_MASK = TARGET_PAGE_SIZE - 1
# a plain int: ``~`` of an IntFlag complements only within the defined members, so it
# would let undefined bits above MULTIFD_FLUSH (0x400, 0x800) through
KNOWN_FLAGS = int(
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


# -- encoding -------------------------------------------------------------------------------


def write_block_list(w: QEMUFileWriter, blocks: list[RAMBlock]) -> None:
    """The set-up payload: MEM_SIZE with every block's name and used length, then EOS."""
    w.put_be64(sum(b.used_length for b in blocks) | RamFlag.MEM_SIZE)
    for b in blocks:
        w.put_counted_string(b.idstr.encode())
        w.put_be64(b.used_length)
    w.put_be64(RamFlag.EOS)


class RecordEncoder:
    """Writes RAM records; the block is named only when it changes within a section.

    Owns staging buffers, so an encoder belongs to one writer thread. ``slots(n)`` offers
    the PAGE-record payload slots as (n, page) rows for a reader to fill directly (the
    snapshot writer reads the VM straight into them).
    """

    def __init__(self, stats: RamStats, batch_pages: int = BATCH_PAGES):
        self.stats = stats
        self._last: RAMBlock | None = None
        self._alloc(batch_pages)

    def _alloc(self, n: int) -> None:
        buf = np.empty(n * PAGE_RECORD, np.uint8)
        self._page_buf = buf
        self._page_hdr = np.ndarray((n,), ">u8", buf, 0, (PAGE_RECORD,))
        self._page_data = np.ndarray((n, TARGET_PAGE_SIZE), np.uint8, buf, 8, (PAGE_RECORD, 1))
        self._slots_addr = self._page_data.ctypes.data  # asked once: .ctypes costs ~2 us
        zbuf = np.zeros(n * ZERO_RECORD, np.uint8)
        self._zero_buf = zbuf
        self._zero_hdr = np.ndarray((n,), ">u8", zbuf, 0, (ZERO_RECORD,))
        self._capacity = n

    def slots(self, n: int) -> np.ndarray:
        if n > self._capacity:
            self._alloc(n)
        return self._page_data[:n]

    def start_section(self) -> None:
        """Each section names its first block again, so a reader can start at any section."""
        self._last = None

    @staticmethod
    def _headers(idx: np.ndarray, flag: int) -> np.ndarray:
        return (idx.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) | np.uint64(flag | RamFlag.CONTINUE)

    def _name_block(self, w: QEMUFileWriter, block: RAMBlock, page: int, flag: int) -> bool:
        """Write the header of a record that names its block; True if one was needed."""
        if self._last is block:
            return False
        w.put_be64((page << TARGET_PAGE_BITS) | flag)
        w.put_counted_string(block.idstr.encode())
        self._last = block
        return True

    def put_batch(self, w: QEMUFileWriter, batch: PageBatch) -> None:
        """ZERO records for the batch's zero pages, PAGE records for its data pages."""
        st = self.stats
        st.holes_skipped += batch.holes
        st.pages_read += len(batch.read_idx)
        block = batch.b.block
        if len(batch.zero):
            self.put_zero(w, block, batch.zero)
        if len(batch.data):
            self.put_pages(w, block, batch.data, batch.data_rows(out=self.slots(len(batch.data))))

    def put_zero(self, w: QEMUFileWriter, block: RAMBlock, idx: np.ndarray) -> None:
        st = self.stats
        if self._name_block(w, block, int(idx[0]), RamFlag.ZERO):
            w.put_u8(0)
            st.transferred += 10 + len(block.idstr)
            idx = idx[1:]
            st.duplicate += 1
        for s in range(0, len(idx), self._capacity):
            part = idx[s : s + self._capacity]
            k = len(part)
            self._zero_hdr[:k] = self._headers(part, RamFlag.ZERO)
            w.put_bytes(memoryview(self._zero_buf[: k * ZERO_RECORD]))
            st.duplicate += k
            st.transferred += k * ZERO_RECORD

    def put_pages(self, w: QEMUFileWriter, block: RAMBlock, idx: np.ndarray, rows: np.ndarray) -> None:
        """PAGE records; ``rows`` may already be this encoder's slots (no copy then)."""
        st = self.stats
        k = len(idx)
        in_slots = k <= self._capacity and rows.ctypes.data == self._slots_addr
        start = 0
        if self._name_block(w, block, int(idx[0]), RamFlag.PAGE):
            w.write_view(memoryview(np.ascontiguousarray(rows[0])))
            st.transferred += 9 + len(block.idstr) + TARGET_PAGE_SIZE
            st.normal += 1
            start = 1
        for s in range(start, k, self._capacity):
            e = min(s + self._capacity, k)
            if in_slots:
                lo = s  # rows are in their slots already: write them where they are
            else:
                lo = 0
                self._page_data[: e - s] = rows[s:e]
            self._page_hdr[lo : lo + e - s] = self._headers(idx[s:e], RamFlag.PAGE)
            w.write_view(memoryview(self._page_buf[lo * PAGE_RECORD : (lo + e - s) * PAGE_RECORD]))
            st.normal += e - s
            st.transferred += (e - s) * PAGE_RECORD

    def put_eos(self, w: QEMUFileWriter) -> None:
        w.put_be64(RamFlag.EOS)
        self.stats.transferred += 8


# -- decoding -------------------------------------------------------------------------------


class BlockLike(Protocol):
    """What the decoder needs of a block: its name and used length."""

    idstr: str
    used_length: int


class RecordConsumer(Protocol):
    """Where decoded records go (the loader applies them; ``inspect`` counts them).

    ``data`` is a view into the reader's buffer, valid only during the call. ``at`` is the
    stream offset of the run's first record.
    """

    def pages(self, block: Any, pages: np.ndarray, data: np.ndarray, at: int) -> None: ...
    def zeros(self, block: Any, pages: np.ndarray, at: int) -> None: ...
    def flush(self, at: int) -> None: ...


def read_block_list(r: QEMUFileReader) -> tuple[int, list[tuple[int, str, int]], int]:
    """The MEM_SIZE set-up record and its block list (EOS not read yet).

    Returns ``(total, [(offset, name, length)], offset after the list)``: entries are read
    until their lengths reach ``total``; whether they match a VM is the caller's check.
    """
    at = r.tell()
    hdr = r.get_be64()
    flags = hdr & FLAG_MASK
    if flags != RamFlag.MEM_SIZE:
        raise StreamError(at, f"RAM setup: expected MEM_SIZE record, got flags 0x{flags:x}")
    total = hdr & ~FLAG_MASK
    entries: list[tuple[int, str, int]] = []
    remaining = total
    while remaining > 0:
        at = r.tell()
        name = r.get_counted_string().decode(errors="replace")
        length = r.get_be64()
        if length == 0:
            raise StreamError(at, f"RAM block \"{name}\" listed with length 0")
        entries.append((at, name, length))
        remaining -= length
    return total, entries, r.tell()


def expect_eos(r: QEMUFileReader) -> None:
    at = r.tell()
    v = r.get_be64()
    if v & FLAG_MASK != RamFlag.EOS or v & ~FLAG_MASK:
        raise StreamError(at, f"RAM section: expected EOS, got 0x{v:016x}")


class RecordDecoder:
    """Reads the records of RAM sections and hands them, in runs, to a consumer."""

    def __init__(self, blocks: Mapping[str, Any]):
        self.blocks = blocks  # name -> block (anything with idstr and used_length)
        self._block: Any = None

    def start_section(self) -> None:
        self._block = None

    def read_section(self, r: QEMUFileReader, out: RecordConsumer) -> None:
        """Records up to and including EOS."""
        while True:
            buf = r.fill(8)
            if len(buf) < 8:
                raise StreamError(r.tell(), "truncated stream: RAM record header cut short")
            hdr = int.from_bytes(buf[:8], "big")
            flags = hdr & FLAG_MASK
            if flags == _PAGE_C and self._block is not None:
                self._page_run(r, out)
                continue
            if flags == _ZERO_C and self._block is not None:
                self._zero_run(r, out)
                continue
            at = r.tell()
            r.consume(8)
            addr = hdr & ~FLAG_MASK
            if flags & ~KNOWN_FLAGS:
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
                out.flush(at)
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
            check_offset(at, block, addr)
            page = np.array([addr >> TARGET_PAGE_BITS], np.int64)
            if kind == RamFlag.ZERO:
                fill_at = r.tell()
                fill = r.get_u8()
                if fill != 0:
                    raise StreamError(fill_at, f"ZERO record with fill byte 0x{fill:02x} (must be 0)")
                out.zeros(block, page, at)
            else:
                data = r.fill(TARGET_PAGE_SIZE)
                if len(data) < TARGET_PAGE_SIZE:  # never hand out part of a page
                    raise StreamError(
                        r.tell(), f"truncated stream: RAM page of {TARGET_PAGE_SIZE} bytes, got {len(data)}"
                    )
                rows = np.frombuffer(data, np.uint8, TARGET_PAGE_SIZE).reshape(1, -1)
                out.pages(block, page, rows, at)
                r.consume(TARGET_PAGE_SIZE)

    def _run(self, r: QEMUFileReader, stride: int, flags: int) -> tuple[memoryview, np.ndarray, int]:
        buf = r.fill(stride)
        n = len(buf) // stride
        if n == 0:
            raise StreamError(r.tell(), f"truncated stream: RAM record of {stride} bytes cut short")
        hdrs = np.ndarray((n,), ">u8", buf, 0, (stride,))
        bad = (hdrs & np.uint64(FLAG_MASK)) != np.uint64(flags)
        if bad.any():
            n = int(np.argmax(bad))
            hdrs = hdrs[:n]
        pages = (hdrs >> np.uint64(TARGET_PAGE_BITS)).astype(np.int64)
        limit = self._block.used_length >> TARGET_PAGE_BITS
        over = pages >= limit
        if over.any():
            i = int(np.argmax(over))
            check_offset(r.tell() + i * stride, self._block, int(pages[i]) << TARGET_PAGE_BITS)
        return buf, pages, n

    def _page_run(self, r: QEMUFileReader, out: RecordConsumer) -> None:
        at = r.tell()
        buf, pages, n = self._run(r, PAGE_RECORD, _PAGE_C)
        data = np.ndarray((n, TARGET_PAGE_SIZE), np.uint8, buf, 8, (PAGE_RECORD, 1))
        out.pages(self._block, pages, data, at)
        r.consume(n * PAGE_RECORD)

    def _zero_run(self, r: QEMUFileReader, out: RecordConsumer) -> None:
        at = r.tell()
        buf, pages, n = self._run(r, ZERO_RECORD, _ZERO_C)
        fills = np.ndarray((n,), np.uint8, buf, 8, (ZERO_RECORD,))
        if fills.any():
            i = int(np.argmax(fills != 0))
            raise StreamError(
                r.tell() + i * ZERO_RECORD + 8,
                f"ZERO record with fill byte 0x{int(fills[i]):02x} (must be 0)",
            )
        out.zeros(self._block, pages, at)
        r.consume(n * ZERO_RECORD)


def check_offset(at: int, block: Any, addr: int) -> None:
    if addr >= block.used_length:
        raise StreamError(
            at,
            f"RAM record offset 0x{addr:x} beyond used length 0x{block.used_length:x} "
            f"of block \"{block.idstr}\"",
        )
