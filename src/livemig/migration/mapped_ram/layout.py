"""mapped-ram's file layout (QEMU 9, docs/devel/migration/mapped-ram.rst): where each RAM
block's pages live in the file, and the bitmap of the pages that are there.

The RAM set-up's block list gives each entry (name, used length) a 28-byte header, all
big-endian::

    be32 version (1)  be64 page_size  be64 bitmap_offset  be64 pages_offset

``bitmap_offset`` is right after the header; ``pages_offset`` is the next 1 MiB boundary
after the bitmap (``MAPPED_RAM_FILE_OFFSET_ALIGNMENT``), so page data is aligned for
O_DIRECT. Page *i* of the block is at ``pages_offset + i * page_size``; the bitmap has one
bit per page (bit *i* is bit ``i % 64`` of little-endian 64-bit word ``i // 64``: QEMU
writes its ``unsigned long`` array), set where the page's data is in the file. The stream
then continues at ``pages_offset + used_length``: the next entry, or after the last one
the rest of the stream (EOS, the device state, EOF, VMDESCRIPTION). Pages that were zero,
never written or unplugged have a clear bit and nothing in the file: a hole.

Everything a reader takes from the file is checked here, and a damaged file fails with
a :class:`MappedRamError` naming the block and the offset.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap, words_for
from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.codec import write_block_list
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError

HEADER = struct.Struct(">IQQQ")
HEADER_VERSION = 1
FILE_OFFSET_ALIGNMENT = 1 << 20
PAGE_SIZE = 4096
PAGE_SHIFT = 12


class MappedRamError(StreamError):
    """A damaged mapped-ram file: the offset and the problem."""


class MappedRamConfigError(ValueError):
    """A mapped-ram migration that cannot work as asked (URI, direct-io): one line."""


@dataclass(frozen=True)
class BlockFileLayout:
    """Where one RAM block's bitmap and pages are in the file."""

    idstr: str
    length: int  # used length, bytes
    bitmap_offset: int
    pages_offset: int

    @property
    def npages(self) -> int:
        return self.length >> PAGE_SHIFT

    @property
    def bitmap_bytes(self) -> int:
        """QEMU's ``BITS_TO_LONGS(num_pages) * sizeof(unsigned long)``."""
        return words_for(self.npages) * 8

    @property
    def end(self) -> int:
        """Where the stream continues after this block's pages."""
        return self.pages_offset + self.length

    def page_offset(self, page: int) -> int:
        return self.pages_offset + (page << PAGE_SHIFT)

    @classmethod
    def at(cls, header_offset: int, idstr: str, length: int) -> BlockFileLayout:
        """The layout of a block whose header is written at ``header_offset``."""
        bitmap = header_offset + HEADER.size
        pages = -(-(bitmap + words_for(length >> PAGE_SHIFT) * 8) // FILE_OFFSET_ALIGNMENT) * FILE_OFFSET_ALIGNMENT
        return cls(idstr, length, bitmap, pages)


# -- writing ------------------------------------------------------------------------------------


def write_block_header(w: QEMUFileWriter, idstr: str, length: int) -> BlockFileLayout:
    """The header of one block-list entry; the stream goes on after the block's pages.

    ``w`` writes a file from offset 0 (its transport is a seekable file object).
    """
    w.flush()
    lay = BlockFileLayout.at(w.transport.tell(), idstr, length)
    w.put_bytes(HEADER.pack(HEADER_VERSION, PAGE_SIZE, lay.bitmap_offset, lay.pages_offset))
    w.flush()
    w.transport.seek(lay.end)
    return lay


class FileLayouts:
    """Every block's place in the file, as the RAM set-up's block list puts it there.

    :meth:`write_blocks` is an :class:`~livemig.migration.outgoing.OutgoingMigration`'s
    ``write_blocks`` hook for a mapped-ram file: each block-list entry gets its header,
    and the stream goes on after the block's pages. Whoever writes the pages (the
    migration's channels, or a background snapshot's writer process, which gets
    :meth:`describe` in its set-up) writes them at these offsets.
    """

    def __init__(self, blocks: dict[str, BlockFileLayout] | None = None):
        self.blocks: dict[str, BlockFileLayout] = dict(blocks or {})

    def write_blocks(self, w: QEMUFileWriter, blocks: list[RAMBlock]) -> None:
        write_block_list(w, blocks, after_block=self._header)

    def _header(self, w: QEMUFileWriter, block: RAMBlock) -> None:
        self.blocks[block.idstr] = write_block_header(w, block.idstr, block.used_length)

    def describe(self) -> list[dict[str, int | str]]:
        """The layouts as JSON-able values (:meth:`from_description` reads them)."""
        return [dataclasses.asdict(lay) for lay in self.blocks.values()]

    @classmethod
    def from_description(cls, desc: list[dict[str, Any]]) -> FileLayouts:
        return cls({d["idstr"]: BlockFileLayout(**d) for d in desc})


def write_bitmap(fd: int, lay: BlockFileLayout, bitmap: Bitmap) -> None:
    data = memoryview(bitmap.words.astype("<u8", copy=False)).cast("B")
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], lay.bitmap_offset + done)


