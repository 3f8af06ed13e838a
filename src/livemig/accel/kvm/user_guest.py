"""Running guest code the user brings on a KVM vCPU: CPUID, the start state, and exits.

* :func:`set_guest_cpuid`: what ``CPUID`` tells the guest — KVM's supported leaves, minus
  what this machine does not have (a local APIC, x2APIC, the TSC deadline timer), plus the
  hypervisor bit. Every KVM vCPU gets it before it first runs: without ``KVM_SET_CPUID2``
  a guest sees no FXSR/SSE, and KVM refuses ``CR4.OSFXSR`` and ``XCR0`` beyond x87.
* :func:`apply_start`: a :class:`~livemig.guest.boot_image.CpuStart` put into the vCPU's
  registers (real mode at a segment:offset, or flat 32-bit protected mode with the
  loader's GDT loaded, selectors and hidden parts agreeing).
* :class:`UserGuest`: stands where livemig's guest agent stands for its own program (the
  machine's ``workload``): the runner's exit callback. Port I/O goes to the machine's
  :class:`~livemig.devices.ioport.IoBus` (string I/O one element at a time); MMIO outside
  RAM reads all ones and drops writes (logged once per page); a triple fault asks the
  machine for a reset, as on a PC; an exit nothing can handle (an internal error, a failed
  entry) stops the guest and asks the machine to report it.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from livemig.accel.kvm import ioctls as k
from livemig.accel.kvm import ioctls_cpu as kc
from livemig.accel.kvm.vm import KvmVcpu, KvmVm, VcpuExit
from livemig.devices.ioport import IoBus
from livemig.guest.boot_image import CpuStart

log = logging.getLogger(__name__)

CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_APIC = 1 << 9
CR0_PE, CR0_PG = 1, 1 << 31


def set_guest_cpuid(vm: KvmVm, vcpu: KvmVcpu) -> None:
    """Give ``vcpu`` KVM's supported CPUID, adjusted to this machine (module docstring)."""
    entries = kc.get_supported_cpuid(vm.kvm_fd)
    for e in entries:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FF_FFFF) | (vcpu.id << 24)  # initial APIC id
            e.ecx = (e.ecx & ~(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE)) | CPUID_1_ECX_HYPERVISOR
            e.edx &= ~CPUID_1_EDX_APIC
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu.id
    kc.set_cpuid2(vcpu.fd, entries)


def _segment(selector: int, base: int, limit: int, code: bool, big: bool) -> k.kvm_segment:
    return k.kvm_segment(
        base=base,
        limit=limit,
        selector=selector,
        type=0xB if code else 0x3,  # execute/read or read/write, accessed
        present=1,
        dpl=0,
        db=int(big),
        s=1,
        g=int(big),
    )


def apply_start(vcpu: KvmVcpu, start: CpuStart) -> None:
    """Put the boot vCPU into the state ``start`` describes (other state stays as it is)."""
    s = vcpu.get_sregs()
    if start.mode == "real":
        s.cs = _segment(start.cs, start.cs << 4, 0xFFFF, code=True, big=False)
        s.ds = s.es = s.fs = s.gs = s.ss = _segment(0, 0, 0xFFFF, code=False, big=False)
        s.cr0 &= ~(CR0_PE | CR0_PG)
        s.idt.base, s.idt.limit = 0, 0x3FF
    elif start.mode == "flat32":
        s.cs = _segment(start.code_sel, 0, 0xFFFF_FFFF, code=True, big=True)
        s.ds = s.es = s.fs = s.gs = s.ss = _segment(start.data_sel, 0, 0xFFFF_FFFF, code=False, big=True)
        s.cr0 = (s.cr0 | CR0_PE) & ~CR0_PG
        s.gdt.base, s.gdt.limit = start.gdt_base, start.gdt_limit
    else:
        raise ValueError(f"unknown start mode {start.mode!r}")
    s.efer = 0
    vcpu.set_sregs(s)
    r = k.kvm_regs(rip=start.eip, rflags=0x2)  # interrupts off: nothing is wired to raise one
    for name, value in start.regs.items():
        setattr(r, "r" + name[1:], value)
    vcpu.set_regs(r)


class GuestSystem(Protocol):
    """What the machine does for a guest (``devices.ioport.SystemControl`` plus errors)."""

    def request_reset(self, reason: str) -> None: ...
    def request_exit(self, status: int) -> None: ...
    def request_error(self, message: str) -> None: ...


class UserGuest:
    """The exit callback of a vCPU running the user's code (module docstring).

    Keeps the ``Workload`` attributes the machine and QMP read (``pages_written``,
    ``fill_done``, ``queue_fill``), which have nothing to report for the user's guest.
    """

    pages_written = 0
    counter = 0

    def __init__(self, vcpu: KvmVcpu, bus: IoBus, system: GuestSystem):
        self.kvm_vcpu = vcpu
        self.bus = bus
        self.system = system
        self.fill_done = threading.Event()
        self.fill_done.set()
        self.mmio: dict[int, int] = {}
        """MMIO accesses outside RAM, by 4 KiB page (the log says it once per page)."""

    def queue_fill(self, *args: object) -> None:
        """The machine's newly-usable-memory hook: the user's guest fills what it likes."""

    def state(self) -> dict[str, int]:
        return {"counter": 0, "pages_written": 0}

    def vcpu(self, index: int, ex: VcpuExit) -> None:
        self.handle(ex)

    def handle(self, ex: VcpuExit) -> None:
        """Serve one exit, on the vCPU thread (or while completing pending I/O)."""
        reason = ex.reason
        if reason == k.KVM_EXIT_IO:
            self._io(ex)
        elif reason == k.KVM_EXIT_MMIO:
            self._mmio(ex)
        elif reason in (k.KVM_EXIT_INTR, k.KVM_EXIT_HLT):
            return
        elif reason == k.KVM_EXIT_SHUTDOWN:
            log.info("guest triple fault: resetting")
            self.system.request_reset("guest-reset")
        else:
            self.system.request_error(f"KVM exit {ex!r} that nothing here can handle")

    def _io(self, ex: VcpuExit) -> None:
        size, port, bus = ex.size, ex.port, self.bus
        if ex.direction == k.KVM_EXIT_IO_OUT:
            data = ex.data
            for i in range(ex.count):
                bus.write(port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
        else:
            self.kvm_vcpu.set_io_data(b"".join(bus.read(port, size).to_bytes(size, "little") for _ in range(ex.count)))

    def _mmio(self, ex: VcpuExit) -> None:
        page = ex.mmio_addr & ~0xFFF
        n = self.mmio.get(page, 0)
        self.mmio[page] = n + 1
        if n == 0:
            log.warning(
                "guest %s %#x, where there is no RAM and no device: reads return all ones, "
                "writes are dropped (logged once per page)",
                "writes" if ex.mmio_is_write else "reads",
                ex.mmio_addr,
            )
        if not ex.mmio_is_write:
            self.kvm_vcpu.set_mmio_data(b"\xff" * ex.size)
