"""livemig against QEMU on the same machine, in one run (issues 7, 16). Prints a table and JSON.

QEMU is Debian's ``qemu-system-x86`` (``apt-get install qemu-system-x86``), the yardstick;
livemig never depends on it.

(a) throughput. Guest RAM holds RANDOM bytes of random pages then ZERO bytes of zero
    pages (written zeros: both sources must read them). QEMU: a VM paused at start (-S)
    whose RAM is a ``memory-backend-file`` (share=on, ``prealloc=on``) on that content in
    /dev/shm, migrated to a QEMU destination over loopback tcp with 1 channel and with
    ``multifd`` 2. livemig: a VM whose virtio-mem memory is plugged and loaded with the
    same file (QMP ``x-load-memory``), paused, migrated the same two ways. Fair start:
    before the clock starts both sources have every guest page mapped and populated in
    their own address space — QEMU by ``prealloc=on`` (it touches every page of its
    backend at start-up), livemig by writing the content through its mapping — so
    neither takes a page fault to read guest memory during the run; each source's shmem
    RSS at the start and its faults during the run are reported. Every run starts fresh
    processes; engines and channel counts are interleaved, ``--repeats`` times, so that
    the machine's noise (other users, the host) falls on both.
(b) discard. A QEMU TCG Linux guest (Debian's kernel, a busybox initramfs built here that
    loads virtio-mem and onlines hot-plugged memory) with 1 GiB RAM and an 8 GiB virtio-mem
    region, 1 GiB plugged; and a livemig guest of the same shape whose memory holds what
    the QEMU guest's memory held when its migration started (copied from QEMU's shmem
    backing files, holes kept as holes). Both backends are shmem (QEMU: files in /dev/shm,
    share=on; livemig: memfd). Equal liveness: both guests are *paused* (``stop``) right
    before their migrations start — QEMU's Linux guest would otherwise keep running under
    TCG while livemig's copy of its memory has no Linux to run — so both move a still image
    of the same memory (QEMU mapped what its guest touched; livemig wrote the same extents).

Reported per run: total time and downtime (each engine's own query-migrate), bytes on the
wire (``ram.transferred``: main channel and multifd channels), pages read on the source
(livemig's ``pages-read``; for both: minor faults and shmem RSS growth of the source
process — a page read for the first time is a fault, and a read of a shmem hole allocates
it), destination RSS and guest memory allocated there, CPU seconds of both processes,
and whether the destination's memory equals the source's. CPU seconds are also given per
GiB of guest memory (the guest's RAM plus plugged memory: 4 GiB in (a) by default, 2 GiB
in (b)) for each side, since on two shared cores time alone does not show efficiency.

Destination memory: this machine's host backs idle memory lazily (first touch of memory
idle for 10 s costs 0.4-0.8 GB/s). ``--dst-memory warm`` touches and frees memory right
before each destination starts; ``cold`` waits 12 s idle instead; both engines get the
same treatment in every run.

Usage: python benchmarks/vs_qemu.py [--random 2G] [--zero 2G] [--repeats 3]
           [--dst-memory warm|cold|both] [--skip a,b] [--json out.json] [--svg out.svg]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _qemu import (  # noqa: E402
    QemuProcess,
    build_initramfs,
    find_kernel,
    proc_stats,
    qemu_version,
    stats_delta,
    tmpdir,
    wait_for_serial,
    warm_host_memory,
)
from _vm import GiB, VmProcess, free_port  # noqa: E402

from livemig.cli import parse_size  # noqa: E402

SHM = Path("/dev/shm")
COLD_IDLE_S = 12.0
MULTIFD = [{"capability": "multifd", "state": True}]


# -- content ---------------------------------------------------------------------------------
def make_content(path: Path, random_bytes: int, zero_bytes: int) -> None:
    """RANDOM bytes of random data, then ZERO bytes of zeros actually written (allocated)."""
    rng = np.random.default_rng(7)
    chunk = 64 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, random_bytes, chunk):
            n = min(chunk, random_bytes - off)
            os.pwrite(fd, rng.integers(0, 1 << 63, n // 8, dtype=np.int64).tobytes(), off)
        zeros = bytes(chunk)
        for off in range(random_bytes, random_bytes + zero_bytes, chunk):
            n = min(chunk, random_bytes + zero_bytes - off)
            os.pwrite(fd, zeros[:n], off)
    finally:
        os.close(fd)


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy the data extents of ``src`` (holes stay holes); returns bytes copied."""
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    copied = 0
    try:
        size = os.fstat(fi).st_size
        os.ftruncate(fo, size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fi, data, os.SEEK_HOLE)
            off = data
            while off < hole:
                n = os.copy_file_range(fi, fo, hole - off, off, off)
                if n <= 0:
                    break
                off += n
                copied += n
            pos = hole
    finally:
        os.close(fi)
        os.close(fo)
    return copied


