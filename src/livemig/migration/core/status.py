"""Migration status values (QEMU's MigrationStatus) and the shared event hook type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NONE = "none"
SETUP = "setup"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
ACTIVE = "active"
POSTCOPY_ACTIVE = "postcopy-active"
POSTCOPY_PAUSED = "postcopy-paused"
POSTCOPY_DEVICE = "postcopy-device"
POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
POSTCOPY_RECOVER = "postcopy-recover"
POSTCOPY = frozenset(
    {POSTCOPY_DEVICE, POSTCOPY_ACTIVE, POSTCOPY_PAUSED, POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER}
)
DEVICE = "device"
COMPLETED = "completed"
FAILED = "failed"

FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})

EventFn = Callable[[str, dict[str, Any]], None]
"""``emit(event_name, data)``: the control layer turns these into QMP events."""


def no_events(name: str, data: dict[str, Any]) -> None:
    """Default event sink for code paths used without a control layer (tests, CLI)."""
