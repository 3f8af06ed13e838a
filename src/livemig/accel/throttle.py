"""Throttling vCPUs: each vCPU thread sleeps a share of its time (QEMU's ``cpu-throttle``).

QEMU slows a guest that dirties memory faster than a migration sends it by taking time
away from its vCPUs: every timeslice of 10 ms a throttled vCPU sleeps
``pct / (1 - pct) * 10 ms`` outside the guest (``cpu-throttle.c``), so it runs
``1 - pct`` of the wall-clock time; ``dirty-limit`` does the same per vCPU with a sleep
sized to bring that vCPU's dirty rate to a quota (``dirtylimit.c``). Both come down to
one number per vCPU, the share of time it sleeps, and that is all this class holds.

The accelerator calls :meth:`VcpuThrottle.pace` on the vCPU's own thread at the points
where it regains control from the guest: the software accelerator between two write
batches (its ``VcpuPauser`` checkpoint), the KVM accelerator before every ``KVM_RUN``
(the runner's loop; the guest program exits every few milliseconds). Once a vCPU has run
a timeslice since its last sleep it sleeps its share. The sleep is a wait on a condition
that :meth:`wake` and every change of the shares end at once, so pausing a throttled
guest (a switchover's stop) never waits out a sleep, and a migration that ends puts its
guest back to full speed immediately.

Where an accelerator can tell which vCPU dirtied a page it also counts them here
(:meth:`count_dirty`; the software accelerator does, in its write path): these are the
per-vCPU dirty rates QEMU's dirty-limit reads from KVM's dirty ring. An accelerator that
cannot attribute writes (KVM with the bitmap log) leaves :meth:`dirty_pages` None.

``slept(index)`` is the time a vCPU has spent in throttle sleeps; :meth:`clock` is the
wall clock minus that — the time the guest actually got. The guests' workloads keep their
dirty-rate budgets on this clock ("the guest dirties N bytes per second it runs"), so a
throttled guest dirties less, as a CPU-bound guest would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

TIMESLICE = 0.010
"""QEMU's ``CPU_THROTTLE_TIMESLICE_NS``: run this long, then sleep the share."""

MAX_RUN = 1.0
"""Wall time one sleep is sized for at most. Everything since the last sleep counts,
the guest's own idle time included (QEMU's throttle is on wall-clock timeslices); time
parked by a pause does not (:meth:`VcpuThrottle.wake` restarts the count)."""

MAX_SHARE = 0.99
"""No vCPU sleeps more than 99% of the time (QEMU's ``max-cpu-throttle`` ceiling)."""


class VcpuThrottle:
    """Per-vCPU sleep shares (0 = full speed), applied by the vCPU threads themselves."""

    def __init__(self, counts_dirty: bool = False) -> None:
        self.counts_dirty = counts_dirty
        self._dirtied: dict[int, int] = {}
        self._cond = threading.Condition()
        self._all = 0.0  # share of every vCPU not listed in _shares
        self._shares: tuple[float, ...] = ()
        self._gen = 0  # bumped by wake() and set(): a sleeper ends early
        self._since: dict[int, float] = {}  # vCPU -> end of its last sleep (or first pace)
        self._slept: dict[int, float] = {}

    # -- control (any thread) ----------------------------------------------------------------
    def set(self, shares: Sequence[float] | float) -> None:
        """Every vCPU sleeps ``shares`` (one number) or ``shares[i]`` of its time."""
        with self._cond:
            if isinstance(shares, (int, float)):
                self._all, self._shares = _clamp(shares), ()
            else:
                self._all, self._shares = 0.0, tuple(_clamp(s) for s in shares)
            self._wake_locked()

    def share(self, index: int) -> float:
        shares = self._shares
        return shares[index] if index < len(shares) else self._all

    @property
    def active(self) -> bool:
        return self._all > 0 or any(s > 0 for s in self._shares)

    def wake(self) -> None:
        """End every throttle sleep now (a pause or shutdown wants the vCPUs)."""
        with self._cond:
            self._wake_locked()

    def _wake_locked(self) -> None:
        self._gen += 1
        self._since.clear()  # time parked or at another share is not time run at this one
        self._cond.notify_all()

    # -- the vCPU thread -----------------------------------------------------------------------
    def pace(self, index: int) -> float:
        """Called by vCPU ``index`` between guest runs: sleep its share once it has run a
        timeslice. Returns the seconds slept."""
        share = self.share(index)
        now = time.monotonic()
        with self._cond:
            since = self._since.get(index)
            if share <= 0.0 or since is None:
                self._since[index] = now
                return 0.0
            ran = now - since
            if ran < TIMESLICE:
                return 0.0
            want = min(ran, MAX_RUN) * share / (1.0 - share)
            gen = self._gen
            self._cond.wait_for(lambda: self._gen != gen, want)
            end = time.monotonic()
            if self._gen == gen:
                self._since[index] = end
            slept = end - now
            self._slept[index] = self._slept.get(index, 0.0) + slept
        return slept

    def count_dirty(self, index: int, npages: int) -> None:
        """On vCPU ``index``'s thread: it dirtied ``npages`` pages."""
        self._dirtied[index] = self._dirtied.get(index, 0) + npages

    def dirty_pages(self, nvcpus: int) -> list[int] | None:
        """Pages each vCPU dirtied so far, or None if the accelerator cannot tell."""
        if not self.counts_dirty:
            return None
        return [self._dirtied.get(i, 0) for i in range(nvcpus)]

    def slept(self, index: int) -> float:
        """Seconds vCPU ``index`` has spent in throttle sleeps, in all."""
        return self._slept.get(index, 0.0)

    def clock(self, index: int) -> float:
        """The time vCPU ``index`` got: ``time.monotonic()`` minus its throttle sleeps."""
        return time.monotonic() - self.slept(index)


def _clamp(share: float) -> float:
    return min(max(float(share), 0.0), MAX_SHARE)
