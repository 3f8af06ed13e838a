"""Memory that need not move: cpr-transfer against a normal migration, and mapped-ram
save/restore and instant restore against a normal stream file (and QEMU's own file
save/restore where this QEMU has one). Prints JSON (issue 15).

(1) VMM update on the same host. A running soft-guest VM (64 MiB base RAM, an 8 GiB
    virtio-mem region with PLUGGED bytes plugged, DATA bytes of it holding data: half
    random, half written zeros, loaded with ``x-load-memory``; the guest keeps writing
    16 MiB/s into 64 MiB) moves to a new ``livemig vm`` process, once by ``cpr-transfer``
    (memfds over a unix socket) and once by a normal precopy migration over loopback tcp.
    Reported: total time (the source's ``total-time``), downtime (the source's, QEMU's
    definition: stop until the destination said it loaded), guest pause (the source's
    STOP event to the destination's RESUME event, both processes' wall clocks), bytes on
    the main channel, CPU seconds of both processes, and CPU seconds per GiB plugged.
(2) Save and restore, 1 GiB plugged (512 MiB random, 512 MiB zeros) of 8 GiB: a normal
    stream file, mapped-ram with 1 and 2 channels, and instant restore (mapped-ram +
    postcopy-ram on the destination); also instant restore of 6 GiB plugged. Reported:
    save time, file size and allocated bytes, restore time until the guest runs and
    until the restore is complete, CPU seconds per GiB. QEMU (Debian's 7.2 here) has no
    ``file:`` URI and no mapped-ram: its row is ``exec:cat > FILE`` / ``exec:cat FILE``
    of a VM whose 1 GiB RAM holds the same bytes (a shmem memory-backend-file).

The machine is shared and noisy: compare within one run.

Usage: python benchmarks/bench_local_update.py [--sizes 1G,6G] [--data 1G] [--skip qemu]
           [--repeats N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _qemu import QemuProcess, proc_stats, qemu_version, stats_delta  # noqa: E402
from _vm import GiB, VmProcess, free_port  # noqa: E402
from vs_qemu import make_content  # noqa: E402

from livemig.cli import parse_size  # noqa: E402
from livemig.control.qmp_client import QMPClient  # noqa: E402

SHM = Path("/dev/shm")
REGION = 8 * GiB


def vm_args(plugged: int) -> list[str]:
    return ["--accel", "soft", "--memory", "64M", "--virtio-mem", f"id=vm0,size={REGION},block-size=2M",
            "--vcpus", "1", "--no-prefill", "--working-set", "64M", "--content", "mixed"]


def ts(event: dict) -> float:
    t = event["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


def last_event(client: Any, name: str) -> float | None:
    found = [ts(e) for e in client.events if e.get("event") == name]
    return found[-1] if found else None


def cpu(s0: dict, s1: dict) -> float:
    d = stats_delta(s0, s1)
    return round(float(d["utime_s"]) + float(d["stime_s"]), 3)


class Watcher:
    """Connects to a VM's QMP socket as soon as it appears and keeps reading events."""

    def __init__(self, path: Path):
        self.path = path
        self.client: QMPClient | None = None
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(0.0005)
        if self.stop.is_set():
            return
        self.client = QMPClient(str(self.path), timeout=60, connect_timeout=30)
        while not self.stop.is_set():
            try:
                self.client.execute("query-status")
            except Exception:  # noqa: BLE001 - the VM went away
                return
            time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)


def source(work: Path, name: str, plugged: int, data: Path, data_bytes: int, dirty: str = "16M") -> VmProcess:
    src = VmProcess(name, [*vm_args(plugged), "--dirty-rate", dirty], work)
    src.plug(plugged)
    src("x-load-memory", id="vm0-memdev", path=str(data), size=data_bytes)
    return src


