"""``livemig demo``: two VM processes on loopback, a live migration, and proof of the promises.

The demo drives both VMs only through their QMP sockets, exactly as a user would, and
checks from the outside:

* the guest's memory checksum on the destination equals the source's at switchover;
* the source's host memory did not grow (no hole and no unplugged block was read) and its
  unplugged ranges hold no allocated block;
* the destination's unplugged ranges hold no allocated block (nothing populated there);
* the destination guest keeps running after ``cont``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from livemig.cli import _progress_loop
from livemig.control.qmp_client import QMPClient
from livemig.machine.factory import resolve as resolve_accel

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm(name: str, qmp: Path, args: argparse.Namespace, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "livemig", "vm", "--name", name, "--qmp", f"unix:{qmp}",
        "--memory", str(args.memory), "--accel", args.accel,
        "--virtio-mem", f"id=vm0,size={args.virtio_mem_size},requested-size=0",
        "--vcpus", str(args.vcpus), "--dirty-rate", str(args.dirty_rate), "--content", "mixed",
        *(["--working-set", "64M"] if args.accel == "kvm" else []), *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_guest_ready(c: QMPClient, plugged: int, console: Console, timeout: float = 120) -> None:
    with console.status("guest plugs virtio-mem memory and writes its RAM...") as st:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            size = c.execute("query-memory-devices")[0]["data"]["size"]
            guest = c.execute("x-query-guest")
            st.update(
                f"guest: {size >> 20} MiB of {plugged >> 20} MiB plugged, "
                f"{guest['pages-written'] * 4096 >> 20} MiB written"
            )
            if size == plugged and guest["fill-done"]:
                return
            time.sleep(0.2)
    raise TimeoutError("the guest did not plug and fill its memory in time")


def _alloc(c: QMPClient) -> dict[str, dict[str, Any]]:
    return {b["id"]: b for b in c.execute("x-query-ram-allocation")}


def run_demo(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json)
    args.accel = resolve_accel(args.accel)
    kvm = args.accel == "kvm"
    # A KVM guest runs without paging, so its virtio-mem region must fit below 4 GiB.
    args.virtio_mem_size = args.virtio_mem_size or (2 << 30 if kvm else 8 << 30)
    args.plugged = args.plugged or (1 << 30 if kvm else 2 << 30)
    args.vcpus = 1 if kvm else 2
    tmp = Path(tempfile.mkdtemp(prefix="livemig-demo-"))
    uri = args.uri or f"tcp:127.0.0.1:{_free_port()}"
    src_qmp, dst_qmp = tmp / "src.qmp", tmp / "dst.qmp"
    procs = [
        _vm("source", src_qmp, args, [], tmp / "source.log"),
        _vm("destination", dst_qmp, args, ["--incoming", uri, "-S"], tmp / "destination.log"),
    ]
    try:
        src, dst = QMPClient(str(src_qmp)), QMPClient(str(dst_qmp))
        console.print(
            f"[bold]livemig demo[/]: {args.accel} guests, {args.memory >> 20} MiB RAM + "
            f"{args.virtio_mem_size >> 30} GiB virtio-mem; source and destination started ({tmp})"
        )
        src.execute("qom-set", path="vm0", property="requested-size", value=args.plugged)
        _wait_guest_ready(src, args.plugged, console)
        before = _alloc(src)
        src.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        src.execute("migrate", uri=uri)
        info = _progress_loop(src, f"migrating to {uri}")
        if info["status"] != "completed":
            console.print(f"[red]migration {info['status']}: {info.get('error-desc')}[/]")
            return 1
        deadline = time.monotonic() + 30
        while dst.execute("query-migrate").get("status") != "completed":
            if time.monotonic() > deadline:
                raise TimeoutError("destination did not complete")
            time.sleep(0.05)
        src_sum = src.execute("x-query-guest-checksum")["checksum"]
        dst_sum = dst.execute("x-query-guest-checksum")["checksum"]
        after, dst_alloc = _alloc(src), _alloc(dst)
        dst.execute("cont")
        written0 = written1 = dst.execute("x-query-guest")["pages-written"]
        deadline = time.monotonic() + 5
        while written1 == written0 and args.dirty_rate and time.monotonic() < deadline:
            time.sleep(0.1)  # a KVM guest reports progress once per pass over its table
            written1 = dst.execute("x-query-guest")["pages-written"]
        checks = {
            "guest checksums equal": src_sum == dst_sum,
            "source memory did not grow": all(
                after[k]["allocated"] <= before[k]["allocated"] for k in before
            ),
            "source unplugged ranges unpopulated": all(
                b.get("allocated-discarded", 0) == 0 for b in after.values()
            ),
            "destination unplugged ranges unpopulated": all(
                b.get("allocated-discarded", 0) == 0 for b in dst_alloc.values()
            ),
            "destination guest runs after cont": args.dirty_rate == 0 or written1 > written0,
        }
        ram = info["ram"]
        summary = {
            "total-time-ms": info["total-time"],
            "downtime-ms": info["downtime"],
            "setup-time-ms": info["setup-time"],
            "bytes-sent": ram["transferred"],
            "pages-zero": ram["duplicate"],
            "pages-normal": ram["normal"],
            "discarded-bytes-skipped": ram["discarded-skipped-bytes"],
            "hole-pages-skipped": ram["hole-pages-skipped"],
            "pages-read-on-source": ram["pages-read"],
            "dirty-sync-count": ram["dirty-sync-count"],
            "throughput-mbps": ram["mbps"],
            "checksum": dst_sum,
            "checks": checks,
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            table = Table(title="migration summary")
            table.add_column("what")
            table.add_column("value", justify="right")
            for key, value in summary.items():
                if key != "checks":
                    table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
            console.print(table)
            for name, ok in checks.items():
                console.print(f"  {'[green]✓' if ok else '[red]✗'}[/] {name}")
        for c in (src, dst):
            c.execute("quit")
            c.close()
        return 0 if all(checks.values()) else 1
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
