"""Offline inspection of migration stream files written by livemig or by QEMU.

``inspect_stream(path)`` walks a whole stream file and returns a :class:`StreamReport`:
the header and configuration, every section and command in stream order, the RAM blocks
with how many ZERO and PAGE records each received (and which pages got one), the device
sections decoded with the help of the VMDESCRIPTION trailer, and the state of every
virtio-mem device (its plugged bitmap and the RAM block behind it). ``check_discard``
then answers the question livemig exists for: did any page record land in memory that
the virtio-mem bitmap says is unplugged?

Why it is built the way it is:

* The VMDESCRIPTION JSON is at the *end* of the file, but the device sections before it
  cannot be parsed without it (a FULL section has no length field). So the trailer is
  located first, by looking backwards from the end of the file for ``0x06, be32 len``
  whose length matches what follows. JSON text never contains a raw 0x06 byte, which is
  what makes the backward search reliable.
* Page records are counted with strided numpy views over the reader's buffer, like the
  destination's loader: a 1 GiB stream is a quarter of a million PAGE records or many
  more ZERO records, far too many for one Python iteration each.
* In QEMU 7.2 the virtio-mem bitmap is inside the last device section, after every page
  record, so the discard check can only be evaluated once the whole file has been read.
  The first pass therefore only remembers *which* pages got a record (a bitmap per RAM
  block); if the check finds pages in unplugged memory, a second pass over the file
  collects the stream offset and kind of every offending record.
* QEMU 7.2 sends all virtio-mem state inside the generic VirtIO device state, which its
  VMDESCRIPTION describes as one opaque ``virtio`` field. The virtio-mem part is found in
  that blob by its layout: the sanity-check struct (addr, region_size, block_size, node),
  the sizes and the bitmap, with every value cross-checked (region size equal to a RAM
  block's length, sizes multiples of the block size, the popcount of the bitmap equal to
  the plugged size, a subsection marker or the end of the blob right after).
* Every format problem is a :class:`StreamError` carrying the absolute offset, so a
  damaged file gets a message that can be checked against a hex dump. Things that are not
  damage but cannot be interpreted (an iterative section of unknown format, a section
  the VMDESCRIPTION does not describe in a stream without one) stop the walk with
  :attr:`StreamReport.stopped` set instead.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap, words_for
from livemig.migration.stream.format import (
    DEFAULT_TARGET_PAGE_SIZE,
    RAM_FLAG_REMOVED_COMPRESS_PAGE,
    RAM_IDSTR,
    RAM_MIN_PAGE_BITS,
    RAM_VERSION,
    MigCommand,
    RamFlag,
    SectionType,
)
from livemig.migration.stream.qemu_file import (
    QEMUFileReader,
    StreamError,
    bytes_reader,
    open_reader,
)
from livemig.migration.stream.savevm import (
    MAX_VMDESC,
    SectionHeader,
    check_footer,
    read_command,
    read_configuration,
    read_header,
    read_section_header,
)

__all__ = [
    "CommandReport",
    "RamBlockReport",
    "SectionReport",
    "StreamReport",
    "Violation",
    "ViolationList",
    "VirtioMemReport",
    "check_discard",
    "inspect_stream",
]

READ_BUFFER = 8 << 20
"""Reader buffer: each numpy pass over a run of PAGE records covers up to ~2000 records."""

SHORT_RUN = 16
"""Runs of CONTINUE records shorter than this are parsed without numpy (less overhead)."""

MAX_VIOLATIONS = 100_000
"""Most offending records whose stream offset is collected; the rest are only counted."""

MAX_KEPT_RAW = 16 << 20
"""Raw field bytes above this are skipped, not kept (no device state is that large)."""

MAX_PACKAGED = 1 << 24
"""QEMU's ``MAX_VM_CMD_PACKAGED_SIZE``: the largest postcopy package."""

MAX_VMDESC_DEPTH = 64
"""Deepest struct nesting accepted in a VMDESCRIPTION (QEMU's are a handful deep)."""

_RAM_KIND_FLAGS = RamFlag.ZERO | RamFlag.PAGE | RamFlag.XBZRLE | RAM_FLAG_REMOVED_COMPRESS_PAGE
_KNOWN_RAM_FLAGS = (
    _RAM_KIND_FLAGS
    | RamFlag.MEM_SIZE
    | RamFlag.EOS
    | RamFlag.CONTINUE
    | RamFlag.HOOK
    | RamFlag.MULTIFD_FLUSH
)
_KIND_NAMES = {
    int(RamFlag.ZERO): "ZERO",
    int(RamFlag.PAGE): "PAGE",
    int(RamFlag.XBZRLE): "XBZRLE",
    RAM_FLAG_REMOVED_COMPRESS_PAGE: "COMPRESSED",
}
_RECORD_START = frozenset(
    int(t)
    for t in (
        SectionType.EOF,
        SectionType.START,
        SectionType.PART,
        SectionType.END,
        SectionType.FULL,
        SectionType.COMMAND,
    )
)
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

# Names QEMU and livemig give to a machine's base RAM and firmware blobs: never the memory
# behind a virtio-mem device, which breaks ties when several blocks have the right size.
_NOT_VIRTIO_MEM = ("pc.ram", "ram", "mach-virt.ram", "pc.bios", "pc.rom", "vga.vram")


