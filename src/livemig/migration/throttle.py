"""Slowing down a guest that dirties memory faster than its migration sends it.

Two of QEMU's capabilities, with its parameters, arithmetic and statistics:

* **auto-converge** (``ram.c`` ``mig_throttle_guest_down``, ``cpu-throttle.c``): every
  vCPU sleeps ``cpu-throttle-percentage`` of its time; the percentage starts at
  ``cpu-throttle-initial`` and grows by ``cpu-throttle-increment`` (or, with
  ``cpu-throttle-tailslow``, by what the last period says is needed, at most that) up to
  ``max-cpu-throttle``;
* **dirty-limit** (``system/dirtylimit.c``): each vCPU's dirty rate is brought to
  ``vcpu-dirty-limit`` MB/s by a sleep per "dirty ring full" that is re-adjusted every
  ``x-vcpu-dirty-limit-period`` ms — linearly while the rate is far from the quota, by a
  tenth of the ring-full time when close, and left alone within 25 MB/s of it.

When either starts is QEMU's ``migration_trigger_throttle``: after a dirty sync that
ends a period of more than a second, if the pages newly dirtied in the period exceed
``throttle-trigger-threshold`` percent of the bytes sent in it, for the second time, the
guest is throttled (further). The pass loop (``OutgoingMigration.iterate``) calls
:meth:`MigrationThrottle.after_sync` after every sync; nothing else starts a throttle,
and the migration's recovery and clean-up call :meth:`MigrationThrottle.stop`, so a
throttle lives exactly as long as its migration and a cancelled or failed one leaves the
guest at full speed.

Where the dirty rates come from. QEMU's dirty-limit reads each vCPU's rate from KVM's
dirty ring, every period. livemig reads ``vm.vcpu_dirty_pages()`` — per-vCPU counts of
dirtied pages where the accelerator can tell (the software accelerator counts in its
write path) — and re-adjusts after the first section at least a period after the last
adjustment. livemig's KVM guests use KVM's dirty *bitmap* (``kvm_pvm`` offers a dirty
ring, but it loses entries when a vCPU fills it in one run and it cannot run beside the
bitmap; docs/convergence.md), which cannot tell vCPUs apart: there the rate is the
migration's own — pages newly dirty at each sync over the time since the previous
adjustment, shared equally among the vCPUs — and the throttle is re-adjusted at syncs.
That rate counts each page once per pass, so it cannot exceed the memory the guest
writes per pass: it is the rate that decides convergence, not the guest's write rate.
The ring the sleeps are "per full" of is a nominal :data:`DIRTY_RING_PAGES` entries,
which is what ``dirty-limit-ring-full-time`` reports.
The sleep itself is the accelerator's (``accel.throttle``): a vCPU running at its
unthrottled rate fills the nominal ring in the ring-full time, then sleeps the
per-round time, so it sleeps ``t / (t + ring_full_time)`` of its time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from livemig.migration.core.params import Capabilities, Parameters
from livemig.migration.core.vm import MigratableVM

PAGE = 4096
PERIOD = 1.0
"""Seconds a trigger period lasts at least (QEMU: a sync > 1000 ms after the last)."""

DIRTY_RING_PAGES = 4096
"""The nominal per-vCPU dirty ring of dirty-limit's arithmetic (QEMU: ``dirty-ring-size``)."""

TOLERANCE_MBPS = 25  # DIRTYLIMIT_TOLERANCE_RANGE
LINEAR_ADJUSTMENT_PCT = 50  # DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT
THROTTLE_PCT_MAX = 99  # DIRTYLIMIT_THROTTLE_PCT_MAX


