"""The x86 I/O port space of a machine: which device answers which port.

A guest's ``in``/``out`` reaches the accelerator as an exit; the accelerator hands it to an
:class:`IoBus`, which finds the device that registered the port. A port nobody registered
behaves like an ISA bus with nothing on it: reads return all ones (``0xff`` per byte),
writes are dropped, and each such port is logged once (a guest probing for hardware does
this routinely, so once is enough to notice it without flooding the log).

Devices see offsets from their base and accesses no wider than they declare: a wider
access is split into byte accesses to consecutive ports, little-endian (how a 16550A or
port 0x92, byte-wide devices, see ``out dx, ax``).

:class:`SystemControl` is what a device may ask of the machine: a reset (port 0x92 bit 0)
or the end of the VM with an exit status (``isa-debug-exit``). The machine implements it;
devices know only this protocol.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class PortDevice(Protocol):
    """A device on the port bus; ``offset`` is from its base, ``size`` at most its width."""

    def io_read(self, offset: int, size: int) -> int: ...
    def io_write(self, offset: int, size: int, value: int) -> None: ...


class SystemControl(Protocol):
    """What a device may ask the machine for (implemented by ``machine``)."""

    def request_reset(self, reason: str) -> None: ...
    def request_exit(self, status: int) -> None: ...


@dataclass(frozen=True)
class PortRange:
    name: str
    base: int
    size: int
    device: PortDevice
    width: int

    @property
    def end(self) -> int:
        return self.base + self.size


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class IoBus:
    """Ports 0-0xffff: registered devices, and the all-ones answer for the rest."""

    def __init__(self) -> None:
        self._ports: dict[int, PortRange] = {}
        self.ranges: list[PortRange] = []
        self.unassigned: dict[int, int] = {}
        """Accesses to ports nobody registered, by port (the log says it once per port)."""
        self._lock = threading.Lock()

    def register(self, name: str, base: int, size: int, device: PortDevice, width: int = 1) -> None:
        """Give ports [base, base+size) to ``device``; ValueError if any is taken."""
        if size <= 0 or base < 0 or base + size > 0x10000:
            raise ValueError(f"{name}: ports {base:#x}+{size} are not inside 0-0xffff")
        for port in range(base, base + size):
            other = self._ports.get(port)
            if other is not None:
                raise ValueError(
                    f"{name}: port {port:#x} is taken by {other.name} "
                    f"(ports {other.base:#x}-{other.end - 1:#x})"
                )
        r = PortRange(name, base, size, device, width)
        self.ranges.append(r)
        for port in range(base, base + size):
            self._ports[port] = r

    def owner(self, port: int) -> str | None:
        r = self._ports.get(port)
        return None if r is None else r.name

    def _unassigned(self, port: int, what: str) -> None:
        with self._lock:
            n = self.unassigned.get(port, 0)
            self.unassigned[port] = n + 1
        if n == 0:
            log.warning(
                "guest %s port %#x, where there is no device: reads return all ones, writes "
                "are dropped (logged once per port)",
                what,
                port,
            )

    def read(self, port: int, size: int) -> int:
        r = self._ports.get(port)
        if r is None:
            self._unassigned(port, "reads")
            return ones(size)
        if size <= r.width:
            return r.device.io_read(port - r.base, size) & ones(size)
        value = 0
        for i in range(size):
            value |= self.read(port + i, 1) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        r = self._ports.get(port)
        if r is None:
            self._unassigned(port, "writes")
            return
        if size <= r.width:
            r.device.io_write(port - r.base, size, value & ones(size))
            return
        for i in range(size):
            self.write(port + i, 1, (value >> (8 * i)) & 0xFF)
