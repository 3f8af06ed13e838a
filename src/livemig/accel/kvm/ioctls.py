"""KVM ioctl numbers, ctypes mirrors of the kernel structures, and thin ioctl wrappers.

Every ioctl goes through ``libc.ioctl`` called via ctypes rather than ``fcntl.ioctl``. The
reason is ``KVM_RUN``: it blocks for as long as the guest runs, and a ctypes call into a
``CDLL`` function releases the GIL for its duration, so other Python threads (the migration
thread, the one that pauses vCPUs) keep running. ``fcntl.ioctl`` holds the GIL. The other
ioctls use the same path for uniformity; none of them needs the GIL either.

Numbers and structure sizes agree with ``<linux/kvm.h>`` on x86-64 and were measured on
this platform (platform notes, section 2c); the layout sizes are asserted at import time so
a mistake in a structure shows up immediately rather than as memory corruption.

Errors raise :class:`KvmIoctlError` (an ``OSError``) whose message names the ioctl and its
arguments, so ``EINVAL`` from ``KVM_CLEAR_DIRTY_LOG`` is distinguishable from one from
``KVM_SET_USER_MEMORY_REGION``.
"""

from __future__ import annotations

import ctypes
import os

# -- ioctl numbers (type 0xAE) --------------------------------------------------------------
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_GET_DIRTY_LOG = 0x4010AE42
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_ENABLE_CAP = 0x4068AEA3
KVM_CLEAR_DIRTY_LOG = 0xC018AEC0

IOCTL_NAMES = {
    KVM_GET_API_VERSION: "KVM_GET_API_VERSION",
    KVM_CREATE_VM: "KVM_CREATE_VM",
    KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
    KVM_GET_VCPU_MMAP_SIZE: "KVM_GET_VCPU_MMAP_SIZE",
    KVM_CREATE_VCPU: "KVM_CREATE_VCPU",
    KVM_GET_DIRTY_LOG: "KVM_GET_DIRTY_LOG",
    KVM_SET_USER_MEMORY_REGION: "KVM_SET_USER_MEMORY_REGION",
    KVM_RUN: "KVM_RUN",
    KVM_GET_REGS: "KVM_GET_REGS",
    KVM_SET_REGS: "KVM_SET_REGS",
    KVM_GET_SREGS: "KVM_GET_SREGS",
    KVM_SET_SREGS: "KVM_SET_SREGS",
    KVM_ENABLE_CAP: "KVM_ENABLE_CAP",
    KVM_CLEAR_DIRTY_LOG: "KVM_CLEAR_DIRTY_LOG",
}

KVM_API_VERSION = 12

# -- capabilities ---------------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# -- memory region flags --------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# -- exit reasons ---------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
    KVM_EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


# -- structures -----------------------------------------------------------------------------
class kvm_regs(ctypes.Structure):  # noqa: N801 - kernel names, kept for grep-ability
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):  # noqa: N801
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_run_io(ctypes.Structure):  # noqa: N801
    """``KVM_EXIT_IO``: the data lives in the run page at ``data_offset``."""

    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(ctypes.Structure):  # noqa: N801
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(ctypes.Structure):  # noqa: N801
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):  # noqa: N801
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit_union(ctypes.Union):  # noqa: N801
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):  # noqa: N801
    """The header of the vCPU's shared run page (mmap of the vCPU fd); the rest is unused."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit_union),
    ]


class kvm_userspace_memory_region(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(ctypes.Structure):  # noqa: N801
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):  # noqa: N801
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):  # noqa: N801
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


for _s, _n in (
    (kvm_regs, 0x90),
    (kvm_segment, 24),
    (kvm_dtable, 16),
    (kvm_sregs, 0x138),
    (kvm_userspace_memory_region, 0x20),
    (kvm_dirty_log, 0x10),
    (kvm_clear_dirty_log, 0x18),
    (kvm_enable_cap, 0x68),
    (kvm_run_exit_union, 256),
):
    assert ctypes.sizeof(_s) == _n, (_s.__name__, ctypes.sizeof(_s), _n)
assert kvm_run.exit_reason.offset == 8 and kvm_run.exit.offset == 32
assert kvm_run_io.data_offset.offset == 8 and kvm_run_mmio.is_write.offset == 20


# -- the call -------------------------------------------------------------------------------
class KvmIoctlError(OSError):
    """A KVM ioctl failed; ``ioctl`` is its name (e.g. ``"KVM_CLEAR_DIRTY_LOG"``)."""

    def __init__(self, err: int, ioctl: str, detail: str = ""):
        what = f"{ioctl}({detail})" if detail else ioctl
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.ioctl = ioctl


_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | None = 0, detail: str = "") -> int:
    """Issue one ioctl without the GIL; return its non-negative result or raise.

    ``arg`` is either an integer (passed by value, or an address) or a ctypes structure
    (passed by address, and filled in place for ioctls that write back).
    """
    # ``arg`` must stay referenced until the call returns: rebinding it to its address
    # would free a temporary structure (Python 3.11 hands the only reference to the
    # callee) and the kernel would read memory the allocator already reused.
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else arg
    r = _ioctl(fd, request, ptr or None)
    if r < 0:
        raise KvmIoctlError(ctypes.get_errno(), IOCTL_NAMES.get(request, hex(request)), detail)
    return r


def ioctl_run(fd: int) -> int:
    """``KVM_RUN`` returning ``0`` or ``-errno`` instead of raising.

    ``EINTR`` (immediate_exit, or a signal) and ``EAGAIN`` are normal outcomes of a run, not
    errors, so the vCPU loop wants the code rather than an exception on the hot path.
    """
    r = _ioctl(fd, KVM_RUN, None)
    return -ctypes.get_errno() if r < 0 else r


def get_api_version(kvm_fd: int) -> int:
    return ioctl(kvm_fd, KVM_GET_API_VERSION, 0)


def create_vm(kvm_fd: int, machine_type: int = 0) -> int:
    return ioctl(kvm_fd, KVM_CREATE_VM, machine_type, f"type={machine_type}")


def check_extension(fd: int, cap: int) -> int:
    """The capability's value (0 = absent); ``fd`` may be the /dev/kvm or a VM fd."""
    return ioctl(fd, KVM_CHECK_EXTENSION, cap, f"cap={cap}")


