"""Copy a range of guest-physical memory to a file (QMP ``pmemsave``), honouring discards.

Three kinds of address: RAM is read (through :func:`~livemig.memory.hostmem.load`, without
the GIL, since the page may be missing and answered by a postcopy fault handler), in
chunks; memory a discard manager reports discarded (unplugged virtio-mem blocks) is
written as zeros *without reading it* — reading a hole of a memfd allocates it, which is
exactly what unplugging gave back; addresses with no RAM read as all ones, as a guest's
access there does.
"""

from __future__ import annotations

from typing import BinaryIO

from livemig.memory import hostmem
from livemig.memory.discard_manager import Section
from livemig.memory.region import GuestMemoryMap, MemoryRegion

CHUNK = 1 << 20


def _pieces(mr: MemoryRegion, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """(offset, length, discarded) covering [lo, hi) of ``mr``, in order."""
    if mr.rdm is None or not mr.is_discarded(lo, hi - lo):
        return [(lo, hi - lo, False)]
    offs, sizes = mr.rdm.discarded_runs(Section(mr, 0, mr.size))
    out: list[tuple[int, int, bool]] = []
    at = lo
    for o, n in sorted(zip(offs, sizes, strict=True)):
        s, e = max(o, lo), min(o + n, hi)
        if e <= s:
            continue
        if s > at:
            out.append((at, s - at, False))
        out.append((s, e - s, True))
        at = e
    if at < hi:
        out.append((at, hi - at, False))
    return out


def dump_physical(memory: GuestMemoryMap, gpa: int, size: int, out: BinaryIO) -> dict[str, int]:
    """Write [gpa, gpa+size) to ``out``; returns bytes read, zero-filled (discarded), unbacked."""
    stats = {"read": 0, "discarded": 0, "unbacked": 0}
    end = gpa + size
    at = gpa
    ones = b"\xff" * CHUNK
    zeros = bytes(CHUNK)

    def fill(pattern: bytes, n: int) -> None:
        while n > 0:
            k = min(n, CHUNK)
            out.write(pattern[:k])
            n -= k

    for mr in memory.regions:
        lo, hi = max(at, mr.addr), min(end, mr.addr + mr.size)
        if hi <= lo:
            continue
        if lo > at:
            fill(ones, lo - at)
            stats["unbacked"] += lo - at
        for off, n, discarded in _pieces(mr, lo - mr.addr, hi - mr.addr):
            if discarded:
                fill(zeros, n)
                stats["discarded"] += n
                continue
            for c in range(0, n, CHUNK):
                k = min(CHUNK, n - c)
                out.write(hostmem.load(mr.block.host + off + c, k))
            stats["read"] += n
        at = hi
    if at < end:
        fill(ones, end - at)
        stats["unbacked"] += end - at
    return stats
