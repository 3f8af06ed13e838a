"""virtio-mem's migration state: what the device saves, checks and loads, and its sections.

Two sections, registered by the device itself (:meth:`VirtioMemState.register_state`):

* ``<id>/virtio-mem-device-early`` (VMSD ``virtio-mem-device-early``): sanity fields,
  plugged size and bitmap, sent during set-up before any RAM page, so the destination
  knows what is plugged before memory arrives (postcopy faults on unplugged memory are
  answered locally; preallocation covers only plugged ranges);
* ``<id>/virtio-mem`` (VMSD ``virtio-mem-device``): sanity fields, usable region and
  requested size, sent at the end; loading it discards every unplugged range on the
  destination (reference 2.5 ``post_load``) unless postcopy is still bringing pages in.

The sanity checks run before the bitmap is read, so a mismatched region is reported as
the property that changed, not as a malformed bitmap.
"""

from __future__ import annotations

from typing import Any

from livemig.devices import vmstate
from livemig.devices.state import DecodeError, LoadContext, StateRegistry, StateSection
from livemig.devices.virtio_mem_abi import VirtioMemError
from livemig.devices.vmstate import Field, StateReader, VMStateDescription
from livemig.memory.bitmap import Bitmap


class VirtioMemState:
    """The migration half of :class:`~livemig.devices.virtio_mem.VirtioMem` (a mixin)."""

    def save_state(self) -> dict[str, Any]:
        """Device state for the stream: sanity fields, sizes and a copy of the bitmap."""
        with self._lock:
            return {
                "addr": self.addr,
                "region_size": self.region_size,
                "block_size": self.block_size,
                "node": self.node,
                "usable_region_size": self.usable_region_size,
                "size": self.size,
                "requested_size": self.requested_size,
                "bitmap": self.bitmap.copy(),
            }

    def check_sanity(self, state: dict[str, Any]) -> None:
        """Raise VirtioMemError naming the first geometry property that differs.

        The guest saw these values and they cannot change under it; they are checked before
        anything else of an incoming state is trusted (the bitmap's length depends on them).
        """
        addr = int(state["addr"])
        if addr != self.addr:
            raise VirtioMemError(
                f"Property 'memaddr' changed from 0x{addr:x} to 0x{self.addr:x}"
            )
        region_size = int(state["region_size"])
        if region_size != self.region_size:
            raise VirtioMemError(
                f"Property 'memdev' size changed from 0x{region_size:x} to "
                f"0x{self.region_size:x}"
            )
        block_size = int(state["block_size"])
        if block_size != self.block_size:
            raise VirtioMemError(
                f"Property 'block-size' changed from 0x{block_size:x} to 0x{self.block_size:x}"
            )
        node = int(state["node"])
        if node != self.node:
            raise VirtioMemError(f"Property 'node' changed from {node} to {self.node}")

    def load_state(
        self, state: dict[str, Any], *, postcopy: bool = False, ram_ignored: bool = False
    ) -> None:
        """Take over the source's state (reference 2.5 and 7.5).

        The sanity fields must match because the guest saw them and they cannot change.
        Plugged ranges are replayed to listeners (they map them). Outside postcopy, every
        unplugged run is discarded on the host so that nothing populated on the
        destination in unplugged ranges survives; in postcopy the pages are not here yet
        and faults on unplugged ranges are answered locally. ``ram_ignored`` is RAM that
        is shared with the source and not migrated (x-ignore-shared): it is not touched.
        ``bitmap`` may be a ``Bitmap`` or the wire format (big-endian u64 words).
        """
        with self._lock:
            self.check_sanity(state)
            nbits = self.bitmap.nbits
            raw = state["bitmap"]
            if isinstance(raw, Bitmap):
                if raw.nbits != nbits:
                    raise VirtioMemError(
                        f"virtio-mem bitmap has {raw.nbits} bits, expected {nbits}"
                    )
                bitmap = raw.copy()
            else:
                data = bytes(raw)
                if len(data) != self.bitmap.words.size * 8:
                    raise VirtioMemError(
                        f"virtio-mem bitmap has {len(data)} bytes, expected "
                        f"{self.bitmap.words.size * 8}"
                    )
                try:
                    bitmap = Bitmap.from_be_words(nbits, data)
                except ValueError as e:
                    raise VirtioMemError(f"virtio-mem bitmap: {e}") from e
            size = int(state["size"])
            requested = int(state["requested_size"])
            usable = int(state["usable_region_size"])
            bs = self.block_size
            if size != bitmap.count() * bs:
                raise VirtioMemError(
                    f"virtio-mem plugged size 0x{size:x} does not match the bitmap "
                    f"(0x{bitmap.count() * bs:x})"
                )
            for name, value in (("requested-size", requested), ("usable size", usable)):
                if value < 0 or value % bs or value > self.region_size:
                    raise VirtioMemError(f"virtio-mem {name} 0x{value:x} is invalid")

            self.bitmap = bitmap
            self.size = size
            self.requested_size = requested
            self.usable_region_size = usable

            block = self.mr.block
            if self.prealloc and not ram_ignored:
                # fail now rather than at a guest access when memory runs out
                for off, length in zip(*self.populated_runs(self.mr.whole()), strict=True):
                    try:
                        block.populate(off, length, write=True)
                    except OSError as e:
                        raise VirtioMemError(f"virtio-mem preallocation failed: {e}") from e
                if postcopy:
                    block.discard_range(0, block.used_length)
            for lst in self._listeners:
                assert lst.section is not None
                ret = self._replay(lst.section, True, lst.notify_populate)
                if ret:
                    raise VirtioMemError(
                        f"virtio-mem: a listener refused plugged memory while loading ({ret})"
                    )
            if ram_ignored or postcopy:
                return
            for off, length in zip(*self.discarded_runs(self.mr.whole()), strict=True):
                try:
                    block.discard_range(off, length)
                except (OSError, ValueError) as e:
                    raise VirtioMemError(f"virtio-mem: discarding unplugged memory: {e}") from e

    def register_state(self, registry: StateRegistry) -> None:
        """Register the device's two sections (early first) with the machine."""
        loader = _Loader(self)
        registry.register(
            StateSection(
                f"{self.id}/virtio-mem-device-early", _early_desc(self.bitmap.nbits),
                self.save_state, loader.load_early, early=True,
            )
        )
        registry.register(
            StateSection(f"{self.id}/virtio-mem", DEVICE_DESC, self.save_state, loader.load_device)
        )


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


