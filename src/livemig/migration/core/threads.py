"""Stopping a migration's threads for good.

A migration's helper threads (channel senders and receivers, prefault and populate
threads, the return-path reader) are always woken before they are joined — their
sockets are shut down, their condition variables notified — so a join ends. It is never
given up: a thread left running after its migration ended could read guest memory the
guest has unplugged since (the migration's RamDiscardManager hold is released after the
joins). A join that takes long is reported, repeatedly, so a stuck thread is visible
instead of silently abandoned.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

WARN_AFTER = 10.0


def join_for_good(thread: threading.Thread | None, warn_after: float = WARN_AFTER) -> None:
    """Join ``thread`` (woken already by the caller), however long it takes."""
    if thread is None or thread is threading.current_thread():
        return
    waited = 0.0
    while thread.is_alive():
        thread.join(warn_after)
        if thread.is_alive():
            waited += warn_after
            log.error("thread %s has not stopped after %.0f s; still waiting", thread.name, waited)
