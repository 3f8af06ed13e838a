"""Bad input: the destination validates every field of an incoming stream.

A valid stream is produced once per module by a real source (``file:`` URI, small VM with a
virtio-mem device) and then corrupted at precise places, found by parsing it with the
project's own readers. Every corruption must fail the incoming migration with a message
naming the problem, leave the destination in ``inmigrate`` without having written guest RAM
beyond what the valid records before the problem wrote, and leave it able to accept a good
stream afterwards. On sockets, a failing or cancelled migration must leave the source's
guest running with its memory intact, and a retry must succeed.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.control.vm_controller import VMController
from livemig.devices import vmstate
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.memory.ram_block import RAMBlock
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.stream import savevm
from livemig.migration.stream.format import MigCommand, RamFlag, SectionType
from livemig.migration.stream.qemu_file import StreamError, bytes_reader, bytes_writer

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
BASE_RAM = 64 * MiB
VMEM_SIZE = GiB - 2 * MiB  # 511 blocks: the bitmap's last word has one unused bit
BLOCK_SIZE = 2 * MiB
PLUGGED = 32 * MiB
VMEM_ADDR = 4 * GiB
NBITS = VMEM_SIZE // BLOCK_SIZE
TIMEOUT = 30.0


def config(incoming: bool, **vmem: Any) -> MachineConfig:
    vm = {"size": VMEM_SIZE, "requested_size": PLUGGED, "block_size": BLOCK_SIZE, **vmem}
    return MachineConfig(
        memory=BASE_RAM,
        virtio_mem=VirtioMemConfig(**vm),
        incoming=incoming,
        workload=WorkloadConfig(vcpus=1, dirty_rate=0, content="mixed"),
    )


def boot_source() -> tuple[Machine, VMController]:
    """A running source whose guest has plugged its memory and written all of it once."""
    m = Machine(config(False))
    try:
        ctrl = VMController(m)
        m.start()
        deadline = time.monotonic() + TIMEOUT
        while not (
            m.driver is not None
            and m.driver.plugged_size == PLUGGED
            and m.workload.fill_done.is_set()
        ):
            assert time.monotonic() < deadline, "source guest did not settle"
            time.sleep(0.01)
    except BaseException:
        m.close()
        raise
    return m, ctrl


# -- the stream's layout ----------------------------------------------------------------------


@dataclass
class Sec:
    """One top-level record: a section (with footer), a command or the configuration."""

    type: SectionType
    offset: int  # the type byte
    payload: int  # first byte after the header
    end: int  # one past the record (after the footer, for sections)
    section_id: int | None = None
    idstr: str | None = None
    footer: int | None = None  # the 0x7e byte
    values: dict[str, Any] | None = None  # decoded vmstate of a device section


@dataclass
class Rec:
    """One RAM page record (ZERO or PAGE)."""

    offset: int
    flags: int
    block: str
    addr: int
    section: int  # index into Layout.sections
    name_at: int | None  # the u8 length of the block name, if the record names its block
    data_at: int  # fill byte or page data

    @property
    def page(self) -> int:
        return self.addr // PAGE


@dataclass
class Layout:
    sections: list[Sec] = field(default_factory=list)
    records: list[Rec] = field(default_factory=list)
    mem_size_at: int = 0
    ram_blocks: dict[str, tuple[int, int]] = field(default_factory=dict)  # name at, length at
    eos: list[int] = field(default_factory=list)  # offsets of every RAM EOS record
    eof_at: int = 0
    vmdesc_at: int = 0

    def device(self, idstr: str) -> Sec:
        return next(s for s in self.sections if s.idstr == idstr)

    def of_type(self, kind: SectionType) -> list[Sec]:
        return [s for s in self.sections if s.type == kind]

    def first_record(self, pred: Callable[[Rec], bool]) -> Rec:
        return next(r for r in self.records if pred(r))


def parse(data: bytes, machine: Machine) -> Layout:
    """Walk the stream with the project's readers and remember where everything is."""
    descs = {s.idstr: s.desc for s in machine.state}
    lay = Layout()
    r = bytes_reader(data)
    savevm.read_header(r)
    names: dict[int, str] = {}
    while True:
        hdr = savevm.read_section_header(r)
        if hdr.type == SectionType.EOF:
            lay.eof_at = hdr.offset
            break
        sec = Sec(hdr.type, hdr.offset, r.tell(), 0, hdr.section_id, hdr.idstr)
        if hdr.type == SectionType.CONFIGURATION:
            savevm.read_configuration(r)
        elif hdr.type == SectionType.COMMAND:
            savevm.read_command(r)
        else:
            assert hdr.section_id is not None
            if hdr.idstr is not None:
                names[hdr.section_id] = hdr.idstr
            sec.idstr = names[hdr.section_id]
            if sec.idstr == "ram":
                _parse_ram(r, lay, len(lay.sections))
            else:
                sec.values = vmstate.decode(descs[sec.idstr], r, hdr.version_id)
            sec.footer = r.tell()
            savevm.check_footer(r, hdr.section_id)
        sec.end = r.tell()
        lay.sections.append(sec)
    lay.vmdesc_at = r.tell()
    assert savevm.read_section_header(r).type == SectionType.VMDESCRIPTION
    savevm.read_vmdesc(r)
    assert r.at_eof()
    return lay


