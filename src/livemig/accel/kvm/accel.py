"""The KVM accelerator: a :class:`~livemig.machine.Machine` on a real KVM VM.

:class:`KvmAccel` offers the surface the machine and migration use from
:class:`~livemig.accel.soft.SoftAccel` (``name``, ``dirty_log``, ``pause``/``resume``/
``shutdown``, ``write``/``read``, ``discarded_writes``, ``start_vcpus``), on top of
:class:`~livemig.accel.kvm.vm.KvmVm`, one vCPU running the guest program
(``guest_program``) or the user's code (a ``BootImage``: ``user_guest``) and a
:class:`~livemig.accel.kvm.runner.VcpuRunner`. Either way the vCPU gets a CPUID and its
whole state travels in section ``livemig-kvm-cpu`` (``cpu_state``).

Memory layout. The guest program runs in 32-bit protected mode without paging, so the
guest reaches only guest-physical addresses below 4 GiB. Base RAM sits at 0 (it holds the
program, its control page and its target table below 1 MiB) and the virtio-mem region
right after base RAM, aligned to the block size (:func:`device_memory_addr`); a region
that does not fit below 4 GiB is a configuration error, reported with the size that would
fit. Every RAM block is one KVM memslot with dirty logging on from its creation.

Host writes. KVM logs only writes made by the guest; a write the host makes through the
mapping (the guest agent rewriting the target table, :meth:`KvmAccel.write`) is invisible
to ``KVM_GET_DIRTY_LOG``. Such writes are recorded in a small software bitmap per block
that :class:`KvmAccelDirtyLog` ORs into every ``sync`` result and clears together with the
KVM log, so migration sees both kinds of write through one :class:`DirtyLog`.

Starting the log. :meth:`KvmAccelDirtyLog.start` does *not* re-protect the slots: the
migration bitmap starts all ones, so whatever the log holds from before the start is
covered already, and each clear-chunk is re-armed lazily right before its pages are sent
(reference 3.3), as QEMU does with ``KVM_DIRTY_LOG_INITIALLY_SET``. That saves a
write-protect pass over all of guest memory at setup, and it leaves the bits of writes
made before the migration in KVM's log — including writes to blocks that were unplugged
since. Those must go *after* the first sync, which is exactly what
``RamState.init_bitmaps`` does (reference 3.2); ``tests/test_kvm_migration.py`` checks it
against KVM's own log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from livemig.accel.kvm import guest_program as gp
from livemig.accel.kvm import ioctls as k
from livemig.accel.kvm import ioctls_cpu as kc
from livemig.accel.kvm.cpu_state import GENERAL_REGS, VcpuStateAccess, cpu_state_section
from livemig.accel.kvm.runner import VcpuRunner
from livemig.accel.kvm.user_guest import apply_start, set_guest_cpuid
from livemig.accel.kvm.vm import KvmDirtyLog, KvmError, KvmVm, VcpuExit, ensure_kick_signal
from livemig.accel.throttle import VcpuThrottle
from livemig.devices.state import StateRegistry
from livemig.guest.boot_image import BootImage
from livemig.memory import hostmem
from livemig.memory.dirty_log import BitmapDirtyLog
from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import GuestMemoryMap, MemoryRegion

log = logging.getLogger(__name__)

GPA_LIMIT = gp.GPA_LIMIT
"""Guest-physical addresses the 32-bit, non-paging guest can reach."""

PAGE = gp.PAGE
PAUSE_TIMEOUT = 5.0
"""Seconds a pause may take: one yield interval normally, more while pages fault in."""

__all__ = ["GENERAL_REGS", "KvmAccel", "KvmLayoutError", "device_memory_addr"]
ZERO_CHUNK = 1 << 20
PENDING_IO_LIMIT = 1 << 16


class KvmLayoutError(ValueError):
    """Guest memory that a KVM guest cannot reach (above 4 GiB)."""


def _fmt(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def device_memory_addr(ram_size: int, region_size: int, block_size: int) -> int:
    """Where a KVM machine puts its virtio-mem region: right after base RAM.

    Aligned to the block size (virtio-mem requires it), and the whole region must end at or
    below 4 GiB, the most the non-paging guest reaches; otherwise :class:`KvmLayoutError`
    says how large a region would fit.
    """
    align = max(block_size, PAGE)
    addr = -(-ram_size // align) * align
    if addr + region_size > GPA_LIMIT:
        room = max(GPA_LIMIT - addr, 0)
        raise KvmLayoutError(
            f"virtio-mem region of {_fmt(region_size)} does not fit below 4 GiB, all that a "
            f"KVM guest reaches without paging: after {_fmt(ram_size)} of base RAM at most "
            f"{_fmt(room)} fits (--accel kvm)"
        )
    return addr


def check_layout(memory: GuestMemoryMap) -> None:
    """Raise :class:`KvmLayoutError` unless base RAM is at 0 and everything is below 4 GiB."""
    try:
        memory.lookup(0)
    except KeyError:
        raise KvmLayoutError("a KVM guest needs base RAM at guest-physical address 0") from None
    for mr in memory.regions:
        end = mr.addr + mr.block.max_length
        if end > GPA_LIMIT:
            raise KvmLayoutError(
                f"{mr.name} at [{mr.addr:#x}, {end:#x}) reaches beyond 4 GiB, which a KVM "
                f"guest cannot address without paging (--accel kvm)"
            )


def discarded_pages(mr: MemoryRegion, offset: int, length: int) -> int:
    """Pages of [offset, offset+length) of ``mr`` that its discard manager reports discarded."""
    if mr.rdm is None or length <= 0 or not mr.is_discarded(offset, length):
        return 0
    offs, sizes = mr.rdm.discarded_runs(Section(mr, 0, mr.size))
    lo = np.maximum(np.asarray(offs, np.int64), offset)
    hi = np.minimum(np.asarray(offs, np.int64) + np.asarray(sizes, np.int64), offset + length)
    return int(np.clip(hi - lo, 0, None).sum()) // mr.block.page_size


class KvmAccelDirtyLog(KvmDirtyLog):
    """KVM's log of guest writes plus a software log of host writes, as one DirtyLog.

    ``sync`` is the KVM bitmap ORed with the host-write bitmap; ``clear`` re-arms both
    (each for the bits its own last sync reported, the contract of
    :class:`~livemig.memory.dirty_log.DirtyLog`). ``start`` leaves KVM's log alone (module
    docstring) and only starts recording host writes: one before the start is covered by
    the all-ones migration bitmap.
    """

    def __init__(self, vm: KvmVm):
        super().__init__(vm)
        self._host = BitmapDirtyLog([s.block for s in vm.slots.values() if s.log_dirty])
        self._host_scratch: dict[str, np.ndarray] = {}  # reused by sync: no allocation per sync

    def start(self) -> None:
        with self._lock:
            for words in self._reported.values():
                words[:] = 0
        self._host.start()
        self._active = True

    def stop(self) -> None:
        self._host.stop()
        super().stop()

    def mark_host(self, block: RAMBlock, first_page: int, npages: int) -> None:
        """Record a host write of [first_page, +npages) of ``block``."""
        self._host.mark_range(block, first_page, npages)

    def sync(self, block: RAMBlock, out: np.ndarray | None = None) -> np.ndarray:
        words = super().sync(block, out)
        scratch = self._host_scratch.get(block.idstr)
        if scratch is None:
            scratch = self._host_scratch[block.idstr] = np.empty_like(words)
        words |= self._host.sync(block, scratch)
        return words

    def clear(self, block: RAMBlock, first_page: int, npages: int) -> None:
        super().clear(block, first_page, npages)
        self._host.clear(block, first_page, npages)


class KvmAccel:
    """A KVM VM with one vCPU running the guest program, shaped like ``SoftAccel``.

    ``incoming``: the machine waits for a migration, so the program is not loaded and the
    vCPU keeps its reset state until :meth:`load_cpu_state` sets what the source saved.

    ``boot``: the vCPU runs the user's code instead of the guest program: the image is
    placed in memory and the vCPU set up as the loader said (again on every
    :meth:`reset_cpu`); HLT halts the vCPU rather than ending its thread, and the machine's
    ``UserGuest`` serves every exit (``exit_handler``).
    """

    name = "kvm"

    def __init__(
        self,
        memory: GuestMemoryMap,
        *,
        incoming: bool = False,
        device: str = "/dev/kvm",
        boot: BootImage | None = None,
    ):
        check_layout(memory)
        self.memory = memory
        self.ram, _ = memory.lookup(0)
        self.discarded_writes = 0
        """Pages written while discarded: host writes into unplugged blocks, and target-table
        pages the guest agent found in unplugged blocks (see ``KvmGuestAgent``)."""
        self.layout = gp.DEFAULT_LAYOUT
        self.runner: VcpuRunner | None = None
        self.throttle = VcpuThrottle()  # auto-converge / dirty-limit: the runner paces it
        self.interrupt = threading.Event()
        self.closed = False
        self.boot = boot
        self.exit_handler: Callable[[VcpuExit], None] | None = None
        """Serves exits met while completing pending I/O (``UserGuest.handle``)."""
        self.start_halted = False
        self._lock = threading.Lock()
        self.vm = KvmVm(device)
        try:
            for mr in memory.regions:
                self.vm.add_slot(mr.block, mr.addr, log_dirty=True)
            self.dirty_log = KvmAccelDirtyLog(self.vm)
            self.vcpu = self.vm.create_vcpu()
            set_guest_cpuid(self.vm, self.vcpu)
            self.cpu_access = VcpuStateAccess(self.vm, self.vcpu)
            self.power_on = self.cpu_access.save(self.vcpu, halted=False)
            if boot is not None:
                ensure_kick_signal()  # the user's code need not exit by itself
                if not incoming:
                    self.load_boot()
            elif not incoming:
                self.layout = gp.load(self.ram.block)
                gp.prepare_vcpu(self.vcpu, self.layout)
        except BaseException:
            self.vm.close()
            raise

    @property
    def memory_end(self) -> int:
        """End of the highest guest-physical range backed by RAM."""
        return max(mr.addr + mr.block.max_length for mr in self.memory.regions)

    # -- host access to guest memory ------------------------------------------------------
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory from the host, and log it dirty (KVM would not)."""
        mr, off = self.memory.lookup(gpa)
        block = mr.block
        end = off + len(data)
        if end > mr.size:
            raise ValueError(f"write at {gpa:#x}+{len(data)} crosses the end of {mr.name}")
        if not len(data):
            return
        ps = block.page_size
        first, last = off // ps, (end - 1) // ps
        self.discarded_writes += discarded_pages(mr, first * ps, (last - first + 1) * ps)
        hostmem.store(block.host + off, data)  # GIL released: the page may be missing
        # After the write: a sync between the two would otherwise consume the bit and send
        # the old content.
        self.dirty_log.mark_host(block, first, last - first + 1)

    def read(self, gpa: int, length: int) -> bytes:
        mr, off = self.memory.lookup(gpa)
        if off + length > mr.size:
            raise ValueError(f"read at {gpa:#x}+{length} crosses the end of {mr.name}")
        return hostmem.load(mr.block.host + off, length)

    def count_discarded(self, ranges: list[tuple[int, int]]) -> int:
        """Pages of ``ranges`` [(gpa, npages)] that lie in discarded (unplugged) memory.

        A range may span regions (the agent merges base RAM with the virtio-mem blocks
        right after it), so each is cut at region boundaries.
        """
        n = 0
        for gpa, npages in ranges:
            end = gpa + npages * PAGE
            for mr in self.memory.regions:
                lo, hi = max(gpa, mr.addr), min(end, mr.addr + mr.size)
                if hi > lo and mr.rdm is not None:
                    n += discarded_pages(mr, lo - mr.addr, hi - lo)
        return n

    # -- the user's guest -------------------------------------------------------------------
    def load_boot(self) -> None:
        """Place the boot image in memory (logged dirty) and set the vCPU's start state."""
        boot = self.boot
        assert boot is not None
        for gpa, data in boot.writes:
            self.write(gpa, data)
        zero = bytes(ZERO_CHUNK)
        for gpa, n in boot.zeros:
            for off in range(0, n, ZERO_CHUNK):
                self.write(gpa + off, memoryview(zero)[: min(ZERO_CHUNK, n - off)])
        apply_start(self.vcpu, boot.cpu)

    def reset_cpu(self) -> None:
        """A system reset of the user's guest (vCPU stopped): power-on state, image, start.

        Guest memory is not cleared (a PC's is not either); what the loader placed is
        placed again, as QEMU's ROM images are on reset.
        """
        self._check_stopped("resetting the vCPU")
        self.complete_pending_io()
        self.cpu_access.load(self.vcpu, self.power_on)
        self.load_boot()
        self.start_halted = False
        if self.runner is not None:
            self.runner.halted = False

    def hold_vcpu(self) -> None:
        """Keep the vCPU from executing another instruction until :meth:`release_vcpu`."""
        if self.runner is not None:
            self.runner.hold()

    def release_vcpu(self) -> None:
        if self.runner is not None:
            self.runner.release()

    @property
    def halted(self) -> bool:
        r = self.runner
        return r.halted if r is not None else self.start_halted

    def translate_range(self, linear: int, size: int) -> list[tuple[int, int]]:
        """Guest-physical (address, length) pieces of [linear, +size) as the vCPU sees it.

        Through the guest's page tables when paging is on (``KVM_TRANSLATE``, one call a
        page); ValueError naming the address of a page that is not mapped. The vCPU must
        be stopped (a vCPU ioctl waits for ``KVM_RUN`` to return).
        """
        if not self.vcpu.get_sregs().cr0 & (1 << 31):
            return [(linear, size)]  # paging off: linear is physical
        runs: list[tuple[int, int]] = []
        at, end = linear, linear + size
        while at < end:
            n = min(PAGE - at % PAGE, end - at)
            phys, valid = kc.translate(self.vcpu.fd, at)
            if not valid:
                raise ValueError(f"linear address {at:#x} is not mapped")
            if runs and runs[-1][0] + runs[-1][1] == phys:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((phys, n))
            at += n
        return runs

    # -- the vCPU ---------------------------------------------------------------------------
    def start_vcpus(self, count: int, on_exit: Callable[[int, VcpuExit], None]) -> None:
        """Start the vCPU thread, parked: :meth:`resume` lets it run.

        ``on_exit(index, exit)`` runs on the vCPU thread after every exit (the guest agent:
        it may change the target table at pass exits; the user's guest: its devices). One
        vCPU only: the guest program's check (``check_pages``) models a single writer.
        """
        if count != 1:
            raise ValueError(f"a KVM guest runs the guest program on 1 vCPU, not {count}")
        if self.runner is not None:
            raise RuntimeError("vCPUs already started")
        user = self.boot is not None
        self.runner = VcpuRunner(
            self.vcpu,
            on_exit=lambda ex: on_exit(0, ex),
            name="kvm-vcpu0",
            halt_on_hlt=user,
            halted=self.start_halted,
            all_exits=user,
            pace=lambda: self.throttle.pace(0),
        )
        self.runner.start(paused=True)

    def vcpu_native_ids(self) -> list[int]:
        """Kernel thread ids of the vCPU threads (postcopy blocktime is per vCPU)."""
        r = self.runner
        return [r.native_id] if r is not None and r.native_id is not None else []

    def _live_runner(self) -> VcpuRunner | None:
        r = self.runner
        if r is None:
            return None
        if not r.running:
            if r.error is not None:
                log.error("vCPU 0 is not running: %r", r.error)
            return None
        return r

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Park the vCPU thread; afterwards no guest write is in flight.

        The kick brings a vCPU inside ``KVM_RUN`` back at its next yield exit (the guest
        program), or at once with the kick signal (the user's code, which need not exit);
        ``interrupt`` cuts short an agent sleeping between passes, so parking does not wait
        out a throttle.
        """
        with self._lock:
            r = self._live_runner()
            if r is None:
                return
            self.interrupt.set()
            self.throttle.wake()
            try:
                r.pause(timeout)
            finally:
                if not self.closed:
                    self.interrupt.clear()

    def resume(self) -> None:
        with self._lock:
            r = self._live_runner()
            if r is not None:
                r.resume()

    @property
    def paused(self) -> bool:
        r = self.runner
        return r is None or r.paused or not r.running

    def wait(self, timeout: float) -> bool:
        """Sleep on the vCPU thread; True as soon as a pause or shutdown wants the vCPU."""
        return self.interrupt.wait(timeout)

    def shutdown(self) -> None:
        """Stop the vCPU thread and close the VM (before the RAM blocks go: KVM maps them)."""
        if self.closed:
            return
        self.closed = True
        self.interrupt.set()
        self.throttle.wake()
        if self.runner is not None:
            try:
                self.runner.stop()
            except TimeoutError:
                log.error("vCPU thread did not stop; closing the VM anyway")
        self.vm.close()

    # -- vCPU state for migration -------------------------------------------------------------
    def _check_stopped(self, what: str) -> None:
        if not self.paused:
            raise RuntimeError(f"{what}: the vCPU must be stopped")

    def register_state(self, registry: StateRegistry) -> None:
        """The vCPU's whole state travels in section ``livemig-kvm-cpu`` (``cpu_state``)."""
        registry.register(cpu_state_section(self))

    def complete_pending_io(self) -> None:
        """Finish an I/O instruction the vCPU exited for, serving any further exits it needs.

        Done before the state is read, so the saved RIP is after the instruction and the
        destination does not execute it (and repeat its output) a second time.
        """
        for _ in range(PENDING_IO_LIMIT):
            ex = self.vcpu.complete_pending_io()
            if ex is None:
                return
            if self.exit_handler is None or ex.reason not in (k.KVM_EXIT_IO, k.KVM_EXIT_MMIO):
                raise KvmError(f"completing pending I/O: unexpected exit {ex!r}")
            self.exit_handler(ex)
        raise KvmError("pending string I/O did not complete")

    def save_cpu_state(self) -> dict[str, Any]:
        """Everything KVM holds for the vCPU (which must be stopped); see ``cpu_state``."""
        self._check_stopped("saving vCPU state")
        self.complete_pending_io()
        return self.cpu_access.save(self.vcpu, self.halted)

    def load_cpu_state(self, state: Mapping[str, Any]) -> None:
        """Set what :meth:`save_cpu_state` produced (decoded: nested dicts) on our vCPU."""
        self._check_stopped("loading vCPU state")
        halted = self.cpu_access.load(self.vcpu, state)
        self.start_halted = halted
        if self.runner is not None:
            self.runner.halted = halted
