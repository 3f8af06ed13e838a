"""QEMU's rate limit on events a guest can trigger at will.

QEMU's monitor (``monitor_qapi_event_conf`` in ``monitor/monitor.c``) throttles a few
events to one per second for each instance: the first is sent at once and starts a
one-second period; events arriving during the period are not sent, only the latest of
them is kept, and it is sent when the period ends (which starts another period). A
guest that plugs and unplugs in a loop thus produces at most one
``MEMORY_DEVICE_SIZE_CHANGE`` per second per device, and the last one always reports
the final size. Instances are told apart by one member of the event's data
(``qom-path`` for ``MEMORY_DEVICE_SIZE_CHANGE``). An event keeps the timestamp of when
it happened, not of when it was sent, as in QEMU.

Throttling happens where QEMU does it, at emission for all clients together: a client
connecting mid-period does not see more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

#: event name -> (period in seconds, data member that tells instances apart or None)
QEMU_THROTTLED_EVENTS: Mapping[str, tuple[float, str | None]] = {
    "RTC_CHANGE": (1.0, None),
    "WATCHDOG": (1.0, None),
    "BALLOON_CHANGE": (1.0, None),
    "QUORUM_REPORT_BAD": (1.0, "node-name"),
    "QUORUM_FAILURE": (1.0, None),
    "VSERPORT_CHANGE": (1.0, "id"),
    "MEMORY_DEVICE_SIZE_CHANGE": (1.0, "qom-path"),
}


class EventThrottle:
    """Delivers events through ``send``, holding back throttled ones.

    Runs on the server's event loop thread only, so it needs no lock: ``offer`` is
    called there (``emit()`` hands events over with ``call_soon_threadsafe``) and the
    end of a period is a ``call_later`` on the same loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[str], None],
        rates: Mapping[str, tuple[float, str | None]] = QEMU_THROTTLED_EVENTS,
    ) -> None:
        self._loop = loop
        self._send = send
        self._rates = dict(rates)
        # (event, instance) -> the latest held-back message, or None when a period runs
        # with nothing held back. A key is present exactly while its period runs.
        self._periods: dict[tuple[str, str], str | None] = {}

    def offer(self, event: str, data: dict[str, Any] | None, text: str) -> None:
        conf = self._rates.get(event)
        if conf is None:
            self._send(text)
            return
        period, member = conf
        instance = "" if member is None or data is None else str(data.get(member, ""))
        key = (event, instance)
        if key in self._periods:
            self._periods[key] = text  # the latest replaces any earlier one held back
            return
        self._send(text)
        self._periods[key] = None
        self._loop.call_later(period, self._period_ended, key, period)

    def _period_ended(self, key: tuple[str, str], period: float) -> None:
        text = self._periods.get(key)
        if text is None:
            self._periods.pop(key, None)
            return
        self._send(text)
        self._periods[key] = None
        self._loop.call_later(period, self._period_ended, key, period)

    @property
    def held_back(self) -> int:
        """Events waiting for their period to end."""
        return sum(1 for text in self._periods.values() if text is not None)
