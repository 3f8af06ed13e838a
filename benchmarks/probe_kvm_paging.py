"""Can a KVM guest on this host reach guest-physical memory above 4 GiB?

livemig's KVM guests (its guest program, boot sectors, Multiboot kernels) run in 32-bit
protected mode without paging, so their machine keeps all memory below 4 GiB, and a KVM
machine's virtio-mem region must fit there. A 32-bit guest could go further with paging:
PAE (2 MiB pages, 36-bit and wider physical addresses) or PSE-36 (4 MiB pages). This probe
tries both, the way a guest would — its own ``mov cr3``, ``mov cr4``, ``mov cr0`` — plus
the host's shortcut (``KVM_SET_SREGS`` with CR0.PG), and reports what happened. A guest
that pages maps virtual 0xC0000000 to guest-physical 5 GiB and writes a marker there; the
probe checks the marker in the memory slot at 5 GiB. A control run without paging writes
the same marker to a slot at 3 GiB (virtual 0xC0000000 is that address when nothing is
mapped), so the probe shows it can see a guest succeed.

Prints one JSON object; ``"marker_written": true`` for a paging mode means livemig could give
KVM machines device memory above 4 GiB (and its guest program could page to use it).

Usage: ``python benchmarks/probe_kvm_paging.py``.
"""

from __future__ import annotations

import ctypes
import json
import platform
import struct
import sys

from livemig.accel.kvm import kvm_available
from livemig.accel.kvm.vm import KvmVm
from livemig.memory.ram_block import RAMBlock

MiB, GiB = 1 << 20, 1 << 30
HIGH_GPA = 5 * GiB
MARKER = 0x1234_5678
CODE, PDPT, PD_LOW, PD_HIGH, STACK = 0x1000, 0x3000, 0x4000, 0x5000, 0x8000
PORT_DONE = 0xF0
CR0_PG, CR4_PSE, CR4_PAE = 1 << 31, 1 << 4, 1 << 5


def tables(low: RAMBlock, mode: str) -> int:
    """Page tables for ``mode`` in low memory: identity for the first MiBs, and virtual
    0xC0000000 -> ``HIGH_GPA``. Returns CR3."""

    def put(gpa: int, data: bytes) -> None:
        ctypes.memmove(low.host + gpa, data, len(data))

    if mode == "pae":  # PDPT entries 0 and 3; 2 MiB pages (PS) in the directories
        put(PDPT, struct.pack("<4Q", PD_LOW | 1, 0, 0, PD_HIGH | 1))
        put(PD_LOW, struct.pack("<Q", 0x83))
        put(PD_HIGH, struct.pack("<Q", HIGH_GPA | 0x83))
        return PDPT
    # PSE-36: a 4 MiB page whose physical bits 32-35 sit in PDE bits 13-16
    put(PD_LOW, struct.pack("<I", 0x83))
    put(PD_LOW + (0xC000_0000 >> 22) * 4, struct.pack("<I", (HIGH_GPA & 0xFFC0_0000) | ((HIGH_GPA >> 32) << 13) | 0x83))
    return PD_LOW


def program(cr3: int, cr4_bits: int) -> bytes:
    """Enable paging as a guest does (``cr4_bits`` 0: stay without paging), write the
    marker at virtual 0xC0000000, report."""
    paging = [
        b"\xb8" + struct.pack("<I", cr3), b"\x0f\x22\xd8",          # mov eax, cr3v; mov cr3, eax
        b"\x0f\x20\xe0", b"\x0d" + struct.pack("<I", cr4_bits),     # mov eax, cr4; or eax, bits
        b"\x0f\x22\xe0",                                            # mov cr4, eax
        b"\x0f\x20\xc0", b"\x25" + struct.pack("<I", 0x9FFF_FFFF),  # mov eax, cr0; clear CD/NW
        b"\x0d" + struct.pack("<I", CR0_PG), b"\x0f\x22\xc0",       # or eax, PG; mov cr0, eax
        b"\xeb\x00",                                                # jmp $+2
    ] if cr4_bits else []
    return b"".join([
        *paging,
        b"\xc7\x05" + struct.pack("<II", 0xC000_0000, MARKER),      # mov [0xC0000000], MARKER
        b"\xe6" + bytes([PORT_DONE]), b"\xf4",                      # out PORT_DONE, al; hlt
    ])  # fmt: skip


def run_guest(mode: str) -> dict:
    """``mode`` pae, pse36, or flat (the control: no paging, the slot at 3 GiB)."""
    low, high = RAMBlock("low", 2 * MiB), RAMBlock("high", 4 * MiB)
    with KvmVm() as vm:
        vm.add_slot(low, 0, log_dirty=False)
        vm.add_slot(high, 0xC000_0000 if mode == "flat" else HIGH_GPA, log_dirty=False)
        cr3 = tables(low, mode)
        code = program(cr3, {"pae": CR4_PAE, "pse36": CR4_PSE, "flat": 0}[mode])
        ctypes.memmove(low.host + CODE, code, len(code))
        cpu = vm.create_vcpu()
        cpu.setup_flat32(CODE, STACK)
        exit_ = cpu.run()
        regs = cpu.get_regs()
        landed = struct.unpack("<I", ctypes.string_at(high.host, 4))[0] == MARKER
        out = {
            "exit": exit_.name,
            "rip": hex(regs.rip),
            "marker_written": landed and exit_.name == "IO",
        }
    low.close()
    high.close()
    return out


def host_sets_paging() -> dict:
    """``KVM_SET_SREGS`` with CR0.PG and CR4.PAE: does the vCPU keep them?"""
    low = RAMBlock("low", 2 * MiB)
    with KvmVm() as vm:
        vm.add_slot(low, 0, log_dirty=False)
        tables(low, "pae")
        cpu = vm.create_vcpu()
        cpu.setup_flat32(CODE, STACK)
        s = cpu.get_sregs()
        s.cr3, s.cr4, s.cr0 = PDPT, s.cr4 | CR4_PAE, (s.cr0 | CR0_PG) & 0x9FFF_FFFF
        cpu.set_sregs(s)
        got = cpu.get_sregs()
        out = {"cr0": hex(got.cr0), "cr4": hex(got.cr4), "kept_pg": bool(got.cr0 & CR0_PG)}
    low.close()
    return out


def main() -> int:
    why = kvm_available()
    if why is not None:
        print(f"probe_kvm_paging: KVM is not available: {why}", file=sys.stderr)
        return 1
    result = {
        "kernel": platform.release(),
        "control_flat_at_3g": run_guest("flat"),
        "set_sregs_paging": host_sets_paging(),
        "guest_pae_paging": run_guest("pae"),
        "guest_pse36_paging": run_guest("pse36"),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
