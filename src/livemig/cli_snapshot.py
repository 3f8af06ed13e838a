"""``livemig snapshot`` and ``livemig restore``: background snapshots over QMP.

``livemig snapshot --qmp unix:SOCK FILE`` turns the ``background-snapshot`` capability on
(if it is not), runs ``migrate file:FILE`` with a progress bar, and puts the capability
back as it was: the VM keeps running throughout, and FILE holds the VM as it was when the
command started. A URI (``tcp:``, ``unix:``, ``file:``) may be given instead of a path.

``livemig restore --qmp unix:SOCK FILE`` loads FILE into a VM started with
``livemig vm --incoming defer`` (same memory configuration as the snapshotted VM) through
``migrate-incoming``, with a progress bar over the file's size. ``livemig vm --incoming
file:FILE`` does the same at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

SCHEMES = ("file:", "tcp:", "unix:")


def target_uri(text: str) -> str:
    """A migration URI from a URI or a path (made absolute: the VM may run elsewhere)."""
    if text.startswith(SCHEMES):
        return text
    return "file:" + os.path.abspath(text)


def add_snapshot_commands(sub: Any) -> None:
    snap = sub.add_parser("snapshot", help="save a running VM to a file while it keeps running")
    snap.add_argument("--qmp", required=True, help="unix:PATH of the VM's QMP socket")
    snap.add_argument("target", help="file to write (or a tcp:/unix:/file: URI)")
    snap.add_argument("--json", action="store_true", help="print query-migrate as JSON")
    snap.set_defaults(func=cmd_snapshot)
    rest = sub.add_parser("restore", help="load a snapshot file into a VM started with --incoming defer")
    rest.add_argument("--qmp", required=True, help="unix:PATH of the VM's QMP socket")
    rest.add_argument("source", help="snapshot file (or a file:/tcp:/unix: URI)")
    rest.add_argument("--json", action="store_true", help="print query-migrate as JSON")
    rest.set_defaults(func=cmd_restore)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from livemig.cli import _progress_loop
    from livemig.control.qmp_client import QMPClient, QMPClientError

    uri = target_uri(args.target)
    with QMPClient(args.qmp, timeout=600) as c:
        caps = {e["capability"]: e["state"] for e in c.execute("query-migrate-capabilities")}
        was_on = bool(caps.get("background-snapshot"))
        try:
            if not was_on:
                c.execute("migrate-set-capabilities",
                          capabilities=[{"capability": "background-snapshot", "state": True}])
            c.execute("migrate", uri=uri)
        except QMPClientError as e:
            print(f"livemig snapshot: {e.desc}", file=sys.stderr)
            _restore_cap(c, was_on)
            return 1
        info = _progress_loop(c, f"snapshot → {uri}")
        _restore_cap(c, was_on)
    print(json.dumps(info, indent=2) if args.json else snapshot_summary(info))
    return 0 if info.get("status") == "completed" else 1


def _restore_cap(c: Any, was_on: bool) -> None:
    if was_on:
        return
    try:
        c.execute("migrate-set-capabilities",
                  capabilities=[{"capability": "background-snapshot", "state": False}])
    except Exception:  # noqa: BLE001 - best effort; the VM may be gone
        pass


def snapshot_summary(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    lines = [f"status: {info.get('status')}"]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    for key, label in (("total-time", "total time (ms)"), ("downtime", "guest stopped (ms)")):
        if key in info:
            lines.append(f"{label}: {info[key]}")
    secs = info.get("total-time", 0) / 1000
    if ram.get("transferred") and secs:
        lines.append(f"written: {ram['transferred']} bytes ({ram['transferred'] / secs / 1e9:.2f} GB/s)")
    for key in ("normal", "duplicate", "hole-pages-skipped", "discarded-skipped-bytes",
                "write-protected-bytes", "write-faults", "write-fault-pages"):
        if key in ram:
            lines.append(f"ram {key}: {ram[key]}")
    return "\n".join(lines)


def cmd_restore(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from livemig.control.qmp_client import QMPClient, QMPClientError

    uri = target_uri(args.source)
    size = os.path.getsize(uri[5:]) if uri.startswith("file:") and os.path.exists(uri[5:]) else None
    with QMPClient(args.qmp, timeout=600) as c:
        state = c.execute("query-status")["status"]
        if state != "inmigrate":
            print(f"livemig restore: the VM is '{state}'; start it with --incoming defer",
                  file=sys.stderr)
            return 1
        try:
            c.execute("migrate-incoming", uri=uri)
        except QMPClientError as e:
            print(f"livemig restore: {e.desc}", file=sys.stderr)
            return 1
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      DownloadColumn(binary_units=True), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn()) as progress:
            task = progress.add_task(f"restore ← {uri}", total=size, status="setup")
            while True:
                info = c.execute("query-migrate")
                st = info.get("status", "none")
                progress.update(task, completed=info.get("ram", {}).get("transferred", 0), status=st)
                if st in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.1)
        run = c.execute("query-status")["status"]
    if args.json:
        print(json.dumps({**info, "runstate": run}, indent=2))
    else:
        ram = info.get("ram", {})
        lines = [f"status: {info.get('status')}", f"VM: {run}"]
        if "error-desc" in info:
            lines.append(f"error: {info['error-desc']}")
        if "total-time" in info:
            lines.append(f"total time (ms): {info['total-time']}")
        for key in ("normal", "duplicate"):
            if key in ram:
                lines.append(f"ram {key}: {ram[key]}")
        print("\n".join(lines))
    return 0 if info.get("status") == "completed" else 1
