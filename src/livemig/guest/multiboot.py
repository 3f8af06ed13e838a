"""Multiboot (version 1) kernels: find and check the header, place the image, build the
boot information, and start the kernel as the specification says.

The header is searched in the first 8192 bytes, 4-byte aligned; magic, flags and checksum
must add up to 0 mod 2**32. Flags 0-15 are requirements: bit 0 (page-aligned modules: there
are none) and bit 1 (memory information: always given) are met; bit 2 (a video mode) is
not, and is reported and ignored as QEMU does; any other requirement fails the load. Bit 16
(the "a.out kludge") gives the load addresses in the header; without it the file must be
an ELF32 i386 executable whose ``PT_LOAD`` segments are loaded at their physical address
(``p_paddr``; the entry point, if it is a virtual address inside a segment, is translated
the same way).

Placement: kernel segments lie in base RAM from 1 MiB (below is this loader's: the GDT at
:data:`GDT_GPA`, the boot information from :data:`MBI_GPA`). Entry state (Multiboot
"machine state"): EAX=0x2BADB002, EBX = the boot information, 32-bit protected mode, paging
off, flat 4 GiB segments (CS=0x08, data 0x10, from a GDT the kernel may keep until it loads
its own), interrupts off, A20 on, ESP=0x7c00 (the specification leaves it undefined).

Boot information: ``mem_lower``/``mem_upper``, the command line (QEMU's form: the kernel's
path, a space, ``--append``), a memory map — conventional memory and base RAM above 1 MiB
available, 0x9fc00-0x100000 and the virtio-mem region reserved — and the loader's name.
"""

from __future__ import annotations

import logging
import os
import struct

from livemig.guest.boot_image import (
    BOOT_STACK,
    HIGH_RAM_START,
    LOW_RAM_END,
    BootError,
    BootImage,
    CpuStart,
    MemoryLayout,
    read_image,
)

log = logging.getLogger(__name__)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_BYTES = 8192
FLAG_PAGE_ALIGN, FLAG_MEMORY_INFO, FLAG_VIDEO_MODE, FLAG_AOUT_KLUDGE = 1, 2, 4, 1 << 16
SUPPORTED_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO

INFO_MEMORY, INFO_CMDLINE, INFO_MEM_MAP, INFO_LOADER_NAME = 0x1, 0x4, 0x40, 0x200
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2

GDT_GPA = 0x500
MBI_GPA = 0x9000
MMAP_GPA = 0x9080
LOADER_NAME_GPA = 0x9200
CMDLINE_GPA = 0x9300
CMDLINE_END = 0x10000
LOADER_NAME = b"livemig\0"

_HEADER = struct.Struct("<8I")  # magic, flags, checksum, header/load/load_end/bss_end/entry
_ELF32_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
_ELF32_PHDR = struct.Struct("<8I")
PT_LOAD, ET_EXEC, EM_386 = 1, 2, 3


def gdt_bytes() -> bytes:
    """Null, flat 32-bit code (0x08), flat 32-bit data (0x10): base 0, limit 4 GiB."""
    return struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)


def find_header(data: bytes, path: str) -> tuple[int, tuple[int, ...]]:
    """(file offset, the eight header words) of the Multiboot header, checked."""
    window = data[:SEARCH_BYTES]
    magic = struct.pack("<I", HEADER_MAGIC)
    off = window.find(magic)
    while off >= 0 and off % 4:
        off = window.find(magic, off + 1)
    if off < 0:
        raise BootError(f"{path}: no Multiboot header in the first {SEARCH_BYTES} bytes{_hint(data)}")
    words = _HEADER.unpack_from(data.ljust(off + _HEADER.size, b"\0"), off)
    _, flags, checksum = words[:3]
    if (HEADER_MAGIC + flags + checksum) & 0xFFFF_FFFF:
        raise BootError(
            f"{path}: Multiboot header at offset {off:#x} has a bad checksum: "
            f"magic + flags ({flags:#x}) + checksum ({checksum:#x}) is not 0 mod 2^32"
        )
    required = flags & 0xFFFF
    if required & FLAG_VIDEO_MODE:
        log.warning("%s asks for a video mode; there is no display, the request is ignored", path)
        required &= ~FLAG_VIDEO_MODE
    if required & ~SUPPORTED_REQUIREMENTS:
        raise BootError(
            f"{path}: the Multiboot header requires features livemig does not provide "
            f"(flags {required & ~SUPPORTED_REQUIREMENTS:#x})"
        )
    return off, words


