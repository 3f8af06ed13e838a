"""The ``livemig`` command line: ``vm``, ``migrate``, ``info``, ``demo``, ``inspect``,
``snapshot`` and ``restore``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """QEMU-style sizes: ``512M``, ``8G``, ``2048`` (bytes)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text else ""
    num, suffix = (t[:-1], t[-1]) if t and t[-1] in _SUFFIX else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 512M, 8G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value * _SUFFIX[suffix])


def parse_virtio_mem(text: str) -> Any:
    """``id=vm0,size=8G,requested-size=1G[,block-size=2M][,backend=memfd|anon][,memaddr=..]``."""
    from livemig.machine import VirtioMemConfig

    cfg = VirtioMemConfig()
    seen = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--virtio-mem: expected key=value, got {part!r}")
        seen.add(key)
        if key == "id":
            cfg.id = value
        elif key == "size":
            cfg.size = parse_size(value)
        elif key == "requested-size":
            cfg.requested_size = parse_size(value)
        elif key == "block-size":
            cfg.block_size = parse_size(value)
        elif key == "backend":
            cfg.backend = value
        elif key == "memaddr":
            cfg.memaddr = int(value, 0)
        elif key == "node":
            cfg.node = int(value)
        else:
            raise argparse.ArgumentTypeError(f"--virtio-mem: unknown property {key!r}")
    if "size" not in seen:
        raise argparse.ArgumentTypeError("--virtio-mem needs size=")
    return cfg


def _rate(text: str) -> int:
    return -1 if text in ("max", "unlimited") else parse_size(text)


# -- livemig vm --------------------------------------------------------------------------------
def add_vm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="livemig", help="VM name")
    p.add_argument("--memory", "-m", type=parse_size, default=1 << 30, help="base RAM (default 1G)")
    p.add_argument("--ram-backend", choices=("memfd", "anon"), default="memfd")
    p.add_argument("--virtio-mem", type=parse_virtio_mem, help="id=vm0,size=8G,requested-size=1G,...")
    p.add_argument("--accel", default="auto", help="soft, kvm or auto (kvm where /dev/kvm works)")
    p.add_argument("--qmp", required=True, help="unix:PATH of the QMP socket")
    p.add_argument("--incoming", action="append",
                   help="tcp:HOST:PORT, unix:PATH, file:PATH or defer; a second --incoming "
                   "'{\"channel-type\": \"cpr\", \"addr\": {...}}' makes this a cpr-transfer "
                   "destination (docs/local-update.md)")
    p.add_argument("-S", dest="paused", action="store_true",
                   help="do not start the guest (after an incoming migration: stay paused)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--working-set", type=parse_size, default=0, help="bytes the workload touches (0: all)")
    p.add_argument("--dirty-rate", type=_rate, default=0, help="bytes/s the workload dirties (0: idle, max)")
    p.add_argument("--content", choices=("random", "zeros", "mixed"), default="random")
    p.add_argument("--no-prefill", action="store_true", help="do not write memory once at boot")
    p.add_argument("--log", default="warning", help="log level")
    p.add_argument("--tls-creds", help="TLS credentials directory (QEMU's x509 layout) for migrations")
    p.add_argument("--tls-authz", help="client certificate names an incoming migration accepts (a,b,...)")
    g = p.add_argument_group("the user's guest (--accel kvm; docs/machine.md)")
    g.add_argument("--boot-sector", metavar="FILE", help="boot a 512-byte boot sector at 0x7c00, real mode")
    g.add_argument("--kernel", metavar="FILE", help="boot a Multiboot kernel (ELF32 or a.out kludge)")
    g.add_argument("--append", metavar="CMDLINE", help="the kernel's command line (with --kernel)")
    g.add_argument("--serial", metavar="BACKEND",
                   help="COM1: file:PATH, stdio, unix:PATH,server[,wait=off], null (default) or none")
    g.add_argument("--device", action="append", default=[], metavar="SPEC",
                   help="isa-debug-exit[,iobase=0xf4][,iosize=4] (may repeat)")


