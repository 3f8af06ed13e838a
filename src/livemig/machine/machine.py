"""A virtual machine: guest memory, devices, an accelerator and a guest, with a run state.

The machine knows nothing about migration or QMP; those layers drive it through
``stop``/``cont``, the device-state hooks and the run state. Layout of guest-physical
memory: base RAM ``pc.ram`` from 0 (below 4 GiB), the virtio-mem region from 4 GiB — or,
with ``--accel kvm``, right after base RAM and below 4 GiB (``machine.factory``), because the
KVM guest runs without paging.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.devices.chardev import ChardevSpec
from livemig.devices.isa import DeviceSpec
from livemig.devices.state import StateRegistry
from livemig.devices.virtio_mem import VirtioMem
from livemig.guest.boot_image import BootImage, MemoryLayout
from livemig.guest.usable_memory import UsableMemory
from livemig.guest.virtio_mem_driver import VirtioMemDriver
from livemig.guest.workload import WorkloadConfig, guest_state_section
from livemig.machine.board import Board, load_image
from livemig.machine.factory import UserCode, device_memory_addr
from livemig.machine.factory import create as create_accel
from livemig.machine.factory import resolve as resolve_accel
from livemig.memory.checksum import memory_checksum
from livemig.memory.dirty_log import DirtyLog
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import GuestMemoryMap, MemoryRegion

log = logging.getLogger(__name__)

MAX_BASE_RAM = 3 << 30
NULL_SERIAL = ChardevSpec("null", text="null")
"""The default COM1 backend of the user's guest: a port that exists, output discarded."""
RUNSTATES = (
    "prelaunch",
    "running",
    "paused",
    "inmigrate",
    "postmigrate",
    "finish-migrate",
    "restore-vm",
    "shutdown",
    "internal-error",
)
NEEDS_RESET = ("shutdown", "internal-error")
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class VirtioMemConfig:
    id: str = "vm0"
    size: int = 8 << 30
    requested_size: int = 0
    block_size: int | None = None
    backend: str = "memfd"
    memaddr: int | None = None
    node: int = 0


@dataclass
class MachineConfig:
    name: str = "livemig"
    memory: int = 1 << 30
    ram_backend: str = "memfd"
    virtio_mem: VirtioMemConfig | None = None
    accel: str = "soft"
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    incoming: bool = False
    # cpr-transfer destination: the memfd of each RAM block, by block name, handed over by
    # the old process (migration.cpr); the blocks map them instead of allocating memory
    ram_fds: dict[str, int] = field(default_factory=dict)
    boot_sector: str | None = None
    kernel: str | None = None
    append: str | None = None
    serial: ChardevSpec | None = NULL_SERIAL
    """COM1's backend (None: no serial port); only with ``boot_sector``/``kernel``."""
    devices: tuple[DeviceSpec, ...] = ()

    @property
    def user_guest(self) -> bool:
        return bool(self.boot_sector or self.kernel)


