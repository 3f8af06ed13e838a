"""Populate destination memory ahead of incoming pages, on other cores.

First-touch page faults, not the network, limit a destination writing into fresh memory
(platform notes: about 0.4-0.8 GB/s for one faulting thread). ``MADV_POPULATE_WRITE``
runs the same faults in the kernel without holding the GIL and scales across threads, so
while the loader copies pages into memory already populated, these threads populate the
next stretch.

What gets populated is bounded, so that the destination does not allocate memory the
source does not use:

* only ranges the RamDiscardManager reports populated (plugged) — never discarded memory;
* only ahead of runs of PAGE records: the window follows the receive position while data
  arrives, and jumps (not fills) over a stretch that came as ZERO records;
* what was populated but then received no data is given back when loading ends
  (:meth:`release_unused`), so the destination ends up holding what the source sent.
"""

from __future__ import annotations

import threading

from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.memory.region import MemoryRegion

CHUNK = 2 << 20


class Prefaulter:
    def __init__(self, regions: list[MemoryRegion], threads: int = 2, ahead: int = 32 << 20):
        self._regions = {mr.block.idstr: mr for mr in regions}
        self._ahead = ahead
        self._cond = threading.Condition()
        self._next: dict[str, int] = {}  # next byte offset to populate, per block
        self._goal: dict[str, int] = {}  # populate up to here
        self._stop = False
        self.bytes_populated = 0
        self.populated: list[tuple[MemoryRegion, int, int]] = []
        self._threads = [
            threading.Thread(target=self._worker, name=f"prefault{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def data_arrived(self, idstr: str, start: int, end: int) -> None:
        """The loader received PAGE records for byte range [start, end) of a block."""
        with self._cond:
            nxt = self._next.get(idstr, 0)
            if end + self._ahead <= self._goal.get(idstr, 0):
                return
            if start > nxt:
                nxt = start - start % CHUNK  # jump over what came as zeros
            self._next[idstr] = max(nxt, end - end % CHUNK)
            self._goal[idstr] = -(-(end + self._ahead) // CHUNK) * CHUNK  # whole chunks
            self._cond.notify_all()

    def _take(self) -> tuple[MemoryRegion, int, int] | None:
        with self._cond:
            while not self._stop:
                for idstr, goal in self._goal.items():
                    mr = self._regions[idstr]
                    off = self._next.get(idstr, 0)
                    limit = min(goal, mr.block.used_length)
                    if off < limit:
                        n = min(CHUNK - off % CHUNK, limit - off)
                        self._next[idstr] = off + n
                        return mr, off, n
                self._cond.wait()
            return None

    def _worker(self) -> None:
        while (job := self._take()) is not None:
            mr, off, n = job
            if mr.rdm is not None and not mr.rdm.is_populated(Section(mr, off, n)):
                continue
            try:
                mr.block.populate(off, n)
            except OSError:
                continue  # only an optimisation: the loader's own write will fault it in
            with self._cond:
                self.bytes_populated += n
                self.populated.append((mr, off, n))

    def release_unused(self, has_data: dict[str, Bitmap], min_pages: int = 16) -> int:
        """Discard populated runs of at least ``min_pages`` pages whose bits in ``has_data``
        are clear; return bytes freed.

        This runs inside the downtime (before the guest may write), so single zero pages
        between data pages are left allocated: one system call each would cost more
        downtime than the memory is worth.
        """
        freed = 0
        for mr, off, n in self.populated:
            bm = has_data[mr.block.idstr]
            ps = mr.block.page_size
            starts, lengths = bm.runs(False, off // ps, n // ps)
            keep = lengths >= min_pages
            for first, count in zip(starts[keep].tolist(), lengths[keep].tolist(), strict=True):
                mr.block.discard_range(first * ps, count * ps)
                freed += count * ps
        self.populated.clear()
        return freed

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
