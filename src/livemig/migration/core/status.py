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

PRE_SWITCHOVER = "pre-switchover"

# Which status may follow which (QEMU's MigrationStatus life cycle, both directions).
# Final statuses are reached only through MigrationJob's end, after clean-up.
_RUNNING_SOURCE = (SETUP, ACTIVE, PRE_SWITCHOVER, DEVICE, POSTCOPY_DEVICE, POSTCOPY_ACTIVE,
                   POSTCOPY_PAUSED, POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER)
TRANSITIONS: dict[str, frozenset[str]] = {
    NONE: frozenset({SETUP}),
    SETUP: frozenset({ACTIVE, POSTCOPY_ACTIVE}),
    ACTIVE: frozenset({PRE_SWITCHOVER, DEVICE, POSTCOPY_DEVICE, POSTCOPY_ACTIVE}),
    PRE_SWITCHOVER: frozenset({DEVICE, POSTCOPY_DEVICE}),  # pause-before-switchover
    DEVICE: frozenset(),
    POSTCOPY_DEVICE: frozenset({POSTCOPY_ACTIVE}),
    POSTCOPY_ACTIVE: frozenset({POSTCOPY_PAUSED}),
    POSTCOPY_PAUSED: frozenset({POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER}),
    POSTCOPY_RECOVER_SETUP: frozenset({POSTCOPY_RECOVER, POSTCOPY_PAUSED}),
    POSTCOPY_RECOVER: frozenset({POSTCOPY_ACTIVE, POSTCOPY_PAUSED}),
    CANCELLING: frozenset(),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
for _s in _RUNNING_SOURCE:
    TRANSITIONS[_s] = TRANSITIONS[_s] | {CANCELLING}