def build_machine(args: argparse.Namespace, ram_fds: dict[str, int] | None = None) -> Any:
    from livemig.devices.chardev import parse_chardev
    from livemig.devices.isa import parse_device
    from livemig.guest.workload import WorkloadConfig
    from livemig.machine import Machine, MachineConfig
    from livemig.machine.machine import NULL_SERIAL

    wl = WorkloadConfig(
        vcpus=args.vcpus,
        working_set=args.working_set,
        dirty_rate=args.dirty_rate,
        content=args.content,
        prefill=not args.no_prefill,
    )
    cfg = MachineConfig(
        name=args.name,
        memory=args.memory,
        ram_backend=args.ram_backend,
        virtio_mem=args.virtio_mem,
        accel=args.accel,
        workload=wl,
        incoming=bool(args.incoming),
        ram_fds=ram_fds or {},
        boot_sector=args.boot_sector,
        kernel=args.kernel,
        append=args.append,
        serial=NULL_SERIAL if args.serial is None else parse_chardev(args.serial),
        devices=tuple(parse_device(d) for d in args.device),
    )
    return Machine(cfg)


def cmd_vm(args: argparse.Namespace) -> int:
    from livemig.migration.helper_modules import prestart_helpers

    prestart_helpers()  # first: its interpreter starts while this process imports the rest
    from livemig.control.qmp_server import QMPServer
    from livemig.control.vm_controller import VMController

    logging.basicConfig(level=args.log.upper(), format="%(asctime)s %(name)s: %(message)s")
    cpr = None
    try:
        main_uri, cpr = _incoming_channels(args.incoming or [])
        ram_fds = None
        if cpr is not None:
            # a cpr-transfer destination takes the old process's memory before anything
            # else (QEMU reads the cpr channel before its monitor starts)
            cpr.receive()
            ram_fds = cpr.take_ram_fds()
        machine = build_machine(args, ram_fds)
    except (ValueError, OSError) as e:
        if cpr is not None:
            cpr.close()  # the old process sees the channel end and keeps its guest
        print(f"livemig vm: {e}", file=sys.stderr)
        return 2
    qmp = QMPServer(args.qmp)
    ctl = VMController(machine, qmp, autostart=not args.paused, cpr=cpr)
    tls_params = {k: v for k, v in (("tls-creds", args.tls_creds), ("tls-authz", args.tls_authz)) if v}
    if tls_params:  # before --incoming starts listening
        from livemig.migration.core.params import MigrationConfigError

        try:
            ctl.params.set(tls_params)
        except MigrationConfigError as e:
            print(f"livemig vm: {e}", file=sys.stderr)
            machine.close()
            return 2
    try:
        qmp.start()
    except OSError as e:
        print(f"livemig vm: {e}", file=sys.stderr)
        machine.close()
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ctl.host_quit("host-signal"))
    try:
        if machine.board is not None:
            machine.board.wait_serial_client(ctl.quit_requested)  # unix:...,server,wait=on
        if ctl.quit_requested.is_set():
            pass
        elif main_uri is not None:
            from livemig.control.qmp_server import QMPError

            try:
                ctl.migrate_incoming(main_uri)
            except QMPError as e:
                print(f"livemig vm: {e}", file=sys.stderr)
                return 2
        elif not args.incoming and not args.paused:
            machine.start()
        while not ctl.quit_requested.wait(0.2):
            pass
        time.sleep(0.1)  # let the reply to 'quit' reach the client, as QEMU answers first
    finally:
        qmp.stop()
        machine.close()
    return ctl.exit_status  # isa-debug-exit: (value << 1) | 1, as QEMU


def _incoming_channels(values: list[str]) -> tuple[str | None, Any]:
    """The main ``--incoming`` (None: defer or none) and a cpr channel's receiver, if any."""
    from livemig.migration.channels import URIError
    from livemig.migration.cpr.channels import parse_incoming_option
    from livemig.migration.cpr.incoming import CprReceiver

    main: str | None = None
    cpr = None
    try:
        for v in values:
            kind, uri = parse_incoming_option(v)
            if kind == "cpr":
                if cpr is not None:
                    raise URIError("--incoming: more than one cpr channel")
                assert uri is not None
                cpr = CprReceiver(uri)
            elif uri is not None:
                main = str(uri)
    except BaseException:
        if cpr is not None:
            cpr.close()
        raise
    return main, cpr


