"""Human monitor commands over QMP (``human-monitor-command``), in QEMU's words and layout.

``info registers`` prints the vCPU as QEMU's x86 CPU dump does (checked line by line
against QEMU 7.2's output for the same guest): general registers, EIP and flags, every
segment register with its hidden base, limit and attribute word (and, in protected mode,
a decoded description), descriptor tables, control and debug registers, EFER, the x87 and
SSE state. 64-bit layout when EFER.LMA is set. ``FPRn`` is ST(n), as QEMU prints it under
KVM (from the XSAVE image, whose registers are in stack order). Lines end in CR LF, as
HMP's do.

The input is what :meth:`~livemig.accel.kvm.accel.KvmAccel.save_cpu_state` returns:
``kvm_regs``/``kvm_sregs`` fields by name (segments as mappings or structures), the XSAVE
image or ``kvm_fpu`` bytes, events and debug registers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

SEGMENTS = (("ES ", "es"), ("CS ", "cs"), ("SS ", "ss"), ("DS ", "ds"), ("FS ", "fs"), ("GS ", "gs"))
_SYS_TYPES_32 = (
    "Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
    "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved",
    "IntGate32", "TrapGate32",
)  # fmt: skip
_SYS_TYPES_64 = (
    "Reserved", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
    "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64",
    "TrapGate64",
)  # fmt: skip
EFER_LMA = 1 << 10
CR0_PE = 1


def _get(seg: Any, name: str) -> int:
    return int(seg[name] if isinstance(seg, Mapping) else getattr(seg, name))


def seg_flags(seg: Any) -> int:
    """The attribute bits of a segment as they sit in a descriptor's high word (QEMU's)."""
    present = _get(seg, "present") and not _get(seg, "unusable")
    return (
        _get(seg, "type") << 8
        | _get(seg, "s") << 12
        | _get(seg, "dpl") << 13
        | int(bool(present)) << 15
        | _get(seg, "avl") << 20
        | _get(seg, "l") << 21
        | _get(seg, "db") << 22
        | _get(seg, "g") << 23
    )


def _seg_line(label: str, seg: Any, protected: bool, lma: bool) -> str:
    flags = seg_flags(seg)
    base = f"{_get(seg, 'base'):016x}" if lma else f"{_get(seg, 'base') & 0xFFFF_FFFF:08x}"
    line = f"{label}={_get(seg, 'selector'):04x} {base} {_get(seg, 'limit'):08x} {flags:08x}"
    if not protected or not flags & (1 << 15):
        return line
    line += f" DPL={_get(seg, 'dpl')} "
    kind = _get(seg, "type")
    if _get(seg, "s"):
        if kind & 8:  # code
            bits = "CS64" if _get(seg, "l") else ("CS32" if _get(seg, "db") else "CS16")
            line += f"{bits} [{'C' if kind & 4 else '-'}{'R' if kind & 2 else '-'}"
        else:
            bits = "DS  " if _get(seg, "db") or lma else "DS16"
            line += f"{bits} [{'E' if kind & 4 else '-'}{'W' if kind & 2 else '-'}"
        line += f"{'A' if kind & 1 else '-'}]"
    else:
        line += (_SYS_TYPES_64 if lma else _SYS_TYPES_32)[kind & 15]
    return line


def _eflags(v: int) -> str:
    return "".join(c if v & bit else "-" for c, bit in zip("DOSZAPC", (0x400, 0x800, 0x80, 0x40, 0x10, 0x4, 0x1), strict=True))


def _fpu(state: Mapping[str, Any], lma: bool) -> list[str]:
    """FCW..XMM lines from the XSAVE image's legacy area (or ``kvm_fpu``)."""
    if "xsave" in state:
        img = bytes(state["xsave"])
        fcw, fsw, ftw = struct.unpack_from("<HHB", img, 0)
        mxcsr = struct.unpack_from("<I", img, 24)[0]
        fpr = [img[32 + 16 * i : 42 + 16 * i] for i in range(8)]
        xmm = [img[160 + 16 * i : 176 + 16 * i] for i in range(16)]
    elif "fpu" in state:
        img = bytes(state["fpu"])
        fpr = [img[16 * i : 16 * i + 10] for i in range(8)]
        fcw, fsw, ftw = struct.unpack_from("<HHB", img, 128)
        xmm = [img[152 + 16 * i : 168 + 16 * i] for i in range(16)]
        mxcsr = struct.unpack_from("<I", img, 408)[0]
    else:
        return []
    lines = [f"FCW={fcw:04x} FSW={fsw:04x} [ST={(fsw >> 11) & 7}] FTW={ftw:02x} MXCSR={mxcsr:08x}"]
    regs = []
    for i, raw in enumerate(fpr):
        mant, exp = struct.unpack("<QH", raw)
        regs.append(f"FPR{i}={mant:016x} {exp:04x}")
    lines += [" ".join(regs[i : i + 2]) for i in range(0, 8, 2)]
    n = 16 if lma and _get(state["cs"], "l") else 8
    xs = []
    for i in range(n):
        lo, hi = struct.unpack("<QQ", xmm[i])
        xs.append(f"XMM{i:02d}={hi:016x} {lo:016x}")
    lines += [" ".join(xs[i : i + 2]) for i in range(0, n, 2)]
    return lines


