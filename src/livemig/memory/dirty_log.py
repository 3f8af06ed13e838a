"""The dirty-log interface that migration drives, and a bitmap-backed implementation.

The contract follows KVM's dirty log with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, because
that is the one whose ordering matters (reference 3.2, 3.3):

* ``sync(block)`` returns the pages written since they were last *cleared*; it does not
  clear anything (KVM_GET_DIRTY_LOG under manual protect);
* ``clear(block, first_page, npages)`` re-arms tracking for the pages of a range that the
  last ``sync`` reported: their bits drop out of the log and the next write sets them
  again (KVM_CLEAR_DIRTY_LOG with the synced bits as its mask, as QEMU passes it). A page
  first written *after* the sync keeps its bit, or that write would be lost: nobody has
  it in a migration bitmap yet. Ranges are multiples of 64 pages, as KVM demands;
* migration clears lazily, one clear-chunk at a time, just before it sends pages of that
  chunk, and clears discarded ranges once right after the first sync.

The software accelerator uses :class:`BitmapDirtyLog` directly; the KVM accelerator
implements the same interface on the kernel's log.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.ram_block import RAMBlock

CLEAR_ALIGN_PAGES = 64


class DirtyLog(ABC):
    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @property
    @abstractmethod
    def active(self) -> bool: ...

    @abstractmethod
    def sync(self, block: RAMBlock, out: np.ndarray | None = None) -> np.ndarray:
        """Words of the block's dirty bitmap (one bit per page over ``max_length``).

        ``out``, if given, receives them (callers that sync repeatedly reuse one buffer:
        a fresh 32 MiB array per sync of a 1 TiB block costs more than the copy).
        """

    @abstractmethod
    def clear(self, block: RAMBlock, first_page: int, npages: int) -> None:
        """Re-arm tracking of [first_page, first_page+npages); 64-page aligned."""

    @staticmethod
    def check_clear_range(block: RAMBlock, first_page: int, npages: int) -> None:
        total = block.max_length // block.page_size
        if first_page % CLEAR_ALIGN_PAGES or (
            npages % CLEAR_ALIGN_PAGES and first_page + npages != total
        ):
            raise ValueError(
                f"{block.idstr}: dirty-log clear [{first_page}, +{npages}) is not 64-page aligned"
            )
        if first_page < 0 or npages < 0 or first_page + npages > total:
            raise ValueError(f"{block.idstr}: dirty-log clear [{first_page}, +{npages}) out of range")


class BitmapDirtyLog(DirtyLog):
    """A dirty log kept in numpy bitmaps, fed by whoever performs the writes.

    ``mark`` is called by the writer after a bulk write, with the page indices it wrote. A
    lock makes ``mark``, ``sync`` and ``clear`` atomic with respect to each other, so a sync
    sees either all or none of one batch's bits.
    """

    def __init__(self, blocks: list[RAMBlock]):
        self._lock = threading.Lock()
        self._maps = {b.idstr: Bitmap(b.max_length // b.page_size) for b in blocks}
        self._reported = {b.idstr: Bitmap(b.max_length // b.page_size) for b in blocks}
        self._marked: set[str] = set()  # blocks with bits since they were last zeroed
        self._active = False
        self.clear_calls = 0

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        with self._lock:
            for idstr in self._marked:
                self._maps[idstr].clear_all()
                self._reported[idstr].clear_all()
            self._marked.clear()
            self._active = True

    def stop(self) -> None:
        with self._lock:
            self._active = False

    def mark(self, block: RAMBlock, pages: np.ndarray) -> None:
        if not self._active or len(pages) == 0:
            return
        bm = self._maps[block.idstr]
        pages = np.asarray(pages, dtype=np.int64)
        with self._lock:
            self._marked.add(block.idstr)
            np.bitwise_or.at(
                bm.words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64))
            )

    def mark_range(self, block: RAMBlock, first_page: int, npages: int) -> None:
        if not self._active or npages == 0:
            return
        with self._lock:
            self._marked.add(block.idstr)
            self._maps[block.idstr].set_range(first_page, npages)

    def sync(self, block: RAMBlock, out: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            src = self._maps[block.idstr].words
            if out is None:
                out = src.copy()
            else:
                np.copyto(out, src)
            self._reported[block.idstr].or_words(out)
            return out

    def clear(self, block: RAMBlock, first_page: int, npages: int) -> None:
        self.check_clear_range(block, first_page, npages)
        if not npages:
            return
        w0, w1 = first_page // 64, (first_page + npages + 63) // 64
        with self._lock:
            reported = self._reported[block.idstr].words
            if not reported[w0:w1].any():
                return
            self._maps[block.idstr].words[w0:w1] &= ~reported[w0:w1]
            reported[w0:w1] = 0
            self.clear_calls += 1

    def peek(self, block: RAMBlock) -> Bitmap:
        """The log as it stands (tests)."""
        with self._lock:
            return self._maps[block.idstr].copy()
