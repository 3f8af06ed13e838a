"""The software guest's workload: vCPU threads that write guest memory in bulk.

Each vCPU loop iteration writes one batch of pages with a single numpy assignment through
the accelerator (which logs them dirty). Knobs mirror what a migration test wants to vary:
working-set size, dirty rate and page content (random, zeros, or a mix, so zero-page
detection has something to find). The dirty rate is per second a vCPU *runs*: time a
throttled vCPU sleeps (``accel.throttle``: auto-converge, dirty-limit) does not count, so
a throttled guest dirties less, as a CPU-bound guest would.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from livemig.accel.soft import SoftAccel, VcpuPauser
from livemig.devices.state import StateSection
from livemig.devices.vmstate import Field, VMStateDescription
from livemig.guest.usable_memory import UsableMemory
from livemig.memory.region import MemoryRegion

CONTENTS = ("random", "zeros", "mixed")
_POOL_PAGES = 256


@dataclass
class WorkloadConfig:
    vcpus: int = 1
    working_set: int = 0  # bytes; 0 = all usable memory
    dirty_rate: int = 0  # bytes/s over all vCPUs after the fill; 0 = idle, -1 = unthrottled
    content: str = "random"
    prefill: bool = True  # write every working-set page once, like a guest that used its RAM
    batch_pages: int = 64
    seed: int = 1
    reads: int = 0  # pages each vCPU also reads per batch (GIL-free copies, as a guest load)

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"workload content must be one of {CONTENTS}, not {self.content!r}")
        if self.vcpus < 1:
            raise ValueError("a guest needs at least one vCPU")


class Workload:
    def __init__(self, accel: SoftAccel, usable: UsableMemory, config: WorkloadConfig):
        self.accel = accel
        self.usable = usable
        self.config = config
        self.pages_written = 0
        self.pages_read = 0
        self.read_digest = 0  # XOR of the first word of every page read: reads are used
        self.counter = 0
        self._fill: deque[tuple[MemoryRegion, int, int]] = deque()
        self._fill_lock = threading.Lock()
        self._fill_inflight = 0
        self.fill_done = threading.Event()
        self.fill_done.set()
        rng = np.random.default_rng(config.seed)
        self._pool = rng.integers(0, 256, (_POOL_PAGES, 4096), dtype=np.uint8)
        self._pool[:, :8] = 0

    # -- fill ---------------------------------------------------------------------------------
    def queue_fill(self, mr: MemoryRegion, first_page: int, npages: int) -> None:
        """Ask the vCPUs to write ``npages`` once (newly usable memory, prefill)."""
        if not self.config.prefill or npages == 0:
            return
        with self._fill_lock:
            self._fill.append((mr, first_page, npages))
            self.fill_done.clear()

    def _take_fill(self, max_pages: int) -> tuple[MemoryRegion, int, int] | None:
        with self._fill_lock:
            if not self._fill:
                if self._fill_inflight == 0:
                    self.fill_done.set()
                return None
            self._fill_inflight += 1
            mr, first, n = self._fill.popleft()
            take = min(n, max_pages)
            if n > take:
                self._fill.appendleft((mr, first + take, n - take))
            return mr, first, take

    def _still_usable(self, mr: MemoryRegion, first: int, n: int) -> bool:
        return any(
            r.mr is mr and r.first_page <= first and first + n <= r.first_page + r.npages
            for r in self.usable.ranges
        )

    # -- content ------------------------------------------------------------------------------
    def _content(self, rng: np.random.Generator, n: int) -> np.ndarray | int:
        kind = self.config.content
        if kind == "zeros":
            return 0
        data = np.take(self._pool, rng.integers(0, _POOL_PAGES, n), axis=0)
        with self._fill_lock:
            c = self.counter
            self.counter += n
        data.view(np.uint64)[:, 0] = np.arange(c + 1, c + n + 1, dtype=np.uint64)
        if kind == "mixed":
            data[rng.random(n) < 0.5] = 0
        return data

    # -- vCPU body ----------------------------------------------------------------------------
    def vcpu(self, index: int, pauser: VcpuPauser) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed * 1000 + index + 1)
        per_vcpu_rate = cfg.dirty_rate / cfg.vcpus if cfg.dirty_rate > 0 else 0
        # the rate is per second the vCPU runs: time in throttle sleeps does not count
        clock = partial(pauser.throttle.clock, index)
        budget_start = clock()
        written_bytes = 0
        while pauser.checkpoint():
            if self._do_fill(rng):
                budget_start, written_bytes = clock(), 0
                continue
            if cfg.dirty_rate == 0:
                time.sleep(0.005)
                continue
            n = self._do_batch(rng)
            if n == 0:
                time.sleep(0.005)
                continue
            written_bytes += n * 4096
            if per_vcpu_rate:
                ahead = written_bytes / per_vcpu_rate - (clock() - budget_start)
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                elif ahead < -1.0:  # do not bank credit across a long pause
                    budget_start, written_bytes = clock(), 0

    def _do_fill(self, rng: np.random.Generator) -> bool:
        job = self._take_fill(2048)
        if job is None:
            return False
        mr, first, n = job
        try:
            with self.usable.lock:
                if self._still_usable(mr, first, n):
                    ps = mr.block.page_size
                    mr.block.populate(first * ps, n * ps)  # in-kernel fault-in, GIL released
                    pages = np.arange(first, first + n, dtype=np.int64)
                    self.accel.write_pages(mr, pages, self._content(rng, n))
                    self.pages_written += n
        finally:
            with self._fill_lock:
                self._fill_inflight -= 1
        return True

    def _do_batch(self, rng: np.random.Generator) -> int:
        cfg = self.config
        with self.usable.lock:
            total = self.usable.total_pages
            if cfg.working_set:
                total = min(total, cfg.working_set // 4096)
            if total == 0:
                return 0
            p = int(rng.integers(0, total))
            r, first, avail = self.usable.range_at(p, total)
            span = min(avail, 16 * cfg.batch_pages)
            pages = np.unique(first + rng.integers(0, span, cfg.batch_pages))
            self.accel.write_pages(r.mr, pages, self._content(rng, len(pages)))
            self.pages_written += len(pages)
            if cfg.reads and hasattr(self.accel, "read_pages"):
                q = int(rng.integers(0, total))
                rr, rfirst, ravail = self.usable.range_at(q, total)
                rpages = np.unique(rfirst + rng.integers(0, min(ravail, 16 * cfg.reads), cfg.reads))
                got = self.accel.read_pages(rr.mr, rpages)
                self.read_digest ^= int(np.bitwise_xor.reduce(got.view(np.uint64)[:, 0]))
                self.pages_read += len(rpages)
            return len(pages)

    def state(self) -> dict[str, int]:
        return {"counter": self.counter, "pages_written": self.pages_written}


GUEST_DESC = VMStateDescription(
    "livemig-guest",
    1,
    [Field.uint64("counter"), Field.uint64("pages_written"), Field.uint32("vcpus")],
)
"""The guest's progress (section ``livemig-guest``): the software workload's, or the KVM
guest agent's pass and page counters, so the guest continues its write sequence."""


class GuestProgress(Protocol):
    """A guest whose progress migrates: ``Workload`` or the KVM guest agent."""

    counter: int
    pages_written: int

    def state(self) -> dict[str, int]: ...


def guest_state_section(guest: GuestProgress, vcpus: int) -> StateSection:
    """Section ``livemig-guest`` of ``guest`` (registered by the machine that runs it)."""

    def save() -> dict[str, int]:
        return {**guest.state(), "vcpus": vcpus}

    def apply(values: dict[str, Any]) -> None:
        guest.counter = values["counter"]
        guest.pages_written = values["pages_written"]

    return StateSection.simple("livemig-guest", GUEST_DESC, save, apply)
