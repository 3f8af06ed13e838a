"""``livemig demo``: two VM processes on loopback, a live migration, and proof of the promises.

The demo drives both VMs only through their QMP sockets, exactly as a user would, and
checks from the outside:

* the guest's memory checksum on the destination equals the source's at switchover;
* the source's host memory did not grow (no hole and no unplugged block was read) and its
  unplugged ranges hold no allocated block;
* the destination received no page record in unplugged ranges and populated nothing there,
  as its own load measured it before discarding them (``query-migrate``'s
  ``unplugged-pages-received`` and ``unplugged-bytes-populated``), and they hold no
  allocated block afterwards;
* the destination guest keeps running after ``cont``.

Its working directory (QMP sockets, the VMs' logs) is removed when the demo succeeds and
kept, with its path printed, when anything fails. A VM that does not start (a bad option
reaches it as a bad ``livemig vm`` option) is reported with the VM's own message.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.cli.errors import EXIT_FAILED, EXIT_USAGE, CLIError, open_qmp, qmp_call
from livemig.cli.progress import follow_migration
from livemig.cli.sizes import format_bytes, rate_mib, size_arg, size_bytes, size_mib
from livemig.cli.stats import migration_rows, section
from livemig.control.qmp_client import QMPClient

MiB = 1 << 20
BLOCK = 2 * MiB  # the VMs' virtio-mem block size (THP size)
READY = "livemig vm: ready"


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="migrate a live VM between two processes and verify it",
                          description="Start a source and a destination VM, migrate live "
                          "over loopback and verify the result from outside.")
    demo.add_argument("--memory", type=size_mib, default=1 << 30, metavar="SIZE",
                      help="base RAM of each VM, as QEMU's -m: a bare number is MiB (default 1G)")
    demo.add_argument("--virtio-mem-size", type=size_bytes, default=None, metavar="SIZE",
                      help="virtio-mem region, as the device's size property: a bare number "
                      "is bytes (default: 8G for the soft guest, 2G for a KVM guest, which "
                      "must fit below 4 GiB)")
    demo.add_argument("--plugged", type=size_bytes, default=None, metavar="SIZE",
                      help="virtio-mem memory the guest plugs before the migration, as the "
                      "device's requested-size: a bare number is bytes (default: 2G soft, 1G KVM)")
    demo.add_argument("--dirty-rate", type=rate_mib, default=64 << 20, metavar="RATE",
                      help="bytes per second the guest dirties; a bare number is MiB/s "
                      "(default 64M)")
    demo.add_argument("--accel", default="auto", help="soft, kvm or auto (default auto)")
    demo.add_argument("--uri", default=None,
                      help="migration URI (default: tcp on a free loopback port)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=run_demo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_sizes(args: argparse.Namespace) -> None:
    """The sizes the VMs would refuse later, refused now with the demo's option names."""
    if args.plugged % BLOCK or args.plugged <= 0:
        raise CLIError(f"--plugged {format_bytes(args.plugged)}: must be a positive multiple of "
                       f"the {format_bytes(BLOCK)} block size", EXIT_USAGE)
    if args.plugged > args.virtio_mem_size:
        raise CLIError(f"--plugged {format_bytes(args.plugged)}: more than --virtio-mem-size "
                       f"{format_bytes(args.virtio_mem_size)}", EXIT_USAGE)


