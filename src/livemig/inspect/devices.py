"""Device sections decoded field by field, as their VMDESCRIPTION entry describes them.

A FULL section carries no length, so its payload can only be walked with the sizes the
trailer gives: every field is read by that size, and the position in the stream stays
exact even for types this reader does not interpret (``virtio``, ``pci config``,
``timer``...: kept as raw bytes). The raw ``virtio`` blobs are remembered with their
offsets, because QEMU 7.2 hides the virtio-mem state in one
(:mod:`livemig.inspect.virtio_mem` finds it there).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from livemig.inspect.report import Skipped
from livemig.migration.stream.format import SectionType
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

MAX_KEPT_RAW = 16 << 20
"""Raw field bytes above this are skipped, not kept (no device state is that large)."""

MAX_VMDESC_DEPTH = 64
"""Deepest struct nesting accepted in a VMDESCRIPTION (QEMU's are a handful deep)."""

_INT_TYPES = {8: "b", 16: "h", 32: "i", 64: "q"}


def int_format(type_name: str, size: int) -> str | None:
    """struct format for vmdesc integer types: ``uint32``, ``int32 equal``, ``int32 le``...

    The words after the type name are the load-time check QEMU applies (``equal``,
    ``le`` = less or equal), not the byte order: every integer is big-endian on the wire.
    """
    words = type_name.split()
    if not words:
        return None
    base = words[0]
    if base == "bool":
        return "?" if size == 1 else None
    signed = not base.startswith("u")
    digits = base.removeprefix("u").removeprefix("int")
    if not base.removeprefix("u").startswith("int") or not digits.isdigit():
        return None
    bits = int(digits)
    if bits not in _INT_TYPES or bits // 8 != size:
        return None
    code = _INT_TYPES[bits]
    return ">" + (code if signed else code.upper())


class DescError(Exception):
    """The VMDESCRIPTION itself is malformed where a field is described."""


class VmsdDecoder:
    """Reads a section's payload as its VMDESCRIPTION entry describes it.

    Every field is read by the size the description gives, so the position in the stream
    stays exact even for types this reader does not interpret (they are kept as raw bytes).
    Integers, bools, capability strings, nested structs (``struct``, and ``tmp`` whose
    fields sit in the field entry itself) and subsections are decoded.
    """

    def __init__(self, r: QEMUFileReader, file_size: int) -> None:
        self.r = r
        self.file_size = file_size
        self.virtio_blobs: list[tuple[int, bytes]] = []  # (offset, raw) of "virtio" fields
        self.offsets: dict[str, int] = {}  # stream offset of each top-level field

    def _need(self, n: int, what: str) -> None:
        left = self.file_size - self.r.tell()
        if n > left:
            raise StreamError(
                self.r.tell(),
                f"truncated stream: {what} needs {n} bytes, only {left} left in the file",
            )

    def decode(self, desc: dict[str, Any], where: str, depth: int = 0) -> dict[str, Any]:
        if depth > MAX_VMDESC_DEPTH:
            raise DescError(f"{where}: nested more than {MAX_VMDESC_DEPTH} levels")
        fields = desc.get("fields", [])
        if not isinstance(fields, list):
            raise DescError(f"{where}: 'fields' is not a list")
        values: dict[str, Any] = {}
        for f in fields:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise DescError(f"{where}: a field has no name")
            name = f["name"]
            if isinstance(f.get("index"), int):
                name = f"{name}[{f['index']}]"
            if depth == 0:
                self.offsets[name] = self.r.tell()
            count = f.get("array_len")
            if count is not None:
                if not isinstance(count, int) or count < 0:
                    raise DescError(f"{where}: field {name!r} has a bad array_len")
                values[name] = self._array(f, count, f"{where}.{name}", depth)
            else:
                values[name] = self._field(f, f"{where}.{name}", depth)
        subs = desc.get("subsections", [])
        if not isinstance(subs, list):
            raise DescError(f"{where}: 'subsections' is not a list")
        for sub in subs:
            if not isinstance(sub, dict) or not isinstance(sub.get("vmsd_name"), str):
                raise DescError(f"{where}: a subsection has no vmsd_name")
            sname = sub["vmsd_name"]
            values[sname] = self._subsection(sub, sname, depth)
        return values

    def _subsection(self, sub: dict[str, Any], sname: str, depth: int) -> dict[str, Any]:
        r = self.r
        off = r.tell()
        mark = r.get_u8()
        if mark != SectionType.SUBSECTION:
            raise StreamError(
                off, f"expected subsection {sname!r} (byte 0x05), found byte 0x{mark:02x}"
            )
        noff = r.tell()
        raw = r.get_counted_string()
        if raw != sname.encode():
            raise StreamError(noff, f"expected subsection {sname!r}, found {raw!r}")
        voff = r.tell()
        version = r.get_be32()
        want = sub.get("version")
        if isinstance(want, int) and version != want:
            raise StreamError(
                voff, f"subsection {sname!r} has version {version}, VMDESCRIPTION says {want}"
            )
        return self.decode(sub, sname, depth + 1)

    def _size(self, f: dict[str, Any], where: str) -> int | None:
        size = f.get("size")
        if size is None:
            return None
        if not isinstance(size, int) or size < 0:
            raise DescError(f"{where}: bad size {size!r}")
        return size

    def _array(self, f: dict[str, Any], count: int, where: str, depth: int) -> Any:
        size = self._size(f, where)
        fmt = int_format(str(f.get("type", "")), size) if size is not None else None
        if fmt is not None and size is not None and "struct" not in f:
            self._need(count * size, where)
            data = self.r.read_exact(count * size) if count * size <= MAX_KEPT_RAW else None
            if data is None:
                self.r.skip(count * size)
                return Skipped(count * size)
            if fmt == "?":
                return [b != 0 for b in data]
            return np.frombuffer(data, np.dtype(fmt)).tolist()
        return [self._field(f, f"{where}[{i}]", depth) for i in range(count)]

    def _field(self, f: dict[str, Any], where: str, depth: int) -> Any:
        r = self.r
        size = self._size(f, where)
        type_name = str(f.get("type", "unknown"))
        start = r.tell()
        nested: dict[str, Any] | None = None
        if isinstance(f.get("struct"), dict):
            nested = f["struct"]
        elif "fields" in f:  # "tmp": QEMU writes the nested vmsd into the field entry itself
            nested = f
        if nested is not None:
            value = self.decode(nested, where, depth + 1)
            used = r.tell() - start
            if size is not None and used != size:
                raise StreamError(
                    start,
                    f"{where}: struct decoded to {used} bytes, VMDESCRIPTION says {size}",
                )
            return value
        if size is None:
            raise DescError(f"{where}: field of type {type_name!r} has no size")
        self._need(size, where)
        fmt = int_format(type_name, size)
        if fmt is not None:
            raw = r.read_exact(size)
            return struct.unpack(fmt, raw)[0]
        if type_name == "capability" and size >= 1:
            raw = r.read_exact(size)
            if raw[0] != size - 1:
                raise StreamError(
                    start, f"{where}: capability string of {raw[0]} bytes in a {size}-byte field"
                )
            return raw[1:].decode(errors="replace")
        if size > MAX_KEPT_RAW:
            r.skip(size)
            return Skipped(size)
        raw = r.read_exact(size)
        if type_name == "virtio":
            self.virtio_blobs.append((start, raw))
        return raw