class Machine:
    def __init__(self, config: MachineConfig):
        if config.memory <= 0 or config.memory > MAX_BASE_RAM or config.memory % (2 << 20):
            raise ValueError(
                f"--memory must be a positive multiple of 2 MiB up to {MAX_BASE_RAM >> 30} GiB"
            )
        accel = resolve_accel(config.accel)  # "auto" becomes what runs (machine type)
        config = dataclasses.replace(config, accel=accel)
        self.config = config
        self.name = config.name
        fds = dict(config.ram_fds)
        self.memory = GuestMemoryMap()
        self.ram = self.memory.add(
            MemoryRegion(
                "pc.ram", RAMBlock("pc.ram", config.memory, config.ram_backend, fd=fds.pop("pc.ram", None)), 0
            )
        )
        self.vmem: VirtioMem | None = None
        self.vmem_mr: MemoryRegion | None = None
        vc = config.virtio_mem
        if vc is not None:
            addr = vc.memaddr
            if addr is None:
                addr = device_memory_addr(accel, config.memory, vc.size, vc.block_size)
            block = RAMBlock(f"{vc.id}-memdev", vc.size, vc.backend, fd=fds.pop(f"{vc.id}-memdev", None))
            self.vmem_mr = MemoryRegion(f"{vc.id}-memdev", block, addr)
            self.vmem = VirtioMem(
                vc.id,
                self.vmem_mr,
                requested_size=vc.requested_size,
                block_size=vc.block_size,
                node=vc.node,
                incoming=config.incoming,
            )
            self.memory.add(self.vmem_mr)
        if fds:
            raise ValueError(f"RAM blocks {', '.join(sorted(fds))} were handed over but this machine has none such")
        self.usable = UsableMemory()
        self.runstate = "inmigrate" if config.incoming else "prelaunch"
        self.runstate_listeners: list[Callable[[str, str], None]] = []
        self.event_listeners: list[EventFn] = []
        """QMP-level events the machine raises itself (RESET, SHUTDOWN): (name, data)."""
        self.exit_listeners: list[Callable[[int], None]] = []
        """Called with the status when the guest ends the VM (the VM process then exits)."""
        self.exit_status: int | None = None
        """Set when the guest ended the VM (isa-debug-exit): the process's exit status."""
        self._lock = threading.RLock()
        self._started = False
        self.board: Board | None = None
        self.boot: BootImage | None = None
        try:
            self.boot, self.board = self._user_guest(config)
            user = None if self.board is None else UserCode(self.boot, self.board.bus, self)
            self.accel, self.workload = create_accel(
                accel, self.memory, self.usable, config.workload, config.incoming, user
            )
        except BaseException:
            self._close_parts()
            raise
        # every component registers the state it migrates, in stream order (devices/state.py)
        self.state = StateRegistry()
        if self.vmem is not None:
            self.vmem.register_state(self.state)
        self.accel.register_state(self.state)
        if self.board is not None:
            self.board.register_state(self.state)
        else:
            self.state.register(guest_state_section(self.workload, config.workload.vcpus))
        self.driver: VirtioMemDriver | None = None

    def _user_guest(self, config: MachineConfig) -> tuple[Any, Board | None]:
        """The user's boot image and devices (``--boot-sector``/``--kernel``), or Nones."""
        if not config.user_guest:
            if config.serial is not NULL_SERIAL or config.devices:
                what = "--serial" if config.serial is not NULL_SERIAL else "--device"
                raise ValueError(
                    f"{what} needs --boot-sector or --kernel (livemig's own guest has no devices)"
                )
            if config.append is not None:
                raise ValueError("--append needs --kernel (it is the kernel's command line)")
            return None, None
        regions = () if self.vmem_mr is None else ((self.vmem_mr.addr, self.vmem_mr.size),)
        layout = MemoryLayout(config.memory, regions)
        boot = load_image(config.boot_sector, config.kernel, config.append, layout)
        return boot, Board(config.serial, config.devices, self)

    def _close_parts(self) -> None:
        if self.board is not None:
            self.board.close()
        for block in self.memory.blocks:
            block.close()

    # -- life cycle ------------------------------------------------------------------------------
    def _boot_guest(self, adopt_plugged: np.ndarray | None, incoming: bool = False) -> None:
        """Start the guest side: allocator view, virtio-mem driver and vCPUs.

        The user's guest gets no virtio-mem driver (it would need its own): a requested
        size is then recorded by the device and acted on by nobody. An ``incoming`` guest
        continues with the memory it brought: no prefill of base RAM (it would overwrite
        what the migration loaded, with or without virtio-mem).
        """
        if self.board is not None:
            self.accel.start_vcpus(self.config.workload.vcpus, self.workload.vcpu)
            self._started = True
            return
        ppb = self.ram.block.pages
        with self.usable.lock:
            self.usable.add(self.ram, 0, ppb)
        if not incoming:
            self.workload.queue_fill(self.ram, 0, ppb)
        if self.vmem is not None and self.vmem_mr is not None:
            vmem = self.vmem
            self.driver = VirtioMemDriver(
                vmem.config_space,
                vmem.handle_request,
                self.vmem_mr,
                self.usable,
                on_plugged=self.workload.queue_fill,
            )
            if adopt_plugged is not None:
                self.driver.adopt(adopt_plugged)
            driver = self.driver
            vmem.on_config_change.append(lambda _dev: driver.config_changed())
            driver.set_running(self.runstate == "running")
            self.driver.start()
        self.accel.start_vcpus(self.config.workload.vcpus, self.workload.vcpu)
        self._started = True

    def start(self) -> None:
        """Power on (prelaunch -> running)."""
        with self._lock:
            if self._started:
                return
            self._boot_guest(None)
            self._set_runstate("running")
            self.accel.resume()

    def start_incoming_guest(self) -> None:
        """After an incoming migration loaded: the guest continues where the source stopped."""
        with self._lock:
            plugged = None
            if self.vmem is not None:
                plugged = np.zeros(self.vmem.bitmap.nbits, bool)
                plugged[self.vmem.bitmap.indices()] = True
            self._boot_guest(plugged, incoming=True)

    def _set_runstate(self, state: str) -> None:
        old, self.runstate = self.runstate, state
        if self.driver is not None:  # guest code: it runs only while the guest does
            self.driver.set_running(state == "running")
        if old != state:
            for fn in list(self.runstate_listeners):
                try:
                    fn(old, state)
                except Exception:  # an observer must never break a state change
                    log.exception("runstate listener failed")

    def set_runstate(self, state: str) -> None:
        if state not in RUNSTATES:
            raise ValueError(state)
        with self._lock:
            self._set_runstate(state)

    @property
    def running(self) -> bool:
        return self.runstate == "running"

    def stop(self, new_state: str = "paused") -> None:
        """Stop the vCPUs at a safe point; no guest write is in flight afterwards."""
        with self._lock:
            if self._started:
                self.accel.pause()
            self._set_runstate(new_state)

    def cont(self) -> None:
        with self._lock:
            if self.runstate in NEEDS_RESET:
                raise RuntimeError("Resetting the Virtual Machine is required")
            if not self._started:
                if self.runstate == "inmigrate":
                    raise RuntimeError("guest is waiting for an incoming migration")
                self._boot_guest(None)
            self._set_runstate("running")
            self.accel.resume()

    def shutdown(self) -> None:
        with self._lock:
            if self.driver:
                self.driver.stop()
            self.accel.shutdown()
            self._set_runstate("shutdown")

    def close(self) -> None:
        self.shutdown()
        self._close_parts()

    # -- what the guest asks of the machine (devices.ioport.SystemControl) -------------------
    def _emit(self, event: str, data: dict[str, Any]) -> None:
        for fn in list(self.event_listeners):
            try:
                fn(event, data)
            except Exception:
                log.exception("event listener failed")

    def _from_guest(self, what: str, fn: Callable[[], None]) -> None:
        """Hold the vCPU now; act on another thread (the vCPU thread must not wait for us)."""
        self.accel.hold_vcpu()
        threading.Thread(target=fn, name=f"machine-{what}", daemon=True).start()

    def request_reset(self, reason: str) -> None:
        """Port 0x92 bit 0 or a triple fault: reset as ``system_reset`` does."""
        self._from_guest("reset", lambda: self.reset(reason, guest=True))

    def request_exit(self, status: int) -> None:
        """isa-debug-exit: the VM ends, and its process exits with ``status``."""
        self._from_guest("exit", lambda: self.guest_exit(status))

    def request_error(self, message: str) -> None:
        """An exit nothing can handle: stop in ``internal-error``, as QEMU does."""

        def stop() -> None:
            log.error("guest stopped: %s", message)
            with self._lock:
                self._set_runstate("internal-error")

        self._from_guest("error", stop)

    def reset(self, reason: str = "host-qmp-system-reset", guest: bool = False) -> None:
        """A system reset: devices, the vCPU and the loaded image; emits RESET.

        Memory is kept, as a PC keeps it; virtio-mem unplugs everything (its reset).
        """
        with self._lock:
            if self.runstate == "inmigrate":
                raise RuntimeError("cannot reset a VM waiting for an incoming migration")
            if self.exit_status is not None:
                return  # the guest ended the VM; its process is on its way out
            running = self.runstate == "running"
            if self._started:
                self.accel.pause()
            if self.vmem is not None:
                self.vmem.reset()
            if self.board is not None:
                self.board.reset()
                self.accel.reset_cpu()
            self.accel.release_vcpu()
            self._emit("RESET", {"guest": guest, "reason": reason})
            if self.runstate in NEEDS_RESET:
                self._set_runstate("paused")  # what needed a reset has had it: 'cont' may go on
            if running:
                self.accel.resume()

    def guest_exit(self, status: int) -> None:
        """The guest ended the VM: SHUTDOWN, runstate ``shutdown``, ``exit_status`` set."""
        with self._lock:
            self.exit_status = status
            self._emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            self._set_runstate("shutdown")
            for fn in list(self.exit_listeners):
                fn(status)

    def inspect_cpu(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the vCPU held still (registers), resuming it if it was running."""
        with self._lock:
            running = self._started and self.runstate == "running"
            if running:
                self.accel.pause()
            try:
                return fn()
            finally:
                if running:
                    self.accel.resume()

    # -- what migration sees (migration.core.vm.MigratableVM) -------------------------------------
    @property
    def dirty_log(self) -> DirtyLog:
        return self.accel.dirty_log

    @property
    def machine_type(self) -> str:
        return f"livemig-{self.config.accel}"

    def vcpu_native_ids(self) -> list[int]:
        return [int(t) for t in self.accel.vcpu_native_ids()]

    @property
    def vcpu_count(self) -> int:
        return self.config.workload.vcpus

    def throttle_vcpus(self, shares: Sequence[float] | float) -> None:
        """Each vCPU sleeps ``shares`` (or ``shares[i]``) of its time; 0 = full speed."""
        self.accel.throttle.set(shares)

    def vcpu_dirty_pages(self) -> list[int] | None:
        """Pages each vCPU has dirtied, if the accelerator can tell (``accel.throttle``)."""
        return self.accel.throttle.dirty_pages(self.vcpu_count)

    # -- inspection ------------------------------------------------------------------------------
    def checksum(self) -> str:
        return memory_checksum(self.memory.regions)

    @property
    def blocks(self) -> list[RAMBlock]:
        return self.memory.blocks