def _hint(data: bytes) -> str:
    if len(data) > 0x206 and data[0x202:0x206] == b"HdrS":
        return " (this is a Linux bzImage: the Linux boot protocol is planned, not supported yet)"
    if data[:4] == b"\x7fELF" and len(data) > 4 and data[4] == 2:
        return " (this is an ELF64 file: 64-bit boot is planned, not supported yet)"
    return ""


def _check_range(path: str, what: str, start: int, end: int, layout: MemoryLayout) -> None:
    if start < HIGH_RAM_START:
        raise BootError(
            f"{path}: {what} [{start:#x}, {end:#x}) starts below 1 MiB, where the loader keeps "
            f"the boot information"
        )
    if end > layout.ram_size:
        raise BootError(
            f"{path}: {what} [{start:#x}, {end:#x}) lies outside base RAM "
            f"[{HIGH_RAM_START:#x}, {layout.ram_size:#x})"
        )


def _load_aout(
    data: bytes, path: str, off: int, words: tuple[int, ...], layout: MemoryLayout
) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]], int]:
    """The a.out kludge: the header says where the file goes."""
    _, _, _, header_addr, load_addr, load_end, bss_end, entry = words
    if not load_addr <= header_addr:
        raise BootError(f"{path}: load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    file_off = off - (header_addr - load_addr)
    if file_off < 0:
        raise BootError(f"{path}: header_addr - load_addr reaches before the start of the file")
    size = (load_end - load_addr) if load_end else len(data) - file_off
    if size <= 0 or file_off + size > len(data):
        raise BootError(
            f"{path}: load_end_addr {load_end:#x} reaches beyond the end of the file "
            f"({len(data)} bytes)"
        )
    end = load_addr + size
    bss = bss_end - end if bss_end else 0
    if bss < 0:
        raise BootError(f"{path}: bss_end_addr {bss_end:#x} is below load_end_addr {end:#x}")
    _check_range(path, "the image", load_addr, end + bss, layout)
    if not load_addr <= entry < end:
        raise BootError(f"{path}: entry_addr {entry:#x} is not inside the loaded image")
    zeros = [(end, bss)] if bss else []
    return [(load_addr, data[file_off : file_off + size])], zeros, entry


def _load_elf(
    data: bytes, path: str, layout: MemoryLayout
) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]], int]:
    if data[:4] != b"\x7fELF":
        raise BootError(
            f"{path}: not an ELF file, and its Multiboot header gives no load addresses (flag 16)"
        )
    if len(data) < _ELF32_EHDR.size or data[4] != 1:
        raise BootError(f"{path}: not an ELF32 file{_hint(data)}")
    if data[5] != 1:
        raise BootError(f"{path}: not a little-endian ELF file")
    (_, e_type, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_) = _ELF32_EHDR.unpack_from(data)
    if machine != EM_386:
        raise BootError(f"{path}: ELF machine {machine} is not i386 (3)")
    if e_type != ET_EXEC:
        raise BootError(f"{path}: ELF type {e_type} is not an executable (2)")
    if phentsize < _ELF32_PHDR.size or phoff + phnum * phentsize > len(data):
        raise BootError(f"{path}: ELF program headers reach beyond the end of the file")
    writes, zeros = [], []
    phys_entry = None
    for i in range(phnum):
        p_type, p_off, vaddr, paddr, filesz, memsz, _, _ = _ELF32_PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or p_off + filesz > len(data):
            raise BootError(f"{path}: ELF segment {i} reaches beyond the end of the file")
        _check_range(path, f"ELF segment {i}", paddr, paddr + memsz, layout)
        writes.append((paddr, data[p_off : p_off + filesz]))
        if memsz > filesz:
            zeros.append((paddr + filesz, memsz - filesz))
        if vaddr <= entry < vaddr + memsz:
            phys_entry = paddr + (entry - vaddr)
    if not writes:
        raise BootError(f"{path}: the ELF file has no loadable segment")
    if phys_entry is None:
        raise BootError(f"{path}: entry point {entry:#x} is not inside a loadable segment")
    return writes, zeros, phys_entry


