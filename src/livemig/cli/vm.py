"""``livemig vm``: one VM process, controlled over QMP.

Options mirror QEMU's where QEMU has them (``-m``/``--memory``, ``--virtio-mem`` with the
device's property names, ``--qmp``, ``--incoming``, ``-S``), including QEMU's size rules
(see :mod:`livemig.cli.sizes`).

Once the VM is up (QMP listening, guest started or waiting for ``--incoming``) it prints
one line to stderr::

    livemig vm: ready, QMP unix:/run/vm1.qmp

(with ``, incoming URI`` appended when it waits for a migration: the real port when
``tcp:HOST:0`` was asked for). Scripts wait for this line instead of polling for the
socket. Mistakes in the options print one line naming the option and exit 2; a failed
incoming migration prints one line (``livemig vm: incoming migration failed: ...``)
whatever ``--log`` says, and the VM stays in ``inmigrate``, ready for another
``migrate-incoming``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any

from livemig.cli.errors import EXIT_USAGE, CLIError
from livemig.cli.sizes import rate_mib, size_bytes, size_mib
from livemig.control.qmp_address import QMPAddressError, parse_address

_VIRTIO_MEM_HELP = (
    "a virtio-mem device: id=vm0,size=8G[,requested-size=1G][,block-size=2M]"
    "[,backend=memfd|anon][,memaddr=ADDR][,node=N]; sizes as QEMU's properties "
    "(a bare number is bytes)"
)


def parse_virtio_mem(text: str) -> Any:
    """``id=vm0,size=8G,requested-size=1G[,block-size=2M][,backend=memfd|anon][,memaddr=..]``."""
    from livemig.machine import VirtioMemConfig

    cfg = VirtioMemConfig()
    seen = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        seen.add(key)
        if key == "id":
            cfg.id = value
        elif key in ("size", "requested-size", "block-size"):
            try:
                setattr(cfg, key.replace("-", "_"), size_bytes(value))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{key}: {e}") from None
        elif key == "backend":
            cfg.backend = value
        elif key in ("memaddr", "node"):
            try:
                setattr(cfg, key, int(value, 0))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{key}: invalid number {value!r}") from None
        else:
            raise argparse.ArgumentTypeError(f"unknown property {key!r}")
    if "size" not in seen:
        raise argparse.ArgumentTypeError("needs size=")
    return cfg


def qmp_address(text: str) -> str:
    """``--qmp``: checked when the command line is read, so a typo is a usage error."""
    try:
        parse_address(text)
    except QMPAddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vm", help="run a VM process controlled over QMP",
                       description="Run a VM process controlled over QMP.")
    p.add_argument("--name", default="livemig", help="VM name (names its memfds)")
    p.add_argument("--memory", "-m", type=size_mib, default=1 << 30, metavar="SIZE",
                   help="base RAM, as QEMU's -m: 1G, 512M; a bare number is MiB (default 1G)")
    p.add_argument("--ram-backend", choices=("memfd", "anon"), default="memfd",
                   help="host memory behind base RAM (default memfd)")
    p.add_argument("--virtio-mem", type=parse_virtio_mem, metavar="PROPS", help=_VIRTIO_MEM_HELP)
    p.add_argument("--accel", default="auto", help="soft, kvm or auto (kvm where /dev/kvm works)")
    p.add_argument("--qmp", required=True, type=qmp_address, metavar="ADDRESS",
                   help="where QMP listens: unix:PATH (mode 0600) or tcp:HOST:PORT (no access "
                   "control: use loopback); QEMU's ,server=on,wait=off are accepted")
    p.add_argument("--incoming", metavar="URI", action="append",
                   help="wait for a migration: tcp:HOST:PORT, unix:PATH, file:PATH, or defer "
                   "(start it later with QMP migrate-incoming); a second --incoming "
                   "'{\"channel-type\": \"cpr\", \"addr\": {...}}' makes this a cpr-transfer "
                   "destination (docs/local-update.md)")
    p.add_argument("-S", dest="paused", action="store_true",
                   help="do not start the guest (after an incoming migration: stay paused)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs of the guest (default 1)")
    p.add_argument("--working-set", type=size_mib, default=0, metavar="SIZE",
                   help="memory the workload touches; a bare number is MiB (default 0: all)")
    p.add_argument("--dirty-rate", type=rate_mib, default=0, metavar="RATE",
                   help="bytes per second the workload dirties, e.g. 64M; a bare number is "
                   "MiB/s; 0 idles, max dirties as fast as it can (default 0)")
    p.add_argument("--content", choices=("random", "zeros", "mixed"), default="random",
                   help="what the workload writes (default random)")
    p.add_argument("--no-prefill", action="store_true", help="do not write memory once at boot")
    p.add_argument("--log", default="warning", choices=("debug", "info", "warning", "error", "critical"),
                   help="log level on stderr (default warning)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="TLS credentials directory (QEMU's x509 layout) for migrations")
    p.add_argument("--tls-authz", metavar="NAMES",
                   help="client certificate names an incoming migration accepts (a,b,...)")
    g = p.add_argument_group("the user's guest (--accel kvm; docs/machine.md)")
    g.add_argument("--boot-sector", metavar="FILE", help="boot a 512-byte boot sector at 0x7c00, real mode")
    g.add_argument("--kernel", metavar="FILE", help="boot a Multiboot kernel (ELF32 or a.out kludge)")
    g.add_argument("--append", metavar="CMDLINE", help="the kernel's command line (with --kernel)")
    g.add_argument("--serial", metavar="BACKEND",
                   help="COM1: file:PATH, stdio, unix:PATH,server[,wait=off], null (default) or none")
    g.add_argument("--device", action="append", default=[], metavar="SPEC",
                   help="isa-debug-exit[,iobase=0xf4][,iosize=4] (may repeat)")
    p.set_defaults(func=cmd_vm)


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


def _incoming_channels(values: list[str]) -> tuple[str | None, Any]:
    """The main ``--incoming`` (None: defer or none) and a cpr channel's receiver, if any."""
    from livemig.migration.channels import URIError
    from livemig.migration.cpr.channels import parse_incoming_option
    from livemig.migration.cpr.incoming import CprReceiver

    main: str | None = None
    cpr = None
    try:
        for v in values:
            if not v.strip().startswith("{"):  # a plain URI: migrate-incoming checks it
                main = None if v.strip() == "defer" else v
                continue
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