def _parse_ram(r: Any, lay: Layout, index: int) -> None:
    block = ""
    while True:
        at = r.tell()
        v = r.get_be64()
        flags, addr = v & (PAGE - 1), v & ~(PAGE - 1)
        if flags == RamFlag.EOS:
            lay.eos.append(at)
            return
        if flags == RamFlag.MEM_SIZE:
            lay.mem_size_at = at
            remaining = addr
            while remaining:
                name_at = r.tell()
                name = r.get_counted_string().decode()
                lay.ram_blocks[name] = (name_at, r.tell())
                remaining -= r.get_be64()
            continue
        name_at = None
        if not flags & RamFlag.CONTINUE:
            name_at = r.tell()
            block = r.get_counted_string().decode()
        lay.records.append(Rec(at, flags, block, addr, index, name_at, r.tell()))
        r.skip(1 if flags & RamFlag.ZERO else PAGE)


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Stream:
    data: bytes
    layout: Layout
    checksum: str

    def patch(self, offset: int, new: bytes) -> bytes:
        return self.data[:offset] + new + self.data[offset + len(new) :]

    def put(self, offset: int, fmt: str, value: int) -> bytes:
        return self.patch(offset, struct.pack(fmt, value))

    def insert(self, offset: int, new: bytes) -> bytes:
        return self.data[:offset] + new + self.data[offset:]

    def cut(self, start: int, end: int) -> bytes:
        return self.data[:start] + self.data[end:]

    def xor(self, offset: int, mask: int) -> bytes:
        return self.patch(offset, bytes([self.data[offset] ^ mask]))


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Stream:
    path = tmp_path_factory.mktemp("stream") / "good.mig"
    src, ctrl = boot_source()
    try:
        ctrl.migrate(f"file:{path}")
        assert ctrl.outgoing is not None and ctrl.outgoing.wait(TIMEOUT)
        assert ctrl.query_migrate()["status"] == "completed"
        data = path.read_bytes()
        return Stream(data, parse(data, src), src.checksum())
    finally:
        src.close()


class Dst:
    """A destination VM waiting in ``inmigrate``, fed from files."""

    def __init__(self, tmp: Path, **vmem: Any):
        self.machine = Machine(config(True, **vmem))
        self.ctrl = VMController(self.machine, autostart=False)
        self.tmp = tmp
        self.n = 0

    def load(self, data: bytes) -> dict[str, Any]:
        self.n += 1
        path = self.tmp / f"in{self.n}.mig"
        path.write_bytes(data)
        self.ctrl.migrate_incoming(f"file:{path}")
        inc = self.ctrl.incoming
        assert inc is not None
        assert inc.wait(TIMEOUT), "incoming migration hung"
        inc.job.join(TIMEOUT)
        assert not inc.job.thread_alive
        path.unlink()
        return self.ctrl.query_migrate()

    def expect_failure(self, data: bytes, *fragments: str) -> str:
        info = self.load(data)
        desc = info.get("error-desc", "")
        assert info["status"] == "failed", info
        for frag in fragments:
            assert frag in desc, f"{frag!r} not in {desc!r}"
        assert self.machine.runstate == "inmigrate"
        assert self.ctrl.query_status()["status"] == "inmigrate"
        return desc

    def expect_success(self, stream: Stream) -> None:
        info = self.load(stream.data)
        assert info["status"] == "completed", info
        assert self.machine.runstate == "paused"
        assert self.machine.checksum() == stream.checksum

    def allocated(self) -> int:
        return sum(b.allocated_bytes(0, b.max_length) for b in self.machine.blocks)

    def block(self, name: str) -> RAMBlock:
        return next(b for b in self.machine.blocks if b.idstr == name)

    def close(self) -> None:
        self.machine.close()


@pytest.fixture
def make_dst(tmp_path: Path) -> Iterator[Callable[..., Dst]]:
    made: list[Dst] = []

    def make(**vmem: Any) -> Dst:
        d = Dst(tmp_path, **vmem)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def dst(make_dst: Callable[..., Dst]) -> Dst:
    return make_dst()


# -- what a failed load may have written --------------------------------------------------------


def first_difference(good: bytes, bad: bytes) -> int:
    """Where ``bad`` stops being the good stream: everything before it was valid."""
    n = min(len(good), len(bad))
    a = np.frombuffer(good, np.uint8, n)
    b = np.frombuffer(bad, np.uint8, n)
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if len(diff) else n