# -- livemig migrate / info ----------------------------------------------------------------------
def _progress_loop(client: Any, title: str) -> dict[str, Any]:
    """Poll query-migrate with a progress bar until the migration finishes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(title, total=None, status="setup")
        while True:
            info = client.execute("query-migrate")
            st = info.get("status", "none")
            ram = info.get("ram", {})
            sent = ram.get("transferred", 0)
            todo = sent + ram.get("remaining", 0)
            progress.update(task, completed=sent, total=max(todo, 1), status=st)
            if st in ("completed", "failed", "cancelled", "none"):
                return info
            time.sleep(0.1)


def cmd_migrate(args: argparse.Namespace) -> int:
    from livemig.control.qmp_client import QMPClient, QMPClientError

    with QMPClient(args.qmp) as c:
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
        try:
            if args.cpr:  # cpr-transfer: main + cpr channels (docs/local-update.md)
                from livemig.migration.channels import parse_uri
                from livemig.migration.cpr.channels import uri_to_address

                params["mode"] = "cpr-transfer"
                channels = [{"channel-type": "main", "addr": uri_to_address(parse_uri(args.uri))},
                            {"channel-type": "cpr", "addr": uri_to_address(parse_uri(args.cpr))}]
            if params:
                c.execute("migrate-set-parameters", **params)
            if args.cpr:
                c.execute("migrate", channels=channels)
            else:
                c.execute("migrate", uri=args.uri)
        except QMPClientError as e:
            print(f"livemig migrate: {e.desc}", file=sys.stderr)
            return 1
        info = _progress_loop(c, f"migrate → {args.uri}")
    print(json.dumps(info, indent=2) if args.json else _summary(info))
    return 0 if info.get("status") == "completed" else 1


def _summary(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    lines = [f"status: {info.get('status')}"]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    for key, label in (("total-time", "total time (ms)"), ("downtime", "downtime (ms)"),
                       ("setup-time", "setup time (ms)")):
        if key in info:
            lines.append(f"{label}: {info[key]}")
    for key in ("transferred", "duplicate", "normal", "discarded-skipped-bytes",
                "hole-pages-skipped", "pages-read", "dirty-sync-count"):
        if key in ram:
            lines.append(f"ram {key}: {ram[key]}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from livemig.control.qmp_client import QMPClient

    with QMPClient(args.qmp) as c:
        out = {
            "status": c.execute("query-status"),
            "memory-devices": c.execute("query-memory-devices"),
            "migrate": c.execute("query-migrate"),
            "ram-allocation": c.execute("x-query-ram-allocation"),
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    st = out["status"]
    print(f"status: {st['status']} (running: {st['running']})")
    for dev in out["memory-devices"]:
        d = dev["data"]
        print(f"virtio-mem {d['id']}: size {d['size'] >> 20} MiB of {d['max-size'] >> 20} MiB, "
              f"requested {d['requested-size'] >> 20} MiB, block {d['block-size'] >> 20} MiB, "
              f"at 0x{d['memaddr']:x}")
    for blk in out["ram-allocation"]:
        print(f"RAM block {blk['id']}: {blk['size'] >> 20} MiB, {blk['allocated'] >> 20} MiB allocated")
    if out["migrate"]:
        print(_summary(out["migrate"]))
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from livemig.cli_inspect import main as inspect_main

    return inspect_main(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from livemig.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        return cmd_inspect(argv[1:])
    parser = argparse.ArgumentParser(prog="livemig", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    vm = sub.add_parser("vm", help="run a VM process controlled over QMP")
    add_vm_args(vm)
    vm.set_defaults(func=cmd_vm)
    mig = sub.add_parser("migrate", help="migrate a running VM (via its QMP socket)")
    mig.add_argument("--qmp", required=True)
    mig.add_argument("uri")
    mig.add_argument("--max-bandwidth", type=parse_size)
    mig.add_argument("--downtime-limit", type=int, help="ms")
    mig.add_argument("--tls-creds", help="TLS credentials directory (QEMU's x509 layout)")
    mig.add_argument("--tls-hostname", help="name the destination's certificate must match")
    mig.add_argument("--overwrite", action="store_true",
                     help="a file: target may replace an existing file (x-file-overwrite)")
    mig.add_argument("--cpr", metavar="unix:PATH",
                     help="cpr-transfer to a new process on this host: its cpr channel")
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(func=cmd_migrate)
    info = sub.add_parser("info", help="show a VM's state (via its QMP socket)")
    info.add_argument("--qmp", required=True)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="migrate a live VM between two processes and verify it")
    demo.add_argument("--memory", type=parse_size, default=1 << 30)
    demo.add_argument("--virtio-mem-size", type=parse_size, default=None,
                      help="default: 8G (soft guest), 2G (KVM guest: must fit below 4 GiB)")
    demo.add_argument("--plugged", type=parse_size, default=None,
                      help="default: 2G (soft guest), 1G (KVM guest)")
    demo.add_argument("--dirty-rate", type=_rate, default=64 << 20)
    demo.add_argument("--accel", default="auto", help="soft, kvm or auto")
    demo.add_argument("--uri", default=None, help="default: tcp on a free loopback port")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("inspect", help="read a migration stream file (see livemig inspect --help)")
    from livemig.cli_snapshot import add_snapshot_commands

    add_snapshot_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
