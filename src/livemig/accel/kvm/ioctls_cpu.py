"""KVM ioctls for the whole vCPU state, CPUID and address translation (ctypes ABI).

Beside ``ioctls`` (VM, memslots, ``KVM_RUN``, general and segment registers), this module
mirrors what a migration needs to carry the rest of an x86 vCPU: FPU/SSE state
(``KVM_GET_XSAVE`` or ``KVM_GET_FPU``), extended control registers, model-specific
registers, pending events, debug registers, the MP state and the TSC frequency; and what a
guest needs before it runs: ``KVM_SET_CPUID2`` (without it the guest sees no FXSR/SSE and
KVM refuses ``CR4.OSFXSR``). ``KVM_TRANSLATE`` serves QMP ``memsave``.

Numbers are computed from the ``_IOC`` encoding with the structure sizes, and the sizes are
asserted against ``<linux/kvm.h>`` on x86-64, so a wrong layout fails at import.
"""

from __future__ import annotations

import ctypes
import errno

from livemig.accel.kvm.ioctls import KvmIoctlError, ioctl

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


# -- structures -----------------------------------------------------------------------------
class kvm_msr_entry(ctypes.Structure):  # noqa: N801 - kernel names
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_cpuid_entry2(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_fpu(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("fpr", u8 * 128),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", u8 * 256),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xcr(ctypes.Structure):  # noqa: N801
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):  # noqa: N801
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_vcpu_events(ctypes.Structure):  # noqa: N801
    """``struct kvm_vcpu_events`` with its inner structs flattened (same layout)."""

    _fields_ = [
        ("exception_injected", u8),
        ("exception_nr", u8),
        ("exception_has_error_code", u8),
        ("exception_pending", u8),
        ("exception_error_code", u32),
        ("interrupt_injected", u8),
        ("interrupt_nr", u8),
        ("interrupt_soft", u8),
        ("interrupt_shadow", u8),
        ("nmi_injected", u8),
        ("nmi_pending", u8),
        ("nmi_masked", u8),
        ("padding_nmi", u8),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi_smm", u8),
        ("smi_pending", u8),
        ("smi_smm_inside_nmi", u8),
        ("smi_latched_init", u8),
        ("triple_fault_pending", u8),
        ("padding_reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_debugregs(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("db0", u64),
        ("db1", u64),
        ("db2", u64),
        ("db3", u64),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("padding", u64 * 9),
    ]


class kvm_mp_state(ctypes.Structure):  # noqa: N801
    _fields_ = [("mp_state", u32)]


class kvm_translation(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


KVM_XSAVE_SIZE = 4096
"""``struct kvm_xsave``: 1024 u32 words; KVM_GET_XSAVE2 may need more (KVM_CAP_XSAVE2)."""

for _s, _n in (
    (kvm_msr_entry, 16),
    (kvm_cpuid_entry2, 40),
    (kvm_fpu, 416),
    (kvm_xcrs, 392),
    (kvm_vcpu_events, 64),
    (kvm_debugregs, 128),
    (kvm_mp_state, 4),
    (kvm_translation, 24),
):
    assert ctypes.sizeof(_s) == _n, (_s.__name__, ctypes.sizeof(_s), _n)
assert kvm_vcpu_events.exception_payload.offset == 56
assert kvm_vcpu_events.triple_fault_pending.offset == 28

# -- ioctl numbers --------------------------------------------------------------------------
KVM_GET_MSR_INDEX_LIST = _ioc(_IOC_READ | _IOC_WRITE, 0x02, 4)
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, 8)
KVM_TRANSLATE = _ioc(_IOC_READ | _IOC_WRITE, 0x85, 24)
KVM_GET_MSRS = _ioc(_IOC_READ | _IOC_WRITE, 0x88, 8)
KVM_SET_MSRS = _ioc(_IOC_WRITE, 0x89, 8)
KVM_GET_FPU = _ioc(_IOC_READ, 0x8C, 416)
KVM_SET_FPU = _ioc(_IOC_WRITE, 0x8D, 416)
KVM_SET_CPUID2 = _ioc(_IOC_WRITE, 0x90, 8)
KVM_GET_MP_STATE = _ioc(_IOC_READ, 0x98, 4)
KVM_SET_MP_STATE = _ioc(_IOC_WRITE, 0x99, 4)
KVM_GET_VCPU_EVENTS = _ioc(_IOC_READ, 0x9F, 64)
KVM_SET_VCPU_EVENTS = _ioc(_IOC_WRITE, 0xA0, 64)
KVM_GET_DEBUGREGS = _ioc(_IOC_READ, 0xA1, 128)
KVM_SET_DEBUGREGS = _ioc(_IOC_WRITE, 0xA2, 128)
KVM_SET_TSC_KHZ = _ioc(_IOC_NONE, 0xA2, 0)
KVM_GET_TSC_KHZ = _ioc(_IOC_NONE, 0xA3, 0)
KVM_GET_XSAVE = _ioc(_IOC_READ, 0xA4, KVM_XSAVE_SIZE)
KVM_SET_XSAVE = _ioc(_IOC_WRITE, 0xA5, KVM_XSAVE_SIZE)
KVM_GET_XCRS = _ioc(_IOC_READ, 0xA6, 392)
KVM_SET_XCRS = _ioc(_IOC_WRITE, 0xA7, 392)
KVM_GET_XSAVE2 = _ioc(_IOC_READ, 0xCF, KVM_XSAVE_SIZE)

assert KVM_GET_MSRS == 0xC008AE88 and KVM_SET_CPUID2 == 0x4008AE90
assert KVM_GET_XSAVE == 0x9000AEA4 and KVM_GET_VCPU_EVENTS == 0x8040AE9F

KVM_CAP_MP_STATE = 14
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_XSAVE2 = 208

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3


# -- wrappers -------------------------------------------------------------------------------
def _array_struct(entry: type[ctypes.Structure], n: int, head: str = "nmsrs") -> ctypes.Structure:
    """``struct { u32 n; u32 pad; entry entries[n]; }`` (kvm_msrs, kvm_cpuid2)."""

    class Arr(ctypes.Structure):
        _fields_ = [(head, u32), ("pad", u32), ("entries", entry * n)]

    return Arr()


def get_msr_index_list(kvm_fd: int) -> list[int]:
    """The MSRs KVM saves and restores for a vCPU (``KVM_GET_MSR_INDEX_LIST`` on /dev/kvm)."""
    n = 256
    while True:

        class MsrList(ctypes.Structure):
            _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

        lst = MsrList(nmsrs=n)
        try:
            ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, lst)
        except KvmIoctlError as e:
            if e.errno == errno.E2BIG and lst.nmsrs > n:
                n = lst.nmsrs
                continue
            raise
        return list(lst.indices[: lst.nmsrs])


def get_msrs(vcpu_fd: int, indices: list[int]) -> list[tuple[int, int]]:
    """(index, value) of the leading MSRs KVM could read (it stops at the first failure)."""
    arr = _array_struct(kvm_msr_entry, max(len(indices), 1))
    arr.nmsrs = len(indices)
    for i, index in enumerate(indices):
        arr.entries[i].index = index
    got = ioctl(vcpu_fd, KVM_GET_MSRS, arr) if indices else 0
    return [(arr.entries[i].index, arr.entries[i].data) for i in range(got)]


def set_msrs(vcpu_fd: int, values: list[tuple[int, int]]) -> int:
    """Write MSRs in order; returns how many KVM accepted (it stops at the first refusal)."""
    if not values:
        return 0
    arr = _array_struct(kvm_msr_entry, len(values))
    arr.nmsrs = len(values)
    for i, (index, value) in enumerate(values):
        arr.entries[i].index = index
        arr.entries[i].data = value
    return ioctl(vcpu_fd, KVM_SET_MSRS, arr)


def get_supported_cpuid(kvm_fd: int) -> list[kvm_cpuid_entry2]:
    n = 128
    while True:
        arr = _array_struct(kvm_cpuid_entry2, n, head="nent")
        arr.nent = n
        try:
            ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, arr)
        except KvmIoctlError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return [arr.entries[i] for i in range(arr.nent)]