class _Stop(Exception):
    """Not damage, but nothing more can be interpreted: the walk ends here."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason


# =============================================================================================
# report types
# =============================================================================================


class PageSet:
    """Pages of one RAM block that received at least one record, as a growable bitmap.

    It grows to the highest page actually seen rather than to the block's announced
    length: a damaged MEM_SIZE list could announce a petabyte, and the bitmap must not be
    allocated from a number nobody checked. Pages of short runs are queued in a list and
    merged in bulk, because one numpy call per page would cost more than the parsing.
    """

    __slots__ = ("_pending", "words")

    PENDING_MAX = 1 << 16

    def __init__(self) -> None:
        self.words = np.zeros(0, np.uint64)
        self._pending: list[int] = []

    def add(self, pages: np.ndarray) -> None:
        if len(pages) == 0:
            return
        need = (int(pages.max()) >> 6) + 1
        if need > len(self.words):
            grown = np.zeros(max(need, 2 * len(self.words)), np.uint64)
            grown[: len(self.words)] = self.words
            self.words = grown
        np.bitwise_or.at(
            self.words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64))
        )

    def add_one(self, page: int) -> None:
        self._pending.append(page)
        if len(self._pending) >= self.PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            pages = np.array(self._pending, np.int64)
            self._pending.clear()
            self.add(pages)

    def count(self) -> int:
        self.flush()
        return int(np.bitwise_count(self.words).sum())

    def words_for_pages(self, npages: int) -> np.ndarray:
        """The bitmap as exactly ``words_for(npages)`` words (zero-padded or cut)."""
        self.flush()
        n = words_for(npages)
        out = np.zeros(n, np.uint64)
        k = min(n, len(self.words))
        out[:k] = self.words[:k]
        return out


@dataclass
class RamBlockReport:
    """One RAM block from the MEM_SIZE list, with the records that arrived for it."""

    name: str
    length: int
    page_size: int | None = None  # postcopy's per-block page size, when sent
    addr: int | None = None  # x-ignore-shared only
    zero: int = 0
    normal: int = 0
    xbzrle: int = 0
    compressed: int = 0
    touched: PageSet = field(default_factory=PageSet, repr=False)

    @property
    def records(self) -> int:
        return self.zero + self.normal + self.xbzrle + self.compressed

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "length": self.length,
            "zero": self.zero,
            "normal": self.normal,
            "pages_with_records": self.touched.count(),
        }
        if self.xbzrle:
            d["xbzrle"] = self.xbzrle
        if self.compressed:
            d["compressed"] = self.compressed
        if self.page_size is not None:
            d["page_size"] = self.page_size
        if self.addr is not None:
            d["addr"] = self.addr
        return d


@dataclass
class SectionReport:
    """A START/PART/END/FULL section: header, extent and (for devices) decoded fields."""

    offset: int
    type: str
    section_id: int
    idstr: str
    instance_id: int | None = None
    version: int | None = None
    end: int | None = None  # offset just past the footer
    vmsd_name: str | None = None
    fields: dict[str, Any] | None = None
    zero: int = 0  # RAM sections: records in this section
    normal: int = 0
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "record": "section",
            "offset": self.offset,
            "type": self.type,
            "section_id": self.section_id,
            "idstr": self.idstr,
        }
        if self.instance_id is not None:
            d["instance_id"] = self.instance_id
            d["version"] = self.version
        if self.end is not None:
            d["size"] = self.end - self.offset
        if self.idstr == RAM_IDSTR:
            d["zero"] = self.zero
            d["normal"] = self.normal
        if self.vmsd_name is not None:
            d["vmsd_name"] = self.vmsd_name
        if self.fields is not None:
            d["fields"] = jsonable(self.fields)
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class CommandReport:
    """A ``QEMU_VM_COMMAND`` record."""

    offset: int
    name: str
    length: int
    detail: Any = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "record": "command",
            "offset": self.offset,
            "command": self.name,
            "length": self.length,
        }
        if self.detail is not None:
            d["detail"] = jsonable(self.detail)
        return d


@dataclass
class VirtioMemReport:
    """A virtio-mem device's migrated state and the RAM block it manages."""

    id: str  # the section idstr's device part: "vm0" (livemig), "0000:00:02.0" (QEMU)
    sections: list[str] = field(default_factory=list)
    source: str = ""  # where the bitmap came from
    addr: int | None = None
    region_size: int | None = None
    block_size: int | None = None
    node: int | None = None
    size: int | None = None  # plugged size as the device states it
    usable_region_size: int | None = None
    requested_size: int | None = None
    bitmap: Bitmap | None = field(default=None, repr=False)
    bitmap_offset: int | None = None
    ram_block: str | None = None
    mapping: str = ""  # how ram_block was chosen, or why none was
    warnings: list[str] = field(default_factory=list)

    @property
    def total_blocks(self) -> int | None:
        return None if self.bitmap is None else self.bitmap.nbits

    @property
    def plugged_blocks(self) -> int | None:
        return None if self.bitmap is None else self.bitmap.count()

    def plugged_runs(self) -> list[tuple[int, int]]:
        if self.bitmap is None:
            return []
        starts, lens = self.bitmap.runs(True)
        return [(int(s), int(n)) for s, n in zip(starts, lens, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        runs = self.plugged_runs()
        return {
            "id": self.id,
            "sections": self.sections,
            "source": self.source,
            "addr": self.addr,
            "region_size": self.region_size,
            "block_size": self.block_size,
            "node": self.node,
            "size": self.size,
            "usable_region_size": self.usable_region_size,
            "requested_size": self.requested_size,
            "total_blocks": self.total_blocks,
            "plugged_blocks": self.plugged_blocks,
            "plugged_runs": [list(r) for r in runs[:1000]],
            "bitmap_offset": self.bitmap_offset,
            "ram_block": self.ram_block,
            "mapping": self.mapping,
            "warnings": self.warnings,
        }


@dataclass
class StreamReport:
    """Everything :func:`inspect_stream` learnt about a stream file."""

    path: str
    file_size: int
    version: int = 0
    configuration: dict[str, Any] | None = None
    page_size: int = DEFAULT_TARGET_PAGE_SIZE
    vmdesc: dict[str, Any] | None = field(default=None, repr=False)
    vmdesc_offset: int | None = None
    vmdesc_size: int | None = None
    records: list[SectionReport | CommandReport] = field(default_factory=list)
    ram_blocks: dict[str, RamBlockReport] = field(default_factory=dict)
    ram_total: int | None = None  # MEM_SIZE total
    eos: int = 0
    multifd_flush: int = 0
    devices: list[VirtioMemReport] = field(default_factory=list)
    eof_offset: int | None = None
    complete: bool = False
    stopped: str | None = None
    stopped_offset: int | None = None
    footers: bool | None = None
    warnings: list[str] = field(default_factory=list)

    # -- totals -----------------------------------------------------------------------------
    @property
    def zero_pages(self) -> int:
        return sum(b.zero for b in self.ram_blocks.values())

    @property
    def normal_pages(self) -> int:
        return sum(b.normal for b in self.ram_blocks.values())

    @property
    def sections(self) -> list[SectionReport]:
        return [r for r in self.records if isinstance(r, SectionReport)]

    @property
    def commands(self) -> list[CommandReport]:
        return [r for r in self.records if isinstance(r, CommandReport)]

    def device(self, id: str) -> VirtioMemReport:
        for d in self.devices:
            if d.id == id:
                return d
        raise KeyError(id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_size": self.file_size,
            "version": self.version,
            "configuration": jsonable(self.configuration),
            "page_size": self.page_size,
            "vmdesc": None
            if self.vmdesc_offset is None
            else {
                "offset": self.vmdesc_offset,
                "size": self.vmdesc_size,
                "devices": len((self.vmdesc or {}).get("devices") or []),
            },
            "records": [r.to_dict() for r in self.records],
            "ram": {
                "total": self.ram_total,
                "zero": self.zero_pages,
                "normal": self.normal_pages,
                "eos": self.eos,
                "multifd_flush": self.multifd_flush,
                "blocks": [b.to_dict() for b in self.ram_blocks.values()],
            },
            "virtio_mem": [d.to_dict() for d in self.devices],
            "eof_offset": self.eof_offset,
            "complete": self.complete,
            "stopped": None
            if self.stopped is None
            else {"offset": self.stopped_offset, "reason": self.stopped},
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class Violation:
    """A page record in memory the virtio-mem bitmap marks unplugged."""

    device: str
    ram_block: str
    kind: str  # ZERO, PAGE, XBZRLE or COMPRESSED
    stream_offset: int
    block_offset: int  # offset of the page in the RAM block
    gpa: int | None  # guest-physical address (device addr + block_offset)
    vmem_block: int  # index of the virtio-mem block

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "ram_block": self.ram_block,
            "kind": self.kind,
            "stream_offset": self.stream_offset,
            "block_offset": self.block_offset,
            "gpa": self.gpa,
            "vmem_block": self.vmem_block,
        }


class ViolationList(list[Violation]):
    """The violations found, listed up to :data:`MAX_VIOLATIONS`; ``total`` counts all
    offending records and ``pages`` the distinct pages they hit."""

    total: int = 0
    pages: int = 0


def jsonable(v: Any) -> Any:
    """A JSON-safe, size-bounded version of a decoded value (big buffers truncated)."""
    if isinstance(v, bool | str) or v is None:
        return v
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float):
        return v
    if isinstance(v, bytes | bytearray):
        d: dict[str, Any] = {"size": len(v), "hex": bytes(v[:32]).hex()}
        if len(v) > 32:
            d["truncated"] = True
        return d
    if isinstance(v, _Skipped):
        return {"size": v.size, "skipped": True}
    if isinstance(v, Bitmap):
        return {"nbits": v.nbits, "set": v.count()}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        items = [jsonable(x) for x in list(v[:256])]
        if len(v) > 256:
            items.append({"more": len(v) - 256})
        return items
    return repr(v)


@dataclass(frozen=True)
class _Skipped:
    """A raw field too large to keep: only its size is reported."""

    size: int


# =============================================================================================
# VMDESCRIPTION: find it before anything else
# =============================================================================================


@dataclass
class _Trailer:
    desc: dict[str, Any] | None = None
    offset: int | None = None  # offset of the 0x06 byte
    size: int | None = None
    problem: StreamError | None = None  # why a trailer that seems to be there is unusable


def _parse_vmdesc_json(data: bytes, joff: int) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StreamError(joff, f"VMDESCRIPTION is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise StreamError(joff, "VMDESCRIPTION is not a JSON object")
    devices = obj.get("devices", [])
    if not isinstance(devices, list):
        raise StreamError(joff, "VMDESCRIPTION: 'devices' is not a list")
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            raise StreamError(joff, f"VMDESCRIPTION: device entry #{i} has no name")
        if not isinstance(dev.get("instance_id", 0), int):
            raise StreamError(joff, f"VMDESCRIPTION: device {dev['name']!r} has a bad instance_id")
    ps = obj.get("page_size")
    if ps is not None and (not isinstance(ps, int) or ps < 1 << RAM_MIN_PAGE_BITS or ps & (ps - 1)):
        raise StreamError(joff, f"VMDESCRIPTION: bad page_size {ps!r}")
    return obj


def find_vmdesc(path: str | os.PathLike[str], file_size: int) -> _Trailer:
    """Locate ``[0x00 EOF] 0x06, be32 len, JSON`` at the very end of the file.

    Looks at the last megabyte first (QEMU's descriptions are tens of kilobytes) and only
    then at the largest tail a description may occupy. A trailer that is there but broken
    (bad JSON, a length that does not match, cut short) is returned as ``problem`` and
    raised only when the walk needs the description, so a stream damaged elsewhere
    reports its first problem first.
    """
    tr = _Trailer()
    with open(path, "rb") as f:
        for tail in sorted({min(file_size, 1 << 20), min(file_size, MAX_VMDESC + 6)}):
            f.seek(file_size - tail)
            data = f.read(tail)
            base = file_size - tail
            pos = len(data)
            suspect: tuple[int, int] | None = None
            while True:
                p = data.rfind(b"\x06", 0, pos)
                if p < 0:
                    break
                pos = p
                if data[p + 5 : p + 6] != b"{":
                    continue
                n = _BE32.unpack_from(data, p + 1)[0]
                follow = len(data) - p - 5
                if n == follow:  # the EOF byte before it is checked by the walk
                    tr.offset, tr.size = base + p, n
                    try:
                        tr.desc = _parse_vmdesc_json(bytes(data[p + 5 :]), base + p + 5)
                    except StreamError as e:
                        tr.problem = e
                    return tr
                if suspect is None and data[p + 5 : p + 7] == b'{"' and p and data[p - 1] == 0:
                    suspect = (p, n)
            if tail != min(file_size, MAX_VMDESC + 6):
                continue
            for k in range(4):  # cut inside "0x06, be32 len": 0..3 length bytes left
                if len(data) >= k + 2 and data[-(k + 2)] == 0 and data[-(k + 1)] == 6:
                    tr.problem = StreamError(
                        file_size - k - 1,
                        f"truncated stream: VMDESCRIPTION header cut short ({k} of 4 length bytes)",
                    )
                    return tr
            if suspect is not None:
                p, n = suspect
                follow = len(data) - p - 5
                what = "cut short" if n > follow else "followed by more data"
                tr.problem = StreamError(
                    base + p + 1,
                    f"VMDESCRIPTION length field says {n} bytes but {follow} follow ({what})",
                )
    return tr


# =============================================================================================
# the RAM section
# =============================================================================================


@dataclass
class _Hit:
    stream_offset: int
    block: str
    page: int
    kind: str


class _RamScanner:
    """Counts the RAM section's records per block without touching any memory.

    Mirrors the destination's loader (reference 4.2): MEM_SIZE block list, page records
    that name their block or CONTINUE the previous one, EOS. Runs of PAGE|CONTINUE and
    ZERO|CONTINUE records are handled a buffer at a time with numpy.
    """

    def __init__(self, report: StreamReport, watch: dict[str, np.ndarray] | None) -> None:
        self.report = report
        self.blocks = report.ram_blocks
        self.block: RamBlockReport | None = None
        self.watch = watch or {}
        self.hits: list[_Hit] = []
        self.hit_total = 0
        self.postcopy_advised = False
        self.ignore_shared = False
        self.mem_size_seen = False
        self.set_page_size(report.page_size)

    def set_page_size(self, page_size: int) -> None:
        self.page_size = page_size
        self.page_bits = page_size.bit_length() - 1
        self.mask = page_size - 1
        self.page_record = 8 + page_size
        self.page_c = int(RamFlag.PAGE | RamFlag.CONTINUE)
        self.zero_c = int(RamFlag.ZERO | RamFlag.CONTINUE)

    # -- setup ------------------------------------------------------------------------------
    def _mem_size(self, r: QEMUFileReader, at: int, total: int) -> None:
        if self.mem_size_seen:
            raise StreamError(at, "second MEM_SIZE record (the block list is sent once)")
        self.mem_size_seen = True
        self.report.ram_total = total
        remaining = total
        while remaining > 0:
            boff = r.tell()
            raw = r.get_counted_string()
            if not raw:
                raise StreamError(boff, "RAM block list: empty block name")
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                raise StreamError(boff, f"RAM block list: name {raw!r} is not UTF-8") from None
            loff = r.tell()
            length = r.get_be64()
            if name in self.blocks:
                raise StreamError(boff, f'RAM block list: "{name}" listed twice')
            if length == 0 or length % self.page_size:
                raise StreamError(
                    loff,
                    f'RAM block "{name}": length 0x{length:x} is not a positive multiple '
                    f"of the page size 0x{self.page_size:x}",
                )
            if length > remaining:
                raise StreamError(
                    loff,
                    f'RAM block "{name}": length 0x{length:x} exceeds the 0x{remaining:x} '
                    f"bytes left of the MEM_SIZE total 0x{total:x}",
                )
            block = RamBlockReport(name, length)
            if self.postcopy_advised:
                head = r.peek(8)
                if len(head) == 8:
                    v = _BE64.unpack(head)[0]
                    if v >= self.page_size and v & (v - 1) == 0 and v <= 1 << 40:
                        r.consume(8)
                        block.page_size = v
            if self.ignore_shared:
                block.addr = r.get_be64()
            self.blocks[name] = block
            remaining -= length

    # -- records ----------------------------------------------------------------------------
    def load(self, r: QEMUFileReader, sec: SectionReport | None) -> None:
        """Read records up to and including EOS."""
        z0, n0 = self.report.zero_pages, self.report.normal_pages
        try:
            self._load(r)
        finally:
            if sec is not None:
                sec.zero += self.report.zero_pages - z0
                sec.normal += self.report.normal_pages - n0

    def _load(self, r: QEMUFileReader) -> None:
        mask = self.mask
        while True:
            buf = r.fill(8)
            if len(buf) < 8:
                raise StreamError(
                    r.tell(),
                    f"truncated stream: RAM record header cut short ({len(buf)} of 8 bytes)",
                )
            hdr = _BE64.unpack_from(buf)[0]
            flags = hdr & mask
            if self.block is not None and (flags == self.page_c or flags == self.zero_c):
                self._continued(r, flags)
                continue
            at = r.tell()
            r.consume(8)
            addr = hdr & ~mask
            if flags & ~_KNOWN_RAM_FLAGS:
                raise StreamError(at, f"unknown RAM record flags 0x{flags:x} (header 0x{hdr:016x})")
            if flags & RamFlag.EOS:
                if flags != RamFlag.EOS or addr:
                    raise StreamError(at, f"malformed RAM EOS record 0x{hdr:016x}")
                self.report.eos += 1
                return
            if flags & RamFlag.HOOK:  # RDMA's control records never reach a file
                raise StreamError(at, f"RAM record with the RDMA HOOK flag (flags 0x{flags:x})")
            if flags & RamFlag.MULTIFD_FLUSH:
                if flags != RamFlag.MULTIFD_FLUSH or addr:
                    raise StreamError(at, f"malformed MULTIFD_FLUSH record 0x{hdr:016x}")
                self.report.multifd_flush += 1
                continue
            if flags & RamFlag.MEM_SIZE:
                if flags != RamFlag.MEM_SIZE:
                    raise StreamError(at, f"malformed MEM_SIZE record 0x{hdr:016x}")
                self._mem_size(r, at, addr)
                continue
            kind = flags & _RAM_KIND_FLAGS
            if kind == 0:
                raise StreamError(at, f"RAM record with no type (flags 0x{flags:x})")
            if kind & (kind - 1):
                raise StreamError(at, f"RAM record with several types (flags 0x{flags:x})")
            if flags & RamFlag.CONTINUE:
                if self.block is None:
                    raise StreamError(at, "RAM record CONTINUEs a block, but no block was named")
                block = self.block
            else:
                noff = r.tell()
                raw = r.get_counted_string()
                block = self.blocks.get(raw.decode(errors="replace"))
                if block is None:
                    raise StreamError(noff, f"RAM record names unknown block {raw!r}")
                self.block = block
            self._check_offset(at, block, addr)
            page = addr >> self.page_bits
            if kind == RamFlag.ZERO:
                foff = r.tell()
                fill = r.get_u8()
                if fill:
                    raise StreamError(foff, f"ZERO record with fill byte 0x{fill:02x} (must be 0)")
                block.zero += 1
            elif kind == RamFlag.PAGE:
                r.skip(self.page_size)
                block.normal += 1
            elif kind == RamFlag.XBZRLE:
                eoff = r.tell()
                enc = r.get_u8()
                if enc != 0x01:
                    raise StreamError(eoff, f"XBZRLE record with encoding byte 0x{enc:02x}")
                loff = r.tell()
                n = r.get_be16()
                if n > self.page_size:
                    raise StreamError(loff, f"XBZRLE record of {n} bytes exceeds a page")
                r.skip(n)
                block.xbzrle += 1
            else:
                loff = r.tell()
                n = r.get_be32()
                bound = self.page_size + (self.page_size >> 12) + (self.page_size >> 14) + 13
                if n > bound:
                    raise StreamError(loff, f"compressed page of {n} bytes exceeds {bound}")
                r.skip(n)
                block.compressed += 1
            block.touched.add_one(page)
            if block.name in self.watch:
                self._watch(block, np.array([page], np.int64), at, 0, _KIND_NAMES[int(kind)])

    def _continued(self, r: QEMUFileReader, flags: int) -> None:
        """PAGE|CONTINUE or ZERO|CONTINUE records: runs of at least ``SHORT_RUN`` go to
        numpy; shorter ones (memory where zero and data pages alternate) are checked
        here, record by record, with nothing heavier than a ``struct`` call each."""
        page = flags == self.page_c
        stride = self.page_record if page else 9
        buf = r.fill(stride)
        if len(buf) < stride:
            raise StreamError(
                r.tell(),
                f"truncated stream: RAM record of {stride} bytes cut short ({len(buf)} left)",
            )
        mask, unpack = self.mask, _BE64.unpack_from
        m = 1
        while m < SHORT_RUN and (m + 1) * stride <= len(buf):
            if unpack(buf, m * stride)[0] & mask != flags:
                break
            m += 1
        if m == SHORT_RUN:
            if page:
                self._page_run(r)
            else:
                self._zero_run(r)
            return
        block = self.block
        assert block is not None
        base = r.tell()
        limit = block.length
        watched = block.name in self.watch
        kind = "PAGE" if page else "ZERO"
        for i in range(m):
            at = i * stride
            addr = unpack(buf, at)[0] & ~mask
            if addr >= limit:
                self._check_offset(base + at, block, addr)
            if not page and buf[at + 8]:
                raise StreamError(
                    base + at + 8, f"ZERO record with fill byte 0x{buf[at + 8]:02x} (must be 0)"
                )
            pg = addr >> self.page_bits
            block.touched.add_one(pg)
            if watched:
                self._watch(block, np.array([pg], np.int64), base + at, 0, kind)
        if page:
            block.normal += m
        else:
            block.zero += m
        r.consume(m * stride)

    def _check_offset(self, at: int, block: RamBlockReport, addr: int) -> None:
        if addr >= block.length:
            raise StreamError(
                at,
                f"RAM record offset 0x{addr:x} beyond the length 0x{block.length:x} "
                f'of block "{block.name}"',
            )

    def _run(self, r: QEMUFileReader, stride: int, want: int) -> tuple[memoryview, np.ndarray, int]:
        """Headers of the records of one kind at the front of the buffer, all checked.

        The window grows geometrically from a few records, so that a short run (guest
        memory where zero and non-zero pages alternate) costs a few small numpy calls and
        not a pass over the whole buffer.
        """
        buf = r.fill(stride)
        avail = len(buf) // stride
        if avail == 0:
            raise StreamError(
                r.tell(),
                f"truncated stream: RAM record of {stride} bytes cut short ({len(buf)} left)",
            )
        k = min(avail, 32)
        while True:
            hdrs = np.ndarray((k,), ">u8", buf, 0, (stride,)).astype(np.uint64)
            bad = (hdrs & np.uint64(self.mask)) != np.uint64(want)
            if bad.any():
                n = int(np.argmax(bad))
                hdrs = hdrs[:n]
                break
            if k == avail:
                n = k
                break
            k = min(avail, k * 8)
        pages = (hdrs >> np.uint64(self.page_bits)).astype(np.int64)
        block = self.block
        assert block is not None
        over = pages >= block.length >> self.page_bits
        if over.any():
            i = int(np.argmax(over))
            self._check_offset(r.tell() + i * stride, block, int(hdrs[i]) & ~self.mask)
        return buf, pages, n

    def _page_run(self, r: QEMUFileReader) -> None:
        stride = self.page_record
        _, pages, n = self._run(r, stride, self.page_c)
        block = self.block
        assert block is not None
        block.normal += n
        block.touched.add(pages)
        if block.name in self.watch:
            self._watch(block, pages, r.tell(), stride, "PAGE")
        r.consume(n * stride)

    def _zero_run(self, r: QEMUFileReader) -> None:
        buf, pages, n = self._run(r, 9, self.zero_c)
        fills = np.ndarray((n,), np.uint8, buf, 8, (9,))
        if fills.any():
            i = int(np.argmax(fills != 0))
            raise StreamError(
                r.tell() + i * 9 + 8,
                f"ZERO record with fill byte 0x{int(fills[i]):02x} (must be 0)",
            )
        block = self.block
        assert block is not None
        block.zero += n
        block.touched.add(pages)
        if block.name in self.watch:
            self._watch(block, pages, r.tell(), 9, "ZERO")
        r.consume(n * 9)

    def _watch(
        self, block: RamBlockReport, pages: np.ndarray, base: int, stride: int, kind: str
    ) -> None:
        """Second pass: note the records of pages the discard check flagged."""
        words = self.watch[block.name]
        hit = (words[pages >> 6] >> (pages & 63).astype(np.uint64)) & np.uint64(1)
        idx = np.flatnonzero(hit)
        self.hit_total += len(idx)
        room = MAX_VIOLATIONS - len(self.hits)
        for i in idx[: max(room, 0)].tolist():
            self.hits.append(_Hit(base + i * stride, block.name, int(pages[i]), kind))


# =============================================================================================
# device sections, decoded with the VMDESCRIPTION
# =============================================================================================

_INT_TYPES = {8: "b", 16: "h", 32: "i", 64: "q"}


def _int_format(type_name: str, size: int) -> str | None:
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


class _DescError(Exception):
    """The VMDESCRIPTION itself is malformed where a field is described."""


class _VmsdDecoder:
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
            raise _DescError(f"{where}: nested more than {MAX_VMDESC_DEPTH} levels")
        fields = desc.get("fields", [])
        if not isinstance(fields, list):
            raise _DescError(f"{where}: 'fields' is not a list")
        values: dict[str, Any] = {}
        for f in fields:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise _DescError(f"{where}: a field has no name")
            name = f["name"]
            if isinstance(f.get("index"), int):
                name = f"{name}[{f['index']}]"
            if depth == 0:
                self.offsets[name] = self.r.tell()
            count = f.get("array_len")
            if count is not None:
                if not isinstance(count, int) or count < 0:
                    raise _DescError(f"{where}: field {name!r} has a bad array_len")
                values[name] = self._array(f, count, f"{where}.{name}", depth)
            else:
                values[name] = self._field(f, f"{where}.{name}", depth)
        subs = desc.get("subsections", [])
        if not isinstance(subs, list):
            raise _DescError(f"{where}: 'subsections' is not a list")
        for sub in subs:
            if not isinstance(sub, dict) or not isinstance(sub.get("vmsd_name"), str):
                raise _DescError(f"{where}: a subsection has no vmsd_name")
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
            raise _DescError(f"{where}: bad size {size!r}")
        return size

    def _array(self, f: dict[str, Any], count: int, where: str, depth: int) -> Any:
        size = self._size(f, where)
        fmt = _int_format(str(f.get("type", "")), size) if size is not None else None
        if fmt is not None and size is not None and "struct" not in f:
            self._need(count * size, where)
            data = self.r.read_exact(count * size) if count * size <= MAX_KEPT_RAW else None
            if data is None:
                self.r.skip(count * size)
                return _Skipped(count * size)
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
            raise _DescError(f"{where}: field of type {type_name!r} has no size")
        self._need(size, where)
        fmt = _int_format(type_name, size)
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
            return _Skipped(size)
        raw = r.read_exact(size)
        if type_name == "virtio":
            self.virtio_blobs.append((start, raw))
        return raw


# =============================================================================================
# virtio-mem state
# =============================================================================================

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


def _scan_virtio_blob(
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


# =============================================================================================
# the walk
# =============================================================================================


class _Walker:
    def __init__(self, path: str, watch: dict[str, np.ndarray] | None = None) -> None:
        self.path = path
        size = os.stat(path).st_size
        self.report = StreamReport(path=path, file_size=size)
        self.trailer = find_vmdesc(path, size)
        rep = self.report
        if self.trailer.desc is not None:
            rep.vmdesc = self.trailer.desc
            ps = self.trailer.desc.get("page_size")
            if isinstance(ps, int):
                rep.page_size = ps
        self.ram = _RamScanner(rep, watch)
        self.ram_section_id: int | None = None
        self.started: dict[int, str] = {}
        self.vmdesc_used: set[int] = set()
        self.vmdesc_next = 0
        self.vmem: dict[str, VirtioMemReport] = {}

    # -- entry ------------------------------------------------------------------------------
    def run(self) -> StreamReport:
        rep = self.report
        with open_reader(self.path, READ_BUFFER) as r:
            self.r = r
            try:
                rep.version = read_header(r)
                self._records(r, nested=False)
                self._after_eof(r)
                rep.complete = True
                unused = self.unused_vmdesc()
                if unused and rep.vmdesc_offset is not None:
                    rep.warnings.append(
                        f"VMDESCRIPTION describes {len(unused)} section(s) not in the stream: "
                        + ", ".join(unused[:5])
                    )
            except _Stop as s:
                rep.stopped, rep.stopped_offset = s.reason, s.offset
            except (StreamError, OSError):
                raise
            except Exception as e:  # a reader bug must still name the place, not trace back
                raise StreamError(
                    self.r.tell(), f"internal error while parsing here: {type(e).__name__}: {e}"
                ) from e
            finally:
                rep.devices = list(self.vmem.values())
                _map_devices(rep)
        return rep

    # -- records ----------------------------------------------------------------------------
    def _records(self, r: QEMUFileReader, nested: bool) -> None:
        rep = self.report
        while True:
            if nested and r.at_eof():
                return
            if r.at_eof():
                raise StreamError(
                    r.tell(), "truncated stream: the file ends without the EOF record"
                )
            hdr = read_section_header(r)
            t = hdr.type
            if t is SectionType.EOF:
                if not nested:
                    rep.eof_offset = hdr.offset
                return
            if t is SectionType.CONFIGURATION:
                self._configuration(r, hdr)
            elif t is SectionType.COMMAND:
                self._command(r, hdr)
            elif t is SectionType.VMDESCRIPTION:
                raise StreamError(hdr.offset, "VMDESCRIPTION before the EOF record")
            elif t in (SectionType.START, SectionType.FULL):
                self._start_or_full(r, hdr)
            else:
                self._part_or_end(r, hdr)

    def _configuration(self, r: QEMUFileReader, hdr: SectionHeader) -> None:
        rep = self.report
        if rep.configuration is not None:
            raise StreamError(hdr.offset, "a second CONFIGURATION record")
        conf = read_configuration(r)
        rep.configuration = conf
        caps = conf.get("capabilities") or []
        if "mapped-ram" in caps:
            raise _Stop(
                hdr.offset, "mapped-ram streams (pages at fixed file offsets) are not supported"
            )
        self.ram.ignore_shared = "x-ignore-shared" in caps
        bits = conf.get("target_page_bits")
        if bits is not None:
            ps = 1 << bits
            if rep.vmdesc is not None and rep.page_size != ps:
                rep.warnings.append(
                    f"configuration says {ps}-byte pages, VMDESCRIPTION {rep.page_size}; using {ps}"
                )
            rep.page_size = ps
            self.ram.set_page_size(ps)

    def _command(self, r: QEMUFileReader, hdr: SectionHeader) -> None:
        cmd, payload = read_command(r)
        detail: Any = None
        if cmd is MigCommand.PING:
            detail = {"value": _BE32.unpack(payload)[0]}
        elif cmd is MigCommand.POSTCOPY_ADVISE:
            self.ram.postcopy_advised = True
            if len(payload) == 16:
                a, b = struct.unpack(">QQ", payload)
                detail = {"max_host_page_size": a, "target_page_size": b}
        elif cmd is MigCommand.POSTCOPY_RAM_DISCARD:
            n = payload[1]
            name = payload[2 : 2 + n].decode(errors="replace")
            detail = {"block": name, "ranges": max(len(payload) - 3 - n, 0) // 16}
        elif cmd is MigCommand.PACKAGED:
            detail = {"package_bytes": _BE32.unpack(payload)[0]}
        elif cmd is MigCommand.RECV_BITMAP:
            detail = {"block": payload[1 : 1 + payload[0]].decode(errors="replace")}
        self.report.records.append(CommandReport(hdr.offset, cmd.name, len(payload), detail))
        if cmd is MigCommand.PACKAGED:
            self._packaged(r, hdr, _BE32.unpack(payload)[0])

    def _packaged(self, r: QEMUFileReader, hdr: SectionHeader, length: int) -> None:
        """Postcopy's package: a run of records (device state, commands) of known length."""
        if length > MAX_PACKAGED:
            raise StreamError(
                hdr.offset, f"PACKAGED command of {length} bytes exceeds {MAX_PACKAGED}"
            )
        off = r.tell()
        data = r.read_exact(length)
        sub = bytes_reader(data, offset=off)
        saved = self.r
        self.r = sub
        try:
            self._records(sub, nested=True)
        finally:
            self.r = saved
        if not sub.at_eof():
            raise StreamError(sub.tell(), "data after the EOF record inside the PACKAGED command")

    def _footer(self, r: QEMUFileReader, section_id: int) -> None:
        """Check the section footer. Streams of very old machine types have none, which
        the first section tells: a byte there that starts no record is a bad footer."""
        rep = self.report
        head = r.peek(1)
        if rep.footers is None and head and head[0] != SectionType.FOOTER:
            if head[0] in _RECORD_START:
                rep.footers = False
                return
        if rep.footers is not False:
            check_footer(r, section_id)
            rep.footers = True

    def _start_or_full(self, r: QEMUFileReader, hdr: SectionHeader) -> None:
        assert hdr.idstr is not None and hdr.section_id is not None
        sec = SectionReport(
            hdr.offset, hdr.type.name, hdr.section_id, hdr.idstr, hdr.instance_id, hdr.version_id
        )
        self.report.records.append(sec)
        if hdr.type is SectionType.START:
            if hdr.section_id in self.started:
                raise StreamError(hdr.offset, f"section id {hdr.section_id} started twice")
            self.started[hdr.section_id] = hdr.idstr
            if hdr.idstr != RAM_IDSTR:
                head = r.peek(8)
                if (
                    self.ram_section_id is None
                    and len(head) == 8
                    and _BE64.unpack(head)[0] & self.ram.mask == RamFlag.MEM_SIZE
                ):
                    raise StreamError(
                        hdr.offset + 6,
                        f"START section {hdr.idstr!r} carries the RAM block list: damaged "
                        f"idstr (expected {RAM_IDSTR!r})",
                    )
                raise _Stop(
                    hdr.offset,
                    f"iterative section {hdr.idstr!r} (START) has a format this tool does not "
                    "know; stopping here",
                )
            self._ram_section(r, hdr, sec)
            return
        if hdr.idstr == RAM_IDSTR:
            raise StreamError(hdr.offset, "the RAM section sent as FULL")
        self._device(r, hdr, sec)

    def _ram_section(self, r: QEMUFileReader, hdr: SectionHeader, sec: SectionReport) -> None:
        if hdr.version_id != RAM_VERSION:
            voff = hdr.offset + 1 + 4 + 1 + len(RAM_IDSTR) + 4
            raise StreamError(
                voff, f"RAM section version {hdr.version_id} (only {RAM_VERSION} exists)"
            )
        if self.ram_section_id is not None:
            raise StreamError(hdr.offset, "a second RAM section START")
        self.ram_section_id = hdr.section_id
        self.ram.load(r, sec)
        if not self.ram.mem_size_seen:
            raise StreamError(hdr.offset, "RAM section START without the MEM_SIZE block list")
        assert hdr.section_id is not None
        self._footer(r, hdr.section_id)
        sec.end = r.tell()

    def _part_or_end(self, r: QEMUFileReader, hdr: SectionHeader) -> None:
        assert hdr.section_id is not None
        idstr = self.started.get(hdr.section_id)
        if idstr is None:
            raise StreamError(
                hdr.offset, f"{hdr.type.name} for section id {hdr.section_id}, never STARTed"
            )
        sec = SectionReport(hdr.offset, hdr.type.name, hdr.section_id, idstr)
        self.report.records.append(sec)
        self.ram.load(r, sec)
        self._footer(r, hdr.section_id)
        sec.end = r.tell()

    # -- device sections ----------------------------------------------------------------------
    def _vmdesc_entry(self, hdr: SectionHeader) -> dict[str, Any] | None:
        desc = self.report.vmdesc
        if desc is None:
            return None
        devices = desc.get("devices") or []

        def matches(e: dict[str, Any]) -> bool:
            return e.get("name") == hdr.idstr and e.get("instance_id", 0) == hdr.instance_id

        i = self.vmdesc_next
        if i < len(devices) and matches(devices[i]):
            self.vmdesc_next = i + 1
        else:
            i = next(
                (k for k, e in enumerate(devices) if k not in self.vmdesc_used and matches(e)), -1
            )
            if i < 0:
                raise StreamError(
                    hdr.offset,
                    f"section {hdr.idstr!r} instance {hdr.instance_id} is not in the "
                    "VMDESCRIPTION (damaged section header?)",
                )
            self.report.warnings.append(
                f"section {hdr.idstr!r} is out of order in the VMDESCRIPTION"
            )
        self.vmdesc_used.add(i)
        entry = devices[i]
        want = entry.get("version")
        if isinstance(want, int) and want != hdr.version_id:
            assert hdr.idstr is not None
            voff = hdr.offset + 1 + 4 + 1 + len(hdr.idstr.encode()) + 4
            raise StreamError(
                voff,
                f"section {hdr.idstr!r} has version {hdr.version_id}, VMDESCRIPTION says {want}",
            )
        return entry

    def _device(self, r: QEMUFileReader, hdr: SectionHeader, sec: SectionReport) -> None:
        assert hdr.section_id is not None and hdr.idstr is not None
        if self.trailer.problem is not None:
            raise self.trailer.problem
        entry = self._vmdesc_entry(hdr)
        if entry is None:
            self._undescribed(r, hdr, sec)
            return
        sec.vmsd_name = entry.get("vmsd_name") if isinstance(entry.get("vmsd_name"), str) else None
        dec = _VmsdDecoder(r, self.report.file_size)
        try:
            values = dec.decode(entry, hdr.idstr)
        except _DescError as e:
            raise StreamError(self.report.vmdesc_offset or 0, f"VMDESCRIPTION: {e}") from None
        self._footer(r, hdr.section_id)
        sec.end = r.tell()
        sec.fields = values
        self._virtio_mem(hdr, sec, values, dec)

    def _undescribed(self, r: QEMUFileReader, hdr: SectionHeader, sec: SectionReport) -> None:
        """A FULL section with no description: its length cannot be known.

        If the file is whole (it ends with a footer and the EOF record), the walk stops
        here. If it was cut short, that is the answer, but the walk goes on to say where:
        the section is skipped to its footer (the first ``0x7e, be32 id`` followed by the
        start of a record) so that the cut is reported at the record it falls in.
        """
        assert hdr.section_id is not None
        needle = bytes([SectionType.FOOTER]) + _BE32.pack(hdr.section_id)
        start = r.tell()
        size = self.report.file_size
        with open(self.path, "rb") as f:
            f.seek(max(size - 6, 0))
            last = f.read(6)
            f.seek(start)
            data = f.read(min(size - start, 64 << 20))
        whole = len(last) == 6 and last[0] == SectionType.FOOTER and last[5] == SectionType.EOF
        if self.report.footers is False or whole:
            raise _Stop(
                hdr.offset,
                f"section {hdr.idstr!r} cannot be decoded without a VMDESCRIPTION (its length "
                "is not in the stream); stopping here",
            )
        pos = data.find(needle)
        while pos >= 0 and pos + 5 < len(data) and data[pos + 5] not in _RECORD_START:
            pos = data.find(needle, pos + 1)
        if pos < 0:
            raise StreamError(
                start,
                f"truncated stream: section {hdr.idstr!r} has no footer before the end of the "
                "file (and there is no VMDESCRIPTION)",
            )
        r.skip(pos + 5)
        sec.end = r.tell()
        sec.note = "not decoded: no VMDESCRIPTION (file cut short); skipped to its footer"

    def _virtio_mem(
        self, hdr: SectionHeader, sec: SectionReport, values: dict[str, Any], dec: _VmsdDecoder
    ) -> None:
        assert hdr.idstr is not None
        vmsd = sec.vmsd_name or ""
        idstr = hdr.idstr
        key = _device_key(idstr)
        tmp = values.get("tmp")
        described = (
            vmsd in ("virtio-mem-device-early", "virtio-mem-device")
            or idstr.endswith("/virtio-mem-device-early")
        ) and isinstance(tmp, dict)
        state: dict[str, Any] | None = None
        bitmap_raw: bytes | None = None
        bitmap_off: int | None = None
        source = ""
        if described:
            assert isinstance(tmp, dict)
            if not all(isinstance(tmp.get(k), int) for k in _SANITY_KEYS):
                self.report.warnings.append(f"{idstr}: sanity struct without the expected fields")
                return
            state = {k: tmp[k] for k in _SANITY_KEYS}
            for k in ("size", "usable_region_size", "requested_size"):
                if isinstance(values.get(k), int):
                    state[k] = values[k]
            bm = values.get("bitmap")
            if isinstance(bm, bytes):
                bitmap_raw = bm
                bitmap_off = dec.offsets.get("bitmap")
            source = f"{vmsd or 'device'} section"
        elif vmsd == "virtio-mem" or idstr.endswith("/virtio-mem"):
            regions = {b.length for b in self.report.ram_blocks.values()}
            for off, blob in dec.virtio_blobs:
                found = _scan_virtio_blob(blob, regions)
                if found is not None:
                    state, rel = found
                    bitmap_raw = state.pop("bitmap_raw", None)
                    bitmap_off = None if rel is None else off + rel
                    source = "VirtIO device state (located by layout)"
                    break
            if state is None:  # keep the device: a check must not pass without its bitmap
                dev = self.vmem.setdefault(key, VirtioMemReport(key))
                dev.sections.append(idstr)
                dev.warnings.append("no virtio-mem state found in the VirtIO device state")
                return
        else:
            return
        dev = self.vmem.get(key)
        if dev is None:
            dev = self.vmem[key] = VirtioMemReport(key)
        dev.sections.append(idstr)
        for k, v in state.items():
            old = getattr(dev, k)
            if old is not None and old != v and k in _SANITY_KEYS:
                dev.warnings.append(f"{idstr}: {k} 0x{v:x} differs from 0x{old:x} seen before")
            setattr(dev, k, v)
        if bitmap_raw is not None:
            assert dev.region_size is not None and dev.block_size is not None
            nbits = dev.region_size // dev.block_size
            dev.bitmap = _bitmap_from_be(bitmap_raw, nbits, bitmap_off or sec.offset, idstr)
            dev.bitmap_offset = bitmap_off
            dev.source = source
            if dev.size is not None and dev.bitmap.count() * dev.block_size != dev.size:
                dev.warnings.append(
                    f"plugged size 0x{dev.size:x} does not match the bitmap's "
                    f"{dev.bitmap.count()} blocks of 0x{dev.block_size:x}"
                )

    # -- end of stream --------------------------------------------------------------------------
    def _after_eof(self, r: QEMUFileReader) -> None:
        rep = self.report
        if r.at_eof():
            rep.warnings.append("no VMDESCRIPTION after the EOF record")
            return
        off = r.tell()
        t = r.get_u8()
        if t != SectionType.VMDESCRIPTION:
            raise StreamError(off, f"byte 0x{t:02x} after the EOF record (expected VMDESCRIPTION)")
        if self.trailer.problem is not None:
            raise self.trailer.problem
        loff = r.tell()
        n = r.get_be32()
        left = rep.file_size - loff - 4
        if n != left:
            raise StreamError(
                loff,
                f"VMDESCRIPTION length field says {n} bytes but {left} follow "
                f"({'cut short' if n > left else 'followed by more data'})",
            )
        if self.trailer.offset != off:  # the backward search missed it: say why
            _parse_vmdesc_json(r.read_exact(n), loff + 4)
            raise StreamError(off, "VMDESCRIPTION does not start with '{'")
        r.skip(n)
        rep.vmdesc_offset, rep.vmdesc_size = off, n
        if not r.at_eof():
            raise StreamError(r.tell(), "data after the VMDESCRIPTION")

    def unused_vmdesc(self) -> list[str]:
        devices = (self.report.vmdesc or {}).get("devices") or []
        return [e["name"] for k, e in enumerate(devices) if k not in self.vmdesc_used]


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


def _map_devices(rep: StreamReport) -> None:
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


def inspect_stream(path: str | os.PathLike[str]) -> StreamReport:
    """Walk the stream file at ``path`` and report what it holds.

    Raises :class:`StreamError` (with the offset) for a damaged or truncated file and
    ``OSError`` if it cannot be read. A stream that is valid as far as it goes but cannot
    be interpreted further comes back with ``stopped`` set and ``complete`` false.
    """
    return _Walker(os.fspath(path)).run()


# =============================================================================================
# the discard check
# =============================================================================================


def _unplugged_page_words(dev: VirtioMemReport, npages: int, page_bits: int) -> np.ndarray:
    """Page-granular bitmap (as words) of the pages in unplugged virtio-mem blocks."""
    assert dev.bitmap is not None and dev.block_size is not None
    ppb = dev.block_size >> page_bits
    plugged = np.unpackbits(dev.bitmap.words.view(np.uint8), bitorder="little")[: dev.bitmap.nbits]
    if ppb % 64 == 0:
        words = np.repeat(np.where(plugged.astype(bool), np.uint64(0), ~np.uint64(0)), ppb // 64)
        out = np.zeros(words_for(npages), np.uint64)
        k = min(len(out), len(words))
        out[:k] = words[:k]
        return out
    per_page = np.repeat(plugged == 0, ppb)[:npages]
    bits = np.zeros(words_for(npages) * 64, np.uint8)
    bits[: len(per_page)] = per_page
    return np.packbits(bits, bitorder="little").view(np.uint64).copy()


def check_discard(report: StreamReport) -> ViolationList:
    """Every page record that fell in a virtio-mem block marked unplugged.

    Uses the pages-with-records bitmaps of the report; only if some page is in unplugged
    memory is the file read again to find each offending record's offset and kind.
    Devices without a bitmap or without a RAM block (see ``VirtioMemReport.mapping``) are
    not checked; the caller decides what that means.
    """
    out = ViolationList()
    watch: dict[str, np.ndarray] = {}
    owners: dict[str, VirtioMemReport] = {}
    page_bits = report.page_size.bit_length() - 1
    for dev in report.devices:
        if dev.bitmap is None or dev.ram_block is None:
            continue
        block = report.ram_blocks[dev.ram_block]
        npages = block.length >> page_bits
        bad = block.touched.words_for_pages(npages) & _unplugged_page_words(dev, npages, page_bits)
        n = int(np.bitwise_count(bad).sum())
        if n:
            watch[block.name] = bad
            owners[block.name] = dev
            out.pages += n
    if not watch:
        return out
    walker = _Walker(report.path, watch)
    walker.run()
    ram = walker.ram
    out.total = ram.hit_total
    ps = report.page_size
    for h in ram.hits:
        dev = owners[h.block]
        assert dev.block_size is not None
        off = h.page * ps
        out.append(
            Violation(
                device=dev.id,
                ram_block=h.block,
                kind=h.kind,
                stream_offset=h.stream_offset,
                block_offset=off,
                gpa=None if dev.addr is None else dev.addr + off,
                vmem_block=off // dev.block_size,
            )
        )
    return out
