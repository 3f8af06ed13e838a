"""A checksum of guest memory that two machines can compare.

It covers what has defined content: all of a region without a RamDiscardManager, and only
the populated parts of one that has one (discarded memory has no content to compare).
It is independent of *how* zero pages are stored — an allocated page of zeros and a hole
hash the same — and it never reads holes of fd-backed memory, because that would allocate
them (platform notes, section 1): the checksum must not disturb what it measures.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from livemig.memory import hostmem
from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import MemoryRegion

_CHUNK = 64 << 20
_COPY = 4 << 20
_local = threading.local()


def _copy_rows(block: RAMBlock, offset: int, length: int) -> np.ndarray:
    """A private copy of [offset, offset+length) as (pages, page_size) rows.

    The copy is a ``memmove`` through ctypes, which releases the GIL: if a page is still
    missing on a postcopy destination, this thread waits for it without stopping the rest
    of the process (the fault handler, the loader, the vCPUs). numpy then works on the
    copy, never on guest memory that could fault.
    """
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = np.empty(_COPY, np.uint8)
    hostmem.memmove(buf.ctypes.data, block.host + offset, length)
    return buf[:length].reshape(-1, block.page_size)


def content_ranges(mr: MemoryRegion) -> list[tuple[int, int]]:
    """(offset, length) ranges of ``mr`` whose content is defined."""
    if mr.rdm is None:
        return [(0, mr.size)]
    offs, sizes = mr.rdm.populated_runs(Section(mr, 0, mr.size))
    return [(int(o), int(s)) for o, s in zip(offs, sizes, strict=True)]


def nonzero_pages(page_rows: np.ndarray) -> np.ndarray:
    """Indices of rows (pages) that hold any non-zero byte; reads at memory speed."""
    words = page_rows.view(np.uint64)
    return np.flatnonzero(np.bitwise_or.reduce(words, axis=1))


def _window_digest(mr: MemoryRegion, lo: int, hi: int, ranges: list[tuple[int, int]]) -> bytes:
    """Digest of the non-zero pages in [lo, hi) of ``mr`` that lie in ``ranges``.

    Indices and page bytes go to two hashers, so how the window happens to be split into
    data extents (which differs between two hosts holding the same content) does not
    change the result. An all-zero window has the empty digest.
    """
    block = mr.block
    ps = block.page_size
    h_idx, h_data = hashlib.sha256(), hashlib.sha256()
    found = False
    for off, length in ranges:
        s, e = max(off, lo), min(off + length, hi)
        if s >= e:
            continue
        for ext_start, ext_end in block.data_extents(s, e - s):
            for start in range(ext_start, ext_end, _COPY):
                rows = _copy_rows(block, start, min(ext_end, start + _COPY) - start)
                nz = nonzero_pages(rows)
                if not len(nz):
                    continue
                found = True
                h_idx.update((nz + start // ps).astype("<i8").tobytes())
                if len(nz) == len(rows):
                    h_data.update(memoryview(rows).cast("B"))
                else:
                    h_data.update(rows[nz].tobytes())
    return h_idx.digest() + h_data.digest() if found else b""


def memory_checksum(regions: Iterable[MemoryRegion], threads: int = 2) -> str:
    """Hash of per-window digests, computed in parallel (hashlib and numpy drop the GIL)."""
    jobs: list[tuple[MemoryRegion, int, list[tuple[int, int]]]] = []
    for mr in regions:
        ranges = content_ranges(mr)
        windows = sorted({w for off, n in ranges for w in range(off // _CHUNK, -(-(off + n) // _CHUNK))})
        jobs += [(mr, w, ranges) for w in windows]

    def run(job: tuple[MemoryRegion, int, list[tuple[int, int]]]) -> bytes:
        mr, w, ranges = job
        d = _window_digest(mr, w * _CHUNK, (w + 1) * _CHUNK, ranges)
        return mr.name.encode() + b"\0" + w.to_bytes(8, "little") + d if d else b""

    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(run, jobs))
    top = hashlib.sha256()
    for d in digests:
        top.update(d)
    return top.hexdigest()[:32]