# -- (1) VMM update ---------------------------------------------------------------------------
def update(work: Path, plugged: int, data: Path, data_bytes: int, mode: str) -> dict[str, Any]:
    src = source(work, f"u{mode}", plugged, data, data_bytes)
    qmp_path = work / f"u{mode}-dst.qmp"
    watcher = None
    dst_proc = None
    try:
        if mode == "cpr-transfer":
            main, cpr = work / "u-main.sock", work / "u-cpr.sock"
            cpr_opt = json.dumps({"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}})
            import subprocess

            watcher = Watcher(qmp_path)
            dst_proc = subprocess.Popen([sys.executable, "-m", "livemig", "vm", "--name", "udst", "--qmp",
                                         f"unix:{qmp_path}", *vm_args(plugged), "--dirty-rate", "16M",
                                         "--incoming", f"unix:{main}", "--incoming", cpr_opt],
                                        stdout=subprocess.DEVNULL)  # fmt: skip
            while not cpr.exists():
                time.sleep(0.01)
            dst_pid = dst_proc.pid
            s0, d0 = proc_stats(src.proc.pid), proc_stats(dst_pid)  # the new process waits, started
            src("migrate-set-parameters", mode="cpr-transfer")
            src("migrate", channels=[
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}}])
        else:
            port = free_port()
            dst = VmProcess("udst", [*vm_args(plugged), "--dirty-rate", "16M", "--incoming", f"tcp:127.0.0.1:{port}"], work)
            dst("query-status")
            dst_proc, dst_pid = dst.proc, dst.proc.pid
            s0, d0 = proc_stats(src.proc.pid), proc_stats(dst_pid)
            src("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration()
        s1 = proc_stats(src.proc.pid)
        client = watcher.client if watcher is not None else dst.qmp
        deadline = time.monotonic() + 30
        resume = None
        while time.monotonic() < deadline:
            if client is not None:
                if watcher is None:
                    client.execute("query-status")
                resume = last_event(client, "RESUME")
                if resume is not None:
                    break
            time.sleep(0.01)
        d1 = proc_stats(dst_pid)
        stop = last_event(src.qmp, "STOP")
        if stop is None:
            src("query-status")
            stop = last_event(src.qmp, "STOP")
        c = cpu(s0, s1) + cpu(d0, d1)
        return {
            "mode": mode, "plugged": plugged, "data": data_bytes, "status": info["status"],
            "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "pause_ms": round((resume - stop) * 1000, 1) if resume and stop else None,
            "main_channel_bytes": info["ram"]["transferred"] - info["ram"].get("multifd-bytes", 0),
            "cpu_s": round(c, 3), "cpu_s_per_gib_plugged": round(c / (plugged / GiB), 3),
        }  # fmt: skip
    finally:
        if watcher is not None:
            watcher.close()
            if watcher.client is not None:
                try:
                    watcher.client.execute("quit")
                except Exception:  # noqa: BLE001
                    pass
        elif dst_proc is not None:
            try:
                dst.close()
            except Exception:  # noqa: BLE001
                pass
        if dst_proc is not None:
            try:
                dst_proc.wait(30)
            except Exception:  # noqa: BLE001
                dst_proc.kill()
        src.close()


# -- (2) save and restore ---------------------------------------------------------------------
CAPS = {
    "stream": [],
    "mapped-ram-1": ["mapped-ram"],
    "mapped-ram-2": ["mapped-ram", "multifd"],
    "instant": ["mapped-ram", "postcopy-ram"],
}


def save_restore(work: Path, plugged: int, data: Path, data_bytes: int, kind: str, save_caps: list[str]) -> dict[str, Any]:
    path = work / f"{kind}.img"
    path.unlink(missing_ok=True)
    src = source(work, f"s{kind}", plugged, data, data_bytes, dirty="0")
    try:
        src("stop")
        if save_caps:
            src("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in save_caps])
            src("migrate-set-parameters", **{"multifd-channels": 2})
        s0 = proc_stats(src.proc.pid)
        src("migrate", uri=f"file:{path}")
        info = src.wait_migration()
        s1 = proc_stats(src.proc.pid)
        want = src("x-query-guest-checksum")
    finally:
        src.close()
    st = os.stat(path)
    dst = VmProcess(f"r{kind}", [*vm_args(plugged), "--dirty-rate", "0", "--incoming", "defer"], work)
    try:
        if CAPS[kind]:
            dst("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in CAPS[kind]])
            dst("migrate-set-parameters", **{"multifd-channels": 2})
        d0 = proc_stats(dst.proc.pid)
        t0 = time.time()
        dst("migrate-incoming", uri=f"file:{path}")
        rinfo = dst.wait_migration()
        t_done = time.time()
        d1 = proc_stats(dst.proc.pid)
        dst("query-status")
        resume = last_event(dst.qmp, "RESUME")
        dst("stop")
        same = dst("x-query-guest-checksum") == want
    finally:
        dst.close()
        path.unlink(missing_ok=True)
    gib = plugged / GiB
    return {
        "kind": kind, "plugged": plugged, "data": data_bytes, "status": rinfo["status"],
        "save_ms": info.get("total-time"), "save_cpu_s_per_gib": round(cpu(s0, s1) / gib, 3),
        "file_size": st.st_size, "file_allocated": st.st_blocks * 512,
        "restore_running_ms": round((resume - t0) * 1000, 1) if resume else None,
        "restore_complete_ms": round((t_done - t0) * 1000, 1),
        "restore_cpu_s_per_gib": round(cpu(d0, d1) / gib, 3),
        "restore_guest_running_ms_reported": rinfo.get("ram", {}).get("restore-guest-running-ms"),
        "checksum_equal": same,
    }  # fmt: skip


def qemu_file(work: Path, data: Path, size: int) -> dict[str, Any]:
    """QEMU's save/restore of the same bytes: exec:cat (7.2 has no file: URI)."""
    img = SHM / "livemig-bench-lu-qsrc.img"
    dst_img = SHM / "livemig-bench-lu-qdst.img"
    path = work / "qemu.stream"
    os.system(f"cp --sparse=always {data} {img}")  # noqa: S605 - fixed paths of this script
    common = ["-accel", "tcg", "-machine", "pc", "-m", f"{size >> 20}M", "-machine", "memory-backend=ram0", "-S"]
    src = QemuProcess("qlu-src", work, [*common, "-object", f"memory-backend-file,id=ram0,size={size},mem-path={img},share=on"])
    try:
        src("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        s0 = proc_stats(src.pid)
        src("migrate", uri=f"exec:cat > {path}")
        info = src.wait_migration()
        s1 = proc_stats(src.pid)
    finally:
        src.close()
        img.unlink(missing_ok=True)
    dst = QemuProcess("qlu-dst", work, [*common, "-incoming", "defer", "-object",
                                        f"memory-backend-file,id=ram0,size={size},mem-path={dst_img},share=on"])  # fmt: skip
    try:
        d0 = proc_stats(dst.pid)
        t0 = time.time()
        dst("migrate-incoming", uri=f"exec:cat {path}")
        rinfo = dst.wait_migration()
        t_done = time.time()
        d1 = proc_stats(dst.pid)
    finally:
        dst.close()
        dst_img.unlink(missing_ok=True)
    st = os.stat(path)
    path.unlink(missing_ok=True)
    gib = size / GiB
    return {
        "kind": "qemu-exec-cat", "qemu": qemu_version(), "status": rinfo["status"],
        "save_ms": info.get("total-time"), "save_cpu_s_per_gib": round(cpu(s0, s1) / gib, 3),
        "file_size": st.st_size, "file_allocated": st.st_blocks * 512,
        "restore_complete_ms": round((t_done - t0) * 1000, 1),
        "restore_cpu_s_per_gib": round(cpu(d0, d1) / gib, 3),
        "note": "this QEMU has no file: URI and no mapped-ram capability (QEMU 9); exec:cat instead",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1G,6G", help="plugged sizes for the VMM update")
    ap.add_argument("--data", type=parse_size, default=1 * GiB, help="bytes of data in guest memory (at most)")
    ap.add_argument("--skip", default="", help="comma list of: update, file, qemu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"livemig-bench-lu-{os.getpid()}"
    work.mkdir(parents=True)
    data = SHM / "livemig-bench-lu-data.img"
    make_content(data, args.data // 2, args.data - args.data // 2)
    out: dict[str, Any] = {"data_bytes": args.data, "update": [], "file": [], "qemu": None}
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
        for _ in range(args.repeats):
            if "update" not in skip:
                for plugged in sizes:
                    for mode in ("cpr-transfer", "normal"):
                        out["update"].append(update(work, plugged, data, min(plugged, args.data), mode))
                        print(json.dumps(out["update"][-1]), file=sys.stderr)
            if "file" not in skip:
                for kind, save_caps in (("stream", []), ("mapped-ram-1", ["mapped-ram"]),
                                        ("mapped-ram-2", ["mapped-ram", "multifd"]), ("instant", ["mapped-ram"])):
                    out["file"].append(save_restore(work, 1 * GiB, data, args.data, kind, save_caps))
                    print(json.dumps(out["file"][-1]), file=sys.stderr)
                r = save_restore(work, 6 * GiB, data, args.data, "instant", ["mapped-ram"])
                out["file"].append(r)
                print(json.dumps(r), file=sys.stderr)
        if "qemu" not in skip and qemu_version() is not None:
            out["qemu"] = qemu_file(work, data, args.data)
    finally:
        data.unlink(missing_ok=True)
    ratios: dict[str, Any] = {}
    for p in {u["plugged"] for u in out["update"]}:
        cpr = [u for u in out["update"] if u["plugged"] == p and u["mode"] == "cpr-transfer"]
        nor = [u for u in out["update"] if u["plugged"] == p and u["mode"] == "normal"]
        if cpr and nor and cpr[0]["pause_ms"] and nor[0]["pause_ms"]:
            ratios[f"pause normal/cpr {p >> 30}G"] = round(nor[0]["pause_ms"] / cpr[0]["pause_ms"], 1)
            ratios[f"total normal/cpr {p >> 30}G"] = round(nor[0]["total_ms"] / max(cpr[0]["total_ms"], 1), 1)
    out["ratios"] = ratios
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
