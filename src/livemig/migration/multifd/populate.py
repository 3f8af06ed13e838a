"""Destination memory populated ahead of multifd's receiving threads.

A page fault inside ``recv`` holds the socket lock and stalls the sender, and first-touch
faults limit a thread writing fresh memory to well under a GB/s here (platform notes).
So the data runs of each packet are populated (``MADV_POPULATE_WRITE``) 2 MiB at a time
by populate threads running ahead of the receiving thread, or by that thread itself when
it gets there first.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.core.threads import join_for_good
from livemig.migration.multifd.wire import POPULATE_CHUNK
from livemig.migration.ram.state import TARGET_PAGE_BITS


class Chunk:
    __slots__ = ("block", "n", "off", "state")

    def __init__(self, block: RAMBlock, off: int, n: int):
        self.block, self.off, self.n, self.state = block, off, n, 0  # 0 todo, 1 busy, 2 done


class Populator:
    """Populate (``MADV_POPULATE_WRITE``) the data runs of received packets ahead of the
    threads receiving into them.

    A channel thread hands over a packet's data runs in 2 MiB chunks and receives them in
    order; a chunk nobody has started yet it populates itself, so it never waits for these
    threads, and never faults inside ``recv``. Only ranges that a packet is about to fill
    are populated: no unplugged memory, no zero pages, nothing to give back afterwards.
    """

    def __init__(self, threads: int):
        self._cond = threading.Condition()
        self._todo: deque[Chunk] = deque()
        self._stop = False
        self.bytes_ahead = 0  # populated by these threads before the receiver got there
        self._threads = [threading.Thread(target=self._work, name=f"multifd-populate{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, block: RAMBlock, starts: np.ndarray, lengths: np.ndarray) -> list[Chunk]:
        chunks = []
        for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
            off, end = s << TARGET_PAGE_BITS, (s + ln) << TARGET_PAGE_BITS
            while off < end:
                n = min(POPULATE_CHUNK - off % POPULATE_CHUNK, end - off)
                chunks.append(Chunk(block, off, n))
                off += n
        if self._threads and len(chunks) > 1:
            with self._cond:
                self._todo.extend(chunks[1:])  # the receiver starts on the first itself
                self._cond.notify_all()
        return chunks

    @staticmethod
    def _populate(c: Chunk) -> None:
        try:
            c.block.populate(c.off, c.n)
        except OSError:
            pass  # only an optimisation: the receive faults the pages in

    def ensure(self, c: Chunk) -> None:
        """Return once chunk ``c`` is populated (populating it here if nobody started)."""
        with self._cond:
            if c.state == 0:
                c.state = 1
            else:
                while c.state == 1:
                    self._cond.wait()
                return
        self._populate(c)
        with self._cond:
            c.state = 2
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._todo:
                    self._cond.wait()
                if self._stop:
                    return
                c = self._todo.popleft()
                if c.state != 0:
                    continue
                c.state = 1
            self._populate(c)
            with self._cond:
                c.state = 2
                self.bytes_ahead += c.n
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for c in self._todo:  # nobody waits for these any more
                if c.state == 0:
                    c.state = 2
            self._todo.clear()
            self._cond.notify_all()
        for t in self._threads:
            join_for_good(t)
