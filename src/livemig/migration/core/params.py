"""Migration capabilities and parameters, with QEMU's names.

Capabilities are booleans set with ``migrate-set-capabilities``; parameters are typed
values set with ``migrate-set-parameters``. Names livemig does not implement are still
known (so QEMU tooling gets a precise "not supported" error instead of "unknown").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from livemig.memory.userfaultfd import write_tracking_problem
from livemig.migration.channels import DEFAULT_TCP_USER_TIMEOUT_MS

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
SUPPORTED_CAPABILITIES = ("events", "return-path", "multifd", "zero-copy-send", "background-snapshot")
SUPPORTED_CAPABILITIES += ("postcopy-ram", "postcopy-blocktime", "postcopy-preempt")
SUPPORTED_CAPABILITIES += ("auto-converge", "dirty-limit", "pause-before-switchover")
SUPPORTED_CAPABILITIES += ("mapped-ram",)
STREAM_CAPABILITIES = ("x-ignore-shared", "mapped-ram")
"""Capabilities that change the stream format: the configuration section names the ones
that are on, and the destination must have the same ones on."""

# QEMU's MigMode values; livemig implements normal and cpr-transfer (migration/cpr/)
KNOWN_MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
SUPPORTED_MODES = ("normal", "cpr-transfer")


class MigrationConfigError(ValueError):
    """Bad capability or parameter; the message is what QMP reports."""


# QEMU's check_caps_background_snapshot (reference 5.2)
BACKGROUND_SNAPSHOT_INCOMPATIBLE = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "return-path",
    "multifd", "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all",
    "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
)


def check_background_snapshot(caps: dict[str, bool], write_tracking: Callable[[], str | None] | None) -> None:
    """``migrate_caps_check`` for background-snapshot: write tracking, then the other caps.

    One difference from QEMU: with ``mapped-ram``, ``multifd`` is allowed (it gives the
    snapshot writer ``multifd-channels`` threads writing the file, as for a mapped-ram
    ``file:`` migration).

    ``write_tracking`` returns QEMU's message if the kernel or the guest memory cannot be
    write-protected (None: probe the kernel only).
    """
    if write_tracking is None:
        problem = write_tracking_problem([])
    else:
        problem = write_tracking()
    if problem:
        raise MigrationConfigError(problem)
    for name in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
        if name == "multifd" and caps.get("mapped-ram"):
            continue  # livemig: the writer's file channels (multifd-channels threads)
        if caps.get(name):
            raise MigrationConfigError(f"Background-snapshot is not compatible with {name}")


@dataclass
class Capabilities:
    enabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KNOWN_CAPABILITIES, False))
    # the machine's write-tracking probe (snapshot.write_tracking_problem over its blocks)
    write_tracking: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)

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
        if staged["postcopy-preempt"] and not staged["postcopy-ram"]:
            raise MigrationConfigError("Postcopy preempt requires postcopy-ram")
        if staged["postcopy-ram"] and staged["multifd"]:
            raise MigrationConfigError("postcopy-ram together with multifd is not supported by livemig")
        if staged["background-snapshot"]:
            check_background_snapshot(staged, self.write_tracking)
        if staged["dirty-limit"] and staged["auto-converge"]:  # QEMU's words, typo included
            raise MigrationConfigError(
                "dirty-limit conflicts with auto-converge either of then available currently"
            )
        if staged["mapped-ram"] and staged["xbzrle"]:
            raise MigrationConfigError("Mapped-ram migration is incompatible with xbzrle")
        self.enabled = staged

    def query(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.enabled.items()]


@dataclass
class Parameters:
    max_bandwidth: int = 0  # bytes/s; 0 = unlimited (QEMU's default is 128 MiB/s)
    downtime_limit: int = 300  # ms
    x_clear_bitmap_shift: int = 18
    multifd_channels: int = 2  # extra connections for RAM pages when multifd is on
    tls_creds: str = ""  # directory in QEMU's x509 layout; "" = no TLS (migration.transport.tls)
    tls_hostname: str = ""  # name the destination's certificate must match; "" = URI host
    tls_authz: str = ""  # comma-separated client certificate names accepted; "" = any
    x_file_overwrite: bool = False  # a file: target may replace an existing regular file
    max_postcopy_bandwidth: int = 0  # bytes/s of the background push in postcopy; 0 = unlimited
    # convergence (migration.throttle), QEMU's defaults
    throttle_trigger_threshold: int = 50  # % of the bytes sent that dirtying may reach
    cpu_throttle_initial: int = 20  # % auto-converge starts at
    cpu_throttle_increment: int = 10  # % added at each further trigger
    cpu_throttle_tailslow: bool = False  # smaller steps near the end
    max_cpu_throttle: int = 99
    x_vcpu_dirty_limit_period: int = 1000  # ms between dirty-limit adjustments
    vcpu_dirty_limit: int = 1  # MB/s per vCPU under dirty-limit
    avail_switchover_bandwidth: int = 0  # bytes/s the switchover may use; 0 = as measured
    mode: str = "normal"  # QEMU's MigMode: normal or cpr-transfer (migration/cpr/)
    direct_io: bool = False  # O_DIRECT for the page data of mapped-ram files
    # ms a TCP migration connection may stay silent before it counts as dead (keepalive
    # and TCP_USER_TIMEOUT on every socket, channels.Liveness); 0 = the kernel's defaults
    x_tcp_user_timeout: int = DEFAULT_TCP_USER_TIMEOUT_MS

    _OTHER_FIELDS: ClassVar[dict[str, tuple[str, type]]] = {
        "tls-creds": ("tls_creds", str),
        "tls-hostname": ("tls_hostname", str),
        "tls-authz": ("tls_authz", str),
        "x-file-overwrite": ("x_file_overwrite", bool),
        "mode": ("mode", str),
        "direct-io": ("direct_io", bool),
    }

    _FIELDS: ClassVar[dict[str, tuple[str, int, int]]] = {
        "max-bandwidth": ("max_bandwidth", 0, 1 << 62),
        "downtime-limit": ("downtime_limit", 0, 2_000_000),
        "x-clear-bitmap-shift": ("x_clear_bitmap_shift", 6, 31),
        "multifd-channels": ("multifd_channels", 1, 255),
        "max-postcopy-bandwidth": ("max_postcopy_bandwidth", 0, 1 << 62),
        "x-tcp-user-timeout": ("x_tcp_user_timeout", 0, 3_600_000),
    }

    # QEMU's QAPI types of the convergence parameters (range checks: check_convergence)
    _QAPI_FIELDS: ClassVar[dict[str, tuple[str, str]]] = {
        "throttle-trigger-threshold": ("throttle_trigger_threshold", "uint8"),
        "cpu-throttle-initial": ("cpu_throttle_initial", "uint8"),
        "cpu-throttle-increment": ("cpu_throttle_increment", "uint8"),
        "cpu-throttle-tailslow": ("cpu_throttle_tailslow", "bool"),
        "max-cpu-throttle": ("max_cpu_throttle", "uint8"),
        "x-vcpu-dirty-limit-period": ("x_vcpu_dirty_limit_period", "uint64"),
        "vcpu-dirty-limit": ("vcpu_dirty_limit", "uint64"),
        "avail-switchover-bandwidth": ("avail_switchover_bandwidth", "uint64"),
    }

    def set(self, changes: dict[str, Any]) -> None:
        """Validate every change, then QEMU's checks on the result, then apply all."""
        staged: dict[str, Any] = {}
        for key, value in changes.items():
            if key in self._QAPI_FIELDS:
                attr, kind = self._QAPI_FIELDS[key]
                staged[attr] = qapi_value(key, kind, value)
                continue
            if key in self._OTHER_FIELDS:
                attr, kind = self._OTHER_FIELDS[key]
                if type(value) is not kind:
                    expected = "string" if kind is str else "boolean"
                    raise MigrationConfigError(f"Invalid parameter type for '{key}', expected: {expected}")
                if key == "tls-creds" and value and not os.path.isdir(value):
                    raise MigrationConfigError(f"Parameter 'tls-creds': {value} is not a directory")
                if key == "mode" and value not in KNOWN_MODES:
                    raise MigrationConfigError(f"Parameter 'mode' does not accept value '{value}'")
                if key == "mode" and value not in SUPPORTED_MODES:
                    raise MigrationConfigError(f"Migration mode '{value}' is not supported by livemig")
                staged[attr] = value
                continue
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
        check_convergence({**{a: getattr(self, a) for a, _ in self._QAPI_FIELDS.values()}, **staged})
        for attr, value in staged.items():
            setattr(self, attr, value)

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, attr) for key, (attr, _, _) in self._FIELDS.items()}
        out.update({key: getattr(self, attr) for key, (attr, _) in self._OTHER_FIELDS.items()})
        out.update({key: getattr(self, attr) for key, (attr, _) in self._QAPI_FIELDS.items()})
        return out