def format_registers(state: Mapping[str, Any], cpu_index: int = 0) -> str:
    """``info registers`` for one vCPU (module docstring)."""
    r = {k: int(state[k]) for k in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "rflags")}
    lma = bool(int(state["efer"]) & EFER_LMA)
    cr0 = int(state["cr0"])
    protected = bool(cr0 & CR0_PE)
    cpl = _get(state["ss"], "dpl") if protected else 0
    shadow = int(state.get("interrupt_shadow", 0)) and 1
    tail = (
        f"CPL={cpl} II={shadow} A20=1 SMM={int(state.get('smi_smm', 0))} "
        f"HLT={int(state.get('halted', 0))}"
    )
    out = ["", f"CPU#{cpu_index}"]
    if lma:
        g = [f"{n}={int(state[k]):016x}" for n, k in (
            ("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"), ("RSI", "rsi"),
            ("RDI", "rdi"), ("RBP", "rbp"), ("RSP", "rsp"), ("R8 ", "r8"), ("R9 ", "r9"),
            ("R10", "r10"), ("R11", "r11"), ("R12", "r12"), ("R13", "r13"), ("R14", "r14"),
            ("R15", "r15"),
        )]  # fmt: skip
        out += [" ".join(g[i : i + 4]) for i in range(0, 16, 4)]
        out.append(f"RIP={r['rip']:016x} RFL={r['rflags']:08x} [{_eflags(r['rflags'])}] {tail}")
    else:
        e = {k: v & 0xFFFF_FFFF for k, v in r.items()}
        out.append(f"EAX={e['rax']:08x} EBX={e['rbx']:08x} ECX={e['rcx']:08x} EDX={e['rdx']:08x}")
        out.append(f"ESI={e['rsi']:08x} EDI={e['rdi']:08x} EBP={e['rbp']:08x} ESP={e['rsp']:08x}")
        out.append(f"EIP={e['rip']:08x} EFL={e['rflags']:08x} [{_eflags(e['rflags'])}] {tail}")
    for label, name in SEGMENTS:
        out.append(_seg_line(label, state[name], protected, lma))
    out.append(_seg_line("LDT", state["ldt"], protected, lma))
    out.append(_seg_line("TR ", state["tr"], protected, lma))
    for label, name in (("GDT", "gdt"), ("IDT", "idt")):
        base = _get(state[name], "base")
        b = f"{base:016x}" if lma else f"{base & 0xFFFF_FFFF:08x}"
        out.append(f"{label}=     {b} {_get(state[name], 'limit'):08x}")
    cr = {k: int(state[k]) for k in ("cr0", "cr2", "cr3", "cr4")}
    if lma:
        out.append(f"CR0={cr['cr0']:08x} CR2={cr['cr2']:016x} CR3={cr['cr3']:016x} CR4={cr['cr4']:08x}")
    else:
        out.append(f"CR0={cr['cr0']:08x} CR2={cr['cr2']:08x} CR3={cr['cr3']:08x} CR4={cr['cr4']:08x}")
    dr = [int(state.get(f"db{i}", 0)) for i in range(4)]
    out.append(" ".join(f"DR{i}={v:016x}" for i, v in enumerate(dr)) + " ")
    out.append(f"DR6={int(state.get('dr6', 0xFFFF0FF0)):016x} DR7={int(state.get('dr7', 0x400)):016x}")
    out.append(f"EFER={int(state['efer']):016x}")
    out += _fpu(state, lma)
    return "\r\n".join(out) + "\r\n"


def parse_registers(text: str) -> dict[str, int]:
    """The ``NAME=hex`` values of an ``info registers`` text (tests and tools read it back)."""
    values: dict[str, int] = {}
    for token in text.replace("\r", " ").replace("\n", " ").split():
        name, sep, value = token.partition("=")
        if sep and name and value:
            try:
                values.setdefault(name, int(value, 16))
            except ValueError:
                continue
    return values
