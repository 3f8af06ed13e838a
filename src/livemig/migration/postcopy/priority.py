"""Scheduling of the urgent page path: its nice value and the fault handler's CPU.

The fault handler (destination) and the urgent-page thread (source) compete for two CPUs
with the bulk push and the guest; a higher priority took the p99 of a request from about
0.5 to 0.35 ms with a throttled push and from 3-5 to about 2.2 ms with an unthrottled one
(docs/postcopy.md). Both are environment settings, read when a migration needs them.
"""

from __future__ import annotations

import os


def handler_cpu() -> int:
    """CPU to pin the fault handler to (``LIVEMIG_POSTCOPY_HANDLER_CPU``; -1 = not pinned)."""
    try:
        return int(os.environ.get("LIVEMIG_POSTCOPY_HANDLER_CPU", "-1"))
    except ValueError:
        return -1


def urgent_nice() -> int:
    """Nice value of the urgent page path (``LIVEMIG_POSTCOPY_NICE``, default -10).

    Needs CAP_SYS_NICE; without it the value is silently not applied.
    """
    try:
        return int(os.environ.get("LIVEMIG_POSTCOPY_NICE", "-10"))
    except ValueError:
        return 0


def urgent_priority(tid: int) -> None:
    """Give thread ``tid`` (of this process) the urgent path's priority, if allowed."""
    nice = urgent_nice()
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass
