"""Small ISA devices of a PC that guests the user brings expect: port 0x92, port 0x80 and
QEMU's ``isa-debug-exit``; and the ``--device`` option that adds the last one.

* **Port 0x92** (System Control Port A, "fast A20"): bit 1 is the A20 gate, bit 0 a reset
  request (0 -> 1 resets the machine, as QEMU's ``port92``). Under KVM the A20 line cannot
  be masked (QEMU with KVM cannot either): addresses never wrap at 1 MiB, and bit 1 only
  reads back what was written. State: section ``port92`` (``outport``), as QEMU's.
* **Port 0x80** (POST codes): writes are ignored and reads return 0xff, without the log
  line other unassigned ports get, since BIOS-style code writes it as a delay.
* **isa-debug-exit** (``--device isa-debug-exit,iobase=0xf4,iosize=0x04``; QEMU's defaults
  0x501 and 2): a write of V ends the VM, which exits with status ``(V << 1) | 1``, so a
  test guest can report success or failure through the process's exit status. It has no
  state to migrate (QEMU registers none either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livemig.devices.ioport import IoBus, SystemControl
from livemig.devices.state import StateRegistry, StateSection
from livemig.devices.vmstate import Field, VMStateDescription

PORT92 = 0x92
PORT80 = 0x80
PORT92_DESC = VMStateDescription("port92", 1, [Field.uint8("outport")])
DEVICES = ("isa-debug-exit",)


class DeviceConfigError(ValueError):
    """A ``--device`` value that cannot be honoured; one line naming the problem."""


class Port92:
    def __init__(self, system: SystemControl):
        self.system = system
        self.outport = 0

    def reset(self) -> None:
        self.outport &= ~1

    def io_read(self, offset: int, size: int) -> int:
        return self.outport

    def io_write(self, offset: int, size: int, value: int) -> None:
        old, self.outport = self.outport, value & 0xFF
        if value & 1 and not old & 1:
            self.system.request_reset("guest-reset")

    def register_state(self, registry: StateRegistry) -> None:
        def apply(values: dict[str, int]) -> None:
            self.outport = values["outport"]

        registry.register(StateSection.simple("port92", PORT92_DESC, lambda: {"outport": self.outport}, apply))


class Port80:
    """POST code port: nothing happens, quietly."""

    def io_read(self, offset: int, size: int) -> int:
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        pass


class DebugExit:
    def __init__(self, system: SystemControl):
        self.system = system
        self.value: int | None = None

    def io_read(self, offset: int, size: int) -> int:
        return 0xFFFF_FFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        self.system.request_exit((value << 1) | 1)


@dataclass(frozen=True)
class DeviceSpec:
    """One ``--device`` option: the driver and its properties (validated)."""

    driver: str
    props: dict[str, int] = field(default_factory=dict)
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.driver


def _int(text: str, spec: str, key: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise DeviceConfigError(f"--device {spec}: {key}={text!r} is not a number") from None


def parse_device(text: str) -> DeviceSpec:
    """``isa-debug-exit[,iobase=N][,iosize=N]``; DeviceConfigError names what is wrong."""
    driver, *parts = text.split(",")
    if driver not in DEVICES:
        raise DeviceConfigError(
            f"--device {text}: unknown device {driver!r} (livemig has: {', '.join(DEVICES)})"
        )
    props = {"iobase": 0x501, "iosize": 2}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise DeviceConfigError(f"--device {text}: expected key=value, got {part!r}")
        if key not in props:
            raise DeviceConfigError(f"--device {text}: {driver} has no property {key!r} (iobase, iosize)")
        props[key] = _int(value, text, key)
    if not 0 <= props["iobase"] <= 0xFFFF:
        raise DeviceConfigError(f"--device {text}: iobase {props['iobase']:#x} is not a port (0-0xffff)")
    if props["iosize"] not in (1, 2, 4):
        raise DeviceConfigError(f"--device {text}: iosize must be 1, 2 or 4, not {props['iosize']}")
    if props["iobase"] + props["iosize"] > 0x10000:
        raise DeviceConfigError(f"--device {text}: the ports reach beyond 0xffff")
    return DeviceSpec(driver, props, text)


def add_device(bus: IoBus, spec: DeviceSpec, system: SystemControl) -> DebugExit:
    """Plug ``spec`` into ``bus``; DeviceConfigError if its ports are taken."""
    dev = DebugExit(system)
    try:
        bus.register(f"--device {spec}", spec.props["iobase"], spec.props["iosize"], dev, width=4)
    except ValueError as e:
        raise DeviceConfigError(str(e)) from None
    return dev