class _IncomingWatch:
    """Says on stderr when an incoming migration fails: at the default log level a
    destination would otherwise fail silently, its reason visible only over QMP."""

    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl
        self.reported: Any = None

    def check(self) -> None:
        inc = self.ctl.incoming
        if inc is None or inc is self.reported or inc.status != "failed":
            return
        self.reported = inc
        desc = self.ctl.query_migrate().get("error-desc", "unknown error")
        print(f"livemig vm: incoming migration failed: {desc}", file=sys.stderr, flush=True)


def cmd_vm(args: argparse.Namespace) -> int:
    from livemig.migration.helper_modules import prestart_helpers

    prestart_helpers()  # first: its interpreter starts while this process imports the rest
    from livemig.control.qmp_server import QMPError, QMPServer
    from livemig.control.vm_controller import VMController
    from livemig.migration.core.params import MigrationConfigError

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
        raise CLIError(str(e), EXIT_USAGE) from None
    try:
        qmp = QMPServer(args.qmp)
        ctl = VMController(machine, qmp, autostart=not args.paused, cpr=cpr)
        tls_params = {k: v for k, v in (("tls-creds", args.tls_creds),
                                        ("tls-authz", args.tls_authz)) if v}
        if tls_params:  # before --incoming starts listening
            try:
                ctl.params.set(tls_params)
            except MigrationConfigError as e:
                raise CLIError(str(e), EXIT_USAGE) from None
        try:
            qmp.start()
        except OSError as e:
            raise CLIError(f"--qmp: {e}") from None
    except BaseException:
        machine.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ctl.host_quit("host-signal"))
    try:
        ready = f"livemig vm: ready, QMP {qmp.address}"
        if machine.board is not None:
            machine.board.wait_serial_client(ctl.quit_requested)  # unix:...,server,wait=on
        if ctl.quit_requested.is_set():
            pass
        elif main_uri is not None:
            try:
                ctl.migrate_incoming(main_uri)
            except QMPError as e:
                raise CLIError(f"--incoming: {e}") from None
            ready += f", incoming {ctl.incoming.uri}"
        elif not args.incoming and not args.paused:
            machine.start()
        print(ready, file=sys.stderr, flush=True)
        watch = _IncomingWatch(ctl)
        while not ctl.quit_requested.wait(0.2):
            watch.check()
        time.sleep(0.1)  # let the reply to 'quit' reach the client, as QEMU answers first
    finally:
        qmp.stop()
        machine.close()
    return int(ctl.exit_status)  # isa-debug-exit: (value << 1) | 1, as QEMU

