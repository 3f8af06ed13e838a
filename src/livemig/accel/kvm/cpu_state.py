"""The vCPU state a KVM guest needs to resume elsewhere: section ``livemig-kvm-cpu``.

General registers, rip, rflags, segment registers with their hidden parts, descriptor
tables, control registers and EFER. The fields are derived from the kernel's
``struct kvm_regs``/``kvm_segment``/``kvm_dtable`` (padding left out), so the description
cannot drift from the ABI. The interrupt bitmap is not carried: the guest program runs
with interrupts off and none are wired.

Registered by :meth:`~livemig.accel.kvm.accel.KvmAccel.register_state`; the migration
layer only sees a :class:`~livemig.devices.state.StateSection`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any, Protocol

from livemig.accel.kvm import ioctls as kvm_abi
from livemig.devices.state import StateSection
from livemig.devices.vmstate import Field, VMStateDescription

SEGMENT_REGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
DESCRIPTOR_TABLES = ("gdt", "idt")
CONTROL_REGS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

_ABI_KINDS = {
    ctypes.c_uint8: Field.uint8,
    ctypes.c_uint16: Field.uint16,
    ctypes.c_uint32: Field.uint32,
    ctypes.c_uint64: Field.uint64,
}


def _abi_fields(struct: type[ctypes.Structure]) -> list[Field]:
    """One field per member of a kernel ABI structure, padding left out."""
    return [
        _ABI_KINDS[ctype](name)
        for name, ctype in struct._fields_  # type: ignore[misc]
        if not name.startswith("padding")
    ]


KVM_SEGMENT_DESC = VMStateDescription("livemig-kvm-segment", 1, _abi_fields(kvm_abi.kvm_segment))
KVM_DTABLE_DESC = VMStateDescription("livemig-kvm-dtable", 1, _abi_fields(kvm_abi.kvm_dtable))
KVM_CPU_DESC = VMStateDescription(
    "livemig-kvm-cpu",
    1,
    [
        *_abi_fields(kvm_abi.kvm_regs),
        *(Field.struct_(name, KVM_SEGMENT_DESC) for name in SEGMENT_REGS),
        *(Field.struct_(name, KVM_DTABLE_DESC) for name in DESCRIPTOR_TABLES),
        *(Field.uint64(name) for name in CONTROL_REGS),
    ],
)


class CpuStateOwner(Protocol):
    """What owns the vCPU state (``KvmAccel``): it saves and loads with the vCPU stopped."""

    def save_cpu_state(self) -> dict[str, Any]: ...
    def load_cpu_state(self, state: Mapping[str, Any]) -> None: ...


def cpu_state_section(kvm: CpuStateOwner) -> StateSection:
    """The section of ``kvm``'s vCPU: saved and loaded with the vCPU stopped."""

    def apply(values: dict[str, Any]) -> None:
        kvm.load_cpu_state(values)  # before the vCPU ever runs on this side

    return StateSection.simple("livemig-kvm-cpu", KVM_CPU_DESC, kvm.save_cpu_state, apply)