def check_ram_writes(dst: Dst, stream: Stream, bad: bytes) -> None:
    """Guest RAM holds data only in pages of PAGE records that lie wholly before the
    corruption: nothing of a bad record, and nothing outside any block's used length."""
    valid_end = first_difference(stream.data, bad)
    allowed: dict[str, list[int]] = {b.idstr: [] for b in dst.machine.blocks}
    for rec in stream.layout.records:
        if rec.flags & RamFlag.PAGE and rec.data_at + PAGE <= valid_end:
            allowed[rec.block].append(rec.page)
    if not any(allowed.values()):
        assert dst.allocated() == 0, "guest RAM was written before any valid page record"
        return
    for block in dst.machine.blocks:
        pages = np.arange(block.max_length // PAGE)
        may_hold = block.data_page_mask(pages)
        may_hold[np.asarray(allowed[block.idstr], np.int64)] = False
        idx = np.flatnonzero(may_hold)
        if len(idx):
            rows = block.pages_array(0, block.max_length)[idx]
            stray = idx[np.flatnonzero(rows.any(axis=1))]
            assert not len(stray), f"{block.idstr}: pages {stray[:8]} written by no valid record"


# -- corruptions ----------------------------------------------------------------------------------

Corruption = Callable[[Stream], bytes]


def be(fmt: str, value: int) -> bytes:
    return struct.pack(fmt, value)


def rename(s: Stream, name_at: int, new: str) -> bytes:
    """Replace a counted string (same length) at ``name_at``."""
    assert len(new) == s.data[name_at]
    return s.patch(name_at + 1, new.encode())


def set_rec(s: Stream, rec: Rec, *, flags: int | None = None, addr: int | None = None) -> bytes:
    f = rec.flags if flags is None else flags
    a = rec.addr if addr is None else addr
    return s.put(rec.offset, ">Q", a | f)


def pc_ram(s: Stream, flags: int, nth: int = 0) -> Rec:
    """The ``nth`` CONTINUE record of ``flags`` in pc.ram, well inside the first PART."""
    recs = [r for r in s.layout.records if r.block == "pc.ram" and r.flags == flags | RamFlag.CONTINUE]
    return recs[200 + nth]


def vmem_rec(s: Stream, flags: int) -> Rec:
    return s.layout.first_record(
        lambda r: r.block == "vm0-memdev" and r.flags == flags | RamFlag.CONTINUE
    )


def first_rec(s: Stream) -> Rec:
    return s.layout.records[0]


def early(s: Stream) -> Sec:
    return s.layout.device("vm0/virtio-mem-device-early")


def late(s: Stream) -> Sec:
    return s.layout.device("vm0/virtio-mem")


def guest(s: Stream) -> Sec:
    return s.layout.device("livemig-guest")


def ram_start(s: Stream) -> Sec:
    return s.layout.of_type(SectionType.START)[0]


def first_part(s: Stream) -> Sec:
    return s.layout.of_type(SectionType.PART)[0]


def config_rec(s: Stream) -> Sec:
    return s.layout.of_type(SectionType.CONFIGURATION)[0]


def after_config(s: Stream) -> int:
    return config_rec(s).end


def command(cmd: int, payload: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + be(">H", cmd) + be(">H", len(payload)) + payload


def configuration(**kw: Any) -> bytes:
    w = bytes_writer()
    savevm.write_configuration(w, "livemig-soft", **kw)
    return w.getvalue()


def replace_config(s: Stream, **kw: Any) -> bytes:
    c = config_rec(s)
    return s.data[: c.offset] + configuration(**kw) + s.data[c.end :]


def subsection(name: str, version: int = 1) -> bytes:
    return bytes([SectionType.SUBSECTION, len(name)]) + name.encode() + be(">I", version)


def mem_size_total(s: Stream) -> int:
    return struct.unpack_from(">Q", s.data, s.layout.mem_size_at)[0] & ~(PAGE - 1)


# early section payload: addr, region_size, block_size (be64), node (be32), size (be64), bitmap
EARLY_ADDR, EARLY_REGION, EARLY_BLOCK, EARLY_NODE, EARLY_SIZE, EARLY_BITMAP = 0, 8, 16, 24, 28, 36
LAST_WORD = EARLY_BITMAP + (NBITS // 64) * 8

# (case id, corruption, fragments the error must contain, whether to retry with a good stream)
CASES: list[tuple[str, Corruption, tuple[str, ...], bool]] = [
    # header
    ("magic", lambda s: s.patch(0, b"QEVN"), ("not a migration stream: magic 0x5145564e",), True),
    ("version-2", lambda s: s.put(4, ">I", 2), ("unsupported stream version 2",), False),
    ("version-4", lambda s: s.put(4, ">I", 4), ("unsupported stream version 4",), False),
    # configuration
    (
        "machine-type",
        lambda s: s.patch(config_rec(s).end - 1, b"x"),
        ("Machine type received is 'livemig-sofx' and local is 'livemig-soft'",),
        True,
    ),
    (
        "machine-name-oversized",
        lambda s: s.put(config_rec(s).payload, ">I", 0xFFFFFFFF),
        ("exceeds the limit of 256",),
        False,
    ),
    (
        "configuration-missing",
        lambda s: s.cut(config_rec(s).offset, config_rec(s).end),
        ("Configuration section missing",),
        False,
    ),
    (
        "second-configuration",
        lambda s: s.insert(after_config(s), s.data[config_rec(s).offset : config_rec(s).end]),
        ("second configuration section",),
        False,
    ),
    (
        "second-configuration-late",
        lambda s: s.insert(first_part(s).offset, configuration()),
        ("second configuration section",),
        False,
    ),
    (
        "capability-mismatch",
        lambda s: replace_config(s, capabilities=["x-ignore-shared"]),
        ("Capability x-ignore-shared is off, but received capability is on",),
        False,
    ),
    (
        "capability-unknown",
        lambda s: replace_config(s, capabilities=["x-bogus"]),
        ("Received unknown capability x-bogus",),
        False,
    ),
    (
        "target-page-bits",
        lambda s: replace_config(s, target_page_bits=16),
        ("target page bits 16",),
        False,
    ),
    # section framing
    ("unknown-section-type", lambda s: s.patch(ram_start(s).offset, b"\x09"), ("unknown section type 0x09",), False),
    ("subsection-at-top", lambda s: s.patch(ram_start(s).offset, b"\x05"), ("unexpected section type 0x05",), False),
    (
        "unknown-section",
        lambda s: rename(s, guest(s).offset + 5, "livemig-guesx"),
        ("Unknown savevm section or instance 'livemig-guesx' 0",),
        True,
    ),
    (
        "unknown-instance",
        lambda s: s.put(guest(s).payload - 8, ">I", 1),
        ("Unknown savevm section or instance 'livemig-guest' 1",),
        False,
    ),
    ("ram-version", lambda s: s.put(ram_start(s).payload - 4, ">I", 5), ("unsupported RAM section version 5",), False),
    (
        "device-version",
        lambda s: s.put(early(s).payload - 4, ">I", 2),
        ("unsupported version 2 for 'vm0/virtio-mem-device-early'",),
        False,
    ),
    (
        "device-section-not-full",
        lambda s: s.patch(guest(s).offset, bytes([SectionType.START])),
        ("device section 'livemig-guest' must be FULL",),
        False,
    ),
    (
        "ram-start-twice",
        lambda s: s.insert(
            ram_start(s).end,
            s.data[ram_start(s).offset : ram_start(s).offset + 1]
            + be(">I", 9)
            + s.data[ram_start(s).offset + 5 : ram_start(s).footer]
            + b"\x7e"
            + be(">I", 9),
        ),
        ("RAM section sent twice",),
        False,
    ),
    (
        "device-twice",
        lambda s: s.insert(
            s.layout.eof_at,
            s.data[guest(s).offset : guest(s).offset + 1]
            + be(">I", 9)
            + s.data[guest(s).offset + 5 : guest(s).footer]
            + b"\x7e"
            + be(">I", 9),
        ),
        ("device section 'livemig-guest' sent twice",),
        False,
    ),
    (
        "section-id-reused",
        lambda s: s.put(guest(s).offset + 1, ">I", 2),
        ("section id 2 used twice",),
        False,
    ),
    ("footer-mismatch", lambda s: s.put(ram_start(s).footer + 1, ">I", 7), ("section footer mismatch: expected id 1, got 7",), True),
    ("footer-missing", lambda s: s.patch(early(s).footer, b"\x7f"), ("missing section footer for section 2",), False),
    (
        "footer-mismatch-part",
        lambda s: s.put(first_part(s).footer + 1, ">I", 3),
        ("section footer mismatch: expected id 1, got 3",),
        True,
    ),
    ("part-unknown-id", lambda s: s.put(first_part(s).offset + 1, ">I", 9), ("unknown section id 9",), False),
    (
        "part-of-device",
        lambda s: s.put(first_part(s).offset + 1, ">I", 2),
        ("section 'vm0/virtio-mem-device-early' is not iterative",),
        False,
    ),
    # commands
    ("unknown-command", lambda s: s.insert(after_config(s), command(12)), ("unknown migration command 12",), False),
    ("invalid-command", lambda s: s.insert(after_config(s), command(0)), ("invalid migration command 0",), False),
    (
        "unsupported-command",
        lambda s: s.insert(after_config(s), command(MigCommand.POSTCOPY_ADVISE)),
        ("unsupported migration command 3",),
        False,
    ),
    (
        "command-bad-length",
        lambda s: s.insert(after_config(s), command(MigCommand.PING, b"\0\0\1")),
        ("command PING: bad length 3, expected 4",),
        False,
    ),
    (
        "command-oversized",
        lambda s: s.insert(after_config(s), command(MigCommand.OPEN_RETURN_PATH, bytes(0xFFFF))),
        ("command OPEN_RETURN_PATH: bad length 65535, expected 0",),
        False,
    ),
    (
        "ping-without-return-path",
        lambda s: s.insert(after_config(s), command(MigCommand.PING, be(">I", 0x1234))),
        ("CMD_PING (0x1234) received with no return path",),
        False,
    ),
    (
        "return-path-on-file",
        lambda s: s.insert(after_config(s), command(MigCommand.OPEN_RETURN_PATH)),
        ("return path requested on a one-way channel",),
        False,
    ),
    # RAM setup
    (
        "setup-unknown-block",
        lambda s: rename(s, s.layout.ram_blocks["pc.ram"][0], "pc.rbm"),
        ('Unknown ramblock "pc.rbm", cannot accept migration',),
        True,
    ),
    (
        "setup-length-mismatch",
        lambda s: s.put(s.layout.ram_blocks["pc.ram"][1], ">Q", 2 * BASE_RAM),
        (f"Length mismatch: pc.ram: 0x{2 * BASE_RAM:x} in != 0x{BASE_RAM:x}",),
        False,
    ),
    (
        "setup-total-mismatch",
        lambda s: s.put(s.layout.mem_size_at, ">Q", (mem_size_total(s) - 2 * MiB) | RamFlag.MEM_SIZE),
        ("RAM size mismatch",),
        False,
    ),
    (
        "setup-not-mem-size",
        lambda s: s.put(s.layout.mem_size_at, ">Q", mem_size_total(s) | RamFlag.PAGE),
        ("expected MEM_SIZE record, got flags 0x8",),
        False,
    ),
    (
        "setup-no-eos",
        lambda s: s.put(s.layout.eos[0], ">Q", RamFlag.EOS | PAGE),
        ("RAM section: expected EOS",),
        False,
    ),
    # RAM records
    (
        "offset-beyond-used-length",
        lambda s: set_rec(s, first_rec(s), addr=BASE_RAM),
        (f'RAM record offset 0x{BASE_RAM:x} beyond used length 0x{BASE_RAM:x} of block "pc.ram"',),
        True,
    ),
    (
        "offset-huge",
        lambda s: set_rec(s, first_rec(s), addr=(1 << 64) - PAGE),
        ("RAM record offset 0xfffffffffffff000 beyond used length",),
        False,
    ),
    (
        "offset-beyond-in-page-run",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), addr=BASE_RAM + 5 * PAGE),
        (f"RAM record offset 0x{BASE_RAM + 5 * PAGE:x} beyond used length",),
        True,
    ),
    (
        "offset-beyond-in-zero-run",
        lambda s: set_rec(s, pc_ram(s, RamFlag.ZERO), addr=BASE_RAM),
        ("beyond used length",),
        False,
    ),
    (
        "offset-beyond-vmem",
        lambda s: set_rec(s, vmem_rec(s, RamFlag.PAGE), addr=VMEM_SIZE),
        (f'RAM record offset 0x{VMEM_SIZE:x} beyond used length 0x{VMEM_SIZE:x} of block "vm0-memdev"',),
        False,
    ),
    (
        "unknown-flag-0x100",
        lambda s: set_rec(s, first_rec(s), flags=RamFlag.ZERO | 0x100),
        ("unknown RAM record flags 0x102",),
        False,
    ),
    (
        "unknown-flag-in-run",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), flags=RamFlag.PAGE | RamFlag.CONTINUE | 0x400),
        ("unknown RAM record flags 0x428",),
        True,
    ),
    (
        "unknown-flag-0x800",
        lambda s: set_rec(s, pc_ram(s, RamFlag.ZERO), flags=RamFlag.ZERO | RamFlag.CONTINUE | 0x800),
        ("unknown RAM record flags 0x822",),
        False,
    ),
    (
        "obsolete-flag-full",
        lambda s: set_rec(s, pc_ram(s, RamFlag.ZERO), flags=RamFlag.ZERO | RamFlag.CONTINUE | 0x001),
        ("unknown RAM record flags 0x23",),
        False,
    ),
    (
        "xbzrle-flag",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), flags=RamFlag.XBZRLE | RamFlag.CONTINUE),
        ("unsupported RAM record flags 0x60",),
        False,
    ),
    (
        "record-without-type",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), flags=RamFlag.CONTINUE),
        ("RAM record with no type (flags 0x20)",),
        False,
    ),
    (
        "record-zero-and-page",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), flags=RamFlag.PAGE | RamFlag.ZERO | RamFlag.CONTINUE),
        ("RAM record with several types (flags 0x2a)",),
        False,
    ),
    (
        "eos-with-address",
        lambda s: s.put(s.layout.eos[1], ">Q", PAGE | RamFlag.EOS),
        ("malformed RAM EOS record",),
        False,
    ),
    (
        "mem-size-in-iteration",
        lambda s: set_rec(s, pc_ram(s, RamFlag.PAGE), flags=RamFlag.MEM_SIZE),
        ("MEM_SIZE record outside the RAM setup section",),
        False,
    ),
    (
        "record-unknown-block",
        lambda s: rename(s, first_rec(s).name_at or 0, "pc.rbm"),
        ('Unknown ramblock "pc.rbm"',),
        False,
    ),
    (
        "zero-fill-named-record",
        lambda s: s.patch(first_rec(s).data_at, b"\x01"),
        ("ZERO record with fill byte 0x01 (must be 0)",),
        False,
    ),
    (
        "zero-fill-in-run",
        lambda s: s.patch(pc_ram(s, RamFlag.ZERO).data_at, b"\xff"),
        ("ZERO record with fill byte 0xff (must be 0)",),
        True,
    ),
    (
        "continue-without-block",
        lambda s: set_rec(s, first_rec(s), flags=first_rec(s).flags | RamFlag.CONTINUE),
        ("RAM record CONTINUE without a previous block",),
        False,
    ),
    (
        "continue-across-sections",
        lambda s: set_rec(
            s,
            s.layout.first_record(lambda r: r.section > first_rec(s).section),
            flags=RamFlag.ZERO | RamFlag.CONTINUE,
        ),
        ("RAM record CONTINUE without a previous block",),
        False,
    ),
    (
        "truncated-page-in-run",
        lambda s: s.data[: pc_ram(s, RamFlag.PAGE).data_at + 100],
        ("truncated stream",),
        True,
    ),
    (
        "truncated-named-page",
        lambda s: s.data[: first_rec(s).offset]
        + be(">Q", RamFlag.PAGE)
        + b"\x06pc.ram"
        + b"\xab" * 100,
        ("truncated stream",),
        False,
    ),
    (
        "truncated-record-header",
        lambda s: s.data[: pc_ram(s, RamFlag.ZERO).offset + 3],
        ("truncated stream",),
        False,
    ),
    # device state
    (
        "sanity-memaddr",
        lambda s: s.put(early(s).payload + EARLY_ADDR, ">Q", 8 * GiB),
        ("Property 'memaddr' changed from 0x200000000 to 0x100000000",),
        True,
    ),
    (
        "sanity-memdev-size",
        lambda s: s.put(early(s).payload + EARLY_REGION, ">Q", GiB),
        (f"Property 'memdev' size changed from 0x40000000 to 0x{VMEM_SIZE:x}",),
        False,
    ),
    (
        "sanity-block-size",
        lambda s: s.put(early(s).payload + EARLY_BLOCK, ">Q", 4 * MiB),
        ("Property 'block-size' changed from 0x400000 to 0x200000",),
        False,
    ),
    (
        "sanity-node",
        lambda s: s.put(early(s).payload + EARLY_NODE, ">I", 1),
        ("Property 'node' changed from 1 to 0",),
        False,
    ),
    (
        "sanity-late-section",
        lambda s: s.put(late(s).payload + EARLY_BLOCK, ">Q", 1 * MiB),
        ("vm0/virtio-mem:", "Property 'block-size' changed from 0x100000 to 0x200000"),
        True,
    ),
    (
        "bitmap-bits-beyond-size",
        lambda s: s.xor(early(s).payload + LAST_WORD, 0x80),
        (f"has bits set beyond its {NBITS} bits",),
        False,
    ),
    (
        "plugged-size-mismatch",
        lambda s: s.put(early(s).payload + EARLY_SIZE, ">Q", PLUGGED + BLOCK_SIZE),
        ("does not match the bitmap",),
        False,
    ),
    (
        "requested-size-invalid",
        lambda s: s.put(late(s).payload + 36, ">Q", VMEM_SIZE + BLOCK_SIZE),
        ("requested-size 0x", "is invalid"),
        False,
    ),
    (
        "unknown-subsection",
        lambda s: s.insert(guest(s).footer, subsection("livemig-guest/extra")),
        ("livemig-guest: unknown subsection 'livemig-guest/extra'",),
        False,
    ),
    (
        "missing-early-section",
        lambda s: s.cut(early(s).offset, early(s).end),
        ("vm0/virtio-mem: device state before its early section",),
        False,
    ),
    (
        "missing-device-section",
        lambda s: s.cut(late(s).offset, late(s).end),
        ("stream ended without device state for vm0/virtio-mem",),
        False,
    ),
    (
        "missing-guest-section",
        lambda s: s.cut(guest(s).offset, guest(s).end),
        ("stream ended without device state for livemig-guest",),
        True,
    ),
    (
        "missing-ram-section",
        lambda s: s.cut(ram_start(s).offset, s.layout.sections[s.layout.sections.index(ram_start(s)) + 1].offset),
        ("unknown section id 1",),
        False,
    ),
    # after EOF
    (
        "garbage-after-eof",
        lambda s: s.patch(s.layout.vmdesc_at, b"\x01"),
        ("unexpected byte 0x01 after EOF",),
        True,
    ),
    (
        "vmdesc-not-json",
        lambda s: s.patch(s.layout.vmdesc_at + 5, b"x"),
        ("VMDESCRIPTION is not valid JSON",),
        False,
    ),
    (
        "vmdesc-oversized",
        lambda s: s.put(s.layout.vmdesc_at + 1, ">I", 0xFFFFFFFF),
        ("VMDESCRIPTION of 4294967295 bytes exceeds the limit",),
        False,
    ),
    (
        "data-after-vmdesc",
        lambda s: s.data + b"\0",
        ("unexpected data after VMDESCRIPTION",),
        False,
    ),
    ("eof-missing", lambda s: s.data[: s.layout.eof_at], ("truncated stream",), False),
]


