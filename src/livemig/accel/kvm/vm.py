"""A KVM virtual machine driven from Python: VM, memory slots, vCPUs and the dirty log.

Design points, each forced by something measured on this platform (platform notes, 2c):

* **Manual dirty-log protection.** ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` is enabled when the
  VM is created, because the kernel only honours it for memslots created afterwards. With it,
  ``KVM_GET_DIRTY_LOG`` only reads the log and ``KVM_CLEAR_DIRTY_LOG`` re-protects a range,
  which is exactly the :class:`~livemig.memory.dirty_log.DirtyLog` contract (sync does not
  clear; clear re-arms), so :class:`KvmDirtyLog` is a thin adapter.
* **Dirty logging from slot creation.** A slot added with ``log_dirty=True`` is tracked from
  the start (the kernel write-protects it). :meth:`KvmDirtyLog.start` clears the whole log,
  so afterwards the log holds exactly the guest writes made since ``start``. Host writes
  through the mapping (e.g. the table the test harness writes) are never logged.
* **Getting a vCPU back.** ``KVM_RUN`` is called through ctypes so it runs without the GIL.
  Two ways bring a running vCPU back to the host, and :meth:`KvmVcpu.kick` uses both:

  1. *Cooperative exits* (the default and what the tests rely on): the guest program does an
     ``out`` every N pages (see ``guest_program``), so ``KVM_RUN`` returns every few
     milliseconds and the vCPU thread checks for a pause request. This needs no
     process-wide state and works whatever thread calls ``KVM_RUN``.
  2. *immediate_exit + signal*: ``kick`` sets ``kvm_run.immediate_exit`` (so a ``KVM_RUN``
     that has not yet entered the guest returns ``EINTR`` at once) and, if
     :func:`install_kick_signal` was called, sends that signal to the thread inside
     ``KVM_RUN``, which makes the kernel leave the guest with ``EINTR``. This also stops a
     guest that never exits, at the price of a process-wide (no-op) signal handler, which is
     why it is opt-in.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
from dataclasses import dataclass

import numpy as np

from livemig.accel.kvm import ioctls as k
from livemig.memory.bitmap import words_for
from livemig.memory.dirty_log import DirtyLog
from livemig.memory.ram_block import RAMBlock

KVM_PAGE_SIZE = 4096
"""KVM's dirty log and memslots work in 4 KiB guest pages on x86."""


class KvmError(RuntimeError):
    """KVM cannot be used as asked (missing capability, wrong API version, bad slot)."""


# -- signal kicking (opt-in) ----------------------------------------------------------------
_kick_signal: int | None = None


def _ignore_signal(signum: int, frame: object) -> None:
    """Handler for the kick signal: its only job is to interrupt ``KVM_RUN`` with EINTR."""


def install_kick_signal(signum: int = signal.SIGUSR1) -> None:
    """Install a no-op handler for ``signum`` and use it to interrupt ``KVM_RUN``.

    Must be called from the main thread (Python only installs handlers there). The handler
    is a no-op, but the signal must be *handled* (not ignored) for the kernel to cut the
    guest short: an ignored signal is dropped before it interrupts anything.
    """
    global _kick_signal
    current = signal.getsignal(signum)
    if current not in (signal.SIG_DFL, _ignore_signal):
        raise KvmError(f"signal {signum} already has a handler ({current!r}); pick another")
    signal.signal(signum, _ignore_signal)
    _kick_signal = signum


def ensure_kick_signal() -> None:
    """Install the kick signal unless it is: a guest that never exits needs it to pause.

    KvmError if it cannot be (not on the main thread, or the signal is taken).
    """
    if _kick_signal is not None:
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmError("a KVM machine running the user's code must be created on the main thread")
    install_kick_signal()


def uninstall_kick_signal() -> None:
    """Restore the default disposition of the kick signal (main thread only)."""
    global _kick_signal
    if _kick_signal is not None:
        signal.signal(_kick_signal, signal.SIG_DFL)
        _kick_signal = None