def get_vcpu_mmap_size(kvm_fd: int) -> int:
    return ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)


def create_vcpu(vm_fd: int, vcpu_id: int) -> int:
    return ioctl(vm_fd, KVM_CREATE_VCPU, vcpu_id, f"id={vcpu_id}")


def enable_cap(fd: int, cap: int, *args: int, flags: int = 0) -> None:
    s = kvm_enable_cap(cap=cap, flags=flags)
    for i, a in enumerate(args):
        s.args[i] = a
    ioctl(fd, KVM_ENABLE_CAP, s, f"cap={cap}, args={list(args)}")


def set_user_memory_region(
    vm_fd: int, slot: int, flags: int, gpa: int, size: int, host_addr: int
) -> None:
    s = kvm_userspace_memory_region(
        slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr
    )
    ioctl(
        vm_fd,
        KVM_SET_USER_MEMORY_REGION,
        s,
        f"slot={slot}, flags={flags:#x}, gpa={gpa:#x}, size={size:#x}",
    )


def get_dirty_log(vm_fd: int, slot: int, bitmap_addr: int) -> None:
    """Copy the slot's dirty bitmap (ALIGN(npages, 64) bits) to ``bitmap_addr``."""
    ioctl(
        vm_fd, KVM_GET_DIRTY_LOG, kvm_dirty_log(slot=slot, dirty_bitmap=bitmap_addr), f"slot={slot}"
    )


def clear_dirty_log(
    vm_fd: int, slot: int, first_page: int, num_pages: int, bitmap_addr: int
) -> None:
    """Re-protect the pages of [first_page, +num_pages) whose bit is set at ``bitmap_addr``.

    Bit 0 of the bitmap is ``first_page``. The kernel wants ``first_page`` a multiple of 64
    and ``num_pages`` a multiple of 64 unless the range ends at the end of the slot.
    """
    s = kvm_clear_dirty_log(
        slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap_addr
    )
    ioctl(
        vm_fd,
        KVM_CLEAR_DIRTY_LOG,
        s,
        f"slot={slot}, first_page={first_page}, num_pages={num_pages}",
    )


def get_regs(vcpu_fd: int) -> kvm_regs:
    r = kvm_regs()
    ioctl(vcpu_fd, KVM_GET_REGS, r)
    return r


def set_regs(vcpu_fd: int, regs: kvm_regs) -> None:
    ioctl(vcpu_fd, KVM_SET_REGS, regs)


def get_sregs(vcpu_fd: int) -> kvm_sregs:
    s = kvm_sregs()
    ioctl(vcpu_fd, KVM_GET_SREGS, s)
    return s


def set_sregs(vcpu_fd: int, sregs: kvm_sregs) -> None:
    ioctl(vcpu_fd, KVM_SET_SREGS, sregs)
