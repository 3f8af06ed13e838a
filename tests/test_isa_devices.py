"""The user's guest's devices and loaders, without a vCPU: 16550A, port 0x92, the port bus,
``--serial``/``--device`` parsing, boot-sector and Multiboot image checks.

The serial port's migration section is compared byte for byte with what QEMU 7.2 wrote for
the same guest actions (a boot sector that enabled the FIFOs, switched to loopback, sent
"AB", enabled the THR-empty interrupt and wrote 0x5a to the scratch register; and the same
without loopback and interrupt), taken from QEMU streams and kept here as hex.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from livemig.devices import vmstate
from livemig.devices.chardev import Backend, ChardevError, ChardevSpec, parse_chardev
from livemig.devices.ioport import IoBus
from livemig.devices.isa import DeviceConfigError, Port92, add_device, parse_device
from livemig.devices.serial import ISA_SERIAL_DESC, Serial16550
from livemig.guest.boot_image import BootError, MemoryLayout, load_boot_sector
from livemig.guest.multiboot import load_multiboot, memory_map
from livemig.migration.stream.qemu_file import bytes_reader

MiB = 1 << 20
# QEMU 7.2, section "serial" v3 payloads (see the module docstring). The Fifo8's bytes
# beyond its count are whatever QEMU's buffer held: here zeroed, as livemig sends them.
QEMU_LOOPBACK = bytes.fromhex(
    "000c0002c2001061b05a01"
    "051073657269616c2f726563765f6669666f00000001"
    "41420000000000000000000000000000" "00000000" "00000002"
    "051773657269616c2f74696d656f75745f6970656e64696e67" "00000001" "00000001"
)  # fmt: skip
QEMU_PLAIN = bytes.fromhex("000c0000c1000060b05a01")
QEMU_FIFO_GARBAGE = bytes.fromhex("4142b45a050000000000000000000000")


class Recorder(Backend):
    def __init__(self) -> None:
        super().__init__(ChardevSpec("null"))
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.out += data


class System:
    def __init__(self) -> None:
        self.resets: list[str] = []
        self.exits: list[int] = []

    def request_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def request_exit(self, status: int) -> None:
        self.exits.append(status)


def uart() -> tuple[Serial16550, Recorder]:
    rec = Recorder()
    return Serial16550(rec), rec


def section(dev: Serial16550) -> bytes:
    return vmstate.encode(ISA_SERIAL_DESC, dev.save())


# -- 16550A -------------------------------------------------------------------------------------
def test_serial_section_matches_qemu_for_the_same_guest_actions() -> None:
    dev, rec = uart()
    for reg, value in ((2, 0x07), (4, 0x10), (0, ord("A")), (0, ord("B")), (1, 0x02), (7, 0x5A)):
        dev.io_write(reg, 1, value)
    assert section(dev) == QEMU_LOOPBACK
    assert rec.out == b""  # loopback: nothing left the port

    dev, rec = uart()
    for reg, value in ((2, 0x07), (4, 0x00), (0, ord("A")), (0, ord("B")), (1, 0x00), (7, 0x5A)):
        dev.io_write(reg, 1, value)
    assert section(dev) == QEMU_PLAIN
    assert rec.out == b"AB"


def test_serial_loads_qemus_section_and_carries_on() -> None:
    raw = QEMU_LOOPBACK.replace(bytes(16), QEMU_FIFO_GARBAGE, 1)
    values = vmstate.decode(ISA_SERIAL_DESC, bytes_reader(raw))
    dev, _ = uart()
    dev.load(values)
    assert section(dev) == QEMU_LOOPBACK
    assert dev.io_read(2, 1) == 0xC2  # THRI pending, FIFOs on
    assert dev.io_read(2, 1) == 0xC1  # reading IIR acknowledged it
    assert [dev.io_read(0, 1), dev.io_read(0, 1)] == [ord("A"), ord("B")]
    assert dev.io_read(5, 1) & 0x01 == 0  # no more data


def test_serial_registers_dlab_scratch_and_modem_status() -> None:
    dev, rec = uart()
    assert dev.io_read(5, 1) == 0x60 and dev.io_read(2, 1) == 0x01 and dev.io_read(6, 1) == 0xB0
    dev.io_write(3, 1, 0x83)  # DLAB, 8 bits
    dev.io_write(0, 1, 0x01)
    dev.io_write(1, 1, 0x00)  # divisor 1: 115200 baud
    assert (dev.io_read(0, 1), dev.io_read(1, 1)) == (1, 0)
    dev.io_write(3, 1, 0x03)
    dev.io_write(0, 1, ord("x"))
    assert rec.out == b"x" and dev.divider == 1
    assert dev.save()["state"]["divider"] == 1
    dev.io_write(7, 1, 0x5A)
    assert dev.io_read(7, 1) == 0x5A
    dev.io_write(4, 1, 0x1F)  # loopback with DTR, RTS, OUT1, OUT2: all inputs on
    assert dev.io_read(6, 1) == 0xF0


def test_serial_input_fifo_overrun_and_flow() -> None:
    dev, _ = uart()
    dev.feed(b"hi")  # no FIFO: one byte in RBR, the next waits outside
    assert dev.io_read(5, 1) & 0x01
    assert dev.io_read(0, 1) == ord("h")
    assert dev.io_read(0, 1) == ord("i")
    assert not dev.io_read(5, 1) & 0x01
    dev.io_write(2, 1, 0x01)  # FIFO on
    dev.feed(bytes(range(40)))  # 16 go in, 24 wait
    assert len(dev.fifo) == 16
    got = bytes(dev.io_read(0, 1) for _ in range(40))
    assert got == bytes(range(40))  # nothing lost: the rest came in as room appeared
    dev.io_write(1, 1, 0x01)  # receive interrupt enabled
    dev.feed(b"z")
    assert dev.io_read(2, 1) == 0xCC  # character timeout pending (below the trigger level)
    dev.io_write(4, 1, 0x10)  # loopback: a looped byte beyond a full FIFO is an overrun
    for i in range(17):
        dev.io_write(0, 1, i)
    assert dev.io_read(5, 1) & 0x02  # OE, cleared by reading LSR
    assert not dev.io_read(5, 1) & 0x02


# -- port 0x92, the bus, isa-debug-exit ------------------------------------------------------
def test_port_bus_unassigned_ports_port92_and_debug_exit() -> None:
    system = System()
    bus = IoBus()
    p92 = Port92(system)
    bus.register("port92", 0x92, 1, p92)
    dev = add_device(bus, parse_device("isa-debug-exit,iobase=0xf4,iosize=4"), system)
    assert bus.read(0x2F8, 1) == 0xFF and bus.read(0x2F8, 4) == 0xFFFF_FFFF
    bus.write(0x2F8, 1, 0x12)
    assert bus.unassigned[0x2F8] == 3
    bus.write(0x92, 1, 0x02)  # A20 on: reads back, no reset
    assert bus.read(0x92, 1) == 0x02 and system.resets == []
    bus.write(0x92, 1, 0x03)  # bit 0 from 0 to 1: reset
    bus.write(0x92, 1, 0x03)  # stays 1: no second reset
    assert system.resets == ["guest-reset"]
    p92.reset()
    assert bus.read(0x92, 1) == 0x02
    bus.write(0xF4, 4, 0x20)
    assert system.exits == [0x41] and dev.value == 0x20
    with pytest.raises(DeviceConfigError, match=r"port 0xf4 is taken by --device"):
        add_device(bus, parse_device("isa-debug-exit,iobase=0xf2,iosize=4"), system)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("isa-debug-exot", "unknown device 'isa-debug-exot'"),
        ("isa-debug-exit,iobase=zz", "iobase='zz' is not a number"),
        ("isa-debug-exit,iobase=0x10000", "is not a port"),
        ("isa-debug-exit,iosize=3", "iosize must be 1, 2 or 4"),
        ("isa-debug-exit,colour=red", "has no property 'colour'"),
        ("isa-debug-exit,iobase", "expected key=value"),
    ],
)
def test_bad_device_options(text: str, words: str) -> None:
    with pytest.raises(DeviceConfigError, match=words) as e:
        parse_device(text)
    assert "\n" not in str(e.value) and text in str(e.value)


def test_device_defaults_are_qemus() -> None:
    assert parse_device("isa-debug-exit").props == {"iobase": 0x501, "iosize": 2}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tcp:localhost:4444", "unknown backend"),
        ("file:", "the path is empty"),
        ("unix:/tmp/x.sock", "add ,server"),
        ("unix:/tmp/x.sock,server,colour=red", "unknown option"),
        ("file:/tmp/x,append=on", "takes no options"),
    ],
)
def test_bad_serial_options(text: str, words: str) -> None:
    with pytest.raises(ChardevError, match=words):
        parse_chardev(text)


def test_serial_specs() -> None:
    assert parse_chardev("none") is None
    assert parse_chardev("stdio") == ChardevSpec("stdio", text="stdio")
    s = parse_chardev("unix:/run/x.sock,server,nowait")
    assert s is not None and (s.kind, s.path, s.wait) == ("unix", "/run/x.sock", False)
    s = parse_chardev("unix:/run/x.sock,server")
    assert s is not None and s.wait  # QEMU's default: wait for a client


# -- loaders -----------------------------------------------------------------------------------
LAYOUT = MemoryLayout(64 * MiB, ((64 * MiB, 128 * MiB),))


def test_boot_sector_checks(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"\xeb\xfe" + bytes(508) + b"\x55\xaa")
    img = load_boot_sector(str(good), LAYOUT)
    assert (0x7C00, good.read_bytes()) in img.writes
    assert img.cpu.mode == "real" and img.cpu.eip == 0x7C00 and img.cpu.regs["edx"] == 0x80
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x55\xaa" * 50)
    with pytest.raises(BootError, match=r"short.bin: a boot sector is 512 bytes, this file has 100"):
        load_boot_sector(str(short), LAYOUT)
    unsigned = tmp_path / "unsigned.bin"
    unsigned.write_bytes(bytes(512))
    with pytest.raises(BootError, match=r"no boot signature: bytes 510-511 are 0x00 0x00"):
        load_boot_sector(str(unsigned), LAYOUT)
    with pytest.raises(BootError, match=r"cannot read boot sector .*missing.bin: No such file"):
        load_boot_sector(str(tmp_path / "missing.bin"), LAYOUT)


def mb_header(flags: int, checksum: int | None = None, addrs: tuple[int, ...] = ()) -> bytes:
    magic = 0x1BADB002
    if checksum is None:
        checksum = -(magic + flags) & 0xFFFF_FFFF
    return struct.pack("<III", magic, flags, checksum) + struct.pack(f"<{len(addrs)}I", *addrs)


def test_multiboot_header_checks(tmp_path: Path) -> None:
    def kernel(name: str, data: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    with pytest.raises(BootError, match="no Multiboot header in the first 8192 bytes"):
        load_multiboot(kernel("none", bytes(16384)), "", LAYOUT)
    late = bytes(8192) + mb_header(0)
    with pytest.raises(BootError, match="no Multiboot header"):
        load_multiboot(kernel("late", late), "", LAYOUT)
    with pytest.raises(BootError, match=r"bad checksum"):
        load_multiboot(kernel("sum", mb_header(0, checksum=0x1234)), "", LAYOUT)
    with pytest.raises(BootError, match=r"requires features livemig does not provide \(flags 0x8\)"):
        load_multiboot(kernel("feat", mb_header(8)), "", LAYOUT)
    with pytest.raises(BootError, match="not an ELF file, and its Multiboot header gives no load addresses"):
        load_multiboot(kernel("raw", mb_header(0) + bytes(64)), "", LAYOUT)
    bz = bytearray(0x400)
    bz[0x202:0x206] = b"HdrS"
    with pytest.raises(BootError, match="Linux bzImage"):
        load_multiboot(kernel("bzImage", bytes(bz)), "", LAYOUT)
    elf64 = b"\x7fELF\x02\x01\x01" + bytes(100)
    with pytest.raises(BootError, match="ELF64"):
        load_multiboot(kernel("elf64", elf64), "", LAYOUT)

    # a.out kludge: header at file offset 0 = header_addr, loaded at load_addr
    def aout(load: int, size: int = 0x100, bss_end: int = 0, entry: int | None = None) -> bytes:
        entry = load + 0x30 if entry is None else entry
        head = mb_header(1 << 16, addrs=(load, load, load + size, bss_end, entry))
        return head + bytes(size - len(head))

    img = load_multiboot(kernel("ok", aout(0x200000, bss_end=0x201000)), "x=1", LAYOUT)
    assert img.cpu.eip == 0x200030 and img.cpu.regs == {"eax": 0x2BADB002, "ebx": 0x9000, "esp": 0x7C00}
    assert (0x200100, 0x1000 - 0x100) in img.zeros
    cmdline = next(b for g, b in img.writes if g == 0x9300)
    assert cmdline == f"{tmp_path / 'ok'} x=1".encode() + b"\0"
    with pytest.raises(BootError, match=r"lies outside base RAM \[0x100000, 0x4000000\)"):
        load_multiboot(kernel("big", aout(0x3FFF000, size=0x2000)), "", LAYOUT)
    with pytest.raises(BootError, match="starts below 1 MiB"):
        load_multiboot(kernel("low", aout(0x8000)), "", LAYOUT)
    with pytest.raises(BootError, match="entry_addr 0x300000 is not inside the loaded image"):
        load_multiboot(kernel("entry", aout(0x200000, entry=0x300000)), "", LAYOUT)
    with pytest.raises(BootError, match="--append: the command line is"):
        load_multiboot(kernel("long", aout(0x200000)), "y" * 40000, LAYOUT)


def test_multiboot_memory_map_reserves_device_memory() -> None:
    assert memory_map(LAYOUT) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x60400, 2),
        (0x100000, 63 * MiB, 1),
        (64 * MiB, 128 * MiB, 2),
    ]
