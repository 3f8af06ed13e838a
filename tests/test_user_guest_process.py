"""``livemig vm --kernel/--boot-sector`` as real processes, driven over QMP like QEMU.

* A Multiboot kernel that keeps values in x87, SSE and segment registers
  (``tests/guests/mb_fpu.S``) is migrated from one VM process to another; on the
  destination it is told over its serial port (a unix socket) to check them, reports the
  result there and ends its VM through isa-debug-exit: the destination process exits with
  the status the guest chose, after a SHUTDOWN event.
* Events: RESET for ``system_reset``, STOP/RESUME, SHUTDOWN for ``quit``.
* Every bad image and bad device option is one line on stderr naming the problem and a
  non-zero exit status, never a traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.accel.kvm import kvm_available

_why = kvm_available()
if _why is not None:
    pytest.skip(f"KVM not usable here ({_why})", allow_module_level=True)

from guest_build import build  # noqa: E402

from livemig.cli import main  # noqa: E402

EXIT = "isa-debug-exit,iobase=0xf4,iosize=0x04"


class VmProcess:
    def __init__(self, tmp_path: Path, name: str, *args: str):
        self.sock = tmp_path / f"{name}.qmp"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "vm", "--accel", "kvm", "--memory", "64M",
             "--qmp", f"unix:{self.sock}", *args],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            assert self.proc.poll() is None, f"livemig vm exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
            assert time.monotonic() < deadline, "QMP socket did not appear"
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(self.sock))
        self.qmp.connect(negotiate=True)

    def wait_status(self, want: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.cmd("query-migrate")
            if info.get("status") == want:
                return info
            assert info.get("status") not in ("failed", "cancelled"), info
            assert time.monotonic() < deadline, f"migration stuck at {info.get('status')}"
            time.sleep(0.05)

    def events(self) -> list[dict]:
        return self.qmp.get_events(wait=False)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001 - the VM may have ended its side already
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture
def procs() -> Iterator[list[VmProcess]]:
    made: list[VmProcess] = []
    yield made
    for p in made:
        p.close()


def read_until(conn: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    conn.settimeout(timeout)
    out = b""
    while marker not in out:
        chunk = conn.recv(4096)
        if not chunk:
            break
        out += chunk
    return out


def test_x87_sse_and_segment_state_survive_a_migration(tmp_path: Path, procs: list[VmProcess]) -> None:
    kernel = str(build("mb_fpu", "elf"))
    src_out = tmp_path / "src.out"
    dst_serial = tmp_path / "dst.serial"
    src = VmProcess(tmp_path, "src", "--kernel", kernel, "--serial", f"file:{src_out}", "--device", EXIT)
    procs.append(src)
    dst = VmProcess(tmp_path, "dst", "--kernel", kernel, "--serial", f"unix:{dst_serial},server,wait=off",
                    "--device", EXIT, "--incoming", f"unix:{tmp_path / 'mig.sock'}")  # fmt: skip
    procs.append(dst)
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(dst_serial))
    deadline = time.monotonic() + 30
    while src_out.read_bytes().count(b".") < 2:  # it counts, and keeps XMM0 in step
        assert time.monotonic() < deadline, src_out.read_bytes()
        time.sleep(0.05)
    before = src.qmp.cmd("human-monitor-command", **{"command-line": "info registers"})
    assert "FCW=0f7f FSW=2800 [ST=5] FTW=e0 MXCSR=00007f80" in before
    assert "FS =0018 00300000 ffffffff 00c09300" in before  # the hidden base, not the GDT's
    # the events of the migration only: a RESUME from the guest's start reaches a QMP
    # client that connected before it (the VM is ready before its guest runs)
    src.qmp.clear_events()
    src.qmp.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    src.wait_status("completed")
    dst.wait_status("completed")
    assert dst.qmp.cmd("query-status")["status"] == "running"
    assert [e["event"] for e in src.events()] == ["STOP"]

    conn.sendall(b"c")
    out = read_until(conn, b"\r\n", timeout=30)
    out += read_until(conn, b"\r\n", timeout=30)
    assert b"fpu-check: x87 sse segments ok after " in out, src_out.read_bytes()[-200:] + out
    shutdown = dst.qmp.pull_event(wait=30.0)
    while shutdown is not None and shutdown["event"] != "SHUTDOWN":
        shutdown = dst.qmp.pull_event(wait=30.0)
    assert shutdown is not None and shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert dst.proc.wait(30) == (0x20 << 1) | 1  # what the guest wrote to isa-debug-exit
    assert src_out.read_bytes().startswith(b"fpu-check: multiboot entry\r\nfpu-check: counting")
    src.qmp.cmd("quit")
    assert src.proc.wait(20) == 0
    conn.close()


def test_serial_on_stdio(tmp_path: Path) -> None:
    """``--serial stdio``: the guest's output on stdout, its input from stdin."""
    kernel = str(build("mb_fpu", "elf"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "vm", "--accel", "kvm", "--memory", "64M",
         "--qmp", f"unix:{tmp_path / 'q.sock'}", "--kernel", kernel, "--serial", "stdio", "--device", EXIT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        seen = b""
        while b"counting" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, seen
            seen += chunk
        proc.stdin.write(b"c")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=60)
        assert b"fpu-check: x87 sse segments ok" in seen + rest
        assert proc.returncode == 65
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unix_serial_waits_for_a_client(tmp_path: Path, procs: list[VmProcess]) -> None:
    """``unix:PATH,server`` (QEMU's default wait=on): the guest starts once someone listens,
    and the listener sees its first byte."""
    halt = str(build("boot_halt", "boot"))
    com1 = tmp_path / "com1.sock"
    vm = VmProcess(tmp_path, "vm", "--boot-sector", halt, "--serial", f"unix:{com1},server")
    procs.append(vm)
    time.sleep(0.5)
    assert vm.qmp.cmd("query-status")["status"] == "prelaunch"
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(com1))
    assert read_until(conn, b"\r\n", timeout=20) == b"halted\r\n"
    assert vm.qmp.cmd("query-status")["status"] == "running"
    conn.close()