class DirtyLimit:
    """QEMU's dirty-limit service for one migration: per-vCPU quota and sleep per ring full."""

    def __init__(self, nvcpus: int, quota: int, period_ms: int, counts: list[int] | None):
        self.quota = quota  # MB/s per vCPU
        self.period = period_ms / 1000
        self.throttle_us = [0] * nvcpus  # cpu->throttle_us_per_full
        self.rates = [0] * nvcpus  # MB/s per vCPU, last measured
        self.max_rate = 0  # dirtylimit_dirty_ring_full_time's static max_dirtyrate
        self.per_vcpu = counts is not None  # the accelerator counts per vCPU
        self._counts = counts or [0] * nvcpus
        self._since = time.monotonic()
        self._pages = 0

    def ring_full_time(self, rate: int) -> int:
        """µs a vCPU dirtying ``rate`` MB/s (at most the highest seen) takes to fill the ring."""
        self.max_rate = max(self.max_rate, rate)
        if not self.max_rate:
            return 0
        ring_mib = DIRTY_RING_PAGES * PAGE >> 20
        return ring_mib * 1_000_000 // self.max_rate

    def measure(self, now: float, counts: list[int] | None, new_pages: int = 0) -> bool:
        """Take a measurement: per-vCPU ``counts`` (cumulative) if the accelerator has
        them, else the pages ``new_pages`` newly dirty at a sync. True when a period had
        passed, so the rates were taken and the throttle re-adjusted."""
        self._pages += new_pages
        elapsed = now - self._since
        if elapsed < self.period:
            return False
        n = len(self.rates)
        if counts is not None:
            pages = [c - p for c, p in zip(counts, self._counts, strict=True)]
            self._counts = counts
        else:
            pages = [self._pages // n] * n
        self.rates = [int(p * PAGE / elapsed) >> 20 for p in pages]  # MB/s (MiB, as QEMU)
        self._since, self._pages = now, 0
        for i in range(n):
            self._adjust(i, self.quota, self.rates[i])
        return True

    def _adjust(self, i: int, quota: int, current: int) -> None:
        """``dirtylimit_adjust_throttle`` + ``dirtylimit_set_throttle`` for vCPU ``i``."""
        if abs(quota - current) <= TOLERANCE_MBPS:
            return
        if current == 0:
            self.throttle_us[i] = 0
            return
        rft = self.ring_full_time(current)
        lo, hi = min(quota, current), max(quota, current)
        t = self.throttle_us[i]
        if (hi - lo) * 100 // hi > LINEAR_ADJUSTMENT_PCT:
            if quota < current:
                pct = (current - quota) * 100 // current
                t += int(rft * pct / (100 - pct))
            else:
                pct = (quota - current) * 100 // quota
                t -= int(rft * pct / (100 - pct))
        else:
            t += rft // 10 if quota < current else -(rft // 10)
        self.throttle_us[i] = max(min(t, rft * THROTTLE_PCT_MAX), 0)

    def shares(self) -> list[float]:
        """The share of its time each vCPU sleeps: per-round sleep over sleep + fill."""
        rft = self.ring_full_time(0)
        return [t / (t + rft) if t and rft else 0.0 for t in self.throttle_us]

    def info(self) -> dict[str, int]:
        n = len(self.rates)
        avg = sum(self.rates) // n if n else 0
        return {
            "dirty-limit-throttle-time-per-round": max(self.throttle_us, default=0),
            "dirty-limit-ring-full-time": self.ring_full_time(avg) if avg else 0,
        }


class MigrationThrottle:
    """auto-converge and dirty-limit for one outgoing migration (module docstring)."""

    def __init__(self, vm: MigratableVM, caps: Capabilities, params: Parameters):
        self.vm = vm
        self.caps = caps
        self.params = params
        self.percentage = 0  # auto-converge's cpu-throttle-percentage; 0 = not throttling
        self.dirty_limit: DirtyLimit | None = None
        self.triggers = 0  # how often migration_trigger_throttle fired
        self._lock = threading.Lock()
        self._started = False
        self._period_start = 0.0
        self._period_pages = 0
        self._bytes_prev = 0
        self._high = 0

    @property
    def enabled(self) -> bool:
        return bool(self.caps["auto-converge"] or self.caps["dirty-limit"])

    def start(self, transferred: int) -> None:
        """The first period starts (after the set-up's sync)."""
        self._period_start, self._period_pages = time.monotonic(), 0
        self._bytes_prev = transferred
        self._started = True

    def after_sync(self, new_pages: int, transferred: int) -> None:
        """After each dirty sync of the pass loop: ``new_pages`` newly dirty, ``transferred``
        bytes sent so far (QEMU's ``migration_bitmap_sync`` tail)."""
        if not self.enabled or not self._started:
            return
        now = time.monotonic()
        with self._lock:
            dl = self.dirty_limit
            if dl is not None and not dl.per_vcpu and dl.measure(now, None, new_pages):
                self.vm.throttle_vcpus(dl.shares())
            self._period_pages += new_pages
            if now - self._period_start <= PERIOD:
                return
            sent = transferred - self._bytes_prev
            dirtied = self._period_pages * PAGE
            threshold = sent * self.params.throttle_trigger_threshold // 100
            if dirtied > threshold:
                self._high += 1
                if self._high >= 2:
                    self._high = 0
                    self.triggers += 1
                    if self.caps["auto-converge"]:
                        self._throttle_down(dirtied, threshold)
                    elif self.caps["dirty-limit"]:
                        self._limit_guest(now)
            self._period_start, self._period_pages = now, 0
            self._bytes_prev = transferred

    def tick(self) -> None:
        """After each section: dirty-limit's periodic re-adjustment, where the
        accelerator counts per-vCPU dirtying (QEMU's dirtylimit thread, every period)."""
        dl = self.dirty_limit
        if dl is None or not dl.per_vcpu:
            return
        with self._lock:
            if self.dirty_limit is dl and dl.measure(time.monotonic(), self.vm.vcpu_dirty_pages()):
                self.vm.throttle_vcpus(dl.shares())

    def _throttle_down(self, dirtied: int, threshold: int) -> None:
        """``mig_throttle_guest_down``."""
        p = self.params
        if not self.percentage:
            pct = p.cpu_throttle_initial
        else:
            inc = p.cpu_throttle_increment
            if p.cpu_throttle_tailslow:
                cpu_now = 100 - self.percentage
                cpu_ideal = int(cpu_now * (threshold / dirtied))
                inc = min(cpu_now - cpu_ideal, inc)
            pct = min(self.percentage + inc, p.max_cpu_throttle)
        self.percentage = pct
        self.vm.throttle_vcpus(pct / 100)

    def _limit_guest(self, now: float) -> None:
        """``migration_dirty_limit_guest``: start the service, or take a changed quota."""
        quota = self.params.vcpu_dirty_limit
        dl = self.dirty_limit
        if dl is not None and dl.quota == quota:
            return
        if dl is None:
            self.dirty_limit = DirtyLimit(
                max(self.vm.vcpu_count, 1), quota, self.params.x_vcpu_dirty_limit_period,
                self.vm.vcpu_dirty_pages(),
            )
        else:
            dl.quota = quota

    def stop(self) -> None:
        """The migration ends, however it ends: the guest runs at full speed again."""
        with self._lock:
            was = self.percentage or self.dirty_limit is not None
            self.percentage = 0
            self.dirty_limit = None
            self._started = False
        if was:
            self.vm.throttle_vcpus(0.0)

    def info(self, out: dict[str, Any]) -> None:
        """query-migrate's throttle members, present while a throttle is on (as QEMU's)."""
        with self._lock:
            if self.percentage:
                out["cpu-throttle-percentage"] = self.percentage
            if self.dirty_limit is not None and self.caps["dirty-limit"]:
                out.update(self.dirty_limit.info())
