"""``livemig inspect FILE``: what a migration stream file holds, and whether it kept the
discard promise.

Exit codes, so that scripts and CI can rely on them:

* 0: the stream was read to its end (and, with ``--check-discard``, no page record fell
  in unplugged virtio-mem memory);
* 1: ``--check-discard`` found page records in unplugged memory;
* 2: the file is damaged or truncated (the message names the offset and the problem),
  cannot be read, or the command line is wrong;
* 3: the stream is intact as far as it goes but could not be interpreted to the end, or
  ``--check-discard`` could not check a virtio-mem device (no bitmap, no RAM block that
  matches it): the answer is "unknown", which must not look like success.

A damaged file never produces a traceback: every format problem is reported as
``offset 0x...: <problem>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from livemig.cli.errors import ArgumentParser
from livemig.inspect import (
    CommandReport,
    SectionReport,
    StreamReport,
    ViolationList,
    check_discard,
    inspect_stream,
)
from livemig.migration.channels import check_stream_path
from livemig.migration.stream.qemu_file import StreamError

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_DAMAGED = 2
EXIT_INCOMPLETE = 3

SHOW_VIOLATIONS = 50
"""Violations listed in the human output (all of them, up to the cap, in ``--json``)."""


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="livemig inspect",
        description="Read a migration stream file written by livemig or QEMU and report "
        "its sections, RAM page records per block and virtio-mem state.",
    )
    p.add_argument("file", metavar="FILE", help="stream file (migrate to file:PATH or exec:cat)")
    p.add_argument(
        "--check-discard",
        action="store_true",
        help="report every page record in memory the virtio-mem bitmap marks unplugged; "
        "exit 1 if there is any",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


# -- formatting helpers ------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _short(v: Any, room: int = 60) -> str:
    """One-line rendering of a decoded field value, cut to about ``room`` characters."""
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, int):
        s = str(v) if -1024 < v < 1024 else hex(v)
    elif isinstance(v, bytes | bytearray):
        s = f"<{len(v)} bytes {bytes(v[:8]).hex()}{'…' if len(v) > 8 else ''}>"
    elif isinstance(v, dict):
        s = "{" + ", ".join(f"{k}: {_short(x, room)}" for k, x in v.items()) + "}"
    elif isinstance(v, list):
        s = "[" + ", ".join(_short(x, room) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
        if len(v) > 8:
            s += f"×{len(v)}"
    else:
        s = str(getattr(v, "size", v))
    return s if len(s) <= room else s[: room - 1] + "…"


def _fields_summary(fields: dict[str, Any] | None, room: int = 90) -> str:
    if not fields:
        return ""
    s = ", ".join(f"{k}={_short(v, 40)}" for k, v in fields.items())
    return s if len(s) <= room else s[: room - 1] + "…"


def _record_rows(report: StreamReport) -> list[list[str]]:
    """Rows for the records table; consecutive RAM PART sections share one row."""
    rows: list[list[str]] = []
    recs = report.records
    i = 0
    while i < len(recs):
        rec = recs[i]
        if isinstance(rec, CommandReport):
            detail = "" if rec.detail is None else _short(rec.detail, 80)
            rows.append([f"0x{rec.offset:x}", "COMMAND", "", rec.name, "", str(rec.length), detail])
            i += 1
            continue
        if rec.type == "PART":
            j = i
            while (
                j < len(recs)
                and isinstance(recs[j], SectionReport)
                and recs[j].type == "PART"  # type: ignore[union-attr]
                and recs[j].section_id == rec.section_id  # type: ignore[union-attr]
            ):
                j += 1
            group = [r for r in recs[i:j] if isinstance(r, SectionReport)]
            size = sum((s.end or s.offset) - s.offset for s in group)
            zero = sum(s.zero for s in group)
            normal = sum(s.normal for s in group)
            what = "PART" if len(group) == 1 else f"PART ×{len(group)}"
            rows.append(
                [
                    f"0x{rec.offset:x}",
                    what,
                    str(rec.section_id),
                    rec.idstr,
                    "",
                    str(size),
                    f"zero {zero}, normal {normal}",
                ]
            )
            i = j
            continue
        size = "" if rec.end is None else str(rec.end - rec.offset)
        if rec.idstr == "ram":
            detail = f"zero {rec.zero}, normal {rec.normal}"
            if rec.type == "START":
                detail = f"MEM_SIZE {len(report.ram_blocks)} blocks, {_size(report.ram_total)}"
        else:
            detail = (rec.vmsd_name + ": " if rec.vmsd_name else "") + _fields_summary(rec.fields)
        if rec.note:
            detail += f" ({rec.note})"
        version = "" if rec.version is None else str(rec.version)
        name = rec.idstr if not rec.instance_id else f"{rec.idstr} #{rec.instance_id}"
        rows.append(
            [f"0x{rec.offset:x}", rec.type, str(rec.section_id), name, version, size, detail]
        )
        i += 1
    return rows


def _print_human(
    console: Console, report: StreamReport, violations: ViolationList | None, verdict: str
) -> None:
    conf = report.configuration or {}
    console.print(f"[bold]{report.path}[/bold]: {report.file_size} bytes")
    info = Table.grid(padding=(0, 2))
    info.add_row("format version", str(report.version))
    info.add_row("machine", str(conf.get("machine", "-")))
    if conf.get("capabilities"):
        info.add_row("capabilities", ", ".join(conf["capabilities"]))
    info.add_row("page size", str(report.page_size))
    if report.vmdesc_offset is not None:
        ndev = len((report.vmdesc or {}).get("devices") or [])
        info.add_row(
            "VMDESCRIPTION",
            f"at 0x{report.vmdesc_offset:x}, {report.vmdesc_size} bytes, {ndev} sections",
        )
    else:
        info.add_row("VMDESCRIPTION", "none")
    if report.eof_offset is not None:
        info.add_row("EOF record", f"at 0x{report.eof_offset:x}")
    console.print(info)

    t = Table(title="Stream records", title_justify="left")
    for col in ("offset", "record", "id", "name", "ver", "bytes", "details"):
        t.add_column(col, overflow="fold", justify="right" if col in ("id", "bytes") else "left")
    for row in _record_rows(report):
        t.add_row(*row)
    console.print(t)

    t = Table(title="RAM blocks (page records)", title_justify="left")
    for col in ("block", "length", "zero", "normal", "pages with records"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for b in report.ram_blocks.values():
        extra = ""
        if b.xbzrle or b.compressed:
            extra = f" (+{b.xbzrle} xbzrle, {b.compressed} compressed)"
        t.add_row(
            b.name, _size(b.length), str(b.zero), str(b.normal) + extra, str(b.touched.count())
        )
    t.add_row(
        "[bold]total[/bold]",
        _size(report.ram_total),
        f"[bold]{report.zero_pages}[/bold]",
        f"[bold]{report.normal_pages}[/bold]",
        "",
    )
    console.print(t)

    if report.devices:
        t = Table(title="virtio-mem devices", title_justify="left")
        for col in ("device", "RAM block", "addr", "region", "block size", "plugged", "state from"):
            t.add_column(col, overflow="fold")
        for d in report.devices:
            plugged = "-"
            if d.bitmap is not None:
                plugged = f"{d.plugged_blocks}/{d.total_blocks} blocks ({_size(d.size or 0)})"
            block = d.ram_block or "[red]?[/red]"
            t.add_row(
                d.id,
                f"{block}\n[dim]{d.mapping}[/dim]",
                "-" if d.addr is None else f"0x{d.addr:x}",
                _size(d.region_size),
                _size(d.block_size),
                plugged,
                d.source or ", ".join(d.sections),
            )
        console.print(t)
        for d in report.devices:
            for w in d.warnings:
                console.print(f"[yellow]warning[/yellow]: {d.id}: {w}")
    else:
        console.print("virtio-mem devices: none found")

    for w in report.warnings:
        console.print(f"[yellow]warning[/yellow]: {w}")
    if report.stopped:
        console.print(
            f"[yellow]stopped[/yellow] at offset 0x{report.stopped_offset or 0:x}: {report.stopped}"
        )

    if violations is not None:
        if violations.total:
            console.print(
                f"[red bold]discard check FAILED[/red bold]: {violations.total} page record(s) "
                f"in {violations.pages} unplugged page(s)"
            )
            t = Table()
            for col in (
                "stream offset",
                "kind",
                "device",
                "RAM block",
                "block offset",
                "gpa",
                "vmem block",
            ):
                t.add_column(col)
            for v in violations[:SHOW_VIOLATIONS]:
                t.add_row(
                    f"0x{v.stream_offset:x}",
                    v.kind,
                    v.device,
                    v.ram_block,
                    f"0x{v.block_offset:x}",
                    "-" if v.gpa is None else f"0x{v.gpa:x}",
                    str(v.vmem_block),
                )
            console.print(t)
            if violations.total > SHOW_VIOLATIONS:
                console.print(f"… and {violations.total - SHOW_VIOLATIONS} more (see --json)")
        console.print(verdict)


def _discard_verdict(report: StreamReport, violations: ViolationList) -> tuple[int, str, list[str]]:
    """Exit code, a one-line verdict and the devices that could not be checked."""
    unchecked: list[str] = []
    for d in report.devices:
        if d.bitmap is None:
            unchecked.append(f"{d.id}: no plugged bitmap in the stream")
        elif d.ram_block is None:
            unchecked.append(f"{d.id}: no RAM block ({d.mapping})")
    if violations.total:
        return EXIT_VIOLATIONS, "discard check: FAILED", unchecked
    if unchecked:
        return EXIT_INCOMPLETE, "discard check: could not check " + "; ".join(unchecked), unchecked
    if not report.complete:
        return (
            EXIT_INCOMPLETE,
            "discard check: inconclusive, the stream was not read to its end",
            [],
        )
    checked = [d for d in report.devices if d.bitmap is not None]
    if not checked:
        return EXIT_OK, "discard check: passed (no virtio-mem device in the stream)", []
    parts = [f"{d.id}: {d.plugged_blocks}/{d.total_blocks} blocks plugged" for d in checked]
    return (
        EXIT_OK,
        "discard check: passed, no page record in unplugged memory (" + "; ".join(parts) + ")",
        [],
    )


def _console(out: TextIO) -> Console:
    tty = out.isatty()
    return Console(file=out, width=None if tty else 160, highlight=False, soft_wrap=False)


def main(
    argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run ``livemig inspect`` with ``argv`` (without the program name); return the exit
    code. ``stdout``/``stderr`` default to the process's streams."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return EXIT_DAMAGED if e.code else EXIT_OK
    path = args.file
    try:
        # a FIFO would block the open, a device or /proc file is no stream: refuse first
        check_stream_path(path, must_exist=True)
        report = inspect_stream(path)
        violations = check_discard(report) if args.check_discard else None
    except StreamError as e:
        msg = f"offset 0x{e.offset:x}: {e.problem}"
        if args.json:
            json.dump({"path": path, "error": {"offset": e.offset, "problem": e.problem}}, out)
            out.write("\n")
        print(f"livemig inspect: {path}: {msg}", file=err)
        return EXIT_DAMAGED
    except OSError as e:
        if args.json:
            json.dump({"path": path, "error": {"offset": None, "problem": str(e)}}, out)
            out.write("\n")
        print(f"livemig inspect: {path}: cannot read: {e.strerror or e}", file=err)
        return EXIT_DAMAGED

    code = EXIT_OK if report.complete else EXIT_INCOMPLETE
    verdict = ""
    unchecked: list[str] = []
    if violations is not None:
        code, verdict, unchecked = _discard_verdict(report, violations)
    if args.json:
        doc = report.to_dict()
        if violations is not None:
            doc["check_discard"] = {
                "ok": code == EXIT_OK,
                "verdict": verdict,
                "violations_total": violations.total,
                "pages": violations.pages,
                "violations": [v.to_dict() for v in violations],
                "unchecked": unchecked,
            }
        doc["exit_code"] = code
        json.dump(doc, out)
        out.write("\n")
    else:
        _print_human(_console(out), report, violations, verdict)
    if report.stopped:
        print(
            f"livemig inspect: {path}: stopped at offset 0x{report.stopped_offset or 0:x}: "
            f"{report.stopped}",
            file=err,
        )
    return code