class _VM:
    """A ``livemig vm`` child with its log; started, waited for, stopped."""

    def __init__(self, name: str, workdir: Path, args: argparse.Namespace, extra: list[str]):
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = workdir / f"{name}.log"
        cmd = [
            sys.executable, "-m", "livemig", "vm", "--name", name, "--qmp", f"unix:{self.qmp_path}",
            "--memory", size_arg(args.memory), "--accel", args.accel,
            "--virtio-mem", f"id=vm0,size={args.virtio_mem_size},requested-size=0",
            "--vcpus", str(args.vcpus),
            "--dirty-rate", "max" if args.dirty_rate < 0 else size_arg(args.dirty_rate),
            "--content", "mixed",
            *(["--working-set", "64M"] if args.accel == "kvm" else []), *extra,
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.client: QMPClient | None = None

    def wait_ready(self, timeout: float = 60) -> QMPClient:
        """Wait for the VM's ready line; if it exits first, fail with its own message."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")
            if READY in text:
                self.client = open_qmp(f"unix:{self.qmp_path}")
                return self.client
            if self.proc.poll() is not None:
                raise CLIError(f"the {self.name} VM did not start: {_vm_message(text)}")
            if time.monotonic() > deadline:
                raise CLIError(f"the {self.name} VM did not get ready in {timeout:.0f} s "
                               f"(log: {self.log})")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.client is not None:
            try:
                self.client.execute("quit")
            except Exception:  # noqa: BLE001 - already gone; the signal below covers it
                pass
            self.client.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def _vm_message(log: str) -> str:
    """The VM's own error line (``livemig vm: ...``), else the last line of its log."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    mine = [ln for ln in lines if ln.startswith("livemig vm:") and READY not in ln]
    line = (mine or lines or ["it exited without a message"])[-1]
    return line.removeprefix("livemig vm:").strip()


def _wait_guest_ready(c: QMPClient, plugged: int, console: Any, timeout: float = 120) -> None:
    with console.status("guest plugs virtio-mem memory and writes its RAM...") as st:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            size = qmp_call(c, "query-memory-devices")[0]["data"]["size"]
            guest = qmp_call(c, "x-query-guest")
            st.update(
                f"guest: {format_bytes(size)} of {format_bytes(plugged)} plugged, "
                f"{format_bytes(guest['pages-written'] * 4096)} written"
            )
            if size == plugged and guest["fill-done"]:
                return
            time.sleep(0.2)
    raise CLIError("the guest did not plug and fill its memory in time")


def _alloc(c: QMPClient) -> dict[str, dict[str, Any]]:
    return {b["id"]: b for b in qmp_call(c, "x-query-ram-allocation")}


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from livemig.machine.factory import resolve as resolve_accel

    console = Console(stderr=args.json)
    try:
        args.accel = resolve_accel(args.accel)
    except ValueError as e:
        raise CLIError(f"--accel: {e}", EXIT_USAGE) from None
    kvm = args.accel == "kvm"
    # A KVM guest runs without paging, so its virtio-mem region must fit below 4 GiB.
    args.virtio_mem_size = args.virtio_mem_size or (2 << 30 if kvm else 8 << 30)
    args.plugged = args.plugged or (1 << 30 if kvm else 2 << 30)
    args.vcpus = 1 if kvm else 2
    _check_sizes(args)
    tmp = Path(tempfile.mkdtemp(prefix="livemig-demo-"))
    ok = kept = False
    vms: list[_VM] = []
    try:
        uri = args.uri or f"tcp:127.0.0.1:{_free_port()}"
        vms.append(_VM("source", tmp, args, []))
        vms.append(_VM("destination", tmp, args, ["--incoming", uri, "-S"]))
        src, dst = (vm.wait_ready() for vm in vms)
        console.print(
            f"[bold]livemig demo[/]: {args.accel} guests, {format_bytes(args.memory)} RAM + "
            f"{format_bytes(args.virtio_mem_size)} virtio-mem; source and destination started"
        )
        ok = _migrate_and_check(src, dst, uri, args, console)
        return 0 if ok else EXIT_FAILED
    except CLIError as e:  # one line: what went wrong, and where to look
        kept = True
        raise CLIError(f"{e}; the VMs' logs are kept in {tmp}", e.code) from None
    finally:
        for vm in vms:
            vm.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not kept:
            print(f"livemig demo: the VMs' logs are kept in {tmp}", file=sys.stderr)


def _migrate_and_check(src: QMPClient, dst: QMPClient, uri: str, args: argparse.Namespace,
                       console: Any) -> bool:
    qmp_call(src, "qom-set", path="vm0", property="requested-size", value=args.plugged)
    _wait_guest_ready(src, args.plugged, console)
    before = _alloc(src)
    qmp_call(src, "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    qmp_call(src, "migrate", uri=uri)
    info = follow_migration(src, f"migrating to {uri}")
    if info["status"] != "completed":
        raise CLIError(f"migration {info['status']}: {info.get('error-desc', 'no reason given')}")
    deadline = time.monotonic() + 30
    while qmp_call(dst, "query-migrate").get("status") != "completed":
        if time.monotonic() > deadline:
            raise CLIError("the destination did not complete the migration in 30 s")
        time.sleep(0.05)
    src_sum = qmp_call(src, "x-query-guest-checksum")["checksum"]
    dst_sum = qmp_call(dst, "x-query-guest-checksum")["checksum"]
    after, dst_alloc = _alloc(src), _alloc(dst)
    dst_ram = qmp_call(dst, "query-migrate").get("ram", {})
    qmp_call(dst, "cont")
    written0 = written1 = qmp_call(dst, "x-query-guest")["pages-written"]
    deadline = time.monotonic() + 5
    while written1 == written0 and args.dirty_rate and time.monotonic() < deadline:
        time.sleep(0.1)  # a KVM guest reports progress once per pass over its table
        written1 = qmp_call(dst, "x-query-guest")["pages-written"]
    checks = {
        "guest checksums equal": src_sum == dst_sum,
        "source memory did not grow": all(
            after[k]["allocated"] <= before[k]["allocated"] for k in before
        ),
        "source unplugged ranges unpopulated": all(
            b.get("allocated-discarded", 0) == 0 for b in after.values()
        ),
        # what the load itself did, before post_load discarded unplugged ranges: no record
        # arrived there and nothing was populated there (the allocation after the load
        # alone could not tell, since post_load discards them anyway)
        "destination received nothing in unplugged ranges": dst_ram.get("unplugged-pages-received") == 0,
        "destination populated nothing in unplugged ranges": (
            dst_ram.get("unplugged-bytes-populated") == 0
            and all(b.get("allocated-discarded", 0) == 0 for b in dst_alloc.values())
        ),
        "destination guest runs after cont": args.dirty_rate == 0 or written1 > written0,
    }
    if args.json:
        print(json.dumps({"query-migrate": info, "checksum": dst_sum, "checks": checks}, indent=2))
    else:
        console.print(section("query-migrate", migration_rows(info)), highlight=False, markup=False)
        console.print(section("x-query-guest-checksum", [("checksum", dst_sum)]),
                      highlight=False, markup=False)
        console.print("checks")
        for name, passed in checks.items():
            console.print(f"  {'[green]✓' if passed else '[red]✗'}[/] {name}")
    return all(checks.values())
