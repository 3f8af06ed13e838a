"""Precopy benchmarks (issue: discard-aware precopy), printed as one JSON object.

(a) throughput: SIZE of random-content plugged memory migrated over loopback tcp between
    two VM processes, beside a raw socket copy of the same number of bytes in the same run
    (a sender process streaming a populated memfd into a receiver process's fresh memfd
    with ``recv_into``, and into a pre-populated one): the machine's limits.
(b) idle guest: 1 GiB RAM + 8 GiB virtio-mem with 1 GiB plugged: total time, bytes on the
    wire, and what was skipped (nothing from unplugged blocks).
(c) setup: a 1 TiB virtio-mem region with 1% plugged at random 2 MiB blocks (about 5000
    runs): time of the migration-bitmap setup (start log, first sync, clear discarded).

Usage: python benchmarks/bench_precopy.py [--size 4G] [--skip a,b,c]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _vm import GiB, MiB, VmProcess, free_port  # noqa: E402

from livemig.cli import parse_size  # noqa: E402

RAW_RECEIVER = r"""
import mmap, os, socket, sys, time
size, port, warm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
fd = os.memfd_create("raw-dst"); os.ftruncate(fd, size)
m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED); mv = memoryview(m)
if warm:
    m.madvise(23, 0, size)  # MADV_POPULATE_WRITE
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
got, t0 = 0, None
while got < size:
    n = c.recv_into(mv[got:], min(4 << 20, size - got))
    if not n: break
    if t0 is None: t0 = time.perf_counter()
    got += n
print(got, time.perf_counter() - t0, flush=True)
"""

RAW_SENDER = r"""
import mmap, os, socket, sys
import numpy as np
size, port = int(sys.argv[1]), int(sys.argv[2])
fd = os.memfd_create("raw-src"); os.ftruncate(fd, size)
m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
a = np.frombuffer(m, np.uint8)
rng = np.random.default_rng(1)
for off in range(0, size, 64 << 20):
    a[off:off + (64 << 20)] = rng.integers(0, 256, min(64 << 20, size - off), dtype=np.uint8)
print("ready", flush=True); sys.stdin.readline()
c = socket.create_connection(("127.0.0.1", port)); c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
mv = memoryview(m)
for off in range(0, size, 4 << 20):
    c.sendall(mv[off:off + (4 << 20)])
