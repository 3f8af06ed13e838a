"""``max-bandwidth`` (and ``max-postcopy-bandwidth``): the one rate limiter of a migration.

QEMU limits a migration's bytes per window and sleeps when it is ahead. Here: the
limiter measures bytes since the start of a window and says how long the sender is ahead
of the limit; a window restarts after a second, so unused budget is not banked and a
change of the limit during the migration takes effect within a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RATE_WINDOW = 0.1  # seconds of budget per section when limited, like QEMU
SLICE_BYTES = 32 << 20  # bytes per section when unlimited
PAGE = 4096


class RateLimiter:
    def __init__(self, limit: Callable[[], int]):
        self.limit = limit  # bytes/s now; 0 = unlimited
        self._t0 = time.monotonic()
        self._b0 = 0

    def slice_bytes(self) -> int:
        """How much to send before the next check (one section's worth)."""
        bw = self.limit()
        return max(int(bw * RATE_WINDOW), PAGE) if bw else SLICE_BYTES

    def restart(self, sent: int) -> None:
        """Start a window at ``sent`` bytes (a new phase: the postcopy push, say)."""
        self._t0, self._b0 = time.monotonic(), sent

    def ahead(self, sent: int) -> float:
        """Seconds the sender, having sent ``sent`` bytes in all, is ahead of the limit."""
        bw = self.limit()
        now = time.monotonic()
        if not bw:
            self._t0, self._b0 = now, sent
            return 0.0
        ahead = (sent - self._b0) / bw - (now - self._t0)
        if ahead <= 0 and now - self._t0 > 1.0:
            self._t0, self._b0 = now, sent
        return max(ahead, 0.0)

    def wait(self, sent: int, sleep: Callable[[float], object]) -> None:
        """Sleep (with ``sleep``, which may return early on cancel) while ahead."""
        ahead = self.ahead(sent)
        if ahead > 0:
            sleep(ahead)
