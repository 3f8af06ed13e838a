"""KVM dirty log on this machine: guest dirty rate, GET and CLEAR cost per GiB.

Runs the guest program (livemig.accel.kvm.guest_program) in a VM with one memfd-backed
slot (1 GiB by default) and prints one JSON object:

* ``guest``: first-touch and warm write rates in pages/s, with and without the periodic
  yield exits (the exits are what make a vCPU pausable without signals, so their cost is
  worth knowing);
* ``all_dirty`` / ``one_percent`` / ``clean``: KVM_GET_DIRTY_LOG (``sync``) and
  KVM_CLEAR_DIRTY_LOG (``clear``) in ms per GiB of slot, as medians and samples. CLEAR is
  timed on the whole slot in one call and in 64 MiB chunks (how migration clears lazily);
  each CLEAR sample follows a fresh guest pass so it always has the stated dirtiness;
* ``exact``: whether the log matched the guest's target pages (plus the heartbeat page);
* ``migration`` / ``postcopy_migration``: a running KVM guest migrated between two
  ``livemig vm`` processes, precopy and postcopy (total time, downtime, page requests).

Usage: ``python benchmarks/bench_kvm_dirty_log.py [--size-mib 1024] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from livemig.accel.kvm import guest_program as gp
from livemig.accel.kvm import kvm_available
from livemig.accel.kvm.vm import KvmDirtyLog, KvmVm
from livemig.memory.ram_block import RAMBlock

PAGE = 4096
CHUNK_PAGES = (64 << 20) // PAGE


def dirty_set(words: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(samples_s: list[float], per_gib: float) -> dict:
    ms = [s * 1e3 / per_gib for s in samples_s]
    return {
        "median_ms_per_gib": round(statistics.median(ms), 4),
        "samples": [round(x, 4) for x in ms],
    }


def kvm_migration(postcopy: bool = False) -> dict:
    """A running KVM guest (256 MiB RAM + 2 GiB virtio-mem, 512 MiB plugged, writing 64 MiB
    per second over a 128 MiB working set) migrated over loopback tcp between processes.

    With ``postcopy``, the source switches to postcopy as soon as the migration is active:
    the destination vCPU then faults inside KVM_RUN on pages still missing.
    """
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _vm import MiB, VmProcess, free_port

    port = free_port()
    common = ["--accel", "kvm", "--memory", "256M", "--virtio-mem", "id=vm0,size=2G",
              "--dirty-rate", "64M", "--working-set", "128M"]
    src = VmProcess("src", common)
    dst = VmProcess("dst", [*common, "--incoming", f"tcp:127.0.0.1:{port}"]
                    + ([] if postcopy else ["-S"]), src.dir)
    try:
        if postcopy:
            caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-blocktime")]
            for vm in (src, dst):
                vm("migrate-set-capabilities", capabilities=caps)
        src.plug(512 * MiB)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        if postcopy:
            while src("query-migrate").get("status") == "setup":  # type: ignore[union-attr]
                time.sleep(0.001)
            src("migrate-start-postcopy")
        info = src.wait_migration()
        dinfo = dst("query-migrate")
        if postcopy:
            dst("stop")
        same = src("x-query-guest-checksum") == dst("x-query-guest-checksum")
    finally:
        src.close()
        dst.close()
    out = {
        "status": info["status"],
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "bytes_on_wire": info["ram"]["transferred"],
        "dirty_sync_count": info["ram"]["dirty-sync-count"],
        "discarded_bytes_skipped": info["ram"]["discarded-skipped-bytes"],
    }
    if postcopy:
        dram = dinfo["ram"]  # type: ignore[index]
        out.update({
            "postcopy_requests": info["ram"]["postcopy-requests"],
            "postcopy_discarded_requests": info["ram"]["postcopy-discarded-requests"],
            "request_latency_p50_ms": round(dram["postcopy-latency-p50-us"] / 1000, 3),
            "request_latency_p99_ms": round(dram["postcopy-latency-p99-us"] / 1000, 3),
            "vcpu_blocktime_ms": dram.get("postcopy-vcpu-blocktime"),
            "lost_pages": dram["postcopy-lost-pages"],
        })
    else:  # after postcopy the destination guest ran on: its memory differs, by design
        out["checksums_equal"] = same
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5,
                    help="at least 2: clears alternate between the whole slot and 64 MiB chunks")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.reps < 2:
        ap.error(f"--reps {args.reps}: at least 2 (clears alternate between the two ways)")
    why = kvm_available()
    if why:
        print(json.dumps({"skipped": why}))
        return 0

    size = args.size_mib << 20
    gib = size / (1 << 30)
    block = RAMBlock("bench", size)
    vm = KvmVm()
    vm.add_slot(block, 0)
    layout = gp.load(block, yield_every=0)
    vcpu = vm.create_vcpu()
    gp.prepare_vcpu(vcpu, layout)
    log = KvmDirtyLog(vm)
    npages = size // PAGE
    control_page = layout.control_gpa // PAGE
    first = layout.data_gpa // PAGE
    all_ranges = [(layout.data_gpa, npages - first)]
    ntarget = npages - first
    out: dict = {"slot_gib": gib, "slot_pages": npages, "target_pages_all": ntarget}

    # -- guest write rate -----------------------------------------------------------------
    gp.write_table(block, all_ranges, layout=layout)
    cold = timed(lambda: gp.run_passes(vcpu))
    warm = [timed(lambda: gp.run_passes(vcpu)) for _ in range(2)]
    gp.write_control(block, yield_every=gp.DEFAULT_YIELD_EVERY)
    yielding = [timed(lambda: gp.run_passes(vcpu)) for _ in range(2)]
    gp.write_control(block, yield_every=0)
    out["guest"] = {
        "first_touch_pages_per_s": round(ntarget / cold),
        "warm_pages_per_s": round(ntarget / min(warm)),
        "warm_with_yield_exits_pages_per_s": round(ntarget / min(yielding)),
        "yield_every_pages": gp.DEFAULT_YIELD_EVERY,
        "yield_exits_per_s": round(ntarget / gp.DEFAULT_YIELD_EVERY / min(yielding)),
    }
    assert gp.check_pages(block, all_ranges, gp.read_heartbeat(block)).ok

    exact = True

    def measure(ranges: list[tuple[int, int]]) -> dict:
        nonlocal exact
        gp.write_table(block, ranges, layout=layout)
        expect = np.union1d(gp.pages_of(ranges) // PAGE, [control_page])
        log.start()
        gp.run_passes(vcpu)
        exact &= np.array_equal(dirty_set(log.sync(block)), expect)
        get = [timed(lambda: log.sync(block)) for _ in range(args.reps)]
        whole, chunked = [], []
        for i in range(args.reps):
            gp.run_passes(vcpu)
            log.sync(block)  # CLEAR re-arms only what a sync reported, as in migration
            if i % 2 == 0:
                whole.append(timed(lambda: log.clear(block, 0, npages)))
            else:

                def by_chunks() -> None:
                    for p in range(0, npages, CHUNK_PAGES):
                        log.clear(block, p, min(CHUNK_PAGES, npages - p))

                chunked.append(timed(by_chunks))
            exact &= not log.sync(block).any()
        return {
            "dirty_pages": int(len(expect)),
            "get": summary(get, gib),
            "clear_whole_slot": summary(whole, gib),
            "clear_64mib_chunks": summary(chunked, gib),
        }

    out["all_dirty"] = measure(all_ranges)
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(np.arange(first, npages), size=max(1, npages // 100), replace=False))
    out["one_percent"] = measure([(int(p) * PAGE, 1) for p in pick])

    log.start()  # nothing dirty at all
    out["clean"] = {
        "get": summary([timed(lambda: log.sync(block)) for _ in range(args.reps)], gib),
        "clear_whole_slot": summary(
            [timed(lambda: log.clear(block, 0, npages)) for _ in range(args.reps)], gib
        ),
    }
    out["exact"] = bool(exact)
    vm.close()
    block.close()
    out["migration"] = kvm_migration()
    out["postcopy_migration"] = kvm_migration(postcopy=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
