"""Guests the user brings, on real KVM: booted, inspected and migrated.

The guests are this repository's own assembly (``tests/guests``), built with binutils:

* ``boot_sweep`` (a boot sector) and ``mb_sweep`` (a Multiboot kernel) sweep 16 MiB for
  ever, page by page, and print one serial line per sweep. Sweep ``s`` stores ``s`` (the
  kernel: ``s`` XOR the page's address) in every page, with the sweep number in EBX and the
  page pointer in ESI (the kernel: EDI). So a dump of the pages and the registers together
  say exactly what memory must hold — :func:`check_sweep` — and the serial lines must be
  the sweeps in order, each once — :func:`check_serial`.
* ``boot_halt`` prints "halted" and halts with interrupts off.

After each migration (precopy, postcopy, background snapshot + restore) the destination is
checked before it runs: ``pmemsave`` of the swept pages against the algorithm and the
destination's ``info registers``; ``info registers`` of the stopped source (or, for a
snapshot, of the source at the snapshot's stop) equals the destination's; and once the
destination runs, its serial output continues the source's exactly where it stopped.
Migration skips the virtio-mem region: the user's guest has no driver, so nothing is
plugged, whatever QMP asks for.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.accel.kvm import kvm_available

_why = kvm_available()
if _why is not None:
    pytest.skip(f"KVM not usable here ({_why})", allow_module_level=True)

from guest_build import build  # noqa: E402
from waiting import wait_for  # noqa: E402

from livemig.control.hmp import parse_registers  # noqa: E402
from livemig.control.vm_controller import VMController  # noqa: E402
from livemig.devices.chardev import parse_chardev  # noqa: E402
from livemig.devices.isa import parse_device  # noqa: E402
from livemig.inspect import check_discard, inspect_stream  # noqa: E402
from livemig.machine import Machine, MachineConfig, VirtioMemConfig  # noqa: E402
from livemig.migration.snapshot.snapshot import BackgroundSnapshot  # noqa: E402

MiB = 1 << 20
PAGE = 4096
REGION = 128 * MiB
SWEEP = (0x100000, 0x1100000)  # boot_sweep.S
MB_SWEEP = (0x400000, 0x1400000)  # mb_sweep.S


def machine(tmp_path: Path, name: str, incoming: bool = False, **cfg: Any) -> Machine:
    """A 64 MiB KVM machine with a 128 MiB virtio-mem region, COM1 to ``name``.out."""
    cfg.setdefault("serial", parse_chardev(f"file:{tmp_path / (name + '.out')}"))
    return Machine(
        MachineConfig(
            memory=64 * MiB,
            accel="kvm",
            virtio_mem=VirtioMemConfig(size=REGION, block_size=2 * MiB),
            incoming=incoming,
            **cfg,
        )
    )


def serial(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_bytes().decode(errors="replace")


def sweeps(text: str) -> int:
    """Complete sweep lines (a line the guest is still writing does not count)."""
    return len(re.findall(r"sweep [0-9a-f]{8}\r\n", text))


def wait_sweeps(tmp_path: Path, name: str, n: int) -> None:
    start = sweeps(serial(tmp_path, name))
    wait_for(lambda: sweeps(serial(tmp_path, name)) >= start + n, what=f"{n} sweeps on {name}")


def registers(ctl: VMController) -> str:
    return ctl.human_monitor_command("info registers")


def dump(ctl: VMController, tmp_path: Path, start: int, end: int) -> np.ndarray:
    """The first u32 of every page of [start, end), through QMP ``pmemsave``."""
    path = tmp_path / f"dump-{start:x}"
    ctl.pmemsave(val=start, size=end - start, filename=str(path))
    data = np.fromfile(path, "<u4")
    assert data.size == (end - start) // 4
    return data[:: PAGE // 4].copy()


def check_sweep(values: np.ndarray, regs: dict[str, int], ptr: str, area: tuple[int, int], keyed: bool) -> int:
    """Pages hold sweep s up to the pointer and s-1 after it (module docstring); returns s."""
    start, end = area
    if keyed:
        values = values ^ np.arange(start, end, PAGE, dtype=np.uint32)
    s, at = regs["EBX"], regs[ptr]
    assert start <= at <= end, f"{ptr}={at:#x} outside the swept area"
    b = int(np.argmin(values == s)) if (values != s).any() else len(values)  # leading pages of sweep s
    assert (values[:b] == s).all() and (values[b:] == s - 1).all(), (
        f"pages are not sweep {s} then {s - 1}: {np.unique(values)}"
    )
    p = (at - start) // PAGE
    assert b in (p, p + 1) or (b == 0 and at == end), f"sweep front at page {b}, {ptr} at page {p}"
    return s


def check_serial(text: str, header: str) -> int:
    """Serial output is ``header`` then sweeps 1, 2, ... each once (the last maybe cut)."""
    assert text.startswith(header), text[:200]
    lines = text[len(header) :].split("\r\n")
    for i, line in enumerate(lines[:-1], start=1):
        assert line == f"sweep {i:08x}", f"line {i}: {line!r}"
    assert f"sweep {len(lines):08x}".startswith(lines[-1]), f"last line {lines[-1]!r}"
    return len(lines) - 1


@pytest.fixture
def boot_sweep() -> str:
    return str(build("boot_sweep", "boot"))


@pytest.fixture
def mb_sweep() -> str:
    return str(build("mb_sweep", "elf"))


@pytest.fixture
def pair() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


BOOT_HEADER = "boot sector: DL=80\r\n"


def mb_header(path: str, append: str) -> str:
    return (
        "mb-sweep: eax=2badb002\r\n"
        "flags=00000245 mem_lower=0000027f mem_upper=0000fc00 \r\n"
        f"cmdline={path} {append}\r\n"
        "loader=livemig\r\n"
        "mmap base=00000000 length=0009fc00 type=00000001 \r\n"
        "mmap base=0009fc00 length=00060400 type=00000002 \r\n"
        "mmap base=00100000 length=03f00000 type=00000001 \r\n"
        "mmap base=04000000 length=08000000 type=00000002 \r\n"
        "port 0x2f8=000000ff mmio 0xfec00000=ffffffff \r\n"
    )


# -- booting ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["elf", "aout"])
def test_multiboot_kernel_sees_what_the_loader_promised(tmp_path: Path, pair: list[Machine], kind: str) -> None:
    """EAX/EBX, mem_lower/upper, command line, memory map with virtio-mem reserved, an
    unassigned port and an address without RAM reading all ones; ELF and a.out kludge."""
    kernel = str(build("mb_sweep", kind))
    m = machine(tmp_path, "mb", kernel=kernel, append="console=ttyS0 x=1")
    pair.append(m)
    m.start()
    wait_sweeps(tmp_path, "mb", 2)
    text = serial(tmp_path, "mb")
    header = mb_header(kernel, "console=ttyS0 x=1")
    check_serial(text, header)
    assert m.workload.mmio == {0xFEC00000: 1}
    assert m.board is not None and m.board.bus.unassigned == {0x2F8: 1}


def test_boot_sector_runs_in_real_mode_then_sweeps(tmp_path: Path, pair: list[Machine], boot_sweep: str) -> None:
    m = machine(tmp_path, "bs", boot_sector=boot_sweep)
    pair.append(m)
    ctl = VMController(m)
    start = parse_registers(registers(ctl))  # before it ran: what a BIOS leaves
    assert (start["EIP"], start["EDX"], start["ESP"], start["HLT"]) == (0x7C00, 0x80, 0x7C00, 0)
    assert "CS =0000 00000000 0000ffff 00009b00\r\n" in registers(ctl)  # real mode
    m.start()
    wait_sweeps(tmp_path, "bs", 3)
    ctl.stop()
    regs = registers(ctl)
    assert "CS =0008 00000000 ffffffff 00c09b00 DPL=0 CS32 [-RA]" in regs  # the guest's own GDT
    s = check_sweep(dump(ctl, tmp_path, *SWEEP), parse_registers(regs), "ESI", SWEEP, keyed=False)
    assert check_serial(serial(tmp_path, "bs"), BOOT_HEADER) in (s - 1, s)
    assert m.board is not None and m.board.port92.outport == 0x02  # the guest opened A20
    assert m.board.bus.unassigned == {}


def test_whole_vcpu_state_round_trips_through_its_section(tmp_path: Path, pair: list[Machine], boot_sweep: str) -> None:
    """Every part of the CPU section — registers, XSAVE, XCR0, MSRs, events, debug
    registers, MP state — set to unusual values on one vCPU, encoded, decoded and loaded
    into another, reads back the same; the TSC moves on, never back."""
    from livemig.accel.kvm import ioctls as k
    from livemig.accel.kvm import ioctls_cpu as kc
    from livemig.accel.kvm.cpu_state import KVM_CPU_DESC, unpack_pairs
    from livemig.devices import vmstate
    from livemig.migration.stream.qemu_file import bytes_reader

    src = machine(tmp_path, "src", boot_sector=boot_sweep)
    dst = machine(tmp_path, "dst", incoming=True, boot_sector=boot_sweep)
    pair += [src, dst]
    v = src.accel.vcpu
    assert kc.set_msrs(v.fd, [(0x174, 0x10), (0x175, 0xDEAD000), (0x176, 0xBEEF000), (0x277, 0x0007010600070106)]) == 4
    # a temporary structure, on purpose: ioctl() must keep it alive (it once freed it, and
    # the allocator's free-list pointer landed in DR0)
    k.ioctl(v.fd, kc.KVM_SET_DEBUGREGS, kc.kvm_debugregs(db0=0x1000, db3=0x7C00, dr6=0xFFFF0FF1, dr7=0x401))
    image = bytearray(kc.get_xsave(v.fd))
    image[0:2] = (0x0F7F).to_bytes(2, "little")  # FCW
    image[24:28] = (0x7F80).to_bytes(4, "little")  # MXCSR
    image[160:176] = bytes(range(16))  # XMM0
    image[512] |= 0x3  # XSTATE_BV: x87 and SSE state present (else they load as init)
    kc.set_xsave(v.fd, bytes(image))
    state = src.accel.save_cpu_state()
    wire = vmstate.encode(KVM_CPU_DESC, state)
    dst.accel.load_cpu_state(vmstate.decode(KVM_CPU_DESC, bytes_reader(wire)))
    again = dst.accel.save_cpu_state()
    assert again["xsave"][:512] == state["xsave"][:512] and again["xsave"][:2] == b"\x7f\x0f"
    before, after = dict(unpack_pairs(state["msrs"])), dict(unpack_pairs(again["msrs"]))
    assert before.keys() == after.keys() and len(before) > 30
    assert after[0x175] == 0xDEAD000 and after[0x277] == 0x0007010600070106
    assert 0 <= after[0x10] - before[0x10] < 10 * state["tsc_khz"] * 1000  # TSC, < 10 s on
    for key in set(state) - {"msrs", "xsave"}:
        assert again[key] == state[key], key
    assert (again["db0"], again["db3"], again["dr6"], again["dr7"]) == (0x1000, 0x7C00, 0xFFFF0FF1, 0x401)

    # a version-1 section (registers only, as livemig wrote before) still loads
    v1 = {key: state[key] for key in (f.name for f in KVM_CPU_DESC.fields)}
    old = vmstate.encode(KVM_CPU_DESC, v1)
    assert len(old) < len(wire)
    dst.accel.load_cpu_state(vmstate.decode(KVM_CPU_DESC, bytes_reader(old), 1))


# -- precopy ---------------------------------------------------------------------------------------
def test_precopy_of_a_boot_sector(tmp_path: Path, pair: list[Machine], boot_sweep: str) -> None:
    src = machine(tmp_path, "src", boot_sector=boot_sweep)
    dst = machine(tmp_path, "dst", incoming=True, boot_sector=boot_sweep)
    pair += [src, dst]
    cs, cd = VMController(src), VMController(dst, autostart=False)
    assert src.vmem is not None
    src.vmem.set_requested_size(32 * MiB)  # nobody plugs: the user's guest has no driver
    src.start()
    wait_sweeps(tmp_path, "src", 3)
    uri = f"unix:{tmp_path / 'mig.sock'}"
    cd.migrate_incoming(uri)
    cs.migrate(uri)
    assert cs.outgoing is not None and cd.incoming is not None
    assert cs.outgoing.wait(120) and cd.incoming.wait(30)
    info = cs.query_migrate()
    assert info["status"] == "completed", (info, cd.query_migrate())
    assert (src.runstate, dst.runstate) == ("postmigrate", "paused")

    regs = registers(cd)
    assert regs == registers(cs)
    s = check_sweep(dump(cd, tmp_path, *SWEEP), parse_registers(regs), "ESI", SWEEP, keyed=False)
    before = serial(tmp_path, "src")
    assert check_serial(before, BOOT_HEADER) in (s - 1, s)
    ram = info["ram"]
    assert ram["dirty-sync-count"] >= 2
    assert ram["discarded-skipped-bytes"] == REGION  # virtio-mem: all unplugged, none sent
    assert cd.query_memory_devices()[0]["data"]["size"] == 0
    assert next(b for b in cd.x_query_ram_allocation() if "discarded" in b)["allocated"] == 0

    cd.cont()
    wait_sweeps(tmp_path, "dst", 3)
    cd.stop()
    after = serial(tmp_path, "dst")
    assert not after.startswith("boot")  # it went on, it did not boot again
    assert check_serial(before + after, BOOT_HEADER) >= s + 2


def test_state_is_saved_with_the_io_instruction_completed(
    tmp_path: Path, pair: list[Machine], boot_sweep: str
) -> None:
    """The vCPU stops right at an ``in`` from COM1's LSR. KVM finishes an I/O instruction
    (the data into AL, RIP past it) only on the next KVM_RUN, so the state that travels
    must be taken after completing it: otherwise the destination executes the instruction
    again (for an ``out`` under hardware KVM, the byte would be written twice)."""
    from livemig.accel.kvm import ioctls as k

    src = machine(tmp_path, "src", boot_sector=boot_sweep)
    dst = machine(tmp_path, "dst", incoming=True, boot_sector=boot_sweep)
    pair += [src, dst]
    cs, cd = VMController(src), VMController(dst, autostart=False)
    src.start()
    wait_sweeps(tmp_path, "src", 2)
    runner = src.accel.runner
    assert runner is not None
    runner.pause(5.0, at=lambda ex: ex.reason == k.KVM_EXIT_IO and ex.port == 0x3FD)
    assert runner.park_exit is not None and runner.park_exit.direction == k.KVM_EXIT_IO_IN
    before = serial(tmp_path, "src")
    uri = f"unix:{tmp_path / 'o.sock'}"
    cd.migrate_incoming(uri)
    cs.migrate(uri)
    assert cs.outgoing is not None and cd.incoming is not None
    assert cs.outgoing.wait(60) and cd.incoming.wait(30) and cd.incoming.status == "completed"
    regs = parse_registers(registers(cd))
    assert dst.accel.read(regs["EIP"] - 1, 1) == b"\xec"  # just past "in al, dx"
    assert regs["EAX"] & 0xFF == 0x60  # with what the LSR said: THRE and TEMT
    assert serial(tmp_path, "src") == before
    cd.cont()
    wait_sweeps(tmp_path, "dst", 2)
    cd.stop()
    check_serial(before + serial(tmp_path, "dst"), BOOT_HEADER)


# -- postcopy --------------------------------------------------------------------------------------
def test_postcopy_of_a_multiboot_kernel(tmp_path: Path, pair: list[Machine], mb_sweep: str) -> None:
    """The destination is inspected while its pages are still coming: ``pmemsave`` faults
    them in through the postcopy handler, like the guest's own accesses afterwards."""
    from livemig.migration.postcopy import placer as postcopy_uffd

    if (why := postcopy_uffd.available()) is not None:
        pytest.skip(f"no userfaultfd ({why})")
    src = machine(tmp_path, "src", kernel=mb_sweep, append="pc")
    dst = machine(tmp_path, "dst", incoming=True, kernel=mb_sweep, append="pc")
    pair += [src, dst]
    cs, cd = VMController(src), VMController(dst, autostart=False)
    caps = [{"capability": "postcopy-ram", "state": True}]
    cs.caps.set(caps)
    cd.caps.set(caps)
    src.start()
    wait_sweeps(tmp_path, "src", 3)
    uri = f"unix:{tmp_path / 'pc.sock'}"
    cd.migrate_incoming(uri)
    cs.params.set({"max-bandwidth": 8 * MiB, "max-postcopy-bandwidth": 8 * MiB})
    cs.migrate(uri)
    assert cs.outgoing is not None and cd.incoming is not None
    wait_for(lambda: cs.outgoing.status == "active", what="active")
    cs.migrate_start_postcopy()
    wait_for(lambda: cd.incoming.status == "postcopy-active", what="postcopy-active")
    wait_for(lambda: dst.runstate == "paused", what="the destination's vCPU set up, not running")

    regs = registers(cd)
    assert regs == registers(cs)
    s = check_sweep(dump(cd, tmp_path, *MB_SWEEP), parse_registers(regs), "EDI", MB_SWEEP, keyed=True)
    before = serial(tmp_path, "src")
    header = mb_header(mb_sweep, "pc")
    assert check_serial(before, header) in (s - 1, s)

    cd.cont()
    wait_sweeps(tmp_path, "dst", 3)
    assert cs.outgoing.wait(120) and cs.outgoing.status == "completed", cs.query_migrate()
    assert cd.incoming.wait(30) and cd.incoming.status == "completed", cd.query_migrate()
    cd.stop()
    assert check_serial(before + serial(tmp_path, "dst"), header) >= s + 2
    dst_ram = cd.query_migrate()["ram"]
    assert dst_ram["postcopy-faults"] > 0 and dst_ram["postcopy-lost-pages"] == 0
    assert cs.query_migrate()["ram"]["discarded-skipped-bytes"] == REGION


