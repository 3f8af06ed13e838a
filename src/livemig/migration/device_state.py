"""Device sections of a machine's migration stream.

* ``<id>/virtio-mem-device-early`` (VMSD ``virtio-mem-device-early``): sanity fields, plugged
  size and bitmap, sent during setup before any RAM page, so the destination knows what is
  plugged before memory arrives (postcopy faults on unplugged memory are answered locally;
  preallocation covers only plugged ranges).
* ``<id>/virtio-mem`` (VMSD ``virtio-mem-device``): sanity fields, usable region and requested
  size, sent at the end; loading it discards every unplugged range on the destination
  (reference 2.5 ``post_load``) unless postcopy is still bringing pages in.
* ``livemig-guest``: the software guest's workload state, so the guest continues its
  write sequence on the destination.

The sanity checks run before the bitmap is read, so a mismatched region is reported as
the property that changed, not as a malformed bitmap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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

    def save_guest() -> dict[str, int]:
        return {**machine.workload.state(), "vcpus": machine.config.workload.vcpus}

    def load_guest(r: QEMUFileReader, version: int) -> None:
        values = vmstate.decode(GUEST_DESC, r, version)
        machine.workload.counter = values["counter"]
        machine.workload.pages_written = values["pages_written"]

    out.append(DeviceSection("livemig-guest", 0, 1, False, GUEST_DESC, save_guest, load_guest))
    return out
