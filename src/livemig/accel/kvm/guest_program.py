"""A tiny x86 guest that dirties a host-chosen set of pages, for migration tests.

The idea is the one behind QEMU's migration test: a guest that keeps writing memory in a
pattern the host can check afterwards, so a migrated copy can be verified page by page.
This one is driven by a *target table* the host writes into guest memory, so tests decide
exactly which pages get dirtied (and can change the set between passes).

Guest-physical layout (:data:`DEFAULT_LAYOUT`; all below 4 GiB, as the guest runs in 32-bit
protected mode with flat segments and no paging):

==================  =========  ======================================================
what                GPA        notes
==================  =========  ======================================================
code                0x1000     :func:`program` bytes, < 1 page; never written by guest
control page        0x2000     u32 heartbeat at +0 (written by guest every pass),
                               u32 yield_every at +4 (read by guest every pass)
target table        0x10000    up to 64 KiB: entries ``<u32 start_gpa, u32 npages>``,
                               terminated by an entry with npages == 0; read-only
                               for the guest
targets             >= 1 MiB   :attr:`GuestLayout.data_gpa`, by convention
==================  =========  ======================================================

Program semantics. Pass number ``n = heartbeat + 1``. For every entry of the table in
order, for every page of the entry in order, the guest stores the u32 ``n`` at offset 0 of
the page. After the last entry it stores ``heartbeat = n`` and executes ``out 0xF0, eax``
with ``eax = n`` (:data:`PORT_PASS`, a *pass exit*), then starts the next pass, re-reading
the heartbeat, the table and yield_every. Additionally, after every ``yield_every`` pages
(counted within the pass, across entries) it executes ``out 0xF1, eax`` with ``eax`` = the
GPA of the next page of the current entry (:data:`PORT_YIELD`, a *yield exit*), purely so the
host regains control every few milliseconds (pausing a vCPU is then prompt without signals).
``yield_every = 0`` means no yield exits (the countdown wraps at 2**32).

The host may rewrite the table or yield_every only while the vCPU is stopped at a pass
exit; a change at a yield exit would take effect in the middle of a pass, and
:func:`check_pages` does not model that.

Written pages: the table's pages and the control page. The code and table pages are only
read, so KVM's dirty log never shows them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from livemig.accel.kvm import ioctls as k
from livemig.accel.kvm.vm import KvmVcpu, VcpuExit
from livemig.memory import hostmem
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import GuestMemoryMap

PAGE = 4096
PORT_PASS = 0xF0
PORT_YIELD = 0xF1
DEFAULT_YIELD_EVERY = 1024
"""About 2-10 ms of guest work per yield at 0.1-0.45 Mpages/s (platform notes, 2c)."""

GPA_LIMIT = 1 << 32
ENTRY = struct.Struct("<II")


@dataclass(frozen=True)
class GuestLayout:
    """Where the program, its control words and its table live in guest-physical memory."""

    code_gpa: int = 0x1000
    control_gpa: int = 0x2000
    table_gpa: int = 0x10000
    table_bytes: int = 0x10000
    data_gpa: int = 0x100000

    @property
    def heartbeat_gpa(self) -> int:
        return self.control_gpa

    @property
    def yield_every_gpa(self) -> int:
        return self.control_gpa + 4

    @property
    def table_capacity(self) -> int:
        """Entries the table holds, not counting the terminator."""
        return self.table_bytes // ENTRY.size - 1

    @property
    def reserved(self) -> list[tuple[int, int]]:
        """[start, end) GPA ranges the program owns (targets must avoid them)."""
        code_end = self.code_gpa + len(program(self))
        return [
            (self.code_gpa & ~(PAGE - 1), -(-code_end // PAGE) * PAGE),
            (self.control_gpa & ~(PAGE - 1), (self.control_gpa & ~(PAGE - 1)) + PAGE),
            (self.table_gpa, self.table_gpa + self.table_bytes),
        ]


DEFAULT_LAYOUT = GuestLayout()
CODE_GPA = DEFAULT_LAYOUT.code_gpa
CONTROL_GPA = DEFAULT_LAYOUT.control_gpa
HEARTBEAT_GPA = DEFAULT_LAYOUT.heartbeat_gpa
YIELD_EVERY_GPA = DEFAULT_LAYOUT.yield_every_gpa
TABLE_GPA = DEFAULT_LAYOUT.table_gpa
DATA_GPA = DEFAULT_LAYOUT.data_gpa


def program(layout: GuestLayout = DEFAULT_LAYOUT) -> bytes:
    """The machine code, hand-assembled for 32-bit protected mode (68 bytes).

    Jumps are relative, so the code runs at any address; only the data addresses (HB =
    heartbeat, YE = yield_every, TABLE) are patched in.
    """
    hb = struct.pack("<I", layout.heartbeat_gpa)
    ye = struct.pack("<I", layout.yield_every_gpa)
    table = struct.pack("<I", layout.table_gpa)
    # fmt: off
    code = b"".join([
        # 00 start:
        b"\x8b\x1d" + hb,              # 00  mov  ebx, [HB]        ; ebx = pass number n
        b"\x43",                       # 06  inc  ebx              ;       = heartbeat + 1
        b"\xbe" + table,               # 07  mov  esi, TABLE       ; esi -> current entry
        b"\x8b\x3d" + ye,              # 0c  mov  edi, [YE]        ; edi = pages to next yield
        # 12 entry:
        b"\x8b\x16",                   # 12  mov  edx, [esi]       ; edx = start_gpa
        b"\x8b\x4e\x04",               # 14  mov  ecx, [esi+4]     ; ecx = npages
        b"\x85\xc9",                   # 17  test ecx, ecx
        b"\x74\x1d",                   # 19  jz   pass_done (38)
        # 1b page:
        b"\x89\x1a",                   # 1b  mov  [edx], ebx       ; the write being tracked
        b"\x81\xc2\x00\x10\x00\x00",   # 1d  add  edx, 0x1000
        b"\x4f",                       # 23  dec  edi
        b"\x75\x0a",                   # 24  jnz  no_yield (30)
        b"\x89\xd0",                   # 26  mov  eax, edx         ; next page, for the host
        b"\xe7\xf1",                   # 28  out  0xF1, eax        ; yield exit
        b"\x8b\x3d" + ye,              # 2a  mov  edi, [YE]
        # 30 no_yield:
        b"\x49",                       # 30  dec  ecx
        b"\x75\xe8",                   # 31  jnz  page (1b)
        b"\x83\xc6\x08",               # 33  add  esi, 8
        b"\xeb\xda",                   # 36  jmp  entry (12)
        # 38 pass_done:
        b"\x89\x1d" + hb,              # 38  mov  [HB], ebx        ; heartbeat = n
        b"\x89\xd8",                   # 3e  mov  eax, ebx
        b"\xe7\xf0",                   # 40  out  0xF0, eax        ; pass exit, eax = n
        b"\xeb\xbc",                   # 42  jmp  start (00)
    ])
    # fmt: on
    assert len(code) == 0x44
    return code


SPIN_PROGRAM = b"\xeb\xfe"
"""``jmp $``: a guest that never exits by itself (to test signal kicks)."""


# -- host side ------------------------------------------------------------------------------
Memory = RAMBlock | memoryview | bytearray


def _view(memory: Memory) -> memoryview:
    """A writable byte view of guest memory, offset 0 = ``base_gpa``."""
    if isinstance(memory, RAMBlock):
        return memory.view
    return memoryview(memory).cast("B")


def _host_addr(memory: RAMBlock, off: int, length: int, what: str) -> int:
    if off < 0 or off + length > memory.max_length:
        raise ValueError(f"{what} at {off:#x}+{length} is outside {memory.idstr}")
    return memory.host + off


def _store(memory: Memory, off: int, raw: bytes) -> None:
    """Write guest memory; RAM blocks without the GIL (the page may be missing in postcopy)."""
    if isinstance(memory, RAMBlock):
        hostmem.store(_host_addr(memory, off, len(raw), "store"), raw)
    else:
        _view(memory)[off : off + len(raw)] = raw


def _load(memory: Memory, off: int, length: int) -> bytes:
    if isinstance(memory, RAMBlock):
        return hostmem.load(_host_addr(memory, off, length, "load"), length)
    return bytes(_view(memory)[off : off + length])


def _u32(memory: Memory) -> np.ndarray:
    mv = _view(memory)
    return np.frombuffer(mv, np.uint32, count=len(mv) // 4)


def load(
    memory: Memory,
    table_gpa: int = TABLE_GPA,
    code_gpa: int = CODE_GPA,
    control_gpa: int = CONTROL_GPA,
    *,
    yield_every: int = DEFAULT_YIELD_EVERY,
    base_gpa: int = 0,
) -> GuestLayout:
    """Write the program, a zero heartbeat and an empty table; return the layout used.

    ``memory`` is the RAM that the guest sees at ``base_gpa`` (a RAMBlock mapped there, or
    any writable buffer). An empty table makes every pass a no-op that only bumps the
    heartbeat, so a freshly loaded guest is safe to run.
    """
    layout = GuestLayout(code_gpa=code_gpa, control_gpa=control_gpa, table_gpa=table_gpa)
    res = sorted(layout.reserved)
    for (_, e0), (s1, _) in zip(res, res[1:], strict=False):
        if s1 < e0:
            raise ValueError(f"guest layout overlaps itself: {layout}")
    mv = _view(memory)
    if res[0][0] < base_gpa or max(e for _, e in res) - base_gpa > len(mv):
        raise ValueError(f"guest layout {layout} does not fit memory at {base_gpa:#x}")
    code = program(layout)
    off = code_gpa - base_gpa
    mv[off : off + len(code)] = code
    write_control(memory, heartbeat=0, yield_every=yield_every, layout=layout, base_gpa=base_gpa)
    write_table(memory, [], layout=layout, base_gpa=base_gpa)
    return layout


def write_control(
    memory: Memory,
    *,
    heartbeat: int | None = None,
    yield_every: int | None = None,
    layout: GuestLayout = DEFAULT_LAYOUT,
    base_gpa: int = 0,
) -> None:
    """Set the heartbeat and/or yield_every words (only at a pass exit, see module doc)."""
    if heartbeat is not None:
        _store(memory, layout.heartbeat_gpa - base_gpa, struct.pack("<I", heartbeat))
    if yield_every is not None:
        _store(memory, layout.yield_every_gpa - base_gpa, struct.pack("<I", yield_every))


def read_heartbeat(memory: Memory, layout: GuestLayout = DEFAULT_LAYOUT, base_gpa: int = 0) -> int:
    """Completed passes, as the guest recorded them."""
    return struct.unpack("<I", _load(memory, layout.heartbeat_gpa - base_gpa, 4))[0]


def validate_ranges(
    ranges: list[tuple[int, int]],
    layout: GuestLayout = DEFAULT_LAYOUT,
    memory_end: int = GPA_LIMIT,
) -> None:
    """Raise ValueError unless ranges are page aligned, disjoint, clear of the program's
    own pages, below ``memory_end`` (and 4 GiB), and fit the table.

    Disjointness matters for :func:`check_pages`: a page listed twice would be written
    twice per pass, breaking the "written prefix" property it relies on.
    """
    if len(ranges) > layout.table_capacity:
        raise ValueError(f"{len(ranges)} ranges > table capacity {layout.table_capacity}")
    spans = []
    for start, npages in ranges:
        if start % PAGE or start < 0 or npages <= 0:
            raise ValueError(f"range ({start:#x}, {npages}): unaligned start or empty")
        end = start + npages * PAGE
        if end > min(memory_end, GPA_LIMIT):
            raise ValueError(f"range ({start:#x}, {npages}) ends beyond {memory_end:#x}")
        spans.append((start, end, "target"))
    spans += [(s, e, "program") for s, e in layout.reserved]
    spans.sort()
    for (s0, e0, w0), (s1, e1, w1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise ValueError(f"{w0} [{s0:#x}, {e0:#x}) overlaps {w1} [{s1:#x}, {e1:#x})")


def write_table(
    memory: Memory,
    ranges: list[tuple[int, int]],
    *,
    layout: GuestLayout = DEFAULT_LAYOUT,
    base_gpa: int = 0,
    memory_end: int | None = None,
) -> None:
    """Install ``ranges`` [(start_gpa, npages), ...] as the target table (at a pass exit).

    Targets must lie below ``memory_end``, by default the end of ``memory``; pass the end
    of the guest's RAM when other slots hold targets (the guest may write any slot).
    """
    mv = _view(memory)
    validate_ranges(ranges, layout, base_gpa + len(mv) if memory_end is None else memory_end)
    table = np.zeros((len(ranges) + 1, 2), np.uint32)  # last row: the terminator
    if ranges:
        table[:-1] = np.asarray(ranges, dtype=np.uint64)
    _store(memory, layout.table_gpa - base_gpa, table.tobytes())


def pages_of(ranges: list[tuple[int, int]]) -> np.ndarray:
    """GPAs of every target page, in the order the guest writes them (int64)."""
    if not ranges:
        return np.zeros(0, np.int64)
    return np.concatenate([start + PAGE * np.arange(n, dtype=np.int64) for start, n in ranges])


def page_values(
    memory: Memory | GuestMemoryMap, ranges: list[tuple[int, int]], base_gpa: int = 0
) -> np.ndarray:
    """The u32 at offset 0 of every target page, in table order (a copy).

    ``memory`` may also be a machine's whole :class:`GuestMemoryMap` (``base_gpa`` is then
    ignored), for tables whose targets span several RAM blocks (base RAM and virtio-mem).
    """
    gpas = pages_of(ranges)
    if not isinstance(memory, GuestMemoryMap):
        return _u32(memory)[(gpas - base_gpa) // 4].copy()
    out = np.empty(len(gpas), np.uint32)
    found = np.zeros(len(gpas), bool)
    for mr in memory.regions:
        sel = (gpas >= mr.addr) & (gpas < mr.addr + mr.size)
        if sel.any():
            out[sel] = _u32(mr.block)[(gpas[sel] - mr.addr) // 4]
            found |= sel
    if not found.all():
        raise ValueError(f"no RAM at target page {int(gpas[np.argmin(found)]):#x}")
    return out


@dataclass
class PassCheck:
    """Outcome of :func:`check_pages`. ``written`` = pages already done in pass h+1."""

    ok: bool
    heartbeat: int
    written: int
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # (gpa, value, expected)

    def __str__(self) -> str:
        head = f"heartbeat={self.heartbeat} written_in_next_pass={self.written}"
        if self.ok:
            return f"consistent: {head}"
        shown = ", ".join(f"{g:#x}={v} (want {w})" for g, v, w in self.bad[:8])
        return f"INCONSISTENT: {head}; {len(self.bad)} bad pages: {shown}"


def check_pages(
    memory: Memory | GuestMemoryMap,
    ranges: list[tuple[int, int]],
    heartbeat: int,
    *,
    table_since: int = 0,
    base_gpa: int = 0,
) -> PassCheck:
    """Check target pages against the guest's write sequence.

    Let ``h = heartbeat`` (completed passes; read it while the vCPU is out of ``KVM_RUN``)
    and ``v[0..N)`` the u32 values of the table's pages in table order. ``table_since`` is
    the heartbeat value when the table was installed (0 = installed before the first pass).
    Consistent means there is a ``k`` (pages pass ``h+1`` already wrote) such that

    * ``v[i] == h + 1`` for ``i < k``;
    * for ``i >= k``: ``v[i] == h`` if ``h > table_since`` (pass ``h`` ran entirely with
      this table), else ``v[i] <= h`` (the table is newer than the last full pass, so
      unwritten pages hold what earlier tables left there, or 0).

    ``k`` is 0 at a pass exit, and may be anything at a yield exit or a kick. Values are
    exact u32 pass numbers (they would only wrap after 2**32 passes). The same check applies
    unchanged to a migrated copy of the memory, which is what it is for.
    """
    v = page_values(memory, ranges, base_gpa).astype(np.int64)
    h = heartbeat
    ahead = v == h + 1
    k_ = len(v) if ahead.all() else int(np.argmin(ahead))  # first page not yet rewritten
    rest = v[k_:]
    bad_mask = rest != h if h > table_since else rest > h
    bad = []
    if bad_mask.any():
        gpas = pages_of(ranges)[k_:]
        want = str(h) if h > table_since else f"<={h}"
        for i in np.flatnonzero(bad_mask)[:64]:
            bad.append((int(gpas[i]), int(rest[i]), want))
    return PassCheck(ok=not bad, heartbeat=h, written=k_, bad=bad)


# -- running the program on a vCPU ------------------------------------------------------------
def prepare_vcpu(vcpu: KvmVcpu, layout: GuestLayout = DEFAULT_LAYOUT) -> None:
    """Point a fresh vCPU at the program in flat 32-bit protected mode."""
    vcpu.setup_flat32(layout.code_gpa)


def is_pass_exit(ex: VcpuExit) -> bool:
    return ex.reason == k.KVM_EXIT_IO and ex.port == PORT_PASS


def is_yield_exit(ex: VcpuExit) -> bool:
    return ex.reason == k.KVM_EXIT_IO and ex.port == PORT_YIELD


def run_passes(vcpu: KvmVcpu, passes: int = 1, max_exits: int = 10_000_000) -> int:
    """Run ``vcpu`` on this thread until ``passes`` more pass exits; return the last pass number.

    Yield exits (and EINTR) are resumed transparently; any other exit is an error, since
    the program has no other way out.
    """
    done = 0
    last = -1
    for _ in range(max_exits):
        ex = vcpu.run()
        if is_pass_exit(ex):
            done += 1
            last = ex.value
            if done == passes:
                return last
        elif not (is_yield_exit(ex) or ex.reason == k.KVM_EXIT_INTR):
            raise RuntimeError(f"guest program stopped unexpectedly: {ex!r}")
    raise RuntimeError(f"no {passes} passes within {max_exits} exits")
