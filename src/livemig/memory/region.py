"""Memory regions and the guest-physical address map.

A MemoryRegion is a RAM block placed in guest-physical address space, optionally managed
by a RamDiscardManager. The map is deliberately simple: base RAM from 0 (below 4 GiB) and
device memory regions (virtio-mem) above it; regions never overlap.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from livemig.memory.discard_manager import RamDiscardManager, Section
from livemig.memory.ram_block import RAMBlock

GiB = 1 << 30
FOUR_GIB = 4 * GiB


@dataclass(eq=False)
class MemoryRegion:
    name: str
    block: RAMBlock
    addr: int = 0
    rdm: RamDiscardManager | None = field(default=None, repr=False)
    mapped: bool = False

    @property
    def size(self) -> int:
        return self.block.used_length

    def set_ram_discard_manager(self, rdm: RamDiscardManager | None) -> int:
        """Attach a manager; -EBUSY if one is already set (reference section 1)."""
        if self.mapped:
            raise RuntimeError(f"{self.name}: cannot change the discard manager while mapped")
        if self.rdm is not None and rdm is not None:
            return -errno.EBUSY
        self.rdm = rdm
        return 0

    def whole(self) -> Section:
        return Section(self, 0, self.size)

    def is_discarded(self, offset: int, length: int) -> bool:
        """True if any part of the range is discarded according to the manager."""
        if self.rdm is None:
            return False
        return not self.rdm.is_populated(Section(self, offset, length))


class GuestMemoryMap:
    """Guest-physical layout: which region answers which address."""

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []

    def add(self, mr: MemoryRegion) -> MemoryRegion:
        for other in self.regions:
            if mr.addr < other.addr + other.size and other.addr < mr.addr + mr.size:
                raise ValueError(f"region {mr.name} overlaps {other.name}")
        mr.mapped = True
        self.regions.append(mr)
        self.regions.sort(key=lambda r: r.addr)
        return mr

    def lookup(self, gpa: int) -> tuple[MemoryRegion, int]:
        for mr in self.regions:
            if mr.addr <= gpa < mr.addr + mr.size:
                return mr, gpa - mr.addr
        raise KeyError(f"no memory at guest-physical address 0x{gpa:x}")

    def by_block(self, idstr: str) -> MemoryRegion:
        for mr in self.regions:
            if mr.block.idstr == idstr:
                return mr
        raise KeyError(idstr)

    @property
    def blocks(self) -> list[RAMBlock]:
        return [mr.block for mr in self.regions]
