"""Guest code the user brings: what goes into guest memory, and how the boot vCPU starts.

A loader reads the user's file, checks it, and returns a :class:`BootImage`: byte ranges
to copy into guest-physical memory, ranges to clear, and a :class:`CpuStart` (the mode and
the registers the boot vCPU starts with). Nothing here touches a vCPU or guest memory:
the accelerator applies the image (``accel.kvm.boot_cpu``), on power-on and again on every
reset, as a BIOS or QEMU's option ROMs do.

Two loaders (the 64-bit and Linux boot protocols are a documented plan, docs/machine.md):

* :func:`load_boot_sector`: a 512-byte image ending in 0x55 0xAA, at 0x7c00, started in real
  mode at 0000:7c00 with DL=0x80, as a BIOS leaves it (here, ``multiboot`` for the other).
* ``multiboot.load_multiboot``: Multiboot version 1 kernels.

There is no BIOS. What a boot sector can count on (docs/machine.md): the interrupt vector
table points every vector at an ``iret`` at F000:FF53, so a stray ``int 0x10`` returns
instead of jumping to address 0; everything else below 1 MiB is zero.

Every problem with a file is a :class:`BootError` whose message names the file and what is
wrong with it, for the command line to print as one line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BOOT_SECTOR_GPA = 0x7C00
BOOT_SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
BOOT_DRIVE = 0x80
"""DL at entry: the first hard disk, which is what a BIOS reports for a disk image."""

IVT_GPA = 0
IRET_STUB_GPA = 0xFFF53
"""F000:FF53, where PC BIOSes keep an ``iret`` for unused vectors."""

LOW_RAM_END = 0x9FC00
"""End of conventional memory a guest may use (639 KiB, below the EBDA)."""
HIGH_RAM_START = 0x100000
BOOT_STACK = 0x7C00
"""Initial stack pointer of both loaders: conventional memory below 0x7c00 is free."""


class BootError(ValueError):
    """A guest image that cannot be booted; the message is one line naming the file."""


@dataclass(frozen=True)
class CpuStart:
    """How the boot vCPU starts.

    ``mode``: ``real`` (16-bit real mode; ``cs`` is a real-mode segment, its base
    ``cs << 4``; every other segment is 0) or ``flat32`` (32-bit protected mode, paging
    off, flat 4 GiB code selector ``code_sel`` and data selector ``data_sel`` from a GDT
    at ``gdt_base`` the loader wrote). ``regs``: general registers by their 32-bit names
    (``eax``..``esp``); the others are 0. ``eip`` is the entry offset.
    """

    mode: str
    eip: int
    cs: int = 0
    regs: dict[str, int] = field(default_factory=dict)
    gdt_base: int = 0
    gdt_limit: int = 0xFFFF
    code_sel: int = 0x08
    data_sel: int = 0x10


@dataclass(frozen=True)
class MemoryLayout:
    """The guest-physical memory a loader places things in and reports to the guest.

    ``ram_size``: base RAM from 0. ``device_regions``: (address, size) of device memory
    (the virtio-mem region), reported as reserved: it is plugged and unplugged by a
    virtio-mem driver, never simply used.
    """

    ram_size: int
    device_regions: tuple[tuple[int, int], ...] = ()


@dataclass
class BootImage:
    """What a loader asks for: ``writes`` (gpa, bytes), ``zeros`` (gpa, length), ``cpu``.

    ``describe`` is a one-line summary for logs and ``info``-style output.
    """

    kind: str
    path: str
    cpu: CpuStart
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    describe: str = ""

    def check_fits(self, layout: MemoryLayout) -> None:
        """Every range inside base RAM (the loaders check their own, this is the backstop)."""
        for gpa, n in [(g, len(b)) for g, b in self.writes] + self.zeros:
            if gpa < 0 or gpa + n > layout.ram_size:
                raise BootError(
                    f"{self.path}: [{gpa:#x}, {gpa + n:#x}) lies outside base RAM "
                    f"[0, {layout.ram_size:#x})"
                )


def read_image(path: str, what: str, limit: int = 1 << 30) -> bytes:
    """The file's bytes, or a :class:`BootError` naming the file and the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise BootError(f"{path}: {what} is larger than {limit >> 20} MiB")
    return data


def bios_tables() -> list[tuple[int, bytes]]:
    """The little a missing BIOS leaves behind: an IVT whose vectors all reach an ``iret``."""
    seg = 0xF000
    ivt = struct.pack("<HH", IRET_STUB_GPA - (seg << 4), seg) * 256
    return [(IVT_GPA, ivt), (IRET_STUB_GPA, b"\xcf")]


def load_boot_sector(path: str, layout: MemoryLayout) -> BootImage:
    """A BIOS-style boot sector (see the module docstring)."""
    data = read_image(path, "boot sector", limit=1 << 20)
    if len(data) != BOOT_SECTOR_SIZE:
        raise BootError(
            f"{path}: a boot sector is {BOOT_SECTOR_SIZE} bytes, this file has {len(data)}"
        )
    if data[510:512] != BOOT_SIGNATURE:
        raise BootError(
            f"{path}: no boot signature: bytes 510-511 are {data[510]:#04x} {data[511]:#04x}, "
            f"expected 0x55 0xaa"
        )
    if layout.ram_size < HIGH_RAM_START:
        raise BootError(f"{path}: a boot sector needs at least 1 MiB of base RAM")
    cpu = CpuStart("real", BOOT_SECTOR_GPA, cs=0, regs={"edx": BOOT_DRIVE, "esp": BOOT_STACK})
    return BootImage(
        "boot-sector",
        path,
        cpu,
        writes=[*bios_tables(), (BOOT_SECTOR_GPA, data)],
        describe=f"boot sector {path} at {BOOT_SECTOR_GPA:#x}, real mode 0000:7c00, DL=0x80",
    )
