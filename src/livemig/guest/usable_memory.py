"""The guest's own view of which memory it may use.

A real guest keeps this in its page allocator: base RAM is always there, virtio-mem blocks
become usable only after the device ACKed a PLUG, and stop being usable *before* the
driver asks to UNPLUG them (Linux offlines memory first). The lock is the equivalent of
memory offlining: the workload holds it for each write batch, so once the driver has
removed a range under the lock, no write to it can still be in flight.

A guest whose vCPUs write without taking the lock (a KVM guest runs its own code and only
comes back to the host now and then) cannot give that guarantee by the lock alone. It sets
:attr:`UsableMemory.quiesce_hook`, which the driver calls through :meth:`quiesce` after a
removal and before UNPLUG; the hook returns once the vCPUs can no longer write what was
removed. Without a hook (the soft guest) :meth:`quiesce` returns at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from livemig.memory.region import MemoryRegion


@dataclass(frozen=True)
class UsableRange:
    mr: MemoryRegion
    first_page: int
    npages: int


class UsableMemory:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._ranges: list[UsableRange] = []
        self._cum = np.zeros(1, np.int64)
        self.generation = 0
        self.quiesce_hook: Callable[[Callable[[], bool]], bool] | None = None

    def quiesce(self, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """After a removal, wait until no vCPU can still write the removed ranges.

        Call with ``lock`` released (the hook's guest may need it to make progress). True
        when that holds; False if ``cancelled()`` became true first or the guest is going
        away — the caller must then not give the memory back.
        """
        hook = self.quiesce_hook
        return True if hook is None else hook(cancelled)

    def _rebuild(self) -> None:
        self._ranges.sort(key=lambda r: (r.mr.addr, r.first_page))
        self._cum = np.concatenate(([0], np.cumsum([r.npages for r in self._ranges]))).astype(
            np.int64
        )
        self.generation += 1

    def add(self, mr: MemoryRegion, first_page: int, npages: int) -> None:
        """Caller holds ``lock``."""
        self._ranges.append(UsableRange(mr, first_page, npages))
        self._rebuild()

    def remove(self, mr: MemoryRegion, first_page: int, npages: int) -> None:
        """Remove [first_page, first_page+npages) of ``mr``, splitting ranges; caller holds lock."""
        end = first_page + npages
        out: list[UsableRange] = []
        for r in self._ranges:
            rend = r.first_page + r.npages
            if r.mr is not mr or rend <= first_page or r.first_page >= end:
                out.append(r)
                continue
            if r.first_page < first_page:
                out.append(UsableRange(mr, r.first_page, first_page - r.first_page))
            if rend > end:
                out.append(UsableRange(mr, end, rend - end))
        self._ranges = out
        self._rebuild()

    @property
    def ranges(self) -> list[UsableRange]:
        return list(self._ranges)

    @property
    def total_pages(self) -> int:
        return int(self._cum[-1])

    def range_at(self, page_index: int, limit: int) -> tuple[UsableRange, int, int]:
        """The range holding the ``page_index``-th usable page, and the in-range window.

        Returns (range, first page within the range's region, pages available up to
        ``limit`` usable pages) — the working set is the first ``limit`` usable pages.
        """
        i = int(np.searchsorted(self._cum, page_index, side="right")) - 1
        r = self._ranges[i]
        start_in_range = page_index - int(self._cum[i])
        avail = min(r.npages, limit - int(self._cum[i])) - start_in_range
        return r, r.first_page + start_in_range, avail
