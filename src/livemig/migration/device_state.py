"""Device sections of a machine's migration stream.

* ``<id>/virtio-mem-device-early`` (VMSD ``virtio-mem-device-early``): sanity fields, plugged
  size and bitmap, sent during setup before any RAM page, so the destination knows what is
  plugged before memory arrives (postcopy faults on unplugged memory are answered locally;
  preallocation covers only plugged ranges).
* ``<id>/virtio-mem`` (VMSD ``virtio-mem-device``): sanity fields, usable region and requested
  size, sent at the end; loading it discards every unplugged range on the destination
  (reference 2.5 ``post_load``) unless postcopy is still bringing pages in.
* ``livemig-kvm-cpu`` (KVM machines only): the vCPU registers the guest program needs to
  resume where it stopped — general registers, rip, rflags, segment registers with their
  hidden parts, descriptor tables, control registers and EFER. Its fields are derived from
  the kernel's ``struct kvm_regs``/``kvm_segment``/``kvm_dtable`` (padding left out). The
  interrupt bitmap is not carried: the guest runs with interrupts off and none are wired.
* ``livemig-guest``: the guest's workload state (the soft workload's, or the KVM guest
  agent's pass and page counters), so the guest continues its write sequence on the
  destination.

The sanity checks run before the bitmap is read, so a mismatched region is reported as
the property that changed, not as a malformed bitmap.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livemig.accel.kvm import ioctls as kvm_abi
from livemig.accel.kvm.accel import CONTROL_REGS, DESCRIPTOR_TABLES, SEGMENT_REGS
from livemig.devices.virtio_mem import VirtioMem, VirtioMemError
from livemig.machine import Machine
from livemig.migration import vmstate
from livemig.migration.qemu_file import QEMUFileReader, StreamError
from livemig.migration.vmstate import Field, VMStateDescription

SANITY = VMStateDescription(
    "virtio-mem-device/sanity-checks",
    1,
    [Field.uint64("addr"), Field.uint64("region_size"), Field.uint64("block_size"), Field.uint32("node")],
)


def _early_desc(nbits: int) -> VMStateDescription:
    return VMStateDescription(
        "virtio-mem-device-early",
        1,
        [
            Field.struct_("tmp", SANITY, getter=lambda v: v),
            Field.uint64("size"),
            Field.bitmap("bitmap", nbits, limit=max(nbits, 1)),
        ],
    )


_EARLY_HEAD = VMStateDescription(
    "virtio-mem-device-early", 1, [Field.struct_("tmp", SANITY), Field.uint64("size")]
)
DEVICE_DESC = VMStateDescription(
    "virtio-mem-device",
    1,
    [
        Field.struct_("tmp", SANITY, getter=lambda v: v),
        Field.uint64("usable_region_size"),
        Field.uint64("requested_size"),
    ],
)
GUEST_DESC = VMStateDescription(
    "livemig-guest",
    1,
    [Field.uint64("counter"), Field.uint64("pages_written"), Field.uint32("vcpus")],
)


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


@dataclass
class DeviceSection:
    """One FULL section: identity, how to encode it, how to load it."""

    idstr: str
    instance_id: int
    version: int
    early: bool
    desc: VMStateDescription
    save: Callable[[], Any]
    load: Callable[[QEMUFileReader, int], None]
    section_id: int = 0
    _last: tuple[bytes, dict[str, Any]] | None = field(default=None, repr=False)

    def encode(self) -> bytes:
        self._last = vmstate.encode_with_vmdesc(self.desc, self.save())
        return self._last[0]

    def vmdesc(self) -> dict[str, Any]:
        js = self._last[1] if self._last else vmstate.encode_with_vmdesc(self.desc, self.save())[1]
        return {"name": self.idstr, "instance_id": self.instance_id, **js}


class VirtioMemLoader:
    """Destination side of the two virtio-mem sections."""

    def __init__(self, vmem: VirtioMem):
        self.vmem = vmem
        self.early: dict[str, Any] | None = None
        self.postcopy = False

    def _sanity(self, values: dict[str, Any]) -> dict[str, Any]:
        tmp = values["tmp"]
        return {k: tmp[k] for k in ("addr", "region_size", "block_size", "node")}

    def load_early(self, r: QEMUFileReader, version: int) -> None:
        at = r.tell()
        head = vmstate.decode(_EARLY_HEAD, r, version)
        vm = self.vmem
        state = self._sanity(head)
        try:
            vm.check_sanity(state)  # before the bitmap, whose length depends on it
        except VirtioMemError as e:
            raise StreamError(at, f"{vm.id}/virtio-mem-device-early: {e}") from e
        nbits = vm.bitmap.nbits
        bm = vmstate.decode(
            VMStateDescription(
                "virtio-mem-device-early", 1, [Field.bitmap("bitmap", nbits, limit=max(nbits, 1))]
            ),
            r,
            version,
        )["bitmap"]
        usable = max(vm.usable_region_size, _usable_cover(bm, vm.block_size))
        try:
            vm.load_state(
                {
                    **state,
                    "bitmap": bm,
                    "size": head["size"],
                    "requested_size": vm.requested_size,
                    "usable_region_size": min(usable, vm.region_size),
                },
                postcopy=True,  # pages have not arrived yet: nothing to discard now
            )
        except VirtioMemError as e:
            raise StreamError(at, f"{vm.id}/virtio-mem-device-early: {e}") from e
        self.early = {**state, "bitmap": bm, "size": head["size"]}

    def load_device(self, r: QEMUFileReader, version: int) -> None:
        at = r.tell()
        values = vmstate.decode(DEVICE_DESC, r, version)
        vm = self.vmem
        if self.early is None:
            raise StreamError(at, f"{vm.id}/virtio-mem: device state before its early section")
        state = {
            **self.early,
            **self._sanity(values),
            "usable_region_size": values["usable_region_size"],
            "requested_size": values["requested_size"],
        }
        try:
            vm.load_state(state, postcopy=self.postcopy)
        except VirtioMemError as e:
            raise StreamError(at, f"{vm.id}/virtio-mem: {e}") from e


def _usable_cover(bm: Any, block_size: int) -> int:
    """Smallest usable size that covers every plugged block."""
    idx = bm.indices()
    return (int(idx[-1]) + 1) * block_size if len(idx) else 0


def device_sections(machine: Machine) -> list[DeviceSection]:
    """The machine's device sections, in stream order (early ones first)."""
    out: list[DeviceSection] = []
    vmem = machine.vmem
    if vmem is not None:
        loader = VirtioMemLoader(vmem)
        out.append(
            DeviceSection(
                f"{vmem.id}/virtio-mem-device-early", 0, 1, True,
                _early_desc(vmem.bitmap.nbits), vmem.save_state, loader.load_early,
            )
        )
        out.append(
            DeviceSection(f"{vmem.id}/virtio-mem", 0, 1, False, DEVICE_DESC, vmem.save_state,
                          loader.load_device)
        )

    if machine.accel.name == "kvm":
        kvm = machine.accel

        def load_cpu(r: QEMUFileReader, version: int) -> None:
            at = r.tell()
            values = vmstate.decode(KVM_CPU_DESC, r, version)
            try:
                kvm.load_cpu_state(values)  # before the vCPU ever runs on this side
            except OSError as e:
                raise StreamError(at, f"livemig-kvm-cpu: KVM refused the vCPU state: {e}") from e

        out.append(
            DeviceSection(
                "livemig-kvm-cpu", 0, 1, False, KVM_CPU_DESC, kvm.save_cpu_state, load_cpu
            )
        )

    def save_guest() -> dict[str, int]:
        return {**machine.workload.state(), "vcpus": machine.config.workload.vcpus}

    def load_guest(r: QEMUFileReader, version: int) -> None:
        values = vmstate.decode(GUEST_DESC, r, version)
        machine.workload.counter = values["counter"]
        machine.workload.pages_written = values["pages_written"]

    out.append(DeviceSection("livemig-guest", 0, 1, False, GUEST_DESC, save_guest, load_guest))
    return out
