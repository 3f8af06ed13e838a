"""``livemig snapshot`` and ``livemig restore``: background snapshots over QMP.

``livemig snapshot --qmp unix:SOCK FILE`` turns the ``background-snapshot`` capability on
(if it is not), runs ``migrate file:FILE`` with a progress bar, and puts the capability
back as it was: the VM keeps running throughout, and FILE holds the VM as it was when the
command started. A URI (``tcp:``, ``unix:``, ``file:``) may be given instead of a path.
Ctrl-C asks the VM to cancel the snapshot.

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
from typing import Any

from livemig.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, CLIError, open_qmp, qmp_call
from livemig.cli.migrate import qmp_subcommand
from livemig.cli.progress import cancel_after_interrupt, follow_migration, follow_restore
from livemig.cli.stats import migration_rows, section
from livemig.control.qmp_client import QMPClient, QMPClientError, QMPConnectError

SCHEMES = ("file:", "tcp:", "unix:")


def target_uri(text: str) -> str:
    """A migration URI from a URI or a path (made absolute: the VM may run elsewhere)."""
    if text.startswith(SCHEMES):
        return text
    return "file:" + os.path.abspath(text)


def add_parsers(sub: Any) -> None:
    qmp_subcommand(sub, "snapshot", cmd_snapshot, help="save a running VM to a file while it keeps running",
                   description="Save a running VM to a file while it keeps running "
                   "(background-snapshot); Ctrl-C asks the VM to cancel.",
                   operand=("target", "file to write (or a tcp:/unix:/file: URI)"))
    qmp_subcommand(sub, "restore", cmd_restore,
                   help="load a snapshot file into a VM started with --incoming defer",
                   description="Load a snapshot file into a VM started with livemig vm --incoming defer.",
                   operand=("source", "snapshot file (or a file:/tcp:/unix: URI)"))


def cmd_snapshot(args: argparse.Namespace) -> int:
    uri = target_uri(args.target)
    with open_qmp(args.qmp, timeout=600) as c:
        caps = {e["capability"]: e["state"] for e in qmp_call(c, "query-migrate-capabilities")}
        was_on = bool(caps.get("background-snapshot"))
        try:
            if not was_on:
                qmp_call(c, "migrate-set-capabilities",
                         capabilities=[{"capability": "background-snapshot", "state": True}])
            qmp_call(c, "migrate", uri=uri)
            info = follow_migration(c, f"snapshot → {uri}")
        except KeyboardInterrupt:
            code = cancel_after_interrupt("livemig snapshot", args.qmp, "snapshot")
            _restore_cap_after_interrupt(args.qmp, was_on)
            return code
        except CLIError:
            _restore_cap(c, was_on)
            raise
        _restore_cap(c, was_on)
    print(json.dumps(info, indent=2) if args.json else section("query-migrate", migration_rows(info)))
    if info.get("status") != "completed":
        print(f"livemig snapshot: snapshot {info.get('status')}: "
              f"{info.get('error-desc', 'no reason given')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _restore_cap(c: QMPClient, was_on: bool) -> None:
    if was_on:
        return
    try:
        c.execute("migrate-set-capabilities",
                  capabilities=[{"capability": "background-snapshot", "state": False}])
    except (QMPClientError, QMPConnectError):  # best effort; the VM may be gone
        pass


def _restore_cap_after_interrupt(address: str, was_on: bool) -> None:
    try:
        with open_qmp(address, timeout=10) as c:
            _restore_cap(c, was_on)
    except CLIError:
        pass


def cmd_restore(args: argparse.Namespace) -> int:
    uri = target_uri(args.source)
    path = uri[5:] if uri.startswith("file:") else None
    size = os.path.getsize(path) if path and os.path.isfile(path) else None
    with open_qmp(args.qmp, timeout=600) as c:
        state = qmp_call(c, "query-status")["status"]
        if state != "inmigrate":
            raise CLIError(f"the VM is '{state}'; start it with --incoming defer")
        qmp_call(c, "migrate-incoming", uri=uri)
        try:
            info = follow_restore(c, f"restore ← {uri}", size)
        except KeyboardInterrupt:
            print(f"livemig restore: interrupted; the VM goes on loading {uri} "
                  "(see livemig info)", file=sys.stderr)
            return EXIT_INTERRUPTED
        status = qmp_call(c, "query-status")
    if args.json:
        print(json.dumps({"query-migrate": info, "query-status": status}, indent=2))
    else:
        print(section("query-migrate", migration_rows(info)))
        print(section("query-status", [("status", status["status"]),
                                       ("running", str(status["running"]).lower())]))
    if info.get("status") != "completed":
        print(f"livemig restore: restore {info.get('status')}: "
              f"{info.get('error-desc', 'no reason given')}", file=sys.stderr)
        return EXIT_FAILED
    return 0