def memory_map(layout: MemoryLayout) -> list[tuple[int, int, int]]:
    """(base, length, type) entries of the boot information's memory map."""
    entries = [
        (0, LOW_RAM_END, MMAP_AVAILABLE),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, MMAP_RESERVED),
        (HIGH_RAM_START, layout.ram_size - HIGH_RAM_START, MMAP_AVAILABLE),
    ]
    entries += [(addr, size, MMAP_RESERVED) for addr, size in layout.device_regions]
    return entries


def boot_information(cmdline: bytes, layout: MemoryLayout) -> list[tuple[int, bytes]]:
    """The Multiboot information structure and what it points to, as (gpa, bytes)."""
    mmap = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in memory_map(layout))
    assert MMAP_GPA + len(mmap) <= LOADER_NAME_GPA, "memory map area overflow"
    info = bytearray(88)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_LOADER_NAME
    mem_upper = (layout.ram_size - HIGH_RAM_START) // 1024
    struct.pack_into("<IIII", info, 0, flags, LOW_RAM_END // 1024, mem_upper, 0)
    struct.pack_into("<I", info, 16, CMDLINE_GPA)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_GPA)
    struct.pack_into("<I", info, 64, LOADER_NAME_GPA)
    return [
        (MBI_GPA, bytes(info)),
        (MMAP_GPA, mmap),
        (LOADER_NAME_GPA, LOADER_NAME),
        (CMDLINE_GPA, cmdline),
    ]


def load_multiboot(path: str, append: str, layout: MemoryLayout) -> BootImage:
    """A Multiboot v1 kernel (ELF32, or any format with the a.out kludge)."""
    if layout.ram_size <= HIGH_RAM_START:
        raise BootError(f"{path}: a Multiboot kernel needs more than 1 MiB of base RAM")
    data = read_image(path, "kernel", limit=layout.ram_size)
    off, words = find_header(data, path)
    if words[1] & FLAG_AOUT_KLUDGE:
        writes, zeros, entry = _load_aout(data, path, off, words, layout)
    else:
        writes, zeros, entry = _load_elf(data, path, layout)
    cmdline = f"{path} {append}".rstrip().encode() + b"\0"
    if CMDLINE_GPA + len(cmdline) > CMDLINE_END:
        raise BootError(
            f"--append: the command line is {len(cmdline)} bytes; at most "
            f"{CMDLINE_END - CMDLINE_GPA} fit (kernel path included)"
        )
    gdt = gdt_bytes()
    cpu = CpuStart(
        "flat32",
        entry,
        regs={"eax": BOOTLOADER_MAGIC, "ebx": MBI_GPA, "esp": BOOT_STACK},
        gdt_base=GDT_GPA,
        gdt_limit=len(gdt) - 1,
    )
    size = sum(len(b) for _, b in writes) + sum(n for _, n in zeros)
    return BootImage(
        "multiboot",
        path,
        cpu,
        writes=[(GDT_GPA, gdt), *boot_information(cmdline, layout), *writes],
        zeros=zeros,
        describe=(
            f"Multiboot kernel {os.path.basename(path)}: {size} bytes from {writes[0][0]:#x}, "
            f"entry {entry:#x}"
        ),
    )
