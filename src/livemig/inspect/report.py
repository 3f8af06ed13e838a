"""What ``livemig inspect`` reports: the dataclasses of a :class:`StreamReport` and their JSON.

Everything here is plain data filled in by the walk (:mod:`livemig.inspect.walk`); the
``to_dict`` methods are the ``--json`` output, so their keys are an interface scripts rely
on (docs/inspect.md lists them). Decoded values are made JSON-safe and bounded by
:func:`jsonable`: a device's 16 MiB buffer must not become 16 MiB of hex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap, words_for
from livemig.migration.stream.format import DEFAULT_TARGET_PAGE_SIZE, RAM_IDSTR

MAX_VIOLATIONS = 100_000
"""Most offending records whose stream offset is collected; the rest are only counted."""


class Stop(Exception):
    """Not damage, but nothing more can be interpreted: the walk ends here, and the
    report says where and why (:attr:`StreamReport.stopped`)."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(offset, reason)
        self.offset = offset
        self.reason = reason


class PageSet:
    """Pages of one RAM block that received at least one record, as a growable bitmap.

    It grows to the highest page actually seen rather than to the block's announced
    length: a damaged MEM_SIZE list could announce a petabyte, and the bitmap must not be
    allocated from a number nobody checked. Pages of records that come one at a time (QEMU
    sends memory where zero and data pages alternate page by page) are queued in a list and
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

    # what the record decoder needs of a block (``livemig.migration.ram.codec.BlockLike``)
    @property
    def idstr(self) -> str:
        return self.name

    @property
    def used_length(self) -> int:
        return self.length

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


@dataclass(frozen=True)
class Skipped:
    """A raw field too large to keep: only its size is reported."""

    size: int


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
    if isinstance(v, Skipped):
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