def test_reset_stop_resume_and_quit_events(tmp_path: Path, procs: list[VmProcess]) -> None:
    halt = str(build("boot_halt", "boot"))
    out = tmp_path / "vm.out"
    vm = VmProcess(tmp_path, "vm", "--boot-sector", halt, "--serial", f"file:{out}")
    procs.append(vm)
    deadline = time.monotonic() + 20
    while out.read_bytes() != b"halted\r\n":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "HLT=1" in vm.qmp.cmd("human-monitor-command", **{"command-line": "info registers"})
    vm.qmp.cmd("stop")
    vm.qmp.cmd("cont")
    vm.qmp.cmd("system_reset")
    while out.read_bytes() != b"halted\r\nhalted\r\n":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cpus = vm.qmp.cmd("query-cpus-fast")
    assert cpus[0]["cpu-index"] == 0 and cpus[0]["thread-id"] != vm.proc.pid  # the vCPU thread
    vm.qmp.cmd("quit")
    assert vm.proc.wait(20) == 0
    events = [(e["event"], e.get("data")) for e in vm.events()]
    assert events == [
        ("STOP", None),
        ("RESUME", None),
        ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}),
    ]


# -- bad images and bad options: one line, non-zero, no traceback -----------------------------------
def _write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    kernel = build("mb_sweep", "elf")
    data = bytearray(kernel.read_bytes())
    at = data.find((0x1BADB002).to_bytes(4, "little"))
    data[at + 8] ^= 0xFF  # the checksum no longer adds up
    phdr = int.from_bytes(kernel.read_bytes()[28:32], "little")  # e_phoff; p_paddr at +12
    low = bytearray(kernel.read_bytes())
    low[phdr + 12 : phdr + 16] = (0x8000).to_bytes(4, "little")
    big = bytearray(kernel.read_bytes())  # p_memsz at +20: 64 MiB from 1 MiB
    big[phdr + 20 : phdr + 24] = (64 << 20).to_bytes(4, "little")
    return [
        (["--boot-sector", _write(tmp_path, "short.bin", b"\x55\xaa" * 10)], "a boot sector is 512 bytes, this file has 20"),
        (["--boot-sector", _write(tmp_path, "nosig.bin", bytes(512))], "no boot signature"),
        (["--boot-sector", str(tmp_path / "missing.bin")], "cannot read boot sector"),
        (["--kernel", _write(tmp_path, "noheader", bytes(9000))], "no Multiboot header in the first 8192 bytes"),
        (["--kernel", _write(tmp_path, "badsum", bytes(data))], "bad checksum"),
        (["--kernel", _write(tmp_path, "big", bytes(big))],
         "ELF segment 0 [0x100000, 0x4100000) lies outside base RAM [0x100000, 0x4000000)"),
        (["--kernel", _write(tmp_path, "low", bytes(low))], "ELF segment 0 [0x8000, "),
        (["--kernel", _write(tmp_path, "elf64", b"\x7fELF\x02\x01\x01" + bytes(200))], "ELF64"),
        (["--append", "x=1"], "--append needs --kernel"),
        (["--boot-sector", str(build("boot_halt", "boot")), "--kernel", str(kernel)], "exclude each other"),
        (["--kernel", str(kernel), "--accel", "soft"], "run on --accel kvm, not soft"),
        (["--kernel", str(kernel), "--device", "isa-debug-exit,iobase=0x3f8"], "port 0x3f8 is taken by serial (COM1)"),
        (["--kernel", str(kernel), "--device", "pci-bridge"], "unknown device 'pci-bridge'"),
        (["--kernel", str(kernel), "--device", "isa-debug-exit,iosize=9"], "iosize must be 1, 2 or 4"),
        (["--kernel", str(kernel), "--serial", "tcp:1.2.3.4:5"], "unknown backend"),
        (["--kernel", str(kernel), "--serial", f"file:{tmp_path}/no/such/dir/out"], "No such file or directory"),
        (["--kernel", str(kernel), "--serial", f"unix:{tmp_path}/s.sock"], "add ,server"),
        (["--serial", "stdio"], "--serial needs --boot-sector or --kernel"),
        (["--device", EXIT], "--device needs --boot-sector or --kernel"),
    ]


def test_bad_images_and_options_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in _bad_cases(tmp_path):
        rc = main(["vm", "--accel", "kvm", "--memory", "64M", "--qmp", f"unix:{tmp_path / 'q.sock'}", *args])
        err = capsys.readouterr().err
        assert rc != 0, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("livemig vm: "), (args, err)
        assert words in lines[0], (args, err)
        assert not (tmp_path / "q.sock").exists()


def test_a_bad_image_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    """The same, through a real process: what the user sees on a terminal."""
    bad = _write(tmp_path, "bad.bin", b"MZ" + bytes(600))
    r = subprocess.run(
        [sys.executable, "-m", "livemig", "vm", "--accel", "kvm", "--qmp", f"unix:{tmp_path / 'q'}",
         "--boot-sector", bad],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == f"livemig vm: {bad}: a boot sector is 512 bytes, this file has 602\n"
