"""A deadline for a blocking step: if the step is not over in time, its I/O is cut.

Sockets that block without a limit are how a silent or hostile peer holds a migration
forever (a destination waiting for a header that never comes, a source waiting to finish
a switchover while the destination is frozen). Per-read timeouts do not help against a
peer that sends one byte now and then; a deadline over the whole step does.
:class:`Deadline` runs ``expire`` (which shuts the step's sockets down, so every blocked
read or write returns) unless :meth:`Deadline.disarm` comes first. Its timer thread is
joined when it is disarmed or has fired.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from livemig.migration.core.threads import join_for_good

log = logging.getLogger(__name__)


class Deadline:
    def __init__(self, seconds: float, expire: Callable[[], None], what: str):
        self.seconds = seconds
        self.what = what
        self.expired = False
        self._expire = expire
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.name = "migration-deadline"
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def _fire(self) -> None:
        self.expired = True
        log.warning("%s: no progress within %.0f s; giving up", self.what, self.seconds)
        self._expire()

    def disarm(self) -> None:
        self._timer.cancel()
        join_for_good(self._timer)

    def message(self) -> str:
        return f"{self.what} did not finish within {self.seconds:g} s"
