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
the consumer in one call. A run of one record (QEMU sends memory page by page, so where
zero and data pages alternate every run is one record long) is checked without numpy. The
destination's loader and ``livemig inspect`` both read RAM through :class:`RecordDecoder`
(the inspector with the stream's own page size and block list, and a hook for the
XBZRLE and compressed records the loader refuses); every sender writes through
:class:`RecordEncoder`.

Validation (reference 3.8): nothing beyond a block's used length, no unknown block, no
unknown or unsupported flag, a zero fill byte, no truncated record; each problem is a
:class:`~livemig.migration.stream.qemu_file.StreamError` naming it and the offset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.pages import PageBatch
from livemig.migration.ram.state import BATCH_PAGES, TARGET_PAGE_BITS, TARGET_PAGE_SIZE, RamStats
from livemig.migration.stream.format import (
    ENCODING_FLAG_XBZRLE,
    RAM_FLAG_REMOVED_COMPRESS_PAGE,
    RAM_MIN_PAGE_BITS,
    RamFlag,
)
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
_KINDS = int(RamFlag.ZERO | RamFlag.PAGE)
_ENCODED_KINDS = int(RamFlag.XBZRLE) | RAM_FLAG_REMOVED_COMPRESS_PAGE
MAX_PAGE_BITS = 31
"""The largest target page a configuration record may announce (2 GiB)."""


# -- encoding -------------------------------------------------------------------------------


