"""What the destination has of guest RAM in postcopy, and how pages get there.

:class:`ReceivedMap` is one byte per guest page in a memfd that the fault-handler process
maps too: ``RECV_NONE`` (not here), ``RECV_DATA`` (placed), ``RECV_ZERO`` (the source
sent it as zero; placed lazily, on the first fault), ``RECV_LOCAL`` (discarded memory a
thread touched, answered here with a zero page and given back at the end). The loader
writes it for pages of the main stream, the handler for the pages it places; bytes are
written whole, so neither disturbs the other's pages. After the pages, one u64 counts the
loader's batches (:meth:`ReceivedMap.tick`): the handler's sign that the main stream
still moves, which it needs to tell a stopped source from a busy one (handler module).

:class:`PostcopyPlacer` is the loader's :class:`~livemig.migration.ram.load.PagePlacer`
after LISTEN: guest RAM is registered with userfaultfd then, so a page is never written
into it — it is copied in with ``UFFDIO_COPY``, which installs a missing page atomically
and wakes its waiters, and refuses one that is present (``EEXIST``: the handler placed it
first; nothing is placed twice).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from livemig.memory.bitmap import Bitmap, index_runs, mask_runs
from livemig.memory.ram_block import RAMBlock
from livemig.migration.postcopy import placer as uffd
from livemig.migration.postcopy.handler import RECV_DATA, RECV_LOCAL, RECV_NONE, RECV_ZERO
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream import return_path as rp

STAGE_PAGES = 1024


class ReceivedMap:
    """The received map (module docstring), shared with the handler through :attr:`fd`."""

    def __init__(self, blocks: list[RAMBlock]):
        self.offsets: dict[str, int] = {}
        off = 0
        for b in blocks:
            self.offsets[b.idstr] = off
            off += b.used_length >> TARGET_PAGE_BITS
        self.pages = off
        self.progress_off = -(-off // 8) * 8  # the batch counter, after the pages
        self.size = self.progress_off + 8
        self.fd = os.memfd_create("livemig:postcopy-received", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes: np.ndarray | None = np.frombuffer(self._map, np.uint8, count=off)
        self._progress: np.ndarray | None = np.frombuffer(self._map, np.uint64, count=1, offset=self.progress_off)

    def tick(self) -> None:
        """The loader took a batch off the main stream (the handler watches this count)."""
        if self._progress is not None:
            self._progress[0] += 1

    def of(self, block: RAMBlock) -> np.ndarray:
        """The bytes of ``block``'s used pages (a view: writes go to the shared map)."""
        assert self.bytes is not None, "received map closed"
        off = self.offsets[block.idstr]
        return self.bytes[off : off + (block.used_length >> TARGET_PAGE_BITS)]

    def load(self, block: RAMBlock, received: Bitmap) -> None:
        """At LISTEN: the pages the loader received before are here (``RECV_DATA``)."""
        n = block.used_length >> TARGET_PAGE_BITS
        self.of(block)[:] = np.unpackbits(received.words.view(np.uint8), bitorder="little")[:n]

    def le_bitmap(self, block: RAMBlock) -> bytes:
        """RECV_BITMAP's payload: pages with any record, little-endian, size rounded to 8."""
        nbits = block.used_length >> TARGET_PAGE_BITS
        bits = np.packbits(self.of(block) != RECV_NONE, bitorder="little").tobytes()
        return bits + bytes(rp.recv_bitmap_size(nbits) - len(bits))

    def count_in(self, block: RAMBlock, runs: tuple[np.ndarray, np.ndarray] | None, *states: int) -> int:
        """Pages of ``runs`` (first, count; all used pages if None) in one of ``states``."""
        hit = np.isin(self.of(block), states)
        if runs is None:
            return int(np.count_nonzero(hit))
        return sum(int(np.count_nonzero(hit[s : s + n]))
                   for s, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True))

    def local_runs(self, block: RAMBlock) -> tuple[np.ndarray, np.ndarray]:
        """(first page, count) of the runs answered locally (discarded memory touched)."""
        return mask_runs(self.of(block) == RECV_LOCAL)

    def summary(self, block: RAMBlock) -> dict[str, int]:
        """How many pages are in each state (tests and inspection)."""
        states = np.bincount(self.of(block), minlength=4)
        return {"none": int(states[RECV_NONE]), "data": int(states[RECV_DATA]),
                "zero": int(states[RECV_ZERO]), "local": int(states[RECV_LOCAL])}

    def close(self) -> None:
        """Unmap and close (idempotent); the handler keeps its own mapping until it exits."""
        self.bytes = self._progress = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it later
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PostcopyPlacer:
    """The loader's page placer after LISTEN (module docstring)."""

    def __init__(self, uffd_fd: int, received: ReceivedMap):
        self.placer = uffd.Placer(uffd_fd)
        self.received = received
        self._stage = np.empty((STAGE_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self.loaded_pages = 0  # placed from the main stream
        self.loaded_existed = 0  # already here when they arrived (placed by the handler)
        self.zero_records = 0

    def place_pages(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None:
        """Place received pages with ``UFFDIO_COPY``; pages already here are left alone.

        ``data`` is a view of the reader's buffer (strided records), so pages are staged
        in a private buffer and each run of consecutive pages is one ioctl.
        """
        self.received.tick()
        recv = self.received.of(block)
        todo = recv[pages] == RECV_NONE
        if not todo.all():
            self.loaded_existed += int(np.count_nonzero(~todo))
            pages, data = pages[todo], data[todo]
        for s in range(0, len(pages), STAGE_PAGES):
            part = pages[s : s + STAGE_PAGES]
            stage = self._stage[: len(part)]
            np.copyto(stage, data[s : s + len(part)])
            starts, counts = index_runs(part)
            at = np.concatenate(([0], np.cumsum(counts)[:-1]))
            for first, n, i in zip(starts.tolist(), counts.tolist(), at.tolist(), strict=True):
                placed, existed = self.placer.copy(
                    block.host + (first << TARGET_PAGE_BITS),
                    stage.ctypes.data + i * TARGET_PAGE_SIZE,
                    n * TARGET_PAGE_SIZE,
                )
                self.loaded_pages += placed >> TARGET_PAGE_BITS
                self.loaded_existed += existed >> TARGET_PAGE_BITS
            recv[part] = RECV_DATA

    def zero_pages(self, block: RAMBlock, pages: np.ndarray) -> None:
        """ZERO records are remembered, not placed: placing would allocate a memfd hole
        that reads as zero already; the first fault, if any, maps a zero page."""
        self.received.tick()
        recv = self.received.of(block)
        cur = recv[pages]
        recv[pages[cur == RECV_NONE]] = RECV_ZERO
        self.zero_records += len(pages)
