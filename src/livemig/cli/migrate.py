"""``livemig migrate`` and ``livemig info``: a running VM, through its QMP socket."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from livemig.cli.errors import EXIT_FAILED, EXIT_USAGE, CLIError, open_qmp, qmp_call
from livemig.cli.progress import cancel_after_interrupt, follow_migration
from livemig.cli.sizes import format_bytes, size_mib
from livemig.cli.stats import migration_rows, section

QMP_HELP = "the VM's QMP address: unix:PATH (or a plain path) or tcp:HOST:PORT"


def qmp_subcommand(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
                   description: str, operand: tuple[str, str] | None = None,
                   json_help: str = "print query-migrate as JSON") -> argparse.ArgumentParser:
    """A subcommand that drives a running VM through its QMP socket: ``--qmp ADDRESS``
    (required), an optional positional ``operand`` (name, help) and ``--json``, the same
    way for every such command; the caller adds its own options to the parser returned."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--qmp", required=True, metavar="ADDRESS", help=QMP_HELP)
    if operand is not None:
        p.add_argument(operand[0], help=operand[1])
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=func)
    return p


def add_parsers(sub: Any) -> None:
    mig = qmp_subcommand(sub, "migrate", cmd_migrate, help="migrate a running VM (via its QMP socket)",
                         description="Migrate a running VM to URI with a progress bar; "
                         "Ctrl-C asks the VM to cancel the migration.",
                         operand=("uri", "where to: tcp:HOST:PORT, unix:PATH or file:PATH"))
    mig.add_argument("--max-bandwidth", type=size_mib, metavar="RATE",
                     help="bytes per second, e.g. 100M; a bare number is MiB/s, as in QEMU's "
                     "migrate_set_parameter (0: unlimited)")
    mig.add_argument("--downtime-limit", type=int, metavar="MS",
                     help="longest acceptable pause of the guest, in milliseconds")
    mig.add_argument("--tls-creds", metavar="DIR",
                     help="TLS credentials directory (QEMU's x509 layout)")
    mig.add_argument("--tls-hostname", metavar="NAME",
                     help="name the destination's certificate must match")
    mig.add_argument("--overwrite", action="store_true",
                     help="a file: target may replace an existing file (x-file-overwrite)")
    mig.add_argument("--cpr", metavar="unix:PATH",
                     help="cpr-transfer to a new process on this host: its cpr channel "
                     "(docs/local-update.md)")
    qmp_subcommand(sub, "info", cmd_info, help="show a VM's state (via its QMP socket)",
                   description="Show a VM's run state, memory devices, RAM allocation and "
                   "migration, each under the QMP command it comes from.",
                   json_help="print the QMP replies as JSON")


def cmd_migrate(args: argparse.Namespace) -> int:
    with open_qmp(args.qmp) as c:
        params: dict[str, Any] = {}
        if args.tls_creds is not None:
            params["tls-creds"] = args.tls_creds
        if args.tls_hostname is not None:
            params["tls-hostname"] = args.tls_hostname
        if args.overwrite:
            params["x-file-overwrite"] = True
        if args.max_bandwidth is not None:
            params["max-bandwidth"] = args.max_bandwidth
        if args.downtime_limit is not None:
            params["downtime-limit"] = args.downtime_limit
        channels = None
        if args.cpr:  # cpr-transfer: main + cpr channels, as QEMU 10 takes them
            from livemig.migration.channels import URIError, parse_uri
            from livemig.migration.cpr.channels import uri_to_address

            params["mode"] = "cpr-transfer"
            try:
                channels = [{"channel-type": "main", "addr": uri_to_address(parse_uri(args.uri))},
                            {"channel-type": "cpr", "addr": uri_to_address(parse_uri(args.cpr))}]
            except (URIError, ValueError) as e:
                raise CLIError(f"--cpr: {e}", EXIT_USAGE) from None
        if params:
            qmp_call(c, "migrate-set-parameters", **params)
        if channels is not None:
            qmp_call(c, "migrate", channels=channels)
        else:
            qmp_call(c, "migrate", uri=args.uri)
        try:
            info = follow_migration(c, f"migrate → {args.uri}")
        except KeyboardInterrupt:
            return cancel_after_interrupt("livemig migrate", args.qmp)
    print(json.dumps(info, indent=2) if args.json else section("query-migrate", migration_rows(info)))
    if info.get("status") != "completed":
        print(f"livemig migrate: migration {info.get('status')}: "
              f"{info.get('error-desc', 'no reason given')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _memory_device_rows(devices: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for dev in devices:
        d = dev["data"]
        rows.append((d["id"], f"{dev['type']}: size {format_bytes(d['size'])} of "
                     f"{format_bytes(d['max-size'])}, requested {format_bytes(d['requested-size'])}, "
                     f"block-size {format_bytes(d['block-size'])}, memaddr 0x{d['memaddr']:x}"))
    return rows


def _allocation_rows(blocks: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for b in blocks:
        text = f"size {format_bytes(b['size'])}, allocated {format_bytes(b['allocated'])}"
        if "discarded" in b:
            text += (f", discarded {format_bytes(b['discarded'])} "
                     f"(allocated-discarded {format_bytes(b['allocated-discarded'])})")
        rows.append((b["id"], text))
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    with open_qmp(args.qmp) as c:
        out = {
            "query-status": qmp_call(c, "query-status"),
            "query-memory-devices": qmp_call(c, "query-memory-devices"),
            "x-query-ram-allocation": qmp_call(c, "x-query-ram-allocation"),
            "query-migrate": qmp_call(c, "query-migrate"),
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    st = out["query-status"]
    print(section("query-status", [("status", st["status"]), ("running", str(st["running"]).lower())]))
    print(section("query-memory-devices", _memory_device_rows(out["query-memory-devices"])))
    print(section("x-query-ram-allocation", _allocation_rows(out["x-query-ram-allocation"])))
    print(section("query-migrate", migration_rows(out["query-migrate"])))
    return 0
