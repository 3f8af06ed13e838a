"""The guest agent of a KVM machine: what the soft guest's ``Workload`` is for ``SoftAccel``.

The guest program (``guest_program``) writes its pass number into every page of a target
table, pass after pass. The agent decides what that table holds, from the guest's
allocator view (:class:`~livemig.guest.usable_memory.UsableMemory`): base RAM above the
program's area plus every plugged virtio-mem block, limited to the working-set knob. It
runs on the vCPU thread, in the runner's exit callback, and changes the table only at pass
exits — the one moment at which the guest re-reads the table from the start, so a change
can never land in the middle of a pass (``check_pages`` does not model that).

Unplugging. The soft workload writes guest memory only while holding ``usable.lock``, so
once the virtio-mem driver has removed a range under the lock, no write to it can be in
flight. A KVM vCPU writes whatever its current table says, lock or no lock. The agent
therefore installs itself as the ``UsableMemory`` quiesce hook: the driver calls it after
removing a range and before sending UNPLUG, and it returns only once the vCPU has reached a
pass exit at which the table was rebuilt without the range. From then on the guest cannot
write the range, so the device may discard it. A stopped vCPU reaches no pass exit: an
unplug then waits until the guest runs again (or the driver stops), as a real guest's
memory offlining would.

Knobs (``WorkloadConfig``): ``working_set`` limits the table to that many bytes (the
first usable pages, as the soft workload's working set); ``dirty_rate`` is honoured
roughly, by sleeping between passes so that table bytes per pass time stay at the rate
(-1: no sleep; 0: idle — after one pass over a new table the guest rests until the table
changes). ``content`` does not apply: the program writes pass numbers. ``fill_done`` is
set once a full pass has covered the current working set.

``discarded_writes`` (on the accelerator) counts table pages found in unplugged blocks when
a table is installed and when a pass over it ends. With the protocol above neither can
happen, so any non-zero value is a broken promise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from livemig.accel.kvm import guest_program as gp
from livemig.accel.kvm.accel import PAGE, KvmAccel
from livemig.accel.kvm.vm import VcpuExit
from livemig.guest.usable_memory import UsableMemory
from livemig.guest.workload import WorkloadConfig
from livemig.memory.region import MemoryRegion

log = logging.getLogger(__name__)

IDLE_POLL = 0.02
"""Seconds between checks for a table change while the guest rests between passes."""

EMPTY_PASS_REST = 0.01
"""Rest after a pass over an empty table, so an idle vCPU does not spin on exits."""


class KvmGuestAgent:
    """Keeps the guest program's target table in step with the guest's usable memory."""

    def __init__(self, accel: KvmAccel, usable: UsableMemory, config: WorkloadConfig):
        if config.vcpus != 1:
            raise ValueError(f"a KVM guest runs the guest program on 1 vCPU, not {config.vcpus}")
        self.accel = accel
        self.usable = usable
        self.config = config
        self.layout = accel.layout
        self.counter = 0  # passes completed (the guest's heartbeat at the last pass exit)
        self.pages_written = 0
        self.table: list[tuple[int, int]] = []  # what the guest runs now; [] = unknown/empty
        self.table_since = 0  # heartbeat when ``table`` was installed (check_pages)
        self.table_pages = 0
        self.fill_done = threading.Event()
        self.fill_done.set()
        self._table_gen = -1  # usable.generation that ``table`` reflects
        self._cv = threading.Condition()
        # pass times on the vCPU's clock: throttle sleeps (accel.throttle) do not count,
        # so the rate is per second the guest runs and a throttled guest dirties less
        self._clock = partial(accel.throttle.clock, 0)
        self._pass_start = self._clock()
        self._warned_capacity = False
        usable.quiesce_hook = self.quiesce

    # -- the Workload surface the machine uses ------------------------------------------------
    def queue_fill(self, mr: MemoryRegion, first_page: int, npages: int) -> None:
        """New usable memory: the next table covers it, and the pass after that fills it."""
        if npages:
            self.fill_done.clear()

    def state(self) -> dict[str, int]:
        return {"counter": self.counter, "pages_written": self.pages_written}

    def vcpu(self, index: int, ex: VcpuExit) -> None:
        """Exit callback, on the vCPU thread: pass exits are where the agent works."""
        if gp.is_pass_exit(ex):
            self._pass_exit(ex.value)

    # -- pass exits ---------------------------------------------------------------------------
    def _pass_exit(self, heartbeat: int) -> None:
        now = self._clock()
        self.counter = heartbeat
        self.pages_written += self.table_pages
        self.accel.discarded_writes += self.accel.count_discarded(self.table)
        if self._table_gen == self.usable.generation:
            self.fill_done.set()  # the pass that just ended covered the current working set
        self._sync_table(heartbeat)
        self._rest(self._rest_time(now))
        self._sync_table(heartbeat)  # the table may have changed while resting
        self._pass_start = self._clock()

    def _rest_time(self, now: float) -> float:
        rate = self.config.dirty_rate
        if rate < 0:
            return 0.0
        if rate == 0:
            return float("inf") if self.fill_done.is_set() else 0.0
        if self.table_pages == 0:
            return EMPTY_PASS_REST
        return self.table_pages * PAGE / rate - (now - self._pass_start)

    def _rest(self, seconds: float) -> None:
        """Sleep at the pass exit; wake early for a pause, a shutdown or a usable change."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        while self.usable.generation == self._table_gen:
            left = deadline - time.monotonic()
            if left <= 0 or self.accel.wait(min(left, IDLE_POLL)):
                return

    def _sync_table(self, heartbeat: int) -> None:
        """Rebuild the table if usable memory changed since it was built (pass exit only)."""
        if self.usable.generation == self._table_gen:
            return
        with self.usable.lock:
            gen = self.usable.generation
            ranges = self._working_set()
            buf = bytearray(self.layout.table_bytes)
            gp.write_table(
                buf,
                ranges,
                layout=self.layout,
                base_gpa=self.layout.table_gpa,
                memory_end=self.accel.memory_end,
            )
            used = (len(ranges) + 1) * gp.ENTRY.size
            self.accel.write(self.layout.table_gpa, memoryview(buf)[:used])  # logged dirty
            self.accel.discarded_writes += self.accel.count_discarded(ranges)
        with self._cv:
            self.table = ranges
            self.table_pages = sum(n for _, n in ranges)
            self.table_since = heartbeat
            self._table_gen = gen
            self._cv.notify_all()

    def _working_set(self) -> list[tuple[int, int]]:
        """Usable memory as (gpa, npages) runs, minus the program's area, capped by the
        working set and the table's capacity. Caller holds ``usable.lock``."""
        limit = self.config.working_set // PAGE if self.config.working_set else None
        floor = self.layout.data_gpa
        out: list[tuple[int, int]] = []
        total = 0
        for r in self.usable.ranges:
            ps = r.mr.block.page_size
            start = max(r.mr.addr + r.first_page * ps, floor)
            end = r.mr.addr + (r.first_page + r.npages) * ps
            n = (end - start) // PAGE
            if limit is not None:
                n = min(n, limit - total)
            if n <= 0:
                if limit is not None and total >= limit:
                    break
                continue
            if out and out[-1][0] + out[-1][1] * PAGE == start:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((start, n))
            total += n
        cap = self.layout.table_capacity
        if len(out) > cap:
            if not self._warned_capacity:
                log.warning("usable memory has %d runs; the table holds %d", len(out), cap)
                self._warned_capacity = True
            out = out[:cap]
        return out

    # -- the quiesce hook -----------------------------------------------------------------------
    def quiesce(self, cancelled: Callable[[], bool]) -> bool:
        """Wait until the guest runs a table built after the latest ``usable`` change.

        Called by the virtio-mem driver after removing ranges (lock released), before it
        asks to unplug them. True once the vCPU has passed a pass exit whose table no
        longer lists them; False if ``cancelled()`` or the machine shuts down first.
        """
        with self.usable.lock:
            target = self.usable.generation
        with self._cv:
            while self._table_gen < target:
                if cancelled() or self.accel.closed:
                    return False
                self._cv.wait(0.05)
        return True
