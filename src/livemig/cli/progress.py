"""Progress bars for long work: a migration or snapshot (source side) and a restore.

The bar's total is fixed for the whole run, so the bar only ever shows progress against
one number:

* migration and snapshot: the RAM the first pass has to send (``ram.transferred +
  ram.remaining`` when the migration first reports data to send). The bar shows how much
  of it is in step with the destination (that total minus ``ram.remaining``); it goes back
  when the guest dirties memory faster than it is sent, and ends full when nothing is
  left to send. The bytes actually sent are shown beside it.
* restore: the size of the stream file, filled by the bytes loaded; it ends full when the
  load completed, since the rest of the file is framing and device state.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from livemig.cli.errors import EXIT_INTERRUPTED, CLIError, open_qmp, qmp_call
from livemig.cli.sizes import format_bytes
from livemig.control.qmp_client import QMPClient, QMPClientError, QMPConnectError

FINISHED = ("completed", "failed", "cancelled")


def _bar(**kwargs: Any) -> Progress:
    """On stderr: stdout carries the result (``--json`` output stays clean)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        **kwargs,
    )


class MigrationBar:
    """Where the bar of a migration stands after a ``query-migrate`` reply: ``(total,
    completed)``, total None until the first pass's size is known, then fixed."""

    def __init__(self) -> None:
        self.total: int | None = None

    def update(self, info: dict[str, Any]) -> tuple[int | None, int]:
        st = info.get("status", "none")
        ram = info.get("ram", {})
        sent, remaining = ram.get("transferred", 0), ram.get("remaining", 0)
        if self.total is None and (remaining > 0 or st == "completed"):
            self.total = max(sent + remaining, 1)  # fixed from here on
        if st == "completed":
            return self.total, self.total or 0
        return self.total, max((self.total or 0) - remaining, 0)


class RestoreBar:
    """The bar of a restore from a file of ``size`` bytes: bytes loaded, full once the
    load completed (the rest of the file is framing and device state)."""

    def __init__(self, size: int | None) -> None:
        self.total = size

    def update(self, info: dict[str, Any]) -> tuple[int | None, int]:
        loaded = info.get("ram", {}).get("transferred", 0)
        if info.get("status") == "completed" and self.total:
            loaded = self.total
        return self.total, loaded


def follow_migration(client: QMPClient, title: str, poll: float = 0.1) -> dict[str, Any]:
    """Poll ``query-migrate`` with a progress bar until the migration ends; return the
    last reply. KeyboardInterrupt propagates (the caller decides what Ctrl-C means)."""
    return _follow(client, title, MigrationBar(), poll, done=(*FINISHED, "none"))


def follow_restore(client: QMPClient, title: str, size: int | None, poll: float = 0.1) -> dict[str, Any]:
    """Poll an incoming migration from a file of ``size`` bytes until it ends."""
    return _follow(client, title, RestoreBar(size), poll, done=FINISHED)


def _follow(client: QMPClient, title: str, bar: MigrationBar | RestoreBar, poll: float,
            done: tuple[str, ...]) -> dict[str, Any]:
    with _bar() as progress:
        task = progress.add_task(title, total=bar.total, note="setup")
        while True:
            info = qmp_call(client, "query-migrate")
            st = info.get("status", "none")
            total, completed = bar.update(info)
            note = st
            if isinstance(bar, MigrationBar):
                note += f", sent {format_bytes(info.get('ram', {}).get('transferred', 0))}"
            progress.update(task, total=total, completed=completed, note=note)
            if st in done:
                return dict(info)
            time.sleep(poll)


def cancel_after_interrupt(prog: str, address: str, what: str = "migration") -> int:
    """Ctrl-C while following a migration: ask the VM to cancel it, say so, and wait a
    little for the answer. Leaving it running silently would surprise: the user pressed
    Ctrl-C to stop it.

    A new connection is used: the old one may be waiting for a reply that Ctrl-C cut off,
    and would hand that stale reply to the next command.
    """
    print(f"{prog}: interrupted; asking the VM to cancel the {what} (migrate_cancel)",
          file=sys.stderr, flush=True)
    try:
        with open_qmp(address, timeout=10) as c:
            try:
                c.execute("migrate_cancel")
            except QMPClientError as e:
                print(f"{prog}: the VM refused to cancel: {e.desc}; the {what} goes on",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
            deadline = time.monotonic() + 10
            st = "cancelling"
            while time.monotonic() < deadline:
                st = c.execute("query-migrate").get("status", "none")
                if st in FINISHED:
                    break
                time.sleep(0.1)
    except (CLIError, QMPConnectError) as e:
        print(f"{prog}: could not cancel the {what}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{prog}: {what} {st}", file=sys.stderr)
    return EXIT_INTERRUPTED