# -- background snapshot + restore ------------------------------------------------------------------
class AtStop:
    """What the source looked like inside the snapshot's stop (a ``stopped_hooks`` hook)."""

    def __init__(self, ctl: VMController, serial_path: Path):
        self.ctl, self.serial_path = ctl, serial_path
        self.registers = ""
        self.serial_len = -1

    def __call__(self, snap: BackgroundSnapshot) -> None:
        self.registers = registers(self.ctl)
        self.serial_len = os.path.getsize(self.serial_path)


def test_snapshot_and_restore_of_a_boot_sector(
    tmp_path: Path, pair: list[Machine], boot_sweep: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemig.memory import userfaultfd as uf

    if not uf.supported_features() & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        pytest.skip("no userfaultfd write protection here")
    src = machine(tmp_path, "src", boot_sector=boot_sweep)
    dst = machine(tmp_path, "dst", incoming=True, boot_sector=boot_sweep)
    pair += [src, dst]
    cs, cd = VMController(src), VMController(dst, autostart=False)
    at_stop = AtStop(cs, tmp_path / "src.out")
    monkeypatch.setattr(BackgroundSnapshot, "stopped_hooks", (at_stop,))
    src.start()
    wait_sweeps(tmp_path, "src", 3)
    cs.migrate_set_capabilities([{"capability": "background-snapshot", "state": True}])
    cs.params.set({"max-bandwidth": 64 * MiB})
    path = tmp_path / "snap.stream"
    cs.migrate(f"file:{path}")
    assert cs.outgoing is not None and cs.outgoing.wait(60)
    assert cs.outgoing.status == "completed", cs.query_migrate()
    assert src.runstate == "running" and cs.query_migrate()["ram"]["write-faults"] > 0
    assert check_discard(inspect_stream(path)) == []
    cd.migrate_incoming(f"file:{path}")
    assert cd.incoming is not None and cd.incoming.wait(60)
    assert cd.incoming.status == "completed", cd.query_migrate()

    regs = registers(cd)
    assert regs == at_stop.registers
    s = check_sweep(dump(cd, tmp_path, *SWEEP), parse_registers(regs), "ESI", SWEEP, keyed=False)
    cd.cont()
    wait_sweeps(tmp_path, "dst", 3)
    cd.stop()
    src_text, dst_text = serial(tmp_path, "src"), serial(tmp_path, "dst")
    cut = at_stop.serial_len
    assert check_serial(src_text[:cut], BOOT_HEADER) in (s - 1, s)
    # the restored guest says again what the source said after the snapshot, from the cut on
    assert len(src_text) >= cut + len(dst_text) and dst_text == src_text[cut : cut + len(dst_text)]
    assert sweeps(dst_text) >= 3


# -- halt, reset, memsave ----------------------------------------------------------------------------
def test_halted_guest_migrates_halted_and_reset_boots_it_again(tmp_path: Path, pair: list[Machine]) -> None:
    halt = str(build("boot_halt", "boot"))
    src = machine(tmp_path, "src", boot_sector=halt, devices=(parse_device("isa-debug-exit,iobase=0xf4"),))
    dst = machine(tmp_path, "dst", incoming=True, boot_sector=halt, devices=(parse_device("isa-debug-exit,iobase=0xf4"),))
    pair += [src, dst]
    cs, cd = VMController(src), VMController(dst, autostart=False)
    events: list[tuple[str, dict]] = []
    dst.event_listeners.append(lambda e, d: events.append((e, d)))
    src.start()
    wait_for(lambda: serial(tmp_path, "src") == "halted\r\n", what="the guest halting")
    wait_for(lambda: src.accel.halted, what="HLT")
    assert parse_registers(registers(cs))["HLT"] == 1  # and it is still running: no stop needed
    cs.stop()
    cs.cont()  # a halted vCPU pauses and resumes
    uri = f"unix:{tmp_path / 'h.sock'}"
    cd.migrate_incoming(uri)
    cs.migrate(uri)
    assert cs.outgoing is not None and cd.incoming is not None
    assert cs.outgoing.wait(60) and cd.incoming.wait(30) and cd.incoming.status == "completed"
    regs = registers(cd)
    assert regs == registers(cs) and parse_registers(regs)["HLT"] == 1

    # memsave: the vCPU's view of memory (paging off: linear is physical)
    cd.memsave(val=0x7C00, size=512, filename=str(tmp_path / "bs.mem"))
    assert (tmp_path / "bs.mem").read_bytes() == Path(halt).read_bytes()
    cd.cont()
    time.sleep(0.2)
    assert registers(cd) == regs and serial(tmp_path, "dst") == ""  # still halted
    cd.system_reset()
    wait_for(lambda: serial(tmp_path, "dst") == "halted\r\n", what="the guest booting again")
    assert events == [("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]

    # a guest reset (port 0x92 bit 0) takes the same path
    assert dst.board is not None
    dst.board.bus.write(0x92, 1, 0x01)
    wait_for(lambda: serial(tmp_path, "dst") == "halted\r\nhalted\r\n", what="the guest reset")
    assert events[-1] == ("RESET", {"guest": True, "reason": "guest-reset"})


def test_triple_fault_resets_and_memory_survives(tmp_path: Path, pair: list[Machine]) -> None:
    m = machine(tmp_path, "m", boot_sector=str(build("boot_reset", "boot")))
    pair.append(m)
    events: list[tuple[str, dict]] = []
    m.event_listeners.append(lambda e, d: events.append((e, d)))
    m.start()
    wait_for(lambda: serial(tmp_path, "m") == "boot 1\r\nboot 2\r\n", what="two boots")
    assert events == [("RESET", {"guest": True, "reason": "guest-reset"})]
    assert m.runstate == "running" and m.accel.read(0x600, 2) == b"\x02\x00"


def test_an_exit_nothing_can_handle_stops_the_vm(tmp_path: Path, pair: list[Machine]) -> None:
    """Code fetched from where there is no RAM: run state internal-error (STOP), ``cont``
    refused, ``system_reset`` and ``cont`` start the guest again."""
    from livemig.control.qmp_server import QMPError

    m = machine(tmp_path, "m", kernel=str(build("mb_badjump", "elf")))
    pair.append(m)
    ctl = VMController(m)
    states: list[str] = []
    m.runstate_listeners.append(lambda old, new: states.append(new))
    m.start()
    wait_for(lambda: m.runstate == "internal-error", what="internal-error")
    assert serial(tmp_path, "m") == "jumping\r\n"
    with pytest.raises(RuntimeError, match="Resetting the Virtual Machine is required"):
        ctl.cont()
    ctl.system_reset()
    assert m.runstate == "paused"
    ctl.cont()
    wait_for(lambda: m.runstate == "internal-error" and serial(tmp_path, "m").count("jumping") == 2, what="again")
    assert states == ["running", "internal-error", "paused", "running", "internal-error"]
    with pytest.raises(QMPError):
        ctl.memsave(val=0, size=16, filename=str(tmp_path / "x"), cpu_index=3)


def test_memsave_and_pmemsave_arguments(tmp_path: Path, pair: list[Machine], boot_sweep: str) -> None:
    from livemig.control.qmp_server import QMPError

    m = machine(tmp_path, "m", boot_sector=boot_sweep)
    pair.append(m)
    ctl = VMController(m)
    with pytest.raises(QMPError, match="cpu-index"):
        ctl.memsave(val=0, size=16, filename=str(tmp_path / "x"), cpu_index=1)
    with pytest.raises(QMPError, match="Could not open"):
        ctl.pmemsave(val=0, size=16, filename=str(tmp_path / "no" / "such"))
    with pytest.raises(QMPError, match="Invalid addr"):
        ctl.pmemsave(val=-1, size=16, filename=str(tmp_path / "x"))
    # the end of base RAM, then the unplugged virtio-mem region: zeros, never read
    assert m.vmem_mr is not None
    before = m.vmem_mr.block.allocated_bytes()
    ctl.pmemsave(val=64 * MiB - PAGE, size=2 * PAGE, filename=str(tmp_path / "edge"))
    assert (tmp_path / "edge").read_bytes()[PAGE:] == bytes(PAGE)
    assert m.vmem_mr.block.allocated_bytes() == before == 0
    # beyond every region: all ones, as the guest reads it
    ctl.pmemsave(val=0xFEC00000, size=8, filename=str(tmp_path / "mmio"))
    assert (tmp_path / "mmio").read_bytes() == b"\xff" * 8
    assert "unknown command" in ctl.human_monitor_command("info bogus")
    assert ctl.human_monitor_command("info status") == "VM status: paused (prelaunch)\r\n"
    assert ctl.query_cpus_fast()[0]["cpu-index"] == 0