c.close()
"""


def raw_copy(size: int, warm: bool) -> float:
    """GB/s of one TCP stream from a populated memfd into a fresh (or warm) memfd."""
    port = free_port()
    rx = subprocess.Popen([sys.executable, "-c", RAW_RECEIVER, str(size), str(port), "1" if warm else "0"],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
    tx = subprocess.Popen([sys.executable, "-c", RAW_SENDER, str(size), str(port)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert tx.stdout is not None and tx.stdin is not None
    assert tx.stdout.readline().strip() == "ready"
    tx.stdin.write("go\n")
    tx.stdin.flush()
    got, secs = rx.stdout.readline().split()
    tx.wait()
    rx.wait()
    assert int(got) == size
    return size / float(secs) / 1e9


def bench_throughput(size: int) -> dict:
    port = free_port()
    common = ["--accel", "soft", "--memory", "256M", "--virtio-mem", f"id=vm0,size={max(8 * GiB, size)},requested-size=0",
              "--vcpus", "2", "--dirty-rate", "0", "--content", "random"]
    src = VmProcess("src", common)
    dst = VmProcess("dst", [*common, "--incoming", f"tcp:127.0.0.1:{port}", "-S"], src.dir)
    try:
        src.plug(size)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        same = src("x-query-guest-checksum") == dst("x-query-guest-checksum")
    finally:
        src.close()
        dst.close()
    ram = info["ram"]
    secs = info["total-time"] / 1000
    lm = ram["transferred"] / secs / 1e9
    raw_cold = raw_copy(size, warm=False)
    raw_warm = raw_copy(size, warm=True)
    return {
        "plugged_bytes": size,
        "bytes_on_wire": ram["transferred"],
        "livemig_seconds": secs,
        "livemig_GBps": round(lm, 3),
        "downtime_ms": info["downtime"],
        "raw_copy_cold_dst_GBps": round(raw_cold, 3),
        "raw_copy_warm_dst_GBps": round(raw_warm, 3),
        "ratio_vs_raw_cold": round(lm / raw_cold, 3),
        "ratio_vs_raw_warm": round(lm / raw_warm, 3),
        "checksums_equal": same,
    }


def bench_idle() -> dict:
    port = free_port()
    common = ["--accel", "soft", "--memory", "1G", "--virtio-mem", "id=vm0,size=8G,requested-size=0",
              "--vcpus", "1", "--dirty-rate", "0", "--content", "mixed"]
    src = VmProcess("src", common)
    dst = VmProcess("dst", [*common, "--incoming", f"tcp:127.0.0.1:{port}", "-S"], src.dir)
    try:
        src.plug(1 * GiB)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        alloc_src = {b["id"]: b for b in src("x-query-ram-allocation")}  # type: ignore[union-attr]
        alloc_dst = {b["id"]: b for b in dst("x-query-ram-allocation")}  # type: ignore[union-attr]
        same = src("x-query-guest-checksum") == dst("x-query-guest-checksum")
    finally:
        src.close()
        dst.close()
    ram = info["ram"]
    return {
        "total_time_ms": info["total-time"],
        "downtime_ms": info["downtime"],
        "bytes_on_wire": ram["transferred"],
        "pages_zero": ram["duplicate"],
        "pages_normal": ram["normal"],
        "discarded_bytes_skipped": ram["discarded-skipped-bytes"],
        "source_unplugged_allocated": alloc_src["vm0-memdev"]["allocated-discarded"],
        "destination_unplugged_allocated": alloc_dst["vm0-memdev"]["allocated-discarded"],
        "checksums_equal": same,
    }


def bench_setup(repeats: int = 7) -> dict:
    from livemig.devices.virtio_mem import VirtioMem
    from livemig.memory.dirty_log import BitmapDirtyLog
    from livemig.memory.ram_block import RAMBlock
    from livemig.memory.region import GuestMemoryMap, MemoryRegion
    from livemig.migration.ram.save import RamSaver

    tib, bs = 1 << 40, 2 * MiB
    gm = GuestMemoryMap()
    gm.add(MemoryRegion("pc.ram", RAMBlock("pc.ram", 64 * MiB), 0))
    mr = MemoryRegion("vm0-memdev", RAMBlock("vm0-memdev", tib), 4 * GiB)
    vmem = VirtioMem("vm0", mr, requested_size=tib // 100 // bs * bs, block_size=bs)
    gm.add(mr)
    nblocks = tib // bs
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(nblocks, tib // 100 // bs, replace=False))
    vmem.usable_region_size = tib  # as after the guest grew it; plugged blocks anywhere
    for i in chosen.tolist():
        vmem.bitmap.set_range(i, 1)
    vmem.size = len(chosen) * bs
    runs = len(vmem.run_arrays(mr.whole(), False)[0])
    log = BitmapDirtyLog(gm.blocks)
    times = []
    for _ in range(repeats):
        saver = RamSaver(gm.regions, log)
        t = time.perf_counter()
        saver.init_bitmaps()
        times.append((time.perf_counter() - t) * 1000)
        assert saver.dirty_pages == (64 * MiB + len(chosen) * bs) // 4096
    return {
        "region_bytes": tib,
        "plugged_fraction": 0.01,
        "discarded_runs": runs,
        "setup_ms_median": round(statistics.median(times), 1),
        "setup_ms_first": round(times[0], 1),
        "setup_ms_min": round(min(times), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=parse_size, default=4 * GiB)
    p.add_argument("--skip", default="")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    out: dict = {}
    if "c" not in skip:
        out["c_setup_1TiB_1pct"] = bench_setup()
    if "b" not in skip:
        out["b_idle_guest"] = bench_idle()
    if "a" not in skip:
        out["a_throughput"] = bench_throughput(args.size)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