_UINT_MAX = {"uint8": 0xFF, "uint64": (1 << 64) - 1}


def qapi_value(key: str, kind: str, value: Any) -> Any:
    """A parameter as QEMU's QMP input visitor takes it: a JSON boolean for ``bool``;
    for unsigned types an integer, negative ones wrapped to 64 bits as QEMU does, then
    checked against the type's maximum."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise MigrationConfigError(f"Invalid parameter type for '{key}', expected: boolean")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise MigrationConfigError(f"Invalid parameter type for '{key}', expected: uint64")
    value &= _UINT_MAX["uint64"]
    if value > _UINT_MAX[kind]:
        raise MigrationConfigError(f"Parameter '{key}' expects {kind}_t")
    return value


def check_convergence(p: dict[str, Any]) -> None:
    """QEMU's ``migrate_params_check`` for the convergence parameters, in its order and
    words, on the values as they would be after the change."""
    def bad(name: str, what: str) -> MigrationConfigError:
        return MigrationConfigError(f"Parameter '{name}' expects {what}")

    if not 1 <= p["throttle_trigger_threshold"] <= 100:
        raise bad("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu_throttle_initial"] <= 99:
        raise bad("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu_throttle_increment"] <= 99:
        raise bad("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if not p["cpu_throttle_initial"] <= p["max_cpu_throttle"] <= 99:
        raise bad("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if not 1 <= p["x_vcpu_dirty_limit_period"] <= 1000:
        raise bad("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if p["vcpu_dirty_limit"] < 1:
        raise MigrationConfigError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")
