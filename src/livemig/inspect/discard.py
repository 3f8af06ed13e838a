"""The question livemig exists for: did any page record land in memory that the
virtio-mem bitmap says is unplugged?

In QEMU 7.2 the bitmap is inside the last device section, after every page record, so the
check can only be evaluated once the whole file has been read. The first pass therefore
only remembers *which* pages got a record (a bitmap per RAM block); the check compares
them with the unplugged blocks one u64 word at a time, and only if some page falls in
unplugged memory is the file read a second time, to collect the stream offset and kind
of every offending record. A clean check costs one pass.
"""

from __future__ import annotations

import numpy as np

from livemig.inspect.report import StreamReport, Violation, ViolationList, VirtioMemReport
from livemig.inspect.walk import Walker
from livemig.memory.bitmap import words_for


def _unplugged_page_words(dev: VirtioMemReport, npages: int, page_bits: int) -> np.ndarray:
    """Page-granular bitmap (as words) of the pages in unplugged virtio-mem blocks."""
    assert dev.bitmap is not None and dev.block_size is not None
    ppb = dev.block_size >> page_bits
    plugged = np.unpackbits(dev.bitmap.words.view(np.uint8), bitorder="little")[: dev.bitmap.nbits]
    if ppb % 64 == 0:
        words = np.repeat(np.where(plugged.astype(bool), np.uint64(0), ~np.uint64(0)), ppb // 64)
        out = np.zeros(words_for(npages), np.uint64)
        k = min(len(out), len(words))
        out[:k] = words[:k]
        return out
    per_page = np.repeat(plugged == 0, ppb)[:npages]
    bits = np.zeros(words_for(npages) * 64, np.uint8)
    bits[: len(per_page)] = per_page
    return np.packbits(bits, bitorder="little").view(np.uint64).copy()


def check_discard(report: StreamReport) -> ViolationList:
    """Every page record that fell in a virtio-mem block marked unplugged.

    Uses the pages-with-records bitmaps of the report; only if some page is in unplugged
    memory is the file read again to find each offending record's offset and kind.
    Devices without a bitmap or without a RAM block (see ``VirtioMemReport.mapping``) are
    not checked; the caller decides what that means.
    """
    out = ViolationList()
    watch: dict[str, np.ndarray] = {}
    owners: dict[str, VirtioMemReport] = {}
    page_bits = report.page_size.bit_length() - 1
    for dev in report.devices:
        if dev.bitmap is None or dev.ram_block is None:
            continue
        block = report.ram_blocks[dev.ram_block]
        npages = block.length >> page_bits
        bad = block.touched.words_for_pages(npages) & _unplugged_page_words(dev, npages, page_bits)
        n = int(np.bitwise_count(bad).sum())
        if n:
            watch[block.name] = bad
            owners[block.name] = dev
            out.pages += n
    if not watch:
        return out
    walker = Walker(report.path, watch)
    walker.run()
    ram = walker.ram
    out.total = ram.hit_total
    ps = report.page_size
    for h in ram.hits:
        dev = owners[h.block]
        assert dev.block_size is not None
        off = h.page * ps
        out.append(
            Violation(
                device=dev.id,
                ram_block=h.block,
                kind=h.kind,
                stream_offset=h.stream_offset,
                block_offset=off,
                gpa=None if dev.addr is None else dev.addr + off,
                vmem_block=off // dev.block_size,
            )
        )
    return out