# -- VM -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Slot:
    """One KVM memslot backed by a whole RAM block (``max_length`` bytes at ``gpa``)."""

    id: int
    block: RAMBlock
    gpa: int
    size: int
    log_dirty: bool

    @property
    def npages(self) -> int:
        return self.size // KVM_PAGE_SIZE


class KvmVm:
    """A KVM VM: ``/dev/kvm`` fd, VM fd, memslots and vCPUs.

    RAM blocks handed to :meth:`add_slot` must outlive the VM: KVM keeps only their host
    address, and a guest access after the block is unmapped fails with ``EFAULT``.
    """

    def __init__(self, device: str = "/dev/kvm"):
        self.kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        self.fd = -1
        self.slots: dict[int, Slot] = {}
        self.vcpus: list[KvmVcpu] = []
        try:
            api = k.get_api_version(self.kvm_fd)
            if api != k.KVM_API_VERSION:
                raise KvmError(f"KVM API version {api}, expected {k.KVM_API_VERSION}")
            self.vcpu_mmap_size = k.get_vcpu_mmap_size(self.kvm_fd)
            self.fd = k.create_vm(self.kvm_fd, 0)
            supported = k.check_extension(self.fd, k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            if not supported & k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                raise KvmError("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            # Before any memslot exists: the kernel applies the mode per slot at creation.
            k.enable_cap(
                self.fd,
                k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
            )
            self.immediate_exit = bool(self.check_extension(k.KVM_CAP_IMMEDIATE_EXIT))
        except BaseException:
            self.close()
            raise

    # -- capabilities / memory ------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        return k.check_extension(self.fd, cap)

    def add_slot(self, block: RAMBlock, gpa: int, log_dirty: bool = True) -> int:
        """Map the whole of ``block`` (``max_length`` bytes) at guest-physical ``gpa``.

        Returns the slot id, which is also the key of :attr:`slots`.
        """
        if block.page_size != KVM_PAGE_SIZE:
            raise KvmError(
                f"{block.idstr}: KVM slots need {KVM_PAGE_SIZE}-byte pages, "
                f"block has {block.page_size}"
            )
        if gpa % KVM_PAGE_SIZE or gpa < 0:
            raise KvmError(f"{block.idstr}: guest address {gpa:#x} is not page aligned")
        end = gpa + block.max_length
        for s in self.slots.values():
            if s.block is block:
                raise KvmError(f"{block.idstr}: already mapped as slot {s.id}")
            if gpa < s.gpa + s.size and s.gpa < end:
                raise KvmError(
                    f"{block.idstr}: [{gpa:#x}, {end:#x}) overlaps slot {s.id} ({s.block.idstr})"
                )
        slot_id = len(self.slots)
        flags = k.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        k.set_user_memory_region(self.fd, slot_id, flags, gpa, block.max_length, block.host)
        self.slots[slot_id] = Slot(slot_id, block, gpa, block.max_length, log_dirty)
        return slot_id

    def slot_of(self, block: RAMBlock) -> Slot:
        for s in self.slots.values():
            if s.block is block:
                return s
        raise KvmError(f"{block.idstr}: not mapped into this VM")

    # -- raw dirty log --------------------------------------------------------------------
    def get_dirty_log(self, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """The slot's dirty bitmap as uint64 words (KVM layout); fills ``out`` if given."""
        s = self.slots[slot]
        n = words_for(s.npages)
        if out is None:
            out = np.empty(n, np.uint64)
        elif out.dtype != np.uint64 or out.shape != (n,) or not out.flags.c_contiguous:
            raise ValueError(f"dirty-log buffer must be a contiguous uint64[{n}]")
        k.get_dirty_log(self.fd, slot, out.ctypes.data)
        return out

    def clear_dirty_log(
        self, slot: int, first_page: int, npages: int, mask: np.ndarray | None = None
    ) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` on [first_page, +npages); all of it unless ``mask`` given.

        No alignment check here on purpose: this is the raw call, so that tests can see
        what the kernel itself accepts. :class:`KvmDirtyLog` checks before calling.
        """
        if mask is None:
            mask = _all_ones(npages)
        elif mask.dtype != np.uint64 or len(mask) < words_for(npages):
            raise ValueError(f"clear mask must be uint64 with >= {words_for(npages)} words")
        k.clear_dirty_log(self.fd, slot, first_page, npages, mask.ctypes.data)

    # -- vCPUs ----------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> KvmVcpu:
        vcpu = KvmVcpu(self, len(self.vcpus) if vcpu_id is None else vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ones_cache: np.ndarray = np.zeros(0, np.uint64)


def _all_ones(npages: int) -> np.ndarray:
    """A read-only all-ones bitmap of at least ``npages`` bits (shared, grown on demand)."""
    global _ones_cache
    n = words_for(npages)
    if len(_ones_cache) < n:
        cache = np.full(max(n, 2 * len(_ones_cache)), np.uint64(0xFFFF_FFFF_FFFF_FFFF))
        cache.flags.writeable = False
        _ones_cache = cache
    return _ones_cache


# -- vCPU -----------------------------------------------------------------------------------
@dataclass(slots=True)
class VcpuExit:
    """Why ``KVM_RUN`` returned, decoded from the run page while it is still valid.

    ``reason`` is a ``KVM_EXIT_*`` value; ``INTR`` stands for a run cut short by
    ``immediate_exit`` or a signal (``KVM_RUN`` returned ``EINTR``). For I/O exits ``data``
    holds ``size * count`` bytes and ``value`` their little-endian integer value (count 1).
    """

    reason: int
    port: int = -1
    direction: int = -1
    size: int = 0
    count: int = 0
    data: bytes = b""
    mmio_addr: int = -1
    mmio_is_write: bool = False

    @property
    def name(self) -> str:
        return k.EXIT_NAMES.get(self.reason, str(self.reason))

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")

    def __repr__(self) -> str:
        if self.reason == k.KVM_EXIT_IO:
            d = "out" if self.direction == k.KVM_EXIT_IO_OUT else "in"
            return f"VcpuExit(IO {d} port={self.port:#x} size={self.size} value={self.value:#x})"
        if self.reason == k.KVM_EXIT_MMIO:
            return f"VcpuExit(MMIO addr={self.mmio_addr:#x} write={self.mmio_is_write})"
        return f"VcpuExit({self.name})"


class KvmVcpu:
    """One vCPU: its fd, the mmapped ``kvm_run`` page, registers, and ``run``/``kick``.

    ``run`` may be called from any one thread at a time; ``kick`` from any thread.
    """

    def __init__(self, vm: KvmVm, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = k.create_vcpu(vm.fd, vcpu_id)
        self._mm = mmap.mmap(self.fd, vm.vcpu_mmap_size, flags=mmap.MAP_SHARED)
        self._run = k.kvm_run.from_buffer(self._mm)
        self._thread: int | None = None  # pthread id of the thread inside run(), if any

    # -- registers ------------------------------------------------------------------------
    def get_regs(self) -> k.kvm_regs:
        return k.get_regs(self.fd)

    def set_regs(self, regs: k.kvm_regs) -> None:
        k.set_regs(self.fd, regs)

    def get_sregs(self) -> k.kvm_sregs:
        return k.get_sregs(self.fd)

    def set_sregs(self, sregs: k.kvm_sregs) -> None:
        k.set_sregs(self.fd, sregs)

    def setup_flat32(self, entry: int, stack: int = 0) -> None:
        """Enter 32-bit protected mode with flat 4 GiB segments and no paging.

        Segment registers are loaded straight through ``KVM_SET_SREGS`` (hidden parts
        included), so no GDT is needed as long as the guest never reloads a selector.
        """
        s = self.get_sregs()
        code = k.kvm_segment(
            base=0, limit=0xFFFF_FFFF, selector=0x08, type=0xB, present=1, dpl=0, db=1, s=1, g=1
        )
        data = k.kvm_segment(
            base=0, limit=0xFFFF_FFFF, selector=0x10, type=0x3, present=1, dpl=0, db=1, s=1, g=1
        )
        s.cs = code
        s.ds = s.es = s.fs = s.gs = s.ss = data
        s.cr0 = (s.cr0 | 1) & ~(1 << 31)  # PE on, PG off
        s.efer = 0
        self.set_sregs(s)
        r = k.kvm_regs()
        r.rip = entry
        r.rsp = stack
        r.rflags = 0x2  # bit 1 is reserved-must-be-one; IF off: no interrupts are wired up
        self.set_regs(r)

    # -- running --------------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """Run until the next exit (``KVM_RUN``, GIL released) and describe it."""
        self._thread = threading.get_ident()
        r = k.ioctl_run(self.fd)
        self._thread = None
        self._run.immediate_exit = 0
        if r < 0:
            if r in (-errno.EINTR, -errno.EAGAIN):
                return VcpuExit(k.KVM_EXIT_INTR)
            raise k.KvmIoctlError(-r, "KVM_RUN", f"vcpu={self.id}")
        return self._decode_exit()

    def _decode_exit(self) -> VcpuExit:
        run = self._run
        reason = run.exit_reason
        if reason == k.KVM_EXIT_IO:
            io = run.exit.io
            n = io.size * io.count
            off = io.data_offset
            return VcpuExit(
                reason,
                port=io.port,
                direction=io.direction,
                size=io.size,
                count=io.count,
                data=self._mm[off : off + n],
            )
        if reason == k.KVM_EXIT_MMIO:
            m = run.exit.mmio
            return VcpuExit(
                reason,
                size=m.len,
                data=bytes(m.data[: m.len]),
                mmio_addr=m.phys_addr,
                mmio_is_write=bool(m.is_write),
            )
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            i = run.exit.internal
            n = min(i.ndata, 16)
            return VcpuExit(reason, data=struct.pack(f"<{n}Q", *i.data[:n]), port=i.suberror)
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            f = run.exit.fail_entry
            return VcpuExit(reason, port=f.hardware_entry_failure_reason)
        return VcpuExit(reason)

    def kick(self) -> None:
        """Make the vCPU leave (or not enter) ``KVM_RUN`` soon; safe from any thread.

        ``immediate_exit`` covers the window before the runner enters ``KVM_RUN``; the kick
        signal (if installed) interrupts a guest already running. Without the signal, a vCPU
        already in the guest returns at its next exit (the guest program's periodic ``out``).
        """
        self._run.immediate_exit = 1
        tid = self._thread
        if _kick_signal is not None and tid is not None:
            try:
                signal.pthread_kill(tid, _kick_signal)
            except ProcessLookupError:
                pass  # the thread is gone; nothing to interrupt

    def complete_pending_io(self) -> VcpuExit | None:
        """Let KVM finish an I/O instruction it exited for, without running the guest.

        After an I/O exit KVM completes the instruction (and advances RIP) only on the next
        ``KVM_RUN``. Reading registers for a snapshot before that would capture a RIP that
        re-executes the ``out``; a ``KVM_RUN`` with ``immediate_exit`` set completes it and
        returns ``EINTR`` without entering the guest. A string instruction (``rep outsb``)
        may need more than one exit to complete: the next one is returned, for the caller
        to serve (an ``in`` wants its data) before calling again.
        """
        self._run.immediate_exit = 1
        r = k.ioctl_run(self.fd)
        self._run.immediate_exit = 0
        if r < 0 and r != -errno.EINTR:
            raise k.KvmIoctlError(-r, "KVM_RUN", f"vcpu={self.id}, immediate_exit")
        return self._decode_exit() if r == 0 else None

    def set_io_data(self, data: bytes) -> None:
        """The bytes an ``in`` exit reads (``size * count``), before the next ``KVM_RUN``."""
        io = self._run.exit.io
        off = io.data_offset
        self._mm[off : off + len(data)] = data

    def set_mmio_data(self, data: bytes) -> None:
        """The bytes an MMIO read exit reads (at most 8), before the next ``KVM_RUN``."""
        m = self._run.exit.mmio
        ctypes.memmove(ctypes.addressof(m.data), data, min(len(data), 8))

    def cancel_kick(self) -> None:
        """Drop a pending ``immediate_exit`` (e.g. one that arrived after the vCPU stopped)."""
        self._run.immediate_exit = 0

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd < 0:
            return
        del self._run
        try:
            self._mm.close()
        except BufferError:  # a traceback still holds a view of the run page: GC closes it
            pass
        os.close(self.fd)
        self.fd = -1


# -- the dirty log ----------------------------------------------------------------------------
class KvmDirtyLog(DirtyLog):
    """:class:`DirtyLog` on KVM's per-slot dirty bitmap (manual-protect mode).

    One RAM block is one slot. ``sync`` is ``KVM_GET_DIRTY_LOG`` into a fresh array (the
    caller owns the copy), and the result is remembered; ``clear`` is ``KVM_CLEAR_DIRTY_LOG``
    with the remembered bits of the range as its mask — only pages the last sync reported
    are re-armed. An all-ones mask would lose a write that landed between the sync and the
    clear on a page the sync had not reported: its bit would be cleared although nobody
    has it. The 64-page alignment check comes first, so a misaligned range fails with
    ``ValueError`` before reaching the kernel (which would say ``EINVAL``).
    """

    def __init__(self, vm: KvmVm, blocks: list[RAMBlock] | None = None):
        self.vm = vm
        slots = (
            [vm.slot_of(b) for b in blocks]
            if blocks is not None
            else [s for s in vm.slots.values() if s.log_dirty]
        )
        for s in slots:
            if not s.log_dirty:
                raise KvmError(f"{s.block.idstr}: slot {s.id} was added without dirty logging")
        self._slots = {s.block.idstr: s for s in slots}
        self._reported = {s.block.idstr: np.zeros(words_for(s.npages), np.uint64) for s in slots}
        self._lock = threading.Lock()
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def _slot(self, block: RAMBlock) -> Slot:
        try:
            s = self._slots[block.idstr]
        except KeyError:
            raise KvmError(f"{block.idstr}: no dirty-logged KVM slot") from None
        if s.block is not block:
            raise KvmError(f"{block.idstr}: a different block of that name is mapped")
        return s

    def start(self) -> None:
        """Forget every write logged so far; from now on the log holds writes since start."""
        with self._lock:
            for s in self._slots.values():
                self.vm.clear_dirty_log(s.id, 0, s.npages)
                self._reported[s.block.idstr][:] = 0
        self._active = True

    def stop(self) -> None:
        """Mark inactive. KVM keeps logging (the slot flag stays); nothing reads it."""
        self._active = False

    def sync(self, block: RAMBlock, out: np.ndarray | None = None) -> np.ndarray:
        words = self.vm.get_dirty_log(self._slot(block).id, out)
        with self._lock:
            self._reported[block.idstr] |= words
        return words

    def clear(self, block: RAMBlock, first_page: int, npages: int) -> None:
        s = self._slot(block)
        self.check_clear_range(block, first_page, npages)
        if not npages:
            return
        w0, w1 = first_page // 64, words_for(first_page + npages)
        with self._lock:
            reported = self._reported[block.idstr]
            mask = reported[w0:w1].copy()
            reported[w0:w1] = 0
        if mask.any():
            self.vm.clear_dirty_log(s.id, first_page, npages, mask)