@pytest.mark.parametrize(
    "corrupt, fragments, retry",
    [pytest.param(c, f, r, id=name) for name, c, f, r in CASES],
)
def test_corrupt_stream_fails_cleanly(
    stream: Stream, dst: Dst, corrupt: Corruption, fragments: tuple[str, ...], retry: bool
):
    bad = corrupt(stream)
    assert bad != stream.data
    dst.expect_failure(bad, "stream offset 0x", *fragments)
    if len(bad) >= len(stream.data) or stream.data.startswith(bad):
        check_ram_writes(dst, stream, bad)  # (a cut shifts valid records: nothing to check)
    if retry:
        dst.expect_success(stream)


@pytest.mark.parametrize(
    "where",
    ["header", "magic", "configuration", "ram-setup", "early-bitmap", "part-header", "device", "eof"],
)
def test_truncated_stream(stream: Stream, dst: Dst, where: str):
    lay = stream.layout
    at = {
        "header": 0,
        "magic": 3,
        "configuration": config_rec(stream).payload + 6,
        "ram-setup": lay.ram_blocks["vm0-memdev"][1] + 2,
        "early-bitmap": early(stream).payload + EARLY_BITMAP + 3,
        "part-header": first_part(stream).offset + 2,
        "device": guest(stream).payload + 9,
        "eof": lay.eof_at,
    }[where]
    bad = stream.data[:at]
    dst.expect_failure(bad, "truncated stream")
    check_ram_writes(dst, stream, bad)


