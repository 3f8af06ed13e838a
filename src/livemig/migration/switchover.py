"""When a precopy may switch over, what the switchover will cost, and holding it back.

:class:`SwitchoverEstimate` is the pass loop's judgement (QEMU's
``migration_update_counters``/``threshold_size``): the bandwidth is measured over windows
of at least :data:`WINDOW` seconds while the loop sends, and over the whole pass when a
pass ends; the rest fits into ``downtime-limit`` when

    dirty bytes after the sync  <=  switchover bandwidth * downtime-limit

where the switchover bandwidth is ``avail-switchover-bandwidth`` if set, else the
measured one. ``downtime-limit`` and ``avail-switchover-bandwidth`` are read at every
pass end, so raising them during a migration takes effect at the next pass.

``expected-downtime`` is the same quotient kept current: after every section, the bytes
a switchover at this moment would have to send (what is still dirty, plus what the guest
has dirtied since the last sync at the measured dirty rate) over the switchover
bandwidth. It starts at ``downtime-limit`` (as QEMU's), and when the migration converges
it is exactly the estimate the decision was made on. With ``max-bandwidth`` set it is an
upper bound: the switchover itself is not rate limited (neither is QEMU's), so tell the
migration the bandwidth the switchover really has with ``avail-switchover-bandwidth``.

:class:`SwitchoverGate` is ``pause-before-switchover``: with the capability on, the
source stops the guest, enters ``pre-switchover`` and waits there — guest stopped, nothing
sent — until ``migrate-continue {state: pre-switchover}`` (or a cancel).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from livemig.migration.core import status
from livemig.migration.core.job import MigrationJob
from livemig.migration.core.params import Parameters

WINDOW = 0.1
"""Seconds a bandwidth sample spans at least (QEMU's ``BUFFER_DELAY``)."""

UNMEASURED_BANDWIDTH = 1e9
"""Bytes/s assumed before anything was measured."""


class SwitchoverEstimate:
    def __init__(self, params: Parameters):
        self.params = params
        self.bandwidth = 0.0  # bytes/s, as measured
        self.expected_downtime = params.downtime_limit  # ms
        self._win_t = 0.0
        self._win_b = 0
        self._pass_t = 0.0
        self._pass_b = 0
        self._sync_t = 0.0

    def switchover_bandwidth(self) -> float:
        return float(self.params.avail_switchover_bandwidth or self.bandwidth or UNMEASURED_BANDWIDTH)

    def start_pass(self, sent: int) -> None:
        now = time.monotonic()
        self._pass_t, self._pass_b = now, sent
        if not self._win_t:
            self._win_t, self._win_b = now, sent
        self._sync_t = now

    def after_section(self, sent: int, remaining: int, dirty_pages_rate: int) -> None:
        """A section went out: refresh the bandwidth window and ``expected-downtime``."""
        now = time.monotonic()
        if now - self._win_t >= WINDOW:
            self.bandwidth = (sent - self._win_b) / (now - self._win_t)
            self._win_t, self._win_b = now, sent
        since_sync = max(now - self._sync_t, 0.0)
        pending = remaining + dirty_pages_rate * 4096 * since_sync
        self.expected_downtime = int(pending / self.switchover_bandwidth() * 1000)

    def end_pass(self, sent: int, remaining: int) -> bool:
        """A pass ended and the dirty log was synced: True if the rest fits the limit."""
        now = time.monotonic()
        took = now - self._pass_t
        if took >= WINDOW or not self.bandwidth:
            self.bandwidth = (sent - self._pass_b) / max(took, 1e-6)
        self._pass_t, self._pass_b, self._sync_t = now, sent, now
        bw = self.switchover_bandwidth()
        self.expected_downtime = int(remaining / bw * 1000)
        return remaining <= bw * self.params.downtime_limit / 1000


class SwitchoverGate:
    """``pause-before-switchover``: wait in ``pre-switchover`` for ``migrate-continue``."""

    def __init__(self, job: MigrationJob, enabled: Callable[[], bool]):
        self.job = job
        self.enabled = enabled
        self._go = threading.Event()

    def wait(self, check_cancel: Callable[[], None]) -> None:
        """With the capability on: ``pre-switchover`` until ``migrate-continue``. The guest
        is already stopped; a cancel (``check_cancel`` raises) ends the wait."""
        if not self.enabled():
            return
        self._go.clear()  # a migrate-continue sent before this point does not count
        if not self.job.move(status.PRE_SWITCHOVER, status.ACTIVE):
            check_cancel()
            return
        while not self._go.wait(0.05):
            check_cancel()

    def proceed(self, state: str) -> None:
        """``migrate-continue {state}``: ValueError (QEMU's text) unless in ``state``."""
        if self.job.status != state:
            raise ValueError(f"Migration not in expected state: {self.job.status}")
        self._go.set()