def write_block_list(
    w: QEMUFileWriter,
    blocks: list[RAMBlock],
    after_block: Callable[[QEMUFileWriter, RAMBlock], None] | None = None,
) -> None:
    """The set-up payload: MEM_SIZE with every block's name and used length, then EOS.

    ``after_block(w, block)`` writes what a capability adds to each entry (mapped-ram's
    header and the block's place in the file).
    """
    w.put_be64(sum(b.used_length for b in blocks) | RamFlag.MEM_SIZE)
    for b in blocks:
        w.put_counted_string(b.idstr.encode())
        w.put_be64(b.used_length)
        if after_block is not None:
            after_block(w, b)
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
    stream offset of the run's first record; the others follow at a fixed stride
    (:attr:`RecordDecoder.page_record` for PAGE records, :data:`ZERO_RECORD` for ZERO
    records). A call for a record that names its block has that one record only.
    """

    def pages(self, block: Any, pages: np.ndarray, data: np.ndarray, at: int) -> None: ...
    def zeros(self, block: Any, pages: np.ndarray, at: int) -> None: ...
    def flush(self, at: int) -> None: ...


EncodedHook = Callable[[Any, int, int, int], None]
"""``on_encoded(block, page, kind, at)``: an XBZRLE or compressed-page record, its payload
checked for size and skipped; ``kind`` is ``RamFlag.XBZRLE`` or
:data:`~livemig.migration.stream.format.RAM_FLAG_REMOVED_COMPRESS_PAGE`."""


class BlockEntry(NamedTuple):
    """One block of the MEM_SIZE list, with the offsets a message about it should name."""

    at: int  # the entry (its name's length byte)
    name: str
    length: int
    length_at: int
    page_size: int | None = None  # postcopy: the block's page size, when the source sent it
    addr: int | None = None  # x-ignore-shared: the block's guest address


def read_block_list(
    r: QEMUFileReader,
    *,
    page_bits: int = TARGET_PAGE_BITS,
    postcopy: bool = False,
    ignore_shared: bool = False,
    after_entry: Callable[[QEMUFileReader, BlockEntry], None] | None = None,
) -> tuple[int, list[BlockEntry], int]:
    """The MEM_SIZE set-up record and its block list (EOS not read yet).

    Returns ``(total, entries, offset after the list)``: entries are read until their
    lengths reach ``total``; whether they add up to it, or match a VM, is the caller's
    check (the loader names the block that differs from its own). Each entry has a
    non-empty UTF-8 name, seen once, and a length that is a positive multiple of the page.

    Two optional fields follow an entry's length, as the source's capabilities say:
    ``ignore_shared`` (x-ignore-shared) the block's address, always; ``postcopy`` (the
    stream advised postcopy) the block's page size, which QEMU sends only when it is not
    the host page size. An offline reader cannot know that size, so a be64 there is taken
    as the page size when it is a power of two from the target page to 1 TiB: the next
    entry would start with its name's length byte (a be64 of at least 2^56), EOS or
    MULTIFD_FLUSH with a value below the page size.

    ``after_entry(r, entry)`` reads what a capability adds after those fields (mapped-ram:
    the block's header, then the stream continues after the block's pages in the file).
    """
    mask = (1 << page_bits) - 1
    at = r.tell()
    hdr = r.get_be64()
    flags = hdr & mask
    if flags != RamFlag.MEM_SIZE:
        raise StreamError(at, f"RAM setup: expected MEM_SIZE record, got flags 0x{flags:x}")
    total = hdr & ~mask
    entries: list[BlockEntry] = []
    seen: set[str] = set()
    remaining = total
    while remaining > 0:
        at = r.tell()
        raw = r.get_counted_string()
        if not raw:
            raise StreamError(at, "RAM block list: empty block name")
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise StreamError(at, f"RAM block list: name {raw!r} is not UTF-8") from None
        if name in seen:
            raise StreamError(at, f'RAM block "{name}" listed twice')
        seen.add(name)
        length_at = r.tell()
        length = r.get_be64()
        if length == 0 or length & mask:
            raise StreamError(
                length_at,
                f'RAM block "{name}": length 0x{length:x} is not a positive multiple of the '
                f"page size 0x{mask + 1:x}",
            )
        page_size = None
        if postcopy:
            head = r.peek(8)
            v = int.from_bytes(head, "big") if len(head) == 8 else 0
            if mask < v <= 1 << 40 and v & (v - 1) == 0:
                r.consume(8)
                page_size = v
        addr = r.get_be64() if ignore_shared else None
        entries.append(BlockEntry(at, name, length, length_at, page_size, addr))
        if after_entry is not None:
            after_entry(r, entries[-1])
        remaining -= length
    return total, entries, r.tell()


def expect_eos(r: QEMUFileReader) -> None:
    at = r.tell()
    v = r.get_be64()
    if v & FLAG_MASK != RamFlag.EOS or v & ~FLAG_MASK:
        raise StreamError(at, f"RAM section: expected EOS, got 0x{v:016x}")


class RecordDecoder:
    """Reads the records of RAM sections and hands them, in runs, to a consumer.

    ``blocks`` maps a name to its block (anything with ``idstr`` and ``used_length``); it
    is looked up whenever a record names its block, so a reader that learns the blocks
    from the stream's own MEM_SIZE list can fill it after construction.

    ``page_bits``: the target page size of the stream (QEMU sends it in the configuration
    when it is not the architecture's minimum; livemig's is 4 KiB).

    ``on_encoded``: XBZRLE records and the compressed pages QEMU wrote before 9.1 have no
    place in guest RAM here, so the loader (no hook) refuses them; ``inspect`` passes a
    hook, and they are then decoded as far as their framing goes and reported to it.
    """

    def __init__(
        self,
        blocks: Mapping[str, Any],
        *,
        page_bits: int = TARGET_PAGE_BITS,
        on_encoded: EncodedHook | None = None,
    ):
        if not RAM_MIN_PAGE_BITS <= page_bits <= MAX_PAGE_BITS:
            raise ValueError(f"page_bits {page_bits} outside {RAM_MIN_PAGE_BITS}..{MAX_PAGE_BITS}")
        self.blocks = blocks
        self.page_bits = page_bits
        self.page_size = 1 << page_bits
        self.page_record = 8 + self.page_size
        self.on_encoded = on_encoded
        self._mask = self.page_size - 1
        # run checks read only the header's low bytes, where the flags are
        self._low_dtype = np.dtype(">u2" if self._mask <= 0xFFFF else ">u4")
        self._known = KNOWN_FLAGS | (RAM_FLAG_REMOVED_COMPRESS_PAGE if on_encoded else 0)
        self._kinds = _KINDS | (_ENCODED_KINDS if on_encoded else 0)
        self._block: Any = None

    def start_section(self) -> None:
        """Forget the current block: the next record must name its own (livemig's rule;
        QEMU's loader keeps the block across sections, and so does ``inspect``)."""
        self._block = None

    def read_section(self, r: QEMUFileReader, out: RecordConsumer) -> None:
        """Records up to and including EOS."""
        mask, page_record = self._mask, self.page_record
        while True:
            buf = r.fill(8)
            have = len(buf)
            if have < 8:
                raise StreamError(
                    r.tell(),
                    f"truncated stream: RAM record header cut short ({have} of 8 bytes)",
                )
            hdr = int.from_bytes(buf[:8], "big")
            flags = hdr & mask
            if (flags == _PAGE_C or flags == _ZERO_C) and self._block is not None:
                stride = page_record if flags == _PAGE_C else ZERO_RECORD
                if stride <= have and (
                    have < 2 * stride
                    or int.from_bytes(buf[stride : stride + 8], "big") & mask != flags
                ):
                    self._one(r, out, buf, hdr, stride)  # a run of one record
                else:
                    self._run(r, out, flags, stride)
            elif self._record(r, out, hdr, flags):
                return

    # -- one record at a time: everything but runs of CONTINUE records ---------------------
    def _record(self, r: QEMUFileReader, out: RecordConsumer, hdr: int, flags: int) -> bool:
        """One record that is not part of a run; True if it was EOS."""
        at = r.tell()
        r.consume(8)
        addr = hdr & ~self._mask
        if flags & ~self._known:
            raise StreamError(at, f"unknown RAM record flags 0x{flags:x}")
        if flags & RamFlag.EOS:
            if flags != RamFlag.EOS or addr:
                raise StreamError(at, f"malformed RAM EOS record 0x{hdr:016x}")
            return True
        if flags & RamFlag.HOOK or (flags & RamFlag.XBZRLE and self.on_encoded is None):
            what = "RDMA HOOK" if flags & RamFlag.HOOK else "XBZRLE"
            raise StreamError(at, f"unsupported RAM record flags 0x{flags:x} ({what})")
        if flags & RamFlag.MULTIFD_FLUSH:
            if flags != RamFlag.MULTIFD_FLUSH or addr:
                raise StreamError(at, f"malformed MULTIFD_FLUSH record 0x{hdr:016x}")
            out.flush(at)
            return False
        if flags & RamFlag.MEM_SIZE:
            raise StreamError(at, "MEM_SIZE record outside the RAM setup section")
        kind = flags & self._kinds  # what is left besides CONTINUE
        if kind == 0:
            raise StreamError(at, f"RAM record with no type (flags 0x{flags:x})")
        if kind & (kind - 1):
            raise StreamError(at, f"RAM record with several types (flags 0x{flags:x})")
        if flags & RamFlag.CONTINUE:
            if self._block is None:
                raise StreamError(at, "RAM record CONTINUE without a previous block")
            block = self._block
        else:
            name = r.get_counted_string().decode(errors="replace")
            block = self.blocks.get(name)
            if block is None:
                raise StreamError(at, f'Unknown ramblock "{name}"')
            self._block = block
        check_offset(at, block, addr)
        page = addr >> self.page_bits
        if kind == RamFlag.ZERO:
            fill_at = r.tell()
            fill = r.get_u8()
            if fill != 0:
                raise StreamError(fill_at, f"ZERO record with fill byte 0x{fill:02x} (must be 0)")
            out.zeros(block, np.array([page], np.int64), at)
        elif kind == RamFlag.PAGE:
            ps = self.page_size
            data = r.fill(ps)
            if len(data) < ps:  # never hand out part of a page
                raise StreamError(
                    r.tell(), f"truncated stream: RAM page of {ps} bytes, got {len(data)}"
                )
            rows = np.frombuffer(data, np.uint8, ps).reshape(1, -1)
            out.pages(block, np.array([page], np.int64), rows, at)
            r.consume(ps)
        else:
            assert self.on_encoded is not None  # kinds include these only with a hook
            self._skip_encoded(r, kind)
            self.on_encoded(block, page, kind, at)
        return False

    def _skip_encoded(self, r: QEMUFileReader, kind: int) -> None:
        """An XBZRLE (u8 encoding, be16 length) or compressed (be32 length) payload."""
        ps = self.page_size
        if kind == RamFlag.XBZRLE:
            enc_at = r.tell()
            enc = r.get_u8()
            if enc != ENCODING_FLAG_XBZRLE:
                raise StreamError(enc_at, f"XBZRLE record with encoding byte 0x{enc:02x}")
            len_at = r.tell()
            n = r.get_be16()
            if n > ps:
                raise StreamError(len_at, f"XBZRLE record of {n} bytes exceeds a page")
        else:
            len_at = r.tell()
            n = r.get_be32()
            bound = ps + (ps >> 12) + (ps >> 14) + 13  # zlib's compressBound
            if n > bound:
                raise StreamError(len_at, f"compressed page of {n} bytes exceeds {bound}")
        r.skip(n)

    # -- runs of PAGE|CONTINUE or ZERO|CONTINUE records -----------------------------------
    def _run(self, r: QEMUFileReader, out: RecordConsumer, flags: int, stride: int) -> None:
        """The run of records with ``flags`` at the front of the buffer, in one call: its
        headers checked with strided views (:meth:`_run_length`)."""
        buf = r.fill(stride)
        avail = len(buf) // stride
        if avail == 0:
            raise StreamError(
                r.tell(),
                f"truncated stream: RAM record of {stride} bytes cut short ({len(buf)} left)",
            )
        at = r.tell()
        block = self._block
        bits = self.page_bits
        n = self._run_length(buf, stride, flags, avail) if avail > 1 else 1
        pages = np.ndarray((n,), ">u8", buf, 0, (stride,)).astype(np.uint64)
        pages >>= np.uint64(bits)  # in place: one array per run, below 2**54 now
        pages = pages.view(np.int64)
        over = pages >= block.used_length >> bits
        if over.any():
            i = int(np.argmax(over))
            check_offset(at + i * stride, block, int(pages[i]) << bits)
        if flags == _PAGE_C:
            data = np.ndarray((n, self.page_size), np.uint8, buf, 8, (stride, 1))
            out.pages(block, pages, data, at)
        else:
            fills = np.ndarray((n,), np.uint8, buf, 8, (ZERO_RECORD,))
            if fills.any():
                i = int(np.argmax(fills != 0))
                raise StreamError(
                    at + i * ZERO_RECORD + 8,
                    f"ZERO record with fill byte 0x{int(fills[i]):02x} (must be 0)",
                )
            out.zeros(block, pages, at)
        r.consume(n * stride)

    def _one(
        self, r: QEMUFileReader, out: RecordConsumer, buf: memoryview, hdr: int, stride: int
    ) -> None:
        """A PAGE|CONTINUE or ZERO|CONTINUE record that is a run of its own, already in the
        buffer: plain integer checks, every numpy call saved that can be (QEMU streams of
        memory where zero and data pages alternate are made of these)."""
        block = self._block
        at = r.tell()
        addr = hdr & ~self._mask
        if addr >= block.used_length:
            check_offset(at, block, addr)
        pages = np.array([addr >> self.page_bits], np.int64)
        if stride != ZERO_RECORD:
            out.pages(block, pages, np.ndarray((1, self.page_size), np.uint8, buf, 8), at)
        elif buf[8]:
            raise StreamError(at + 8, f"ZERO record with fill byte 0x{buf[8]:02x} (must be 0)")
        else:
            out.zeros(block, pages, at)
        r.consume(stride)

    def _run_length(self, buf: memoryview, stride: int, flags: int, avail: int) -> int:
        """How many of the ``avail`` buffered records carry ``flags`` (the first one does).

        Single headers at 64, 512, 4096... records out are read first, until one does not
        carry the flags or the buffer ends; then one numpy pass over the headers up to
        there finds where the run ends. A long run (the common case of a livemig stream)
        costs one pass over the buffer, and a short one a pass over a few dozen headers,
        not over a buffer that may hold half a million ZERO records.
        """
        mask = self._mask
        k = 64
        while k < avail and int.from_bytes(buf[k * stride : k * stride + 8], "big") & mask == flags:
            k *= 8
        k = min(k, avail)
        low = np.ndarray((k,), self._low_dtype, buf, 8 - self._low_dtype.itemsize, (stride,))
        bad = (low & self._low_dtype.type(mask)) != flags
        return int(np.argmax(bad)) if bad.any() else k


def check_offset(at: int, block: Any, addr: int) -> None:
    if addr >= block.used_length:
        raise StreamError(
            at,
            f"RAM record offset 0x{addr:x} beyond used length 0x{block.used_length:x} "
            f"of block \"{block.idstr}\"",
        )