def test_good_stream_and_optional_vmdesc(stream: Stream, make_dst: Callable[..., Dst]):
    make_dst().expect_success(stream)
    # the VMDESCRIPTION trailer is optional
    d = make_dst()
    info = d.load(stream.data[: stream.layout.vmdesc_at])
    assert info["status"] == "completed", info
    assert d.machine.checksum() == stream.checksum


@pytest.mark.parametrize(
    "vmem, fragments",
    [
        pytest.param(
            {"memaddr": 8 * GiB}, ("Property 'memaddr' changed from 0x100000000 to 0x200000000",), id="memaddr"
        ),
        pytest.param(
            {"block_size": MiB}, ("Property 'block-size' changed from 0x200000 to 0x100000",), id="block-size"
        ),
        pytest.param({"node": 1}, ("Property 'node' changed from 0 to 1",), id="node"),
        # the memdev's RAM block is listed (and checked) before any device state arrives
        pytest.param(
            {"size": GiB}, (f'Length mismatch: vm0-memdev: 0x{VMEM_SIZE:x} in != 0x{GiB:x}',), id="memdev-size"
        ),
    ],
)
def test_destination_with_other_virtio_mem_geometry(
    stream: Stream, make_dst: Callable[..., Dst], vmem: dict[str, Any], fragments: tuple[str, ...]
):
    d = make_dst(**vmem)
    d.expect_failure(stream.data, *fragments)
    assert d.allocated() == 0  # refused before any page was written


