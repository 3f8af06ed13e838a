"""The whole state of a KVM vCPU, as it travels in section ``livemig-kvm-cpu``.

Version 1 carried what livemig's own guest program needs: general registers, rip, rflags,
segment registers with their hidden parts (base, limit, attributes: a guest that loaded a
selector and then changed its descriptor keeps the old hidden part, and so must the
destination), descriptor tables, control registers, EFER and the APIC base. Version 2 adds,
as subsections (so a version-1 stream still loads), everything else KVM keeps for a vCPU:

=================================  =====================================================
subsection                         content
=================================  =====================================================
``livemig-kvm-cpu/xsave``          the XSAVE image (x87, SSE, AVX... as the CPU saves it)
``livemig-kvm-cpu/fpu``            ``struct kvm_fpu`` instead, where KVM has no XSAVE
``livemig-kvm-cpu/xcrs``           extended control registers (XCR0)
``livemig-kvm-cpu/msrs``           every MSR of ``KVM_GET_MSR_INDEX_LIST`` that reads and
                                   writes back on this host (TSC, SYSENTER, PAT, ...)
``livemig-kvm-cpu/events``         pending exception/interrupt/NMI/SMI, interrupt shadow
``livemig-kvm-cpu/debugregs``      DR0-DR3, DR6, DR7
``livemig-kvm-cpu/run``            MP state, ``halted`` (a vCPU stopped in HLT: without an
                                   in-kernel LAPIC KVM leaves HLT to us) and the TSC rate
``livemig-kvm-cpu/intr``           the interrupt bitmap of ``kvm_sregs`` (only if non-zero)
=================================  =====================================================

The section keeps livemig's name rather than QEMU's ``cpu``: QEMU's loader would find its own
``cpu`` handler and misread our layout, while an unknown name fails cleanly. Fields of
kernel structures are derived from their ctypes mirrors (padding left out), so the
description cannot drift from the ABI; buffers (XSAVE, FPU) keep the kernel's byte layout.
MSR and XCR lists are ``count`` then ``count`` big-endian (u32 index, u64 value) pairs.

:class:`VcpuStateAccess` finds out once per vCPU what this host's KVM can save and restore
and does the ioctls; :func:`cpu_state_section` is registered by
:meth:`~livemig.accel.kvm.accel.KvmAccel.register_state`.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from livemig.accel.kvm import ioctls as kvm_abi
from livemig.accel.kvm import ioctls_cpu as kc
from livemig.accel.kvm.vm import KvmError, KvmVcpu, KvmVm
from livemig.devices.state import StateSection
from livemig.devices.vmstate import Field, VMStateDescription

log = logging.getLogger(__name__)

SECTION = "livemig-kvm-cpu"
SEGMENT_REGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
DESCRIPTOR_TABLES = ("gdt", "idt")
CONTROL_REGS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
GENERAL_REGS = tuple(name for name, _ in kvm_abi.kvm_regs._fields_)

_ABI_KINDS = {
    ctypes.c_uint8: Field.uint8,
    ctypes.c_uint16: Field.uint16,
    ctypes.c_uint32: Field.uint32,
    ctypes.c_uint64: Field.uint64,
}
_PAIR = np.dtype([("index", ">u4"), ("value", ">u8")])


def _abi_fields(struct: type[ctypes.Structure], skip: tuple[str, ...] = ()) -> list[Field]:
    """One field per scalar member of a kernel ABI structure, padding left out."""
    return [
        _ABI_KINDS[ctype](name)
        for name, ctype in struct._fields_  # type: ignore[misc]
        if not name.startswith("padding") and name not in skip
    ]


def _from_struct(s: ctypes.Structure, fields: list[Field]) -> dict[str, int]:
    return {f.name: int(getattr(s, f.name)) for f in fields}


def _pairs_size(count: str) -> Any:
    return lambda v: int(v[count]) * _PAIR.itemsize


def pack_pairs(pairs: list[tuple[int, int]]) -> bytes:
    a = np.zeros(len(pairs), _PAIR)
    if pairs:
        a["index"], a["value"] = zip(*pairs, strict=True)
    return a.tobytes()


def unpack_pairs(data: bytes) -> list[tuple[int, int]]:
    a = np.frombuffer(data, _PAIR)
    return [(int(i), int(v)) for i, v in zip(a["index"], a["value"], strict=True)]


_SEGMENT_FIELDS = _abi_fields(kvm_abi.kvm_segment)
_DTABLE_FIELDS = _abi_fields(kvm_abi.kvm_dtable)
_EVENT_FIELDS = _abi_fields(kc.kvm_vcpu_events)
_DEBUG_FIELDS = _abi_fields(kc.kvm_debugregs, skip=("flags",))


def _sub(name: str, fields: list[Field], key: str) -> VMStateDescription:
    return VMStateDescription(f"{SECTION}/{name}", 1, fields, needed=lambda v: key in v)


KVM_SEGMENT_DESC = VMStateDescription("livemig-kvm-segment", 1, _SEGMENT_FIELDS)
KVM_DTABLE_DESC = VMStateDescription("livemig-kvm-dtable", 1, _DTABLE_FIELDS)
KVM_CPU_DESC = VMStateDescription(
    SECTION,
    2,
    [
        *_abi_fields(kvm_abi.kvm_regs),
        *(Field.struct_(name, KVM_SEGMENT_DESC) for name in SEGMENT_REGS),
        *(Field.struct_(name, KVM_DTABLE_DESC) for name in DESCRIPTOR_TABLES),
        *(Field.uint64(name) for name in CONTROL_REGS),
    ],
    subsections=[
        _sub("xsave", [Field.uint32("xsave_size"), Field.buffer("xsave", "xsave_size", limit=1 << 20)], "xsave"),
        _sub("fpu", [Field.buffer("fpu", ctypes.sizeof(kc.kvm_fpu))], "fpu"),
        _sub("xcrs", [Field.uint32("xcr_count"), Field.buffer("xcrs", _pairs_size("xcr_count"))], "xcrs"),
        _sub(
            "msrs",
            [Field.uint32("msr_count"), Field.buffer("msrs", _pairs_size("msr_count"), limit=12 << 12)],
            "msrs",
        ),
        _sub("events", _EVENT_FIELDS, "exception_nr"),
        _sub("debugregs", _DEBUG_FIELDS, "dr7"),
        _sub("run", [Field.uint32("mp_state"), Field.uint32("halted"), Field.uint32("tsc_khz")], "mp_state"),
        _sub("intr", [Field.buffer("interrupt_bitmap", 32)], "interrupt_bitmap"),
    ],
    minimum_version=1,
)


class VcpuStateAccess:
    """What this host's KVM saves and restores for a vCPU, and the ioctls that do it.

    Probed once, when the vCPU is created and before it ever runs: the MSR list is
    ``KVM_GET_MSR_INDEX_LIST`` reduced to the MSRs that read *and* write back their value
    here (KVM lists some it refuses from the host, e.g. a PV MSR without its feature), so a
    save never carries an MSR the destination of the same kind would refuse.
    """

    def __init__(self, vm: KvmVm, vcpu: KvmVcpu):
        self.xsave_size = 0
        if vm.check_extension(kc.KVM_CAP_XSAVE):
            self.xsave_size = max(vm.check_extension(kc.KVM_CAP_XSAVE2), kc.KVM_XSAVE_SIZE)
        self.xcrs = bool(vm.check_extension(kc.KVM_CAP_XCRS))
        self.events = bool(vm.check_extension(kc.KVM_CAP_VCPU_EVENTS))
        self.debugregs = bool(vm.check_extension(kc.KVM_CAP_DEBUGREGS))
        self.mp_state = bool(vm.check_extension(kc.KVM_CAP_MP_STATE))
        self.tsc_khz = bool(vm.check_extension(kc.KVM_CAP_GET_TSC_KHZ))
        self.msr_indices = self._usable_msrs(kc.get_msr_index_list(vm.kvm_fd), vcpu)

    @staticmethod
    def _usable_msrs(listed: list[int], vcpu: KvmVcpu) -> list[int]:
        usable = []
        for index in listed:
            got = kc.get_msrs(vcpu.fd, [index])
            if got and kc.set_msrs(vcpu.fd, got) == 1:
                usable.append(index)
        if len(usable) != len(listed):
            skipped = sorted(set(listed) - set(usable))
            log.debug("MSRs KVM lists but will not read and write back: %s", [hex(i) for i in skipped])
        return usable

    # -- save -----------------------------------------------------------------------------------
    def save(self, vcpu: KvmVcpu, halted: bool) -> dict[str, Any]:
        """Everything KVM holds for ``vcpu`` (stopped, with no I/O pending)."""
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        state: dict[str, Any] = {name: getattr(regs, name) for name in GENERAL_REGS}
        for name in SEGMENT_REGS:
            state[name] = _from_struct(getattr(sregs, name), _SEGMENT_FIELDS)
        for name in DESCRIPTOR_TABLES:
            state[name] = _from_struct(getattr(sregs, name), _DTABLE_FIELDS)
        for name in CONTROL_REGS:
            state[name] = getattr(sregs, name)
        bitmap = bytes(sregs.interrupt_bitmap)
        if any(bitmap):
            state["interrupt_bitmap"] = bitmap
        fd = vcpu.fd
        if self.xsave_size:
            state["xsave"] = kc.get_xsave(fd, self.xsave_size)
            state["xsave_size"] = len(state["xsave"])
        else:
            state["fpu"] = bytes(kc.get_struct(fd, kc.KVM_GET_FPU, kc.kvm_fpu))
        if self.xcrs:
            x = kc.get_struct(fd, kc.KVM_GET_XCRS, kc.kvm_xcrs)
            state["xcrs"] = pack_pairs([(x.xcrs[i].xcr, x.xcrs[i].value) for i in range(x.nr_xcrs)])
            state["xcr_count"] = x.nr_xcrs
        msrs = kc.get_msrs(fd, self.msr_indices)
        if len(msrs) != len(self.msr_indices):
            raise KvmError(f"KVM_GET_MSRS stopped at MSR {self.msr_indices[len(msrs)]:#x}")
        state["msrs"], state["msr_count"] = pack_pairs(msrs), len(msrs)
        if self.events:
            state.update(_from_struct(kc.get_struct(fd, kc.KVM_GET_VCPU_EVENTS, kc.kvm_vcpu_events), _EVENT_FIELDS))
        if self.debugregs:
            state.update(_from_struct(kc.get_struct(fd, kc.KVM_GET_DEBUGREGS, kc.kvm_debugregs), _DEBUG_FIELDS))
        mp = kc.get_struct(fd, kc.KVM_GET_MP_STATE, kc.kvm_mp_state) if self.mp_state else None
        state["mp_state"] = mp.mp_state if mp is not None else kc.KVM_MP_STATE_RUNNABLE
        state["halted"] = int(halted)
        state["tsc_khz"] = self.get_tsc_khz(vcpu)
        return state

    def get_tsc_khz(self, vcpu: KvmVcpu) -> int:
        return kvm_abi.ioctl(vcpu.fd, kc.KVM_GET_TSC_KHZ, 0) if self.tsc_khz else 0

    # -- load -----------------------------------------------------------------------------------
    def load(self, vcpu: KvmVcpu, state: Mapping[str, Any]) -> bool:
        """Set what :meth:`save` produced (decoded: nested dicts); returns ``halted``.

        A value KVM refuses raises ``ValueError`` naming it (the stream's fault, reported as
        a decode error of the section).
        """
        regs = kvm_abi.kvm_regs()
        for name in GENERAL_REGS:
            setattr(regs, name, int(state[name]))
        sregs = vcpu.get_sregs()  # keeps the interrupt bitmap unless the stream has one
        for name in (*SEGMENT_REGS, *DESCRIPTOR_TABLES):
            target = getattr(sregs, name)
            for field, value in state[name].items():
                setattr(target, field, int(value))
        for name in CONTROL_REGS:
            setattr(sregs, name, int(state[name]))
        if "interrupt_bitmap" in state:
            ctypes.memmove(ctypes.addressof(sregs.interrupt_bitmap), bytes(state["interrupt_bitmap"]), 32)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        fd = vcpu.fd
        if "xsave" in state:
            kc.set_xsave(fd, bytes(state["xsave"]))
        if "fpu" in state:
            kvm_abi.ioctl(fd, kc.KVM_SET_FPU, kc.kvm_fpu.from_buffer_copy(bytes(state["fpu"])))
        if "xcrs" in state:
            x = kc.kvm_xcrs(nr_xcrs=int(state["xcr_count"]))
            for i, (index, value) in enumerate(unpack_pairs(state["xcrs"])[: kc.KVM_MAX_XCRS]):
                x.xcrs[i].xcr, x.xcrs[i].value = index, value
            kvm_abi.ioctl(fd, kc.KVM_SET_XCRS, x, "XCR0")
        if "msrs" in state:
            pairs = unpack_pairs(state["msrs"])
            done = kc.set_msrs(fd, pairs)
            if done != len(pairs):
                index, value = pairs[done]
                raise ValueError(f"KVM refuses MSR {index:#x} = {value:#x}")
        if "exception_nr" in state:
            ev = kc.kvm_vcpu_events(**{f.name: int(state[f.name]) for f in _EVENT_FIELDS})
            ev.flags |= kc.KVM_VCPUEVENT_VALID_NMI_PENDING | kc.KVM_VCPUEVENT_VALID_SIPI_VECTOR
            kvm_abi.ioctl(fd, kc.KVM_SET_VCPU_EVENTS, ev, f"flags={ev.flags:#x}")
        if "dr7" in state:
            dr = kc.kvm_debugregs(**{f.name: int(state[f.name]) for f in _DEBUG_FIELDS})
            kvm_abi.ioctl(fd, kc.KVM_SET_DEBUGREGS, dr)
        if "mp_state" in state:
            self._load_run(vcpu, state)
        return bool(state.get("halted", 0))

    def _load_run(self, vcpu: KvmVcpu, state: Mapping[str, Any]) -> None:
        mp = int(state["mp_state"])
        if self.mp_state and mp != kc.KVM_MP_STATE_RUNNABLE:
            kvm_abi.ioctl(vcpu.fd, kc.KVM_SET_MP_STATE, kc.kvm_mp_state(mp), f"mp_state={mp}")
        khz, ours = int(state["tsc_khz"]), self.get_tsc_khz(vcpu)
        if khz and ours and khz != ours:
            try:
                kvm_abi.ioctl(vcpu.fd, kc.KVM_SET_TSC_KHZ, khz, f"{khz} kHz")
            except OSError as e:  # KVM without TSC scaling: the guest sees a different rate
                log.warning("TSC runs at %d kHz here, %d kHz on the source (%s)", ours, khz, e)


class CpuStateOwner(Protocol):
    """What owns the vCPU state (``KvmAccel``): it saves and loads with the vCPU stopped."""

    def save_cpu_state(self) -> dict[str, Any]: ...
    def load_cpu_state(self, state: Mapping[str, Any]) -> None: ...


def cpu_state_section(kvm: CpuStateOwner) -> StateSection:
    """The section of ``kvm``'s vCPU: saved and loaded with the vCPU stopped."""

    def apply(values: dict[str, Any]) -> None:
        kvm.load_cpu_state(values)  # before the vCPU ever runs on this side

    return StateSection.simple(SECTION, KVM_CPU_DESC, kvm.save_cpu_state, apply)