class _Loader:
    """Destination side of the two virtio-mem sections."""

    def __init__(self, vmem: Any):  # a VirtioMem
        self.vmem = vmem
        self.early: dict[str, Any] | None = None

    def _sanity(self, values: dict[str, Any]) -> dict[str, Any]:
        tmp = values["tmp"]
        return {k: tmp[k] for k in ("addr", "region_size", "block_size", "node")}

    def load_early(self, r: StateReader, version: int, ctx: LoadContext) -> None:
        at = r.tell()
        head = vmstate.decode(_EARLY_HEAD, r, version)
        vm = self.vmem
        state = self._sanity(head)
        try:
            vm.check_sanity(state)  # before the bitmap, whose length depends on it
        except VirtioMemError as e:
            raise DecodeError(at, f"{vm.id}/virtio-mem-device-early: {e}") from e
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
            raise DecodeError(at, f"{vm.id}/virtio-mem-device-early: {e}") from e
        self.early = {**state, "bitmap": bm, "size": head["size"]}

    def load_device(self, r: StateReader, version: int, ctx: LoadContext) -> None:
        at = r.tell()
        values = vmstate.decode(DEVICE_DESC, r, version)
        vm = self.vmem
        if self.early is None:
            raise DecodeError(at, f"{vm.id}/virtio-mem: device state before its early section")
        state = {
            **self.early,
            **self._sanity(values),
            "usable_region_size": values["usable_region_size"],
            "requested_size": values["requested_size"],
        }
        if not ctx.postcopy:
            # what the load put into unplugged memory, measured before post_load discards
            # it: a destination must never populate there (reference 3.8)
            offs, sizes = vm.run_arrays(vm.mr.whole(), False)
            ctx.report("unplugged-bytes-populated", vm.mr.block.allocated_in_runs(offs, sizes))
        try:
            vm.load_state(state, postcopy=ctx.postcopy, ram_ignored=ctx.ram_ignored)
        except VirtioMemError as e:
            raise DecodeError(at, f"{vm.id}/virtio-mem: {e}") from e


def _usable_cover(bm: Any, block_size: int) -> int:
    """Smallest usable size that covers every plugged block."""
    idx = bm.indices()
    return (int(idx[-1]) + 1) * block_size if len(idx) else 0
