"""mapped-ram, destination side: each block's pages read from their place in the file.

:class:`MappedRamLoader` hooks the RAM loader's block list (``RamLoader.block_extra``):
after each entry it reads and checks the block's mapped-ram header and bitmap
(:mod:`.layout`), has the channel threads (:mod:`.files`) read the present pages straight
into guest RAM, and continues the stream after the block's pages, as QEMU's
``parse_ramblock_mapped_ram`` does. A window of the file with few runs of present pages
is read run by run into guest RAM (``preadv``, after ``MADV_POPULATE_WRITE`` of the run);
a window where data and zero pages alternate is read in one ``preadv`` into the thread's
staging buffer and scattered into guest RAM with one numpy assignment — never a Python
loop per page. Pages whose bit is clear are not read: they are zero, and are written
only where this VM may hold data already (the loader's ``maybe_data``). Unplugged memory
has no bit, so nothing is read or populated there.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap, words_for
from livemig.memory.ram_block import RAMBlock
from livemig.migration.incoming import IncomingMigration
from livemig.migration.mapped_ram.files import (
    STAGING_PAGES,
    Channel,
    FileChannels,
    channel_count,
    pread_all,
)
from livemig.migration.mapped_ram.layout import (
    PAGE_SHIFT,
    BlockFileLayout,
    MappedRamConfigError,
    MappedRamError,
    read_bitmap,
    read_block_header,
)
from livemig.migration.ram.codec import BlockEntry
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

DIRECT_RUNS = 64  # a window with up to this many runs is read run by run into guest RAM


def read_block_entry(
    blocks: dict[str, RAMBlock], fd: int, r: QEMUFileReader, e: BlockEntry
) -> tuple[RAMBlock, BlockFileLayout, Bitmap]:
    """The block, its layout and its present-pages bitmap, all checked."""
    at, name, length = e.at, e.name, e.length
    block = blocks.get(name)
    if block is None:
        raise StreamError(at, f'Unknown ramblock "{name}", cannot accept migration')
    if length != block.used_length:
        raise StreamError(at, f"Length mismatch: {name}: 0x{length:x} in != 0x{block.used_length:x}")
    lay = read_block_header(r, name, length, os.fstat(fd).st_size)
    return block, lay, read_bitmap(fd, lay)


def window_pieces(present: Bitmap, window: int = STAGING_PAGES) -> list[tuple[np.ndarray, np.ndarray]]:
    """Runs of present pages cut at ``window``-page boundaries, grouped by window:
    ``[(starts, lengths)]``, one entry per window that has data."""
    starts, lengths = present.runs(True)
    if not len(starts):
        return []
    w0 = starts // window
    w1 = (starts + lengths - 1) // window
    k = w1 - w0 + 1
    ri = np.repeat(np.arange(len(starts)), k)
    wi = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k) + w0[ri]
    ps = np.maximum(starts[ri], wi * window)
    pe = np.minimum(starts[ri] + lengths[ri], (wi + 1) * window)
    cut = np.flatnonzero(np.diff(wi)) + 1
    return [(s, e - s) for s, e in zip(np.split(ps, cut), np.split(pe, cut), strict=True)]


def run_pages(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every page index of the runs, in order."""
    total = int(lengths.sum())
    offs = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offs


def read_runs(ch: Channel, block: RAMBlock, lay: BlockFileLayout, starts: np.ndarray, lengths: np.ndarray) -> None:
    """Read present pages of one window into guest RAM (module docstring)."""
    if len(starts) <= DIRECT_RUNS:
        view = block.view
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            block.populate(s << PAGE_SHIFT, n << PAGE_SHIFT)
            want = n << PAGE_SHIFT
            got = pread_all(ch.fd, view[s << PAGE_SHIFT : (s + n) << PAGE_SHIFT], lay.page_offset(s))
            if got < want:
                raise MappedRamError(lay.page_offset(s) + got, f"mapped-ram block {lay.idstr}: the file ends in its page data")
    else:
        first = int(starts[0])
        span = int(starts[-1] + lengths[-1]) - first
        buf = ch.staging[:span]
        got = pread_all(ch.fd, memoryview(buf.reshape(-1)), lay.page_offset(first))
        if got < span << PAGE_SHIFT:
            raise MappedRamError(lay.page_offset(first) + got, f"mapped-ram block {lay.idstr}: the file ends in its page data")
        idx = run_pages(starts, lengths)
        block.pages_array(0, block.max_length)[idx] = buf[idx - first]
    ch.bytes += int(lengths.sum()) << PAGE_SHIFT


class MappedRamLoader:
    """The destination's mapped-ram load (module docstring)."""

    def __init__(self, inc: IncomingMigration, channels: int, direct: bool):
        self.inc = inc
        self.n = channels
        self.direct = direct
        self.blocks = {b.idstr: b for b in inc.vm.memory.blocks}
        self.chans: FileChannels | None = None
        self.pages_loaded = 0

    @classmethod
    def attach(cls, inc: IncomingMigration, params: Any) -> MappedRamLoader:
        if inc.uri.scheme != "file":
            raise MappedRamConfigError(f"mapped-ram needs a file: migration URI, not {inc.uri.scheme}:")
        loader = cls(inc, channel_count(inc.caps, params), bool(params.direct_io))
        inc.loader.block_extra = loader.block_entry
        inc.job.on_cleanup("mapped-ram channels", loader.close)
        return loader

    def block_entry(self, r: QEMUFileReader, e: BlockEntry) -> None:
        block, lay, present = read_block_entry(self.blocks, self.inc.fd, r, e)
        name = e.name
        if self.chans is None:
            self.chans = FileChannels.open(self.inc.fd, self.inc.uri.path, self.n, write=False, direct=self.direct)
        ld = self.inc.loader
        for starts, lengths in window_pieces(present):
            self.chans.submit(lambda ch, s=starts, n=lengths: self._read(ch, block, lay, s, n))
        self.chans.drain()
        # zero pages: write only where this VM may hold data now
        md = ld.maybe_data[name].words[: words_for(lay.npages)] & ~present.words
        zs, zl = Bitmap(lay.npages, words=md).runs(True) if md.any() else (np.zeros(0, np.int64),) * 2
        if len(zs):
            ld.zero_runs(block, zs, zl)
        r.seek(lay.end)

    def _read(self, ch: Channel, block: RAMBlock, lay: BlockFileLayout, starts: np.ndarray, lengths: np.ndarray) -> None:
        read_runs(ch, block, lay, starts, lengths)
        self.inc.loader.mark_data_runs(block, starts, lengths)

    def close(self) -> None:
        if self.chans is not None:
            self.chans.close()
