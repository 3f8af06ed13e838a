"""The livemig command line: vm, migrate, info, snapshot, restore, inspect and demo.

Each command lives in its own module and adds its own parser; this module only puts them
together. Every failure a user can cause prints one line naming what is wrong and exits
non-zero (see :mod:`livemig.cli.errors`).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from livemig.cli.demo import add_parser as add_demo
from livemig.cli.errors import ArgumentParser, guarded
from livemig.cli.migrate import add_parsers as add_migrate_and_info
from livemig.cli.snapshot import add_parsers as add_snapshot_and_restore
from livemig.cli.vm import add_parser as add_vm

DESCRIPTION = (
    "Live migration of virtual machines that never reads, sends or populates memory the "
    "guest has given back. Commands: vm (run a VM), migrate and info (drive it over QMP), "
    "snapshot and restore, inspect (read a stream file), demo."
)


def livemig_version() -> str:
    try:
        return version("livemig")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="livemig", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"livemig {livemig_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=ArgumentParser)
    add_vm(sub)
    add_migrate_and_info(sub)
    add_snapshot_and_restore(sub)
    sub.add_parser("inspect", help="read a migration stream file (see livemig inspect --help)",
                   add_help=False)
    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":  # its own parser, exit codes and output
        # imported here: the stream reader (numpy) is not every command's start-up cost,
        # and `livemig vm` starts its helper launcher before the heavy imports
        from livemig.cli.inspect import main as inspect_main

        return guarded("livemig inspect", lambda: inspect_main(argv[1:]))
    args = build_parser().parse_args(argv)
    return guarded(f"livemig {args.command}", lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
