"""A guest the user brings, on this machine's KVM: how fast it runs, stops and migrates.

Builds ``tests/guests/boot_sweep.S`` (a boot sector that sweeps 16 MiB, one u32 per page,
and prints a serial line per sweep) with binutils and prints one JSON object:

* ``guest``: sweeps per second and pages per second, and port I/O exits per second (each
  serial byte is an ``in`` from LSR and an ``out`` to THR, served in Python);
* ``pause_ms``: how long ``stop`` takes (the vCPU is kicked out of KVM_RUN by a signal: this
  guest never exits on its own while it sweeps), median and max of ``--reps`` stops;
* ``info_registers_ms``: QMP ``human-monitor-command info registers`` on a running guest
  (a pause, the whole vCPU state, a resume);
* ``precopy``: the running guest migrated over a unix socket between two machines in this
  process: total time, downtime, bytes, dirty syncs;
* ``snapshot``: a background snapshot to a file: total time, the guest's stop.

Usage: ``python benchmarks/bench_user_guest.py [--reps 20]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livemig.accel.kvm import kvm_available
from livemig.control.vm_controller import VMController
from livemig.devices.chardev import parse_chardev
from livemig.machine import Machine, MachineConfig

MiB = 1 << 20
GUESTS = Path(__file__).resolve().parent.parent / "tests" / "guests"


def build_boot_sweep(out: Path) -> str:
    obj, binary = out / "bs.o", out / "bs.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUESTS / "boot_sweep.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(binary), str(obj)],
                   check=True, capture_output=True)  # fmt: skip
    return str(binary)


def machine(image: str, serial: Path, incoming: bool = False) -> Machine:
    return Machine(MachineConfig(memory=64 * MiB, accel="kvm", boot_sector=image,
                                 serial=parse_chardev(f"file:{serial}"), incoming=incoming))  # fmt: skip


def count_sweeps(path: Path) -> int:
    return path.read_bytes().count(b"sweep ")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if (why := kvm_available()) is not None:
        print(json.dumps({"skipped": why}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="livemig-bench-guest-"))
    image = build_boot_sweep(work)
    out: dict = {}
    src_serial = work / "src.out"
    src = machine(image, src_serial)
    try:
        cs = VMController(src)
        src.start()
        time.sleep(0.5)
        n0, e0, t0 = count_sweeps(src_serial), src.accel.runner.exits, time.perf_counter()
        time.sleep(2.0)
        n1, e1, t1 = count_sweeps(src_serial), src.accel.runner.exits, time.perf_counter()
        rate = (n1 - n0) / (t1 - t0)
        out["guest"] = {
            "sweeps_per_s": round(rate, 1),
            "pages_per_s": round(rate * 4096),
            "exits_per_s": round((e1 - e0) / (t1 - t0)),
        }
        pauses, regs = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            src.stop()
            pauses.append((time.perf_counter() - t) * 1e3)
            src.cont()
            time.sleep(0.01)
            t = time.perf_counter()
            cs.human_monitor_command("info registers")
            regs.append((time.perf_counter() - t) * 1e3)
        out["pause_ms"] = {"median": round(statistics.median(pauses), 3), "max": round(max(pauses), 3)}
        out["info_registers_ms"] = {"median": round(statistics.median(regs), 3), "max": round(max(regs), 3)}

        cs.migrate_set_capabilities([{"capability": "background-snapshot", "state": True}])
        cs.migrate(f"file:{work / 'snap'}")
        assert cs.outgoing is not None and cs.outgoing.wait(120)
        info = cs.query_migrate()
        out["snapshot"] = {k: info.get(k) for k in ("status", "total-time", "downtime")}
        out["snapshot"]["bytes"] = info["ram"]["transferred"]
        cs.migrate_set_capabilities([{"capability": "background-snapshot", "state": False}])

        dst = machine(image, work / "dst.out", incoming=True)
        try:
            cd = VMController(dst, autostart=False)
            uri = f"unix:{work / 'mig.sock'}"
            cd.migrate_incoming(uri)
            cs.migrate(uri)
            assert cs.outgoing is not None and cs.outgoing.wait(120)
            assert cd.incoming is not None and cd.incoming.wait(60)
            info = cs.query_migrate()
            out["precopy"] = {k: info.get(k) for k in ("status", "total-time", "downtime")}
            out["precopy"]["bytes"] = info["ram"]["transferred"]
            out["precopy"]["dirty-sync-count"] = info["ram"]["dirty-sync-count"]
            out["precopy"]["registers_equal"] = cs.human_monitor_command("info registers") == cd.human_monitor_command(
                "info registers"
            )
        finally:
            dst.close()
    finally:
        src.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
