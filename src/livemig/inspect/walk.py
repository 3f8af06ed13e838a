"""The walk over a stream file: header, configuration, every section and command in
stream order, the VMDESCRIPTION after the EOF record.

The trailer is found first (:mod:`livemig.inspect.trailer`), because the device sections
before it cannot be sized without it. The RAM section goes to
:class:`~livemig.inspect.ram.RamRecords` (the engine's record decoder), device sections
to :class:`~livemig.inspect.devices.VmsdDecoder`, and what they say about virtio-mem to
:class:`~livemig.inspect.virtio_mem.VirtioMemStates`.

Every format problem is a :class:`StreamError` carrying the absolute offset, so a damaged
file gets a message that can be checked against a hex dump. Things that are not damage
but cannot be interpreted (an iterative section of unknown format, a device section in a
stream without a VMDESCRIPTION) end the walk with :attr:`StreamReport.stopped` set
instead (:class:`~livemig.inspect.report.Stop`).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from livemig.inspect.devices import DescError, VmsdDecoder
from livemig.inspect.ram import RamRecords
from livemig.inspect.report import CommandReport, SectionReport, Stop, StreamReport
from livemig.inspect.trailer import find_vmdesc, parse_vmdesc_json
from livemig.inspect.virtio_mem import VirtioMemStates
from livemig.migration.stream.format import RAM_IDSTR, RAM_VERSION, MigCommand, RamFlag, SectionType
from livemig.migration.stream.qemu_file import (
    QEMUFileReader,
    StreamError,
    bytes_reader,
    open_reader,
)
from livemig.migration.stream.savevm import (
    SectionHeader,
    check_footer,
    read_command,
    read_configuration,
    read_header,
    read_section_header,
)

READ_BUFFER = 8 << 20
"""Reader buffer: each numpy pass over a run of PAGE records covers up to ~2000 records."""

MAX_PACKAGED = 1 << 24
"""QEMU's ``MAX_VM_CMD_PACKAGED_SIZE``: the largest postcopy package."""

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


class Walker:
    """One pass over a stream file. ``watch`` (the discard check's second pass) maps RAM
    block names to bitmaps of flagged pages, whose records :attr:`ram` collects."""

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
        self.ram = RamRecords(rep, watch)
        self.ram_section_id: int | None = None
        self.started: dict[int, str] = {}
        self.vmdesc_used: set[int] = set()
        self.vmdesc_next = 0
        self.vmem = VirtioMemStates(rep)

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
            except Stop as s:
                rep.stopped, rep.stopped_offset = s.reason, s.offset
            except (StreamError, OSError):
                raise
            except Exception as e:  # a reader bug must still name the place, not trace back
                raise StreamError(
                    self.r.tell(), f"internal error while parsing here: {type(e).__name__}: {e}"
                ) from e
            finally:
                self.vmem.finish()
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
        if self.ram.decoder is not None:  # RAM was read with a page size: it must not change
            raise StreamError(hdr.offset, "CONFIGURATION record after the RAM set-up section")
        conf = read_configuration(r)
        rep.configuration = conf
        caps = conf.get("capabilities") or []
        self.ram.mapped_ram = "mapped-ram" in caps  # pages at fixed file offsets, a bitmap
        self.ram.ignore_shared = "x-ignore-shared" in caps
        bits = conf.get("target_page_bits")
        if bits is not None:
            ps = 1 << bits
            if rep.vmdesc is not None and rep.page_size != ps:
                rep.warnings.append(
                    f"configuration says {ps}-byte pages, VMDESCRIPTION {rep.page_size}; using {ps}"
                )
            rep.page_size = ps

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
                    and _BE64.unpack(head)[0] & (self.report.page_size - 1) == RamFlag.MEM_SIZE
                ):
                    raise StreamError(
                        hdr.offset + 6,
                        f"START section {hdr.idstr!r} carries the RAM block list: damaged "
                        f"idstr (expected {RAM_IDSTR!r})",
                    )
                raise Stop(
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
        self.ram.setup(r, sec)
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
        dec = VmsdDecoder(r, self.report.file_size)
        try:
            values = dec.decode(entry, hdr.idstr)
        except DescError as e:
            raise StreamError(self.trailer.offset or 0, f"VMDESCRIPTION: {e}") from None
        self._footer(r, hdr.section_id)
        sec.end = r.tell()
        sec.fields = values
        self.vmem.section(hdr.idstr, sec, values, dec)

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
            raise Stop(
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
            parse_vmdesc_json(r.read_exact(n), loff + 4)
            raise StreamError(off, "VMDESCRIPTION does not start with '{'")
        r.skip(n)
        rep.vmdesc_offset, rep.vmdesc_size = off, n
        if not r.at_eof():
            raise StreamError(r.tell(), "data after the VMDESCRIPTION")

    def unused_vmdesc(self) -> list[str]:
        devices = (self.report.vmdesc or {}).get("devices") or []
        return [e["name"] for k, e in enumerate(devices) if k not in self.vmdesc_used]


def inspect_stream(path: str | os.PathLike[str]) -> StreamReport:
    """Walk the stream file at ``path`` and report what it holds.

    Raises :class:`StreamError` (with the offset) for a damaged or truncated file and
    ``OSError`` if it cannot be read. A stream that is valid as far as it goes but cannot
    be interpreted further comes back with ``stopped`` set and ``complete`` false.
    """
    return Walker(os.fspath(path)).run()