def files_equal(a: Path, b: Path, length: int) -> bool:
    """Compare with ``pread`` (reading a shmem hole this way allocates nothing)."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        for off in range(0, length, 64 << 20):
            n = min(64 << 20, length - off)
            if os.pread(fa, n, off) != os.pread(fb, n, off):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def prepare_destination(mode: str) -> float:
    if mode == "warm":
        return warm_host_memory(5 * GiB)
    time.sleep(COLD_IDLE_S)
    return 0.0


# -- one migration, either engine ----------------------------------------------------------------
def _result(engine: str, channels: int, mode: str, info: dict, s0: dict, s1: dict, d1: dict,
            d0: dict, timeline: list, guest_bytes: int) -> dict[str, Any]:
    ram = info.get("ram", {})
    total = info.get("total-time")
    src_d, dst_d = stats_delta(s0, s1), stats_delta(d0, d1)
    src_cpu = src_d["utime_s"] + src_d["stime_s"]
    dst_cpu = dst_d["utime_s"] + dst_d["stime_s"]
    return {
        "engine": engine,
        "channels": channels,
        "dst_memory": mode,
        "status": info.get("status"),
        "error": info.get("error-desc"),
        "total_time_ms": total,
        "downtime_ms": info.get("downtime"),
        "setup_time_ms": info.get("setup-time"),
        "bytes_on_wire": ram.get("transferred"),
        "multifd_bytes": ram.get("multifd-bytes"),
        "GBps": round(ram.get("transferred", 0) / total / 1e6, 3) if total else None,
        "pages_normal": ram.get("normal"),
        "pages_zero": ram.get("duplicate"),
        "src_pages_read": ram.get("pages-read"),  # livemig only: QEMU does not count reads
        "src_minflt": src_d["minflt"],
        "src_shmem_rss_growth": src_d["RssShmem"],
        "src_rss_growth": src_d["VmRSS"],
        "src_shmem_rss_at_start": s0["RssShmem"],
        "src_cpu_s": round(src_cpu, 2),
        "dst_cpu_s": round(dst_cpu, 2),
        "guest_bytes": guest_bytes,
        "src_cpu_s_per_gib": round(src_cpu / (guest_bytes / GiB), 3),
        "dst_cpu_s_per_gib": round(dst_cpu / (guest_bytes / GiB), 3),
        "dst_rss": d1["VmRSS"],
        "dst_shmem_rss": d1["RssShmem"],
        "timeline": timeline,
    }


def _migrate(src: Any, dst: Any, port: int, channels: int, qemu: bool) -> tuple[dict, dict, dict, dict, dict, list]:
    for v in (src, dst):
        if channels > 1:
            v("migrate-set-capabilities", capabilities=MULTIFD)
            v("migrate-set-parameters", **{"multifd-channels": channels})
    if qemu:
        src("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # QEMU's default is 128 MiB/s
    dst("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    s0, d0 = proc_stats(src.pid), proc_stats(dst.pid)
    timeline: list[tuple[float, int]] = []
    src("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(timeline=timeline)
    s1 = proc_stats(src.pid)
    deadline = time.monotonic() + 60
    while dst("query-migrate").get("status") not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.02)
    d1 = proc_stats(dst.pid)
    return info, s0, s1, d0, d1, timeline


class LiveVm(VmProcess):
    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_migration(self, timeout: float = 900, timeline: list | None = None) -> dict:
        t0 = time.monotonic()
        while True:
            info = self("query-migrate")
            if timeline is not None and "ram" in info:  # type: ignore[operator]
                timeline.append((round(time.monotonic() - t0, 3), int(info["ram"]["transferred"])))  # type: ignore[index]
            if info.get("status") in ("completed", "failed", "cancelled"):  # type: ignore[union-attr]
                return info  # type: ignore[return-value]
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("migration did not finish")
            time.sleep(0.02)


def run_qemu_a(img: Path, size: int, channels: int, mode: str, work: Path) -> dict:
    dst_file = SHM / "livemig-vsqemu-qdst.img"
    src_file = SHM / "livemig-vsqemu-qsrc.img"
    common = ["-accel", "tcg", "-machine", "pc", "-m", f"{size >> 20}M", "-machine", "memory-backend=ram0", "-S"]
    # The source's memory is a fresh copy of the content, made right before the run, as
    # livemig's source gets its own by x-load-memory: both engines' sources take their
    # memory from the host at the same moment (which pages a destination gets after the
    # cold pause depends on it). prealloc=on: QEMU maps and populates its whole backend
    # before the clock starts, as livemig's source has its memory written through its
    # mapping.
    shutil.copyfile(img, src_file)
    src = QemuProcess("qsrc", work, [*common, "-object",
                                     f"memory-backend-file,id=ram0,size={size},mem-path={src_file},share=on,"
                                     "prealloc=on"])
    dst = None
    try:
        prepare_destination(mode)
        dst_file.unlink(missing_ok=True)
        dst = QemuProcess("qdst", work, [*common, "-incoming", "defer", "-object",
                                         f"memory-backend-file,id=ram0,size={size},mem-path={dst_file},share=on"])
        info, s0, s1, d0, d1, tl = _migrate(src, dst, free_port(), channels, qemu=True)
        r = _result("qemu", channels, mode, info, s0, s1, d1, d0, tl, size)
        r["src_memory_setup"] = "a fresh copy of the content, memory-backend-file prealloc=on"
        r["dst_guest_ram_allocated"] = allocated(dst_file)
        r["content_equal"] = files_equal(img, dst_file, size)
        return r
    finally:
        src.close()
        if dst is not None:
            dst.close()
        dst_file.unlink(missing_ok=True)
        src_file.unlink(missing_ok=True)


def livemig_args(size: int) -> list[str]:
    return ["--accel", "soft", "--memory", "16M", "--virtio-mem", f"id=vm0,size={size},requested-size=0",
            "--vcpus", "1", "--dirty-rate", "0", "--no-prefill"]


def run_livemig_a(img: Path, size: int, channels: int, mode: str, work: Path) -> dict:
    src = LiveVm("lsrc", livemig_args(size), work)
    dst = None
    try:
        src.plug(size)
        loaded = src("x-load-memory", id="vm0-memdev", path=str(img))
        src("stop")
        prepare_destination(mode)
        dst = LiveVm("ldst", [*livemig_args(size), "--incoming", "defer", "-S"], work)
        info, s0, s1, d0, d1, tl = _migrate(src, dst, free_port(), channels, qemu=False)
        r = _result("livemig", channels, mode, info, s0, s1, d1, d0, tl, size)
        r["src_memory_setup"] = "x-load-memory (written through the mapping)"
        r["dst_guest_ram_allocated"] = sum(b["allocated"] for b in dst("x-query-ram-allocation"))  # type: ignore[union-attr]
        r["content_equal"] = src("x-query-guest-checksum") == dst("x-query-guest-checksum")
        r["loaded"] = loaded
        return r
    finally:
        src.close()
        if dst is not None:
            dst.close()


def scenario_a(args: argparse.Namespace, work: Path) -> dict:
    size = args.random + args.zero
    img = SHM / "livemig-vsqemu-a.img"
    t = time.perf_counter()
    make_content(img, args.random, args.zero)
    runs: list[dict] = []
    configs = [("qemu", 1), ("livemig", 1), ("qemu", 2), ("livemig", 2)]
    modes = ["warm", "cold"] if args.dst_memory == "both" else [args.dst_memory]
    try:
        print(f"(a) content file ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for rep in range(args.repeats):
            order = configs[rep % 4:] + configs[: rep % 4]  # nobody always goes first
            for mode in modes:
                for engine, ch in order:
                    fn = run_qemu_a if engine == "qemu" else run_livemig_a
                    r = fn(img, size, ch, mode, work)
                    r["rep"] = rep
                    runs.append(r)
                    print(f"(a) rep {rep} {mode} {engine:7s} ch={ch}: {r['status']} "
                          f"{r['total_time_ms']} ms, {r['bytes_on_wire']} B", file=sys.stderr)
    finally:
        img.unlink(missing_ok=True)
    return {"random_bytes": args.random, "zero_bytes": args.zero, "runs": runs,
            "summary": summarize(runs, modes)}


def summarize(runs: list[dict], modes: list[str]) -> dict:
    out: dict[str, Any] = {}
    keys = ("total_time_ms", "downtime_ms", "bytes_on_wire", "src_cpu_s", "dst_cpu_s", "dst_rss",
            "dst_guest_ram_allocated", "src_minflt", "src_shmem_rss_growth", "src_pages_read",
            "src_shmem_rss_at_start", "src_cpu_s_per_gib", "dst_cpu_s_per_gib")
    for mode in modes:
        per: dict[str, Any] = {}
        for engine in ("qemu", "livemig"):
            for ch in (1, 2):
                sel = [r for r in runs if r["engine"] == engine and r["channels"] == ch
                       and r["dst_memory"] == mode and r["status"] == "completed"]
                if not sel:
                    continue
                entry = {k: statistics.median(r[k] for r in sel) if sel[0].get(k) is not None else None
                         for k in keys}
                entry["runs"] = len(sel)
                entry["total_time_ms_all"] = [r["total_time_ms"] for r in sel]
                entry["content_equal"] = all(r["content_equal"] for r in sel)
                per[f"{engine}_{'multifd' + str(ch) if ch > 1 else 'single'}"] = entry
        targets: dict[str, Any] = {}
        for ch in ("single", "multifd2"):  # issue 16: equal channel counts, CPU per GiB each side
            q, lm = per.get(f"qemu_{ch}"), per.get(f"livemig_{ch}")
            if not q or not lm:
                continue
            targets[f"{ch}_time_livemig_vs_qemu"] = round(lm["total_time_ms"] / q["total_time_ms"], 3)
            targets[f"{ch}_livemig_no_slower"] = lm["total_time_ms"] <= q["total_time_ms"]
            for side in ("src", "dst"):
                ratio = lm[f"{side}_cpu_s_per_gib"] / max(q[f"{side}_cpu_s_per_gib"], 1e-9)
                targets[f"{ch}_{side}_cpu_per_gib_livemig_vs_qemu"] = round(ratio, 3)
                targets[f"{ch}_{side}_cpu_per_gib_at_most_0.6x"] = ratio <= 0.6
        if targets:
            per["targets"] = targets
        out[mode] = per
    return out


# -- (b) discard ----------------------------------------------------------------------------------
def qemu_b_args(ram: str, vmem: str, kernel: Path, initrd: Path, serial: Path) -> list[str]:
    return ["-accel", "tcg", "-machine", "pc", "-cpu", "max", "-smp", "1", "-m", "1G,maxmem=9G",
            "-object", ram, "-machine", "memory-backend=ram0", "-object", vmem,
            "-device", "virtio-mem-pci,id=vm0,memdev=mem0,requested-size=1G,block-size=2M",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet memhp_default_state=online", "-serial", f"file:{serial}"]


def run_qemu_b(channels: int, kernel: Path, initrd: Path, work: Path, snap: tuple[Path, Path],
               mode: str) -> dict:
    ramf, vmemf = SHM / "livemig-vsqemu-b-ram.img", SHM / "livemig-vsqemu-b-vmem.img"
    for f in (ramf, vmemf):
        f.unlink(missing_ok=True)
    serial = work / "bsrc.serial"
    serial.unlink(missing_ok=True)
    src = QemuProcess("bsrc", work, qemu_b_args(
        f"memory-backend-file,id=ram0,size=1G,mem-path={ramf},share=on",
        f"memory-backend-file,id=mem0,size=8G,mem-path={vmemf},share=on", kernel, initrd, serial))
    dst = None
    try:
        boot_s = wait_for_serial(serial, "LIVEMIG-BENCH: online 16", 300)
        time.sleep(2)
        plugged = src("query-memory-devices")[0]["data"]["size"]
        # what livemig's guest will hold: the QEMU guest's memory as its migration starts
        src("stop")  # equal liveness: both guests paused (docstring)
        snap_bytes = copy_sparse(ramf, snap[0]) + copy_sparse(vmemf, snap[1])
        src_alloc_before = allocated(ramf) + allocated(vmemf)
        prepare_destination(mode)
        dst = QemuProcess("bdst", work, [*qemu_b_args(
            "memory-backend-memfd,id=ram0,size=1G", "memory-backend-memfd,id=mem0,size=8G",
            kernel, initrd, work / "bdst.serial"), "-incoming", "defer"])
        info, s0, s1, d0, d1, tl = _migrate(src, dst, free_port(), channels, qemu=True)
        r = _result("qemu", channels, mode, info, s0, s1, d1, d0, tl, GiB + plugged)
        r.update(boot_s=round(boot_s, 1), plugged=plugged, guest_data_bytes=snap_bytes, guest="paused",
                 dst_guest_ram_allocated=d1["RssShmem"],  # memfd: what QEMU touched is allocated
                 src_guest_ram_allocated_before=src_alloc_before,
                 src_guest_ram_allocated_after=allocated(ramf) + allocated(vmemf))
        return r
    finally:
        src.close()
        if dst is not None:
            dst.close()
        for f in (ramf, vmemf):
            f.unlink(missing_ok=True)


def livemig_b_args() -> list[str]:
    return ["--accel", "soft", "--memory", "1G", "--virtio-mem", "id=vm0,size=8G,requested-size=0,block-size=2M",
            "--vcpus", "1", "--dirty-rate", "0", "--no-prefill"]


def run_livemig_b(channels: int, work: Path, snap: tuple[Path, Path], mode: str) -> dict:
    src = LiveVm("blsrc", livemig_b_args(), work)
    dst = None
    try:
        src.plug(1 * GiB)
        loaded = [src("x-load-memory", id="pc.ram", path=str(snap[0])),
                  src("x-load-memory", id="vm0-memdev", path=str(snap[1]))]
        alloc0 = {b["id"]: b for b in src("x-query-ram-allocation")}  # type: ignore[union-attr]
        src("stop")  # equal liveness: both guests paused (docstring)
        prepare_destination(mode)
        dst = LiveVm("bldst", [*livemig_b_args(), "--incoming", "defer", "-S"], work)
        info, s0, s1, d0, d1, tl = _migrate(src, dst, free_port(), channels, qemu=False)
        r = _result("livemig", channels, mode, info, s0, s1, d1, d0, tl, 2 * GiB)
        r["guest"] = "paused"
        alloc1 = {b["id"]: b for b in src("x-query-ram-allocation")}  # type: ignore[union-attr]
        dalloc = {b["id"]: b for b in dst("x-query-ram-allocation")}  # type: ignore[union-attr]
        r.update(
            loaded=loaded,
            plugged=src("query-memory-devices")[0]["data"]["size"],  # type: ignore[index]
            src_guest_ram_allocated_before=sum(b["allocated"] for b in alloc0.values()),
            src_guest_ram_allocated_after=sum(b["allocated"] for b in alloc1.values()),
            src_unplugged_allocated_after=alloc1["vm0-memdev"]["allocated-discarded"],
            dst_guest_ram_allocated=sum(b["allocated"] for b in dalloc.values()),
            dst_unplugged_allocated=dalloc["vm0-memdev"]["allocated-discarded"],
            discarded_bytes_skipped=info["ram"]["discarded-skipped-bytes"],
            hole_pages_skipped=info["ram"]["hole-pages-skipped"],
            content_equal=src("x-query-guest-checksum") == dst("x-query-guest-checksum"),
        )
        return r
    finally:
        src.close()
        if dst is not None:
            dst.close()


def scenario_b(args: argparse.Namespace, work: Path) -> dict:
    found = find_kernel()
    if found is None:
        return {"skipped": "no kernel: apt-get install linux-image-amd64 busybox-static"}
    kernel, mods = found
    initrd = build_initramfs(work / "initrd.gz", mods)
    snap = (SHM / "livemig-vsqemu-b-snap-ram.img", SHM / "livemig-vsqemu-b-snap-vmem.img")
    runs: list[dict] = []
    try:
        for rep in range(args.repeats_b):
            for ch in (1, 2):
                q = run_qemu_b(ch, kernel, initrd, work, snap, "warm")
                lm = run_livemig_b(ch, work, snap, "warm")
                for r in (q, lm):
                    r["rep"] = rep
                    runs.append(r)
                    print(f"(b) rep {rep} {r['engine']:7s} ch={ch}: {r['status']} {r['total_time_ms']} ms, "
                          f"{r['bytes_on_wire']} B", file=sys.stderr)
    finally:
        for f in snap:
            f.unlink(missing_ok=True)
    summary: dict[str, Any] = {}
    for ch in (1, 2):
        q = [r for r in runs if r["engine"] == "qemu" and r["channels"] == ch and r["status"] == "completed"]
        lm = [r for r in runs if r["engine"] == "livemig" and r["channels"] == ch and r["status"] == "completed"]
        if q and lm:
            qt = statistics.median(r["total_time_ms"] for r in q)
            lt = statistics.median(r["total_time_ms"] for r in lm)
            summary[f"channels_{ch}"] = {
                "guests": "both paused",
                "qemu_time_ms": qt,
                "livemig_time_ms": lt,
                "time_livemig_vs_qemu": round(lt / qt, 3),
                "livemig_at_most_0.3x_qemu_time": lt <= 0.3 * qt,
                "qemu_bytes": statistics.median(r["bytes_on_wire"] for r in q),
                "livemig_bytes": statistics.median(r["bytes_on_wire"] for r in lm),
                "livemig_sends_no_more_bytes": max(r["bytes_on_wire"] for r in lm)
                <= min(r["bytes_on_wire"] for r in q),
                "livemig_reads_no_discarded_page": all(r["src_unplugged_allocated_after"] == 0 for r in lm),
                "livemig_source_grew_bytes": max(r["src_guest_ram_allocated_after"]
                                                 - r["src_guest_ram_allocated_before"] for r in lm),
                "qemu_source_grew_bytes": max(r["src_guest_ram_allocated_after"]
                                              - r["src_guest_ram_allocated_before"] for r in q),
            }
    return {"kernel": str(kernel), "runs": runs, "summary": summary}


# -- output ------------------------------------------------------------------------------------------
def _mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e6:.0f}"


def table(out: dict) -> str:
    rows = [("scenario", "engine", "ch", "dst mem", "total ms", "downtime ms", "wire MB", "src shmem MB",
             "src faults", "src shmem +MB", "src read pg", "dst RSS MB", "dst alloc MB", "cpu s src/dst",
             "cpu s/GiB src/dst", "equal")]
    for name in ("a_throughput", "b_discard"):
        for r in out.get(name, {}).get("runs", []):
            mb = 1e6
            rows.append((name[0], r["engine"], str(r["channels"]), r["dst_memory"], str(r["total_time_ms"]),
                         str(r["downtime_ms"]), f"{(r['bytes_on_wire'] or 0) / mb:.1f}",
                         f"{r['src_shmem_rss_at_start'] / mb:.0f}", str(r["src_minflt"]),
                         f"{r['src_shmem_rss_growth'] / mb:.1f}", str(r.get("src_pages_read", "-")),
                         f"{r['dst_rss'] / mb:.0f}", _mb(r.get("dst_guest_ram_allocated")),
                         f"{r['src_cpu_s']}/{r['dst_cpu_s']}",
                         f"{r['src_cpu_s_per_gib']}/{r['dst_cpu_s_per_gib']}", str(r.get("content_equal", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def svg_timelines(out: dict, path: Path) -> None:
    """Bytes sent over time for the median-ish run of each (a) configuration (warm)."""
    runs = [r for r in out.get("a_throughput", {}).get("runs", []) if r["status"] == "completed"]
    if not runs:
        return
    colors = {("qemu", 1): "#c44", ("qemu", 2): "#e99", ("livemig", 1): "#36c", ("livemig", 2): "#8ad"}
    chosen = []
    for key in colors:
        sel = sorted((r for r in runs if (r["engine"], r["channels"]) == key and r["dst_memory"] == runs[0]["dst_memory"]),
                     key=lambda r: r["total_time_ms"])
        if sel:
            chosen.append((key, sel[len(sel) // 2]))
    tmax = max(r["total_time_ms"] for _, r in chosen) / 1000 * 1.05
    bmax = max(r["bytes_on_wire"] for _, r in chosen) * 1.05
    w, h, m = 720, 400, 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - 10}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{m}" y2="10" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">seconds (median run of each)</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">GB sent</text>']
    for i in range(6):
        x = m + (w - m - 10) * i / 5
        parts.append(f'<text x="{x}" y="{h - m + 15}" text-anchor="middle">{tmax * i / 5:.1f}</text>')
        y = h - m - (h - m - 10) * i / 5
        parts.append(f'<text x="{m - 5}" y="{y + 4}" text-anchor="end">{bmax * i / 5 / 1e9:.1f}</text>')
    for k, ((engine, ch), r) in enumerate(chosen):
        pts = [(0.0, 0)] + [(t, b) for t, b in r["timeline"]] + [(r["total_time_ms"] / 1000, r["bytes_on_wire"])]
        xy = " ".join(f"{m + (w - m - 10) * t / tmax:.1f},{h - m - (h - m - 10) * b / bmax:.1f}" for t, b in pts)
        parts.append(f'<polyline fill="none" stroke="{colors[(engine, ch)]}" stroke-width="2" points="{xy}"/>')
        label = f"{engine} {'multifd ' + str(ch) if ch > 1 else '1 channel'}: {r['total_time_ms']} ms"
        parts.append(f'<text x="{m + 10}" y="{20 + 16 * k}" fill="{colors[(engine, ch)]}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random", type=parse_size, default=2 * GiB)
    p.add_argument("--zero", type=parse_size, default=2 * GiB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-b", type=int, default=1)
    p.add_argument("--dst-memory", choices=("warm", "cold", "both"), default="warm")
    p.add_argument("--skip", default="")
    p.add_argument("--json", type=Path)
    p.add_argument("--svg", type=Path)
    args = p.parse_args()
    version = qemu_version()
    if version is None:
        sys.exit("qemu-system-x86_64 not found: apt-get update && apt-get install -y qemu-system-x86")
    skip = set(args.skip.split(","))
    work = tmpdir()
    out: dict[str, Any] = {"qemu": version, "machine": {"cpus": os.cpu_count(),
                                                       "load_avg_at_start": os.getloadavg()}}
    if "a" not in skip:
        out["a_throughput"] = scenario_a(args, work)
    if "b" not in skip:
        out["b_discard"] = scenario_b(args, work)
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    print(table(out))
    slim = json.loads(json.dumps(out))
    for name in ("a_throughput", "b_discard"):
        for r in slim.get(name, {}).get("runs", []):
            r.pop("timeline", None)
    print(json.dumps({k: v for k, v in slim.items()}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.svg:
        svg_timelines(out, args.svg)


if __name__ == "__main__":
    main()
