"""The PC devices of a machine that runs the user's code, and how the guest reaches them.

A machine started with ``--boot-sector`` or ``--kernel`` gets a :class:`Board`: the I/O
port bus with COM1 (a 16550A at 0x3f8, unless ``--serial none``), port 0x92, port 0x80 and
every ``--device isa-debug-exit``. Each device with state registers its own section with
the machine's registry (``serial``, ``port92``), after the vCPU's, as QEMU orders them.

:func:`load_image` turns ``--boot-sector``/``--kernel`` into a
:class:`~livemig.guest.boot_image.BootImage` for the memory the machine has, so that a bad
file is reported before anything else is set up.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from livemig.devices.chardev import Backend, ChardevSpec, open_backend
from livemig.devices.ioport import IoBus, SystemControl
from livemig.devices.isa import PORT80, PORT92, DebugExit, DeviceSpec, Port80, Port92, add_device
from livemig.devices.serial import COM1_BASE, Serial16550
from livemig.devices.state import StateRegistry
from livemig.guest.boot_image import BootError, BootImage, MemoryLayout, load_boot_sector
from livemig.guest.multiboot import load_multiboot


def load_image(
    boot_sector: str | None, kernel: str | None, append: str | None, layout: MemoryLayout
) -> BootImage | None:
    """The boot image the options ask for (None: livemig's own guest program)."""
    if boot_sector and kernel:
        raise BootError("--boot-sector and --kernel exclude each other: boot one or the other")
    if append is not None and not kernel:
        raise BootError("--append needs --kernel (it is the kernel's command line)")
    if boot_sector:
        return load_boot_sector(boot_sector, layout)
    if kernel:
        return load_multiboot(kernel, append or "", layout)
    return None


class Board:
    """I/O bus and devices (module docstring); ``close`` releases the serial backend."""

    def __init__(self, serial: ChardevSpec | None, devices: Sequence[DeviceSpec], system: SystemControl):
        self.bus = IoBus()
        self.backend: Backend | None = None
        self.serial: Serial16550 | None = None
        try:
            if serial is not None:
                self.backend = open_backend(serial)
                self.serial = Serial16550(self.backend)
                self.bus.register("serial (COM1)", COM1_BASE, 8, self.serial)
            self.port92 = Port92(system)
            self.bus.register("port92", PORT92, 1, self.port92)
            self.bus.register("port80", PORT80, 1, Port80())
            self.debug_exits: list[DebugExit] = [add_device(self.bus, spec, system) for spec in devices]
        except BaseException:
            self.close()
            raise

    def register_state(self, registry: StateRegistry) -> None:
        if self.serial is not None:
            self.serial.register_state(registry)
        self.port92.register_state(registry)

    def reset(self) -> None:
        if self.serial is not None:
            self.serial.reset()
        self.port92.reset()

    def wait_serial_client(self, stop: threading.Event) -> bool:
        """``unix:...,server`` with ``wait=on``: True once a client is there (or not needed)."""
        return self.backend is None or self.backend.wait_connected(stop)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