# -- reading ------------------------------------------------------------------------------------


def read_block_header(r: QEMUFileReader, idstr: str, length: int, file_size: int) -> BlockFileLayout:
    """Read and check the header after a block-list entry (reader at the header)."""
    at = r.tell()
    raw = r.read_exact(HEADER.size)
    version, page_size, bitmap_offset, pages_offset = HEADER.unpack(raw)
    where = f"mapped-ram block {idstr}"
    if version > HEADER_VERSION or version == 0:
        raise MappedRamError(
            at, f"Migration mapped-ram capability version not supported (expected <= {HEADER_VERSION}, got {version})"
        )
    if page_size != PAGE_SIZE:
        raise MappedRamError(at + 4, f"{where}: page size {page_size} in its header, expected {PAGE_SIZE}")
    lay = BlockFileLayout(idstr, length, bitmap_offset, pages_offset)
    if pages_offset % PAGE_SIZE:
        raise MappedRamError(at + 20, f"Error reading ramblock {idstr} pages, region has bad alignment")
    if bitmap_offset < at + HEADER.size or bitmap_offset + lay.bitmap_bytes > pages_offset:
        raise MappedRamError(
            at + 12,
            f"{where}: bitmap at 0x{bitmap_offset:x} (0x{lay.bitmap_bytes:x} bytes) is not between "
            f"its header and its pages at 0x{pages_offset:x}",
        )
    if lay.end > file_size:
        raise MappedRamError(
            at + 20,
            f"{where}: pages [0x{pages_offset:x}, 0x{lay.end:x}) reach beyond the end of the file "
            f"(0x{file_size:x} bytes): the file is truncated",
        )
    return lay


def read_bitmap(fd: int, lay: BlockFileLayout) -> Bitmap:
    """The block's present-pages bitmap, checked (no bit beyond the block's pages)."""
    n = lay.bitmap_bytes
    buf = np.zeros(n // 8, np.uint64)
    mv = memoryview(buf).cast("B")
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], lay.bitmap_offset + got)
        if k == 0:
            raise MappedRamError(lay.bitmap_offset + got, f"Error reading dirty bitmap of mapped-ram block {lay.idstr}: the file ends")
        got += k
    try:
        return Bitmap.from_le_bytes(lay.npages, mv)
    except ValueError as e:
        raise MappedRamError(lay.bitmap_offset, f"mapped-ram block {lay.idstr}: {e}") from None


def scan_block(r: QEMUFileReader, idstr: str, length: int) -> tuple[BlockFileLayout, Bitmap]:
    """For a reader of a whole file at a block's header: its layout and bitmap, and the
    reader moved past its pages (``livemig inspect``)."""
    fd = r.transport.fileno()
    lay = read_block_header(r, idstr, length, os.fstat(fd).st_size)
    present = read_bitmap(fd, lay)
    r.seek(lay.end)
    return lay, present