def set_cpuid2(vcpu_fd: int, entries: list[kvm_cpuid_entry2]) -> None:
    arr = _array_struct(kvm_cpuid_entry2, len(entries), head="nent")
    arr.nent = len(entries)
    for i, e in enumerate(entries):
        arr.entries[i] = e
    ioctl(vcpu_fd, KVM_SET_CPUID2, arr, f"{len(entries)} entries")


def get_struct(vcpu_fd: int, request: int, cls: type[ctypes.Structure]) -> ctypes.Structure:
    s = cls()
    ioctl(vcpu_fd, request, s)
    return s


def get_xsave(vcpu_fd: int, size: int = KVM_XSAVE_SIZE) -> bytes:
    """The XSAVE image (``KVM_GET_XSAVE2`` when the state is larger than 4 KiB)."""
    buf = (u8 * size)()
    request = KVM_GET_XSAVE if size <= KVM_XSAVE_SIZE else KVM_GET_XSAVE2
    ioctl(vcpu_fd, request, ctypes.addressof(buf), f"size={size}")
    return bytes(buf)


def set_xsave(vcpu_fd: int, image: bytes) -> None:
    n = max(len(image), KVM_XSAVE_SIZE)
    buf = (u8 * n).from_buffer_copy(image.ljust(n, b"\0"))
    ioctl(vcpu_fd, KVM_SET_XSAVE, ctypes.addressof(buf), f"size={len(image)}")


def translate(vcpu_fd: int, linear: int) -> tuple[int, bool]:
    """(physical address, valid) of a linear address under the vCPU's current paging."""
    t = kvm_translation(linear_address=linear)
    ioctl(vcpu_fd, KVM_TRANSLATE, t, f"linear={linear:#x}")
    return t.physical_address, bool(t.valid)
