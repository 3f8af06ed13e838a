"""Migration capabilities and parameters, with QEMU's names.

Capabilities are booleans set with ``migrate-set-capabilities``; parameters are typed
values set with ``migrate-set-parameters``. Names livemig does not implement are still
known (so QEMU tooling gets a precise "not supported" error instead of "unknown").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# All of QEMU's capability names (reference 5.3); the supported subset is below.
KNOWN_CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)
SUPPORTED_CAPABILITIES = ("events", "return-path")


class MigrationConfigError(ValueError):
    """Bad capability or parameter; the message is what QMP reports."""


@dataclass
class Capabilities:
    enabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KNOWN_CAPABILITIES, False))

    def __getitem__(self, name: str) -> bool:
        return self.enabled[name]

    def set(self, changes: list[dict[str, Any]]) -> None:
        """Validate every entry first, then apply all: a bad list changes nothing."""
        staged = dict(self.enabled)
        for item in changes:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise MigrationConfigError(
                    "Invalid parameter type for 'capabilities', expected: list of {capability, state}"
                )
            name, state = item["capability"], item["state"]
            if name not in KNOWN_CAPABILITIES:
                raise MigrationConfigError(
                    f"Parameter 'capability' does not accept value '{name}'"
                )
            if not isinstance(state, bool):
                raise MigrationConfigError("Invalid parameter type for 'state', expected: boolean")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise MigrationConfigError(f"Migration capability '{name}' is not supported by livemig")
            staged[name] = state
        self.enabled = staged

    def query(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.enabled.items()]


@dataclass
class Parameters:
    max_bandwidth: int = 0  # bytes/s; 0 = unlimited (QEMU's default is 128 MiB/s)
    downtime_limit: int = 300  # ms
    x_clear_bitmap_shift: int = 18

    _FIELDS: ClassVar[dict[str, tuple[str, int, int]]] = {
        "max-bandwidth": ("max_bandwidth", 0, 1 << 62),
        "downtime-limit": ("downtime_limit", 0, 2_000_000),
        "x-clear-bitmap-shift": ("x_clear_bitmap_shift", 6, 31),
    }

    def set(self, changes: dict[str, Any]) -> None:
        staged: dict[str, int] = {}
        for key, value in changes.items():
            if key not in self._FIELDS:
                raise MigrationConfigError(f"Parameter '{key}' is unexpected")
            attr, lo, hi = self._FIELDS[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise MigrationConfigError(f"Invalid parameter type for '{key}', expected: integer")
            if not lo <= value <= hi:
                raise MigrationConfigError(
                    f"Parameter '{key}' expects a value between {lo} and {hi}"
                )
            staged[attr] = value
        for attr, value in staged.items():
            setattr(self, attr, value)

    def query(self) -> dict[str, int]:
        return {key: getattr(self, attr) for key, (attr, _, _) in self._FIELDS.items()}
