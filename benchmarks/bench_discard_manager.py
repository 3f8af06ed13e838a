"""Benchmark virtio-mem as a RamDiscardManager and as a plug/unplug device.

Why these numbers matter: the migration source walks the discarded runs of every
virtio-mem region at setup (reference 7.1), so a 1 TiB region with little plugged must be
walked in milliseconds; and plug/unplug throughput bounds how fast a guest can resize.

Run as ``python benchmarks/bench_discard_manager.py``; prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from livemig.devices.virtio_mem import VirtioMem  # noqa: E402
from livemig.devices.virtio_mem_abi import (  # noqa: E402
    REQ_PLUG,
    REQ_UNPLUG,
    RESP_ACK,
    decode_response,
    encode_request,
)
from livemig.memory.discard_manager import Section  # noqa: E402
from livemig.memory.ram_block import RAMBlock  # noqa: E402
from livemig.memory.region import MemoryRegion  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BS = 2 * MiB


def median_ms(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), times


def request(dev: VirtioMem, t: int, block: int, nb: int) -> None:
    resp, _ = decode_response(dev.handle_request(encode_request(t, dev.addr + block * BS, nb)))
    if resp != RESP_ACK:
        raise RuntimeError(f"request {t} at block {block} x{nb} answered {resp}")


def bench_walks(runs: int = 15) -> dict:
    """1 TiB region, 2 MiB blocks, 1% of blocks plugged at random (mostly isolated runs)."""
    blk = RAMBlock("bench-tib", TiB)
    try:
        mr = MemoryRegion("bench-tib", blk, addr=TiB)
        dev = VirtioMem("bench-tib", mr, TiB, BS)
        nb = dev.bitmap.nbits
        rng = np.random.default_rng(42)
        plugged = np.sort(rng.choice(nb, nb // 100, replace=False))
        t = time.perf_counter()
        for b in plugged.tolist():
            request(dev, REQ_PLUG, b, 1)
        plug_setup_s = time.perf_counter() - t
        whole = mr.whole()
        visited = [0]

        def cb(_: Section) -> int:
            visited[0] += 1
            return 0

        def walk(fn: Callable) -> Callable[[], None]:
            def run() -> None:
                visited[0] = 0
                fn(whole, cb)

            return run

        disc_ms, disc_all = median_ms(walk(dev.replay_discarded), runs)
        disc_runs = visited[0]
        pop_ms, _ = median_ms(walk(dev.replay_populated), runs)
        pop_runs = visited[0]
        disc_lists_ms, _ = median_ms(lambda: dev.discarded_runs(whole), runs)
        disc_arrays_ms, _ = median_ms(lambda: dev.run_arrays(whole, False), runs)

        # is_populated: the migration destination asks per faulting host page
        n_q = 20000
        offs = (rng.integers(0, nb, n_q) * BS + rng.integers(0, BS // 4096, n_q) * 4096).tolist()
        secs = [Section(mr, o, 4096) for o in offs]
        t = time.perf_counter()
        hits = sum(dev.is_populated(s) for s in secs)
        small_us = (time.perf_counter() - t) / n_q * 1e6
        whole_ms, _ = median_ms(lambda: dev.is_populated(whole), runs)
        return {
            "region_bytes": TiB,
            "block_size": BS,
            "blocks": nb,
            "plugged_blocks": int(len(plugged)),
            "setup_plug_requests_s": round(plug_setup_s, 3),
            "replay_discarded": {
                "median_ms": round(disc_ms, 3),
                "min_ms": round(min(disc_all), 3),
                "runs_visited": disc_runs,
                "repeats": runs,
            },
            "replay_populated": {
                "median_ms": round(pop_ms, 3),
                "runs_visited": pop_runs,
                "repeats": runs,
            },
            "discarded_runs_lists_ms": round(disc_lists_ms, 3),
            "run_arrays_ms": round(disc_arrays_ms, 3),
            "is_populated": {
                "page_section_us_per_call": round(small_us, 3),
                "page_sections_populated": hits,
                "page_section_calls": n_q,
                "whole_region_ms": round(whole_ms, 3),
            },
        }
    finally:
        blk.close()


def bench_plug_unplug(size: int = 2 * GiB, nb_per_req: int = 1) -> dict:
    """Plug everything, write into every block, unplug everything (host memory freed)."""
    blk = RAMBlock(f"bench-plug-{nb_per_req}", size)
    try:
        mr = MemoryRegion(blk.idstr, blk, addr=4 * GiB)
        dev = VirtioMem(blk.idstr, mr, size, BS)
        nb = dev.bitmap.nbits
        starts = list(range(0, nb, nb_per_req))
        t = time.perf_counter()
        for b in starts:
            request(dev, REQ_PLUG, b, nb_per_req)
        plug_s = time.perf_counter() - t
        t = time.perf_counter()
        blk.pages_array()[:] = 0x5A
        fill_s = time.perf_counter() - t
        allocated_before = blk.allocated_bytes()
        t = time.perf_counter()
        for b in starts:
            request(dev, REQ_UNPLUG, b, nb_per_req)
        unplug_s = time.perf_counter() - t
        allocated_after = blk.allocated_bytes()
        n = len(starts)
        return {
            "region_bytes": size,
            "blocks_per_request": nb_per_req,
            "requests": n,
            "plug_gib_s": round(size / GiB / plug_s, 2),
            "plug_requests_s": round(n / plug_s),
            "fill_gib_s": round(size / GiB / fill_s, 2),
            "unplug_gib_s": round(size / GiB / unplug_s, 2),
            "unplug_requests_s": round(n / unplug_s),
            "allocated_before_unplug": allocated_before,
            "allocated_after_unplug": allocated_after,
        }
    finally:
        blk.close()


def main() -> None:
    t0 = time.perf_counter()
    result = {
        "benchmark": "virtio-mem discard manager",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "walks_1tib_1pct": bench_walks(),
        "plug_unplug_2gib_per_block": bench_plug_unplug(nb_per_req=1),
        "plug_unplug_2gib_128mib_requests": bench_plug_unplug(nb_per_req=64),
    }
    result["total_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
