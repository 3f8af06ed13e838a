"""virtio-mem devices: their migrated state, wherever the stream keeps it, and the RAM
block each one manages.

The state comes from one of three places (docs/inspect.md):

* the early section ``<id>/virtio-mem-device-early`` (livemig; QEMU >= 8.0 with
  ``x-early-migration``), described field by field by the VMDESCRIPTION;
* livemig's ``<id>/virtio-mem`` section (usable and requested sizes);
* QEMU 7.2 (and newer QEMU without early migration): inside the generic VirtIO device
  state, which the VMDESCRIPTION describes as one opaque ``virtio`` field. The virtio-mem
  part is found in that blob by its layout, every value cross-checked
  (:func:`scan_virtio_blob`).

A device section whose state cannot be found is still listed, without a bitmap, so that
the discard check answers "could not check" rather than "passed".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from livemig.inspect.devices import VmsdDecoder
from livemig.inspect.report import SectionReport, StreamReport, VirtioMemReport
from livemig.memory.bitmap import Bitmap, words_for
from livemig.migration.stream.format import SectionType
from livemig.migration.stream.qemu_file import StreamError

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

# Names QEMU and livemig give to a machine's base RAM and firmware blobs: never the memory
# behind a virtio-mem device, which breaks ties when several blocks have the right size.
_NOT_VIRTIO_MEM = ("pc.ram", "ram", "mach-virt.ram", "pc.bios", "pc.rom", "vga.vram")

_SANITY_KEYS = ("addr", "region_size", "block_size", "node")


def _device_key(idstr: str) -> str:
    return idstr.rsplit("/", 1)[0] if "/" in idstr else idstr


def _bitmap_from_be(raw: bytes, nbits: int, off: int, where: str) -> Bitmap:
    want = words_for(nbits) * 8
    if len(raw) != want:
        raise StreamError(
            off, f"{where}: bitmap of {len(raw)} bytes, {want} expected for {nbits} blocks"
        )
    try:
        return Bitmap.from_be_words(nbits, raw)
    except ValueError as e:
        raise StreamError(off + max(want - 8, 0), f"{where}: {e}") from None


def _plausible_geometry(addr: int, region: int, block: int, node: int) -> bool:
    return (
        block >= 4096
        and block & (block - 1) == 0
        and region % block == 0
        and addr % block == 0
        and node < 1 << 16
    )


def scan_virtio_blob(
    blob: bytes, region_sizes: set[int]
) -> tuple[dict[str, Any], int | None] | None:
    """Find ``virtio-mem-device`` state inside QEMU's opaque VirtIO device state.

    Layout without early migration (QEMU 7.2): sanity struct (be64 addr, be64
    region_size, be64 block_size, be32 node), be64 usable_region_size, be64 size, be64
    requested_size, bitmap. With early migration the size and bitmap are not there.
    Returns the fields and the bitmap's offset in the blob (None if there is no bitmap).
    """
    found: tuple[dict[str, Any], int | None] | None = None
    for region in sorted(region_sizes):
        needle = _BE64.pack(region)
        pos = blob.find(needle, 8)
        while pos >= 0:
            s = pos - 8
            if s + 28 + 24 <= len(blob):
                addr, _, bsize = struct.unpack_from(">QQQ", blob, s)
                node = _BE32.unpack_from(blob, s + 24)[0]
                if _plausible_geometry(addr, region, bsize, node):
                    state = {
                        "addr": addr,
                        "region_size": region,
                        "block_size": bsize,
                        "node": node,
                    }
                    nbits = region // bsize
                    after = s + 28
                    usable, size, req = struct.unpack_from(">QQQ", blob, after)
                    bm_off = after + 24
                    bm_len = words_for(nbits) * 8
                    end = bm_off + bm_len
                    if (
                        all(v <= region and v % bsize == 0 for v in (usable, size, req))
                        and end <= len(blob)
                        and (end == len(blob) or blob[end] == SectionType.SUBSECTION)
                    ):
                        words = np.frombuffer(blob, ">u8", words_for(nbits), bm_off)
                        tail = nbits & 63
                        ok_tail = not tail or int(words[-1]) >> tail == 0
                        if (
                            ok_tail
                            and int(np.bitwise_count(words.astype(np.uint64)).sum()) * bsize == size
                        ):
                            state.update(usable_region_size=usable, size=size, requested_size=req)
                            state["bitmap_raw"] = bytes(blob[bm_off:end])
                            return state, bm_off
                    # early-migration layout: usable_region_size, requested_size only
                    usable, req = struct.unpack_from(">QQ", blob, after)
                    end = after + 16
                    if (
                        found is None
                        and all(v <= region and v % bsize == 0 for v in (usable, req))
                        and (end == len(blob) or blob[end] == SectionType.SUBSECTION)
                    ):
                        state.update(usable_region_size=usable, requested_size=req)
                        found = (state, None)
            pos = blob.find(needle, pos + 1)
    return found


@dataclass
class _Found:
    """virtio-mem state read from one section: fields, and the bitmap with its offset."""

    state: dict[str, int]
    source: str
    bitmap_raw: bytes | None = None
    bitmap_offset: int | None = None


class VirtioMemStates:
    """The virtio-mem devices met so far in a walk, keyed by device: the section idstr's
    device part (``vm0`` for livemig, the PCI path for QEMU), which the early and the
    late section share."""

    def __init__(self, report: StreamReport) -> None:
        self.report = report
        self.devices: dict[str, VirtioMemReport] = {}

    def section(
        self, idstr: str, sec: SectionReport, values: dict[str, Any], dec: VmsdDecoder
    ) -> None:
        """Take what a decoded device section says about a virtio-mem device, if anything."""
        vmsd = sec.vmsd_name or ""
        tmp = values.get("tmp")
        if (
            vmsd in ("virtio-mem-device-early", "virtio-mem-device")
            or idstr.endswith("/virtio-mem-device-early")
        ) and isinstance(tmp, dict):
            found = self._described(idstr, vmsd, tmp, values, dec)
            if found is None:
                return
        elif vmsd == "virtio-mem" or idstr.endswith("/virtio-mem"):
            found = self._in_virtio_blob(dec)
            if found is None:  # keep the device: a check must not pass without its bitmap
                dev = self._device(idstr)
                dev.warnings.append("no virtio-mem state found in the VirtIO device state")
                return
        else:
            return
        self._apply(self._device(idstr), idstr, found, sec.offset)

    def _described(
        self,
        idstr: str,
        vmsd: str,
        tmp: dict[str, Any],
        values: dict[str, Any],
        dec: VmsdDecoder,
    ) -> _Found | None:
        """The early section: the sanity struct (a ``tmp`` field), sizes and bitmap."""
        if not all(isinstance(tmp.get(k), int) for k in _SANITY_KEYS):
            self.report.warnings.append(f"{idstr}: sanity struct without the expected fields")
            return None
        found = _Found({k: tmp[k] for k in _SANITY_KEYS}, f"{vmsd or 'device'} section")
        for k in ("size", "usable_region_size", "requested_size"):
            if isinstance(values.get(k), int):
                found.state[k] = values[k]
        bm = values.get("bitmap")
        if isinstance(bm, bytes):
            found.bitmap_raw = bm
            found.bitmap_offset = dec.offsets.get("bitmap")
        return found

    def _in_virtio_blob(self, dec: VmsdDecoder) -> _Found | None:
        """QEMU 7.2: the state inside an opaque ``virtio`` field, located by its layout."""
        regions = {b.length for b in self.report.ram_blocks.values()}
        for off, blob in dec.virtio_blobs:
            hit = scan_virtio_blob(blob, regions)
            if hit is not None:
                state, rel = hit
                raw = state.pop("bitmap_raw", None)
                return _Found(
                    state,
                    "VirtIO device state (located by layout)",
                    raw,
                    None if rel is None else off + rel,
                )
        return None

    def _device(self, idstr: str) -> VirtioMemReport:
        key = _device_key(idstr)
        dev = self.devices.get(key)
        if dev is None:
            dev = self.devices[key] = VirtioMemReport(key)
        dev.sections.append(idstr)
        return dev

    @staticmethod
    def _apply(dev: VirtioMemReport, idstr: str, found: _Found, sec_offset: int) -> None:
        for k, v in found.state.items():
            old = getattr(dev, k)
            if old is not None and old != v and k in _SANITY_KEYS:
                dev.warnings.append(f"{idstr}: {k} 0x{v:x} differs from 0x{old:x} seen before")
            setattr(dev, k, v)
        if found.bitmap_raw is None:
            return
        assert dev.region_size is not None and dev.block_size is not None
        nbits = dev.region_size // dev.block_size
        where = found.bitmap_offset or sec_offset
        dev.bitmap = _bitmap_from_be(found.bitmap_raw, nbits, where, idstr)
        dev.bitmap_offset = found.bitmap_offset
        dev.source = found.source
        if dev.size is not None and dev.bitmap.count() * dev.block_size != dev.size:
            dev.warnings.append(
                f"plugged size 0x{dev.size:x} does not match the bitmap's "
                f"{dev.bitmap.count()} blocks of 0x{dev.block_size:x}"
            )

    def finish(self) -> None:
        """Hand the devices to the report, each with the RAM block it manages."""
        self.report.devices = list(self.devices.values())
        map_devices(self.report)


def _name_rules(dev_id: str, taken: set[str]) -> list[tuple[str, Any]]:
    """Tie-breakers between RAM blocks of the right length, strongest first."""

    def free_device_ram(n: str) -> bool:
        return (
            n not in taken
            and n not in _NOT_VIRTIO_MEM
            and not n.startswith(("/rom@", "ram-node"))
            and not n.endswith(".rom")
        )

    return [
        ("named <id>-memdev", lambda n: n == f"{dev_id}-memdev"),
        ("named <device path>/<backend id>", lambda n: n.startswith(dev_id + "/")),
        ("name contains the device id", lambda n: dev_id in n),
        ("not base RAM or firmware, not taken by another device", free_device_ram),
    ]


def map_devices(rep: StreamReport) -> None:
    """Choose the RAM block behind each virtio-mem device.

    The block's length must equal the device's region size. Among several, names decide:
    livemig calls it ``<id>-memdev``, QEMU ``<device path>/<backend id>`` (the device path
    is the part of the section idstr before the slash); base RAM and firmware names are
    ruled out; blocks taken by another device are skipped.
    """
    taken: set[str] = set()
    for dev in rep.devices:
        if dev.region_size is None:
            dev.mapping = "no region size in the stream"
            continue
        cands = [b for b in rep.ram_blocks.values() if b.length == dev.region_size]
        if not cands:
            dev.mapping = f"no RAM block of length 0x{dev.region_size:x}"
            continue
        if len(cands) == 1:
            dev.ram_block = cands[0].name
            dev.mapping = "the only RAM block of the region size"
        else:
            for why, rule in _name_rules(dev.id, taken):
                picked = [b for b in cands if rule(b.name)]
                if len(picked) == 1:
                    dev.ram_block = picked[0].name
                    dev.mapping = f"region size, and {why}"
                    break
            else:
                names = ", ".join(repr(b.name) for b in cands)
                dev.mapping = f"ambiguous: RAM blocks {names} all match the region size"
                continue
        taken.add(dev.ram_block)
