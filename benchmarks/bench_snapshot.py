"""Background-snapshot benchmarks (issue 5), printed as one JSON object.

(a) throughput: a VM process with SIZE of random-content plugged memory (idle guest) is
    snapshotted to a file; GB/s over the whole command and over the RAM phase (total time
    minus set-up and downtime: the writer's start, populating and writing), the writer
    process's start (spawn to ready, ``x-writer-start-ms``), beside a plain precopy
    ``migrate file:`` of the same VM in the same run and a raw write of as many bytes to
    the same directory (the file system's limit).
(b) guest write slowdown: a guest writing as fast as it can (unthrottled vCPUs over all
    plugged memory: the soft guest random pages, the KVM guest its table in order); guest
    page writes per second over windows without a snapshot (before and after), and over
    the snapshot, with the write faults the snapshot served. Soft guest (numpy stores
    holding the GIL) and, where /dev/kvm works, the KVM guest (stores inside KVM_RUN).
(c) file formats: the same idle VM (SIZE plugged of a region four times as large, at
    least 8 GiB; half of its pages zero) snapshotted into a stream file and into mapped-ram
    files (``mapped-ram``, 1 writer channel, and 2 with ``multifd``): total time, guest
    stopped, the file's size and its allocated bytes.

Usage: python benchmarks/bench_snapshot.py [--size 2G] [--dir /tmp] [--repeats 3]
       [--skip a,b,c] [--accel soft,kvm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _vm import GiB, VmProcess  # noqa: E402

from livemig.cli import parse_size  # noqa: E402

CAP = "background-snapshot"


def set_cap(vm: VmProcess, state: bool) -> None:
    vm("migrate-set-capabilities", capabilities=[{"capability": CAP, "state": state}])


def raw_write(path: Path, size: int) -> float:
    """GB/s of writing ``size`` bytes of random data to a new file in 4 MiB writes."""
    buf = os.urandom(4 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    try:
        for _ in range(0, size, len(buf)):
            os.write(fd, buf)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    os.unlink(path)
    return size / dt / 1e9


def run_one(vm: VmProcess, path: Path, snapshot: bool) -> dict:
    set_cap(vm, snapshot)
    os.sync()  # start every run with no write-back pending from the previous one
    t = time.perf_counter()
    vm("migrate", uri=f"file:{path}")
    info = vm.wait_migration()
    wall = time.perf_counter() - t
    assert info["status"] == "completed", info
    size = os.path.getsize(path)
    os.unlink(path)
    ram_ms = info["total-time"] - info.get("setup-time", 0) - info.get("downtime", 0)
    out = {
        "bytes": size,
        "total_ms": info["total-time"],
        "setup_ms": info.get("setup-time"),
        "guest_stopped_ms": info.get("downtime"),
        "gbps_total": round(size / (info["total-time"] / 1000) / 1e9, 3),
        "gbps_wall": round(size / wall / 1e9, 3),
    }
    if snapshot:
        out["gbps_ram_phase"] = round(size / max(ram_ms / 1000, 1e-3) / 1e9, 3)
        out["write_faults"] = info["ram"].get("write-faults")
        out["writer_start_ms"] = info["ram"].get("x-writer-start-ms")  # spawn to ready
    return out


def bench_throughput(size: int, directory: Path, repeats: int) -> dict:
    vm = VmProcess("snap", ["--accel", "soft", "--memory", "64M", "--virtio-mem",
                            f"id=vm0,size={max(2 * size, 4 * GiB)}", "--vcpus", "1",
                            "--dirty-rate", "0", "--content", "random"])
    try:
        vm.plug(size)
        snaps, pres, raws = [], [], []
        for i in range(repeats):  # alternate the order: the page cache remembers
            for snapshot in (True, False) if i % 2 == 0 else (False, True):
                kind = "snap" if snapshot else "pre"
                (snaps if snapshot else pres).append(
                    run_one(vm, directory / f"bench-{kind}-{i}.stream", snapshot))
                if not snapshot:
                    vm("cont")  # precopy leaves the source in postmigrate
            os.sync()
            raws.append(raw_write(directory / f"bench-raw-{i}", snaps[-1]["bytes"]))

        def med(runs: list[dict], key: str) -> float | None:
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        return {
            "plugged_bytes": size,
            "directory": str(directory),
            "snapshot_gbps_median": med(snaps, "gbps_total"),
            "snapshot_ram_phase_gbps_median": med(snaps, "gbps_ram_phase"),
            "snapshot_guest_stopped_ms_median": med(snaps, "guest_stopped_ms"),
            "snapshot_writer_start_ms_median": med(snaps, "writer_start_ms"),
            "precopy_file_gbps_median": med(pres, "gbps_total"),
            "raw_write_gbps_median": round(statistics.median(raws), 3),
            "snapshot_runs": snaps,
            "precopy_runs": pres,
        }
    finally:
        vm.close()


def guest_rate(vm: VmProcess, seconds: float) -> float:
    a = vm("x-query-guest")["pages-written"]
    t = time.perf_counter()
    time.sleep(seconds)
    b = vm("x-query-guest")["pages-written"]
    return (b - a) / (time.perf_counter() - t)


def bench_slowdown(accel: str, size: int, directory: Path, bandwidth: int) -> dict:
    args = ["--accel", accel, "--memory", "64M", "--dirty-rate", "max"]
    if accel == "kvm":
        args += ["--virtio-mem", f"id=vm0,size={2 * GiB}"]
    else:
        args += ["--virtio-mem", f"id=vm0,size={4 * GiB}", "--vcpus", "2", "--content", "random"]
    vm = VmProcess(f"slow-{accel}", args)
    try:
        vm.plug(size)
        guest_rate(vm, 1.0)  # settle
        set_cap(vm, True)
        vm("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        os.sync()
        path = directory / f"bench-slow-{accel}.stream"
        before = guest_rate(vm, 2.0)
        a = vm("x-query-guest")["pages-written"]
        t = time.perf_counter()
        vm("migrate", uri=f"file:{path}")
        info = vm.wait_migration()
        dt = time.perf_counter() - t
        during = (vm("x-query-guest")["pages-written"] - a) / dt
        after = guest_rate(vm, 2.0)
        assert info["status"] == "completed", info
        os.unlink(path)
        ram = info["ram"]
        base = (before + after) / 2
        return {
            "accel": accel,
            "plugged_bytes": size,
            "snapshot_seconds": round(dt, 3),
            "snapshot_bandwidth_limit": bandwidth,
            "guest_writes_per_s_without": round(base),
            "guest_writes_per_s_before": round(before),
            "guest_writes_per_s_after": round(after),
            "guest_writes_per_s_during": round(during),
            "slowdown_factor": round(base / max(during, 1e-9), 2),
            "write_faults": ram.get("write-faults"),
            "pages_saved_on_fault": ram.get("write-fault-pages"),
            "guest_stopped_ms": info.get("downtime"),
        }
    finally:
        vm.close()


FORMATS = {"stream": (), "mapped-ram-1": ("mapped-ram",), "mapped-ram-2": ("mapped-ram", "multifd")}


def bench_formats(size: int, directory: Path, repeats: int) -> dict:
    """(c): one VM, each file format in turn (order alternating between repeats)."""
    vm = VmProcess("formats", ["--accel", "soft", "--memory", "64M", "--virtio-mem",
                               f"id=vm0,size={max(4 * size, 8 * GiB)}", "--vcpus", "1",
                               "--dirty-rate", "0", "--content", "mixed"])
    runs: dict[str, list[dict]] = {name: [] for name in FORMATS}
    try:
        vm.plug(size)
        vm("migrate-set-parameters", **{"multifd-channels": 2})
        for i in range(repeats):
            order = list(FORMATS) if i % 2 == 0 else list(reversed(FORMATS))
            for name in order:
                on = {CAP, *FORMATS[name]}
                vm("migrate-set-capabilities", capabilities=[
                    {"capability": c, "state": c in on} for c in (CAP, "mapped-ram", "multifd")])
                os.sync()
                path = directory / f"bench-{name}-{i}.snap"
                vm("migrate", uri=f"file:{path}")
                info = vm.wait_migration()
                assert info["status"] == "completed", info
                st = os.stat(path)
                os.unlink(path)
                runs[name].append({"total_ms": info["total-time"], "guest_stopped_ms": info.get("downtime"),
                                   "file_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512})
    finally:
        vm.close()
    out: dict = {"plugged_bytes": size, "directory": str(directory)}
    for name, rs in runs.items():
        out[name] = {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"runs": rs}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=2 * GiB, help="plugged memory for (a)")
    p.add_argument("--slow-size", type=parse_size, default=2 * GiB, help="plugged memory for (b)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--snapshot-bandwidth", type=parse_size, default=0,
                   help="max-bandwidth during (b) (default 0: unlimited)")
    p.add_argument("--accel", default="soft,kvm", help="guests for (b); kvm only where it works")
    p.add_argument("--skip", default="")
    args = p.parse_args()
    skip = set(args.skip.split(",")) - {""}
    out: dict = {}
    if "a" not in skip:
        out["throughput"] = bench_throughput(args.size, args.dir, args.repeats)
    if "b" not in skip:
        from livemig.accel.kvm import kvm_available

        out["slowdown"] = []
        for accel in args.accel.split(","):
            if accel == "kvm" and kvm_available() is not None:
                continue
            out["slowdown"].append(bench_slowdown(accel, args.slow_size, args.dir, args.snapshot_bandwidth))
    if "c" not in skip:
        out["formats"] = bench_formats(args.size, args.dir, args.repeats)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