# -- random damage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def hot_offsets(s: Stream) -> list[int]:
    """Framing bytes worth hitting more often than page data."""
    lay = s.layout
    out = [0, 4, lay.mem_size_at, lay.eof_at, lay.vmdesc_at, *lay.eos]
    for sec in lay.sections:
        out += [sec.offset, sec.payload, sec.end - 5]
    out += [o for _, o in lay.ram_blocks.values()]
    recs = lay.records
    for rec in (recs[0], recs[1], recs[len(recs) // 2], recs[-1], *(r for r in recs if r.name_at)):
        out += [rec.offset, rec.data_at]
    return sorted(set(out))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_never_hurts_the_destination(stream: Stream, workdir: Path, data: st.DataObject):
    n = len(stream.data)
    hot = hot_offsets(stream)
    pos = data.draw(
        st.one_of(
            st.integers(0, n - 1),
            st.tuples(st.sampled_from(hot), st.integers(0, 15)).map(lambda t: min(t[0] + t[1], n - 1)),
        ),
        label="position",
    )
    if data.draw(st.booleans(), label="truncate"):
        bad = stream.data[:pos]
    else:
        bad = stream.xor(pos, data.draw(st.integers(1, 255), label="xor"))
    d = Dst(workdir)
    try:
        info = d.load(bad)
        st_ = info["status"]
        assert st_ in ("completed", "failed"), info
        if st_ == "failed":
            # every failure is a validated stream error, not an exception from a missed check
            assert info["error-desc"].startswith("stream offset 0x"), info["error-desc"]
            assert d.machine.runstate == "inmigrate"
        else:
            assert d.machine.runstate == "paused"
    finally:
        d.close()


# -- sockets: the source survives a bad destination ------------------------------------------


@pytest.fixture
def source() -> Iterator[tuple[Machine, VMController]]:
    m, ctrl = boot_source()
    try:
        yield m, ctrl
    finally:
        m.close()


def wait_out(ctrl: VMController) -> dict[str, Any]:
    assert ctrl.outgoing is not None and ctrl.outgoing.wait(TIMEOUT), "source migration hung"
    return ctrl.query_migrate()


def wait_in(d: Dst) -> dict[str, Any]:
    assert d.ctrl.incoming is not None and d.ctrl.incoming.wait(TIMEOUT), "destination hung"
    return d.ctrl.query_migrate()


def assert_source_intact(src: Machine, ctrl: VMController, final: str, before: str) -> None:
    info = wait_out(ctrl)
    assert info["status"] == final, info
    if final == "failed":
        assert info.get("error-desc"), info
    assert src.runstate == "running"
    assert ctrl.query_status() == {"running": True, "singlestep": False, "status": "running"}
    assert src.checksum() == before


def migrate_ok(src: Machine, ctrl: VMController, d: Dst, uri: str, before: str) -> None:
    """A retry to a good destination completes with the source's memory."""
    ctrl.migrate_set_parameters(max_bandwidth=0)
    d.ctrl.migrate_incoming(uri)
    ctrl.migrate(uri)
    assert wait_out(ctrl)["status"] == "completed"
    assert wait_in(d)["status"] == "completed"
    assert src.runstate == "postmigrate"
    assert d.machine.checksum() == before == src.checksum()


def test_socket_destination_with_other_block_size(
    source: tuple[Machine, VMController], make_dst: Callable[..., Dst], tmp_path: Path
):
    src, ctrl = source
    before = src.checksum()
    bad = make_dst(block_size=MiB)
    uri = f"unix:{tmp_path / 'bad.sock'}"
    bad.ctrl.migrate_incoming(uri)
    ctrl.migrate(uri)
    assert_source_intact(src, ctrl, "failed", before)
    info = wait_in(bad)
    assert info["status"] == "failed"
    assert "Property 'block-size' changed from 0x200000 to 0x100000" in info["error-desc"]
    assert bad.machine.runstate == "inmigrate"
    migrate_ok(src, ctrl, make_dst(), f"unix:{tmp_path / 'good.sock'}", before)


def test_socket_destination_fails_after_switchover(
    source: tuple[Machine, VMController], make_dst: Callable[..., Dst], tmp_path: Path
):
    """The destination refuses the last device section: the source had stopped its guest
    for the switchover and must let it run again."""
    src, ctrl = source
    before = src.checksum()
    d = make_dst()
    uri = f"unix:{tmp_path / 'late.sock'}"
    d.ctrl.migrate_incoming(uri)
    assert d.ctrl.incoming is not None

    section = d.machine.state.find("livemig-guest")
    assert section is not None
    original = section.load

    def refuse(r: Any, version: int, ctx: Any) -> None:
        section.load = original  # the owner's section: refuse this one load only
        raise StreamError(r.tell(), "livemig-guest: refused by the test")

    section.load = refuse
    ctrl.migrate(uri)
    assert_source_intact(src, ctrl, "failed", before)
    info = wait_in(d)
    assert info["status"] == "failed" and "refused by the test" in info["error-desc"]
    # the reason reaches the source, named, not only "Broken pipe"
    desc = ctrl.query_migrate()["error-desc"]
    assert "destination reported a failed migration" in desc and "refused by the test" in desc, desc
    assert d.machine.runstate == "inmigrate"
    # the same destination accepts a new incoming migration
    migrate_ok(src, ctrl, d, f"unix:{tmp_path / 'again.sock'}", before)


class FakeDestination:
    """A socket peer that reads ``limit`` bytes (all, if None), then closes without a word."""

    def __init__(self, path: Path, limit: int | None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.limit = limit
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while self.limit is None or self.received < self.limit:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                self.received += len(chunk)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(TIMEOUT)


def test_socket_destination_closes_the_connection(
    source: tuple[Machine, VMController], make_dst: Callable[..., Dst], tmp_path: Path
):
    src, ctrl = source
    before = src.checksum()
    fake = FakeDestination(tmp_path / "close.sock", limit=4 * MiB)
    try:
        ctrl.migrate(f"unix:{tmp_path / 'close.sock'}")
        assert_source_intact(src, ctrl, "failed", before)
    finally:
        fake.close()
    assert fake.received >= 4 * MiB
    migrate_ok(src, ctrl, make_dst(), f"unix:{tmp_path / 'good.sock'}", before)


# -- migrate_cancel ---------------------------------------------------------------------------


def test_cancel_during_setup(
    source: tuple[Machine, VMController],
    make_dst: Callable[..., Dst],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    src, ctrl = source
    before = src.checksum()
    entered, release = threading.Event(), threading.Event()
    setup = OutgoingMigration.write_stream_start

    def gated_setup(self: OutgoingMigration) -> None:
        entered.set()
        release.wait(TIMEOUT)
        setup(self)

    monkeypatch.setattr(OutgoingMigration, "write_stream_start", gated_setup)
    d = make_dst()
    uri = f"unix:{tmp_path / 'setup.sock'}"
    d.ctrl.migrate_incoming(uri)
    ctrl.migrate(uri)
    assert entered.wait(TIMEOUT)
    assert ctrl.query_migrate()["status"] == "setup"
    ctrl.migrate_cancel()
    assert ctrl.query_migrate()["status"] in ("cancelling", "cancelled")
    release.set()
    assert_source_intact(src, ctrl, "cancelled", before)
    # the destination saw the stream end early and waits for another try
    info = wait_in(d)
    assert info["status"] == "failed" and info["error-desc"]
    assert d.machine.runstate == "inmigrate"
    monkeypatch.undo()
    migrate_ok(src, ctrl, d, f"unix:{tmp_path / 'retry.sock'}", before)


def test_cancel_during_throttled_iteration(
    source: tuple[Machine, VMController], make_dst: Callable[..., Dst], tmp_path: Path
):
    src, ctrl = source
    before = src.checksum()
    ctrl.migrate_set_parameters(max_bandwidth=20_000_000)
    d = make_dst()
    uri = f"unix:{tmp_path / 'slow.sock'}"
    d.ctrl.migrate_incoming(uri)
    ctrl.migrate(uri)
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = ctrl.query_migrate()
        if info["status"] == "active" and info["ram"]["transferred"] > 2 * MiB:
            break
        assert info["status"] in ("setup", "active") and time.monotonic() < deadline, info
        time.sleep(0.01)
    ctrl.migrate_cancel()
    assert_source_intact(src, ctrl, "cancelled", before)
    assert ctrl.query_migrate()["ram"]["transferred"] < 48 * MiB  # it was really throttled
    info = wait_in(d)
    assert info["status"] == "failed" and d.machine.runstate == "inmigrate"
    migrate_ok(src, ctrl, d, f"unix:{tmp_path / 'retry.sock'}", before)


def test_cancel_while_waiting_for_the_destination(
    source: tuple[Machine, VMController], make_dst: Callable[..., Dst], tmp_path: Path
):
    """Everything is sent and the guest is stopped, but the destination never answers:
    cancelling then must give the source its running guest back."""
    src, ctrl = source
    before = src.checksum()
    fake = FakeDestination(tmp_path / "mute.sock", limit=None)
    try:
        ctrl.migrate(f"unix:{tmp_path / 'mute.sock'}")
        deadline = time.monotonic() + TIMEOUT
        while ctrl.query_migrate()["status"] != "device":
            assert time.monotonic() < deadline and ctrl.outgoing is not None
            assert ctrl.outgoing.is_running(), ctrl.query_migrate()
            time.sleep(0.005)
        assert src.runstate == "finish-migrate"
        time.sleep(0.1)  # let it send the rest and wait for the answer
        ctrl.migrate_cancel()
        assert_source_intact(src, ctrl, "cancelled", before)
    finally:
        fake.close()
    migrate_ok(src, ctrl, make_dst(), f"unix:{tmp_path / 'good.sock'}", before)
