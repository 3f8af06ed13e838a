"""Background snapshot: QEMU's ``background-snapshot`` capability (reference 3.10, 5.2).

The stream is a snapshot of the VM *as it was when the snapshot started*, while the guest
keeps running. It is an ordinary precopy stream — any destination (``migrate-incoming``,
``livemig vm --incoming file:PATH``) restores it:

    header, configuration, START ram (block list), FULL virtio-mem-early   guest running
    --- guest stopped: device state encoded into a buffer, RAM write-protected ---
    --- guest running again ---
    PART ram ...  (every page with its content at the stop)
    END ram, <the device-state buffer: FULL sections, EOF, VMDESCRIPTION>

:class:`BackgroundSnapshot` is the :class:`~livemig.migration.outgoing.SourceMode` of an
:class:`~livemig.migration.outgoing.OutgoingMigration` whose capabilities ask for it. The
orchestrator writes the stream's start (RAM set-up with the migration bitmap, no dirty
log, no sync, discarded ranges cleared; early devices; ``active``); then :meth:`run`:

1. open a userfaultfd for write protection (:class:`~.tracking.WriteTracking`; bound to
   this process's memory, whoever holds it later);
2. start the *snapshot writer*, a separate process (:mod:`.writer_process`: forked from
   the helper launcher, not from this process), and send it the set-up (:mod:`.setup_message`): the userfaultfd, the
   migration bitmap as built here, the block layout and the memfds, the stream, the
   statistics page;
3. while it starts, populate-read plugged memory — never a hole of memfd memory
   (:meth:`~.tracking.WriteTracking.prepare`); then wait until its fault thread is ready;
4. stop the guest; encode the device state into a buffer; register every block and
   write-protect the plugged ranges only; hand the buffer to the writer (``go``); close
   this process's userfaultfd (the writer now holds the only one); let the guest run;
5. wait for the writer: it writes every page with its content at the stop, saving pages
   the guest writes meanwhile first (:mod:`.faults`), then END ram and the buffer.

**Into a mapped-ram file** (``mapped-ram`` on, :meth:`BackgroundSnapshot.into_mapped_ram`):
the RAM set-up written here gives each block its mapped-ram header
(:class:`~livemig.migration.mapped_ram.layout.FileLayouts`, as a mapped-ram ``file:``
migration does), and step 2 also hands the writer the layouts and one descriptor of the
file per channel thread (``multifd-channels`` with ``multifd``, else one; ``O_DIRECT``
with ``direct-io``, refused here before anything starts where the file system cannot).
The writer then writes each page at its offset, not as a record; see :mod:`.writer`.

Why a process, and why nothing can deadlock: :mod:`.writer` and ``docs/snapshot.md``. If
the snapshot fails or is cancelled, the writer is killed first — with it goes the last
userfaultfd reference, which releases every protected range and wakes every blocked
fault — then the guest runs again as it was (the job's recovery); unplugged ranges are
never read, populated, protected or sent.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from livemig.memory.userfaultfd import NOT_SUPPORTED
from livemig.migration.core.vm import MigratableVM
from livemig.migration.mapped_ram.files import channel_count, open_channel_fds
from livemig.migration.mapped_ram.layout import FileLayouts
from livemig.migration.ram.state import TARGET_PAGE_SIZE
from livemig.migration.snapshot import setup_message as msg
from livemig.migration.snapshot.shared_stats import SharedStats
from livemig.migration.snapshot.tracking import SnapshotError, WriteTracking
from livemig.migration.snapshot.writer_process import StreamRelay, WriterProcess
from livemig.migration.stream.qemu_file import BytesWriter, QEMUFileWriter

if TYPE_CHECKING:
    from livemig.migration.outgoing import OutgoingMigration

__all__ = ["NOT_SUPPORTED", "BackgroundSnapshot", "SnapshotError"]

RELAY_FINISH_TIMEOUT = 30.0  # seconds for the TLS relay to send the writer's last bytes


class BackgroundSnapshot:
    """``migrate`` with the ``background-snapshot`` capability (module docstring)."""

    start_log = False  # no dirty log: write protection catches what the guest writes
    return_path = False  # QEMU forbids return-path with background-snapshot

    stopped_hooks: ClassVar[tuple[Callable[[BackgroundSnapshot], None], ...]] = ()
    """Called with the guest stopped, after the device state was taken and before write
    protection starts: what a hook sees of guest memory is what the snapshot holds.
    A test hook (class attribute), not a QMP interface."""

    def __init__(self, out: OutgoingMigration, layouts: FileLayouts | None = None):
        self.out = out
        self.vm: MigratableVM = out.vm
        # a mapped-ram file: each block's place in it, filled while the RAM set-up is written
        self.layouts = layouts
        if layouts is not None:
            out.write_blocks = layouts.write_blocks
        self._channel_fds: list[int] = []  # the writer's descriptors of a mapped-ram file
        self.stats = SharedStats.create()  # query-migrate reads it from the start
        self.tracking: WriteTracking | None = None
        self.writer: WriterProcess | None = None
        self.relay: StreamRelay | None = None
        self.protected = threading.Event()  # set once write protection is on

    @classmethod
    def into_mapped_ram(cls, out: OutgoingMigration) -> BackgroundSnapshot:
        """A snapshot that writes a mapped-ram file (``background-snapshot`` + ``mapped-ram``)."""
        return cls(out, FileLayouts())

    @property
    def writer_pid(self) -> int:
        """The writer process's pid (0 before it started)."""
        return self.writer.pid if self.writer is not None else 0

    # -- SourceMode ------------------------------------------------------------------------------
    def commands(self, w: QEMUFileWriter) -> None:
        pass  # never called: no return path

    def run(self) -> None:
        """Steps 1-5 of the module docstring; returns once the stream is complete."""
        out, job = self.out, self.out.job
        job.on_cleanup("statistics page", self.stats.close_fd)
        job.check_cancel()
        if self.layouts is not None:  # before anything starts: direct-io may be refused
            job.on_cleanup("mapped-ram channel descriptors", self._close_channel_fds)
            n = channel_count(out.caps, out.params)
            self._channel_fds = open_channel_fds(out.fd, out.uri.path, n, write=True,
                                                 direct=bool(out.params.direct_io))
        self.tracking = tracking = WriteTracking(self.vm.memory.regions)
        job.on_cleanup("write tracking", tracking.stop)
        stream_fd = self._stream_for_writer()
        self.writer = writer = WriterProcess()
        job.on_cleanup("snapshot writer", writer.close)
        self._set_up(writer, tracking, stream_fd)  # queued until the writer reads it
        tracking.prepare()  # while the writer starts and sets itself up
        writer.wait_ready(job.cancel_requested)
        self._switch(writer, tracking)
        try:
            writer.wait(job.cancel_requested, self._tick)
        except SnapshotError as e:
            if self.relay is not None and self.relay.error is not None:
                raise self.relay.error from e  # the channel's failure, not the writer's EPIPE
            raise
        if self.relay is not None:
            self.relay.finish(RELAY_FINISH_TIMEOUT)
        out.ram.stats.precopy_bytes = self.stats["transferred"]

    def recover(self, final: str) -> None:
        """Kill the writer before the guest runs again: the last userfaultfd reference
        goes with it, so no guest thread stays blocked on a protected page."""
        if self.writer is not None:
            self.writer.kill()
        if self.tracking is not None:
            self.tracking.stop()
        if self.relay is not None:
            self.relay.close()
        self.stats.close_fd()  # failed before the set-up shared it

    # -- the steps -------------------------------------------------------------------------------
    def _stream_for_writer(self) -> int:
        """The descriptor the writer writes the stream to: the file, the socket, or — for a
        channel that cannot change process (TLS) — a relay's socketpair end."""
        out = self.out
        if out.sock is None:
            return out.fd
        if type(out.sock) is socket.socket:  # not a subclass: an SSLSocket's fd is ciphertext
            return out.sock.fileno()
        self.relay = relay = StreamRelay(out.sock)
        out.job.on_cleanup("snapshot stream relay", relay.close)
        return relay.writer_end()

    def _set_up(self, writer: WriterProcess, tracking: WriteTracking, stream_fd: int) -> None:
        out = self.out
        blocks, block_fds = msg.describe_blocks(out.ram)
        self.stats["max_bandwidth"] = int(out.params.max_bandwidth)
        bitmaps = msg.bitmaps_memfd(out.ram)
        stats_fd = self.stats.share()
        fds = [tracking.fd, stats_fd, bitmaps, stream_fd, *block_fds, *self._channel_fds]
        setup: dict[str, Any] = {
            "vm_pid": os.getpid(),
            "ram_id": out.ram_id,
            "stream_offset": out.writer.bytes_written,
            "clear_bitmap_shift": out.params.x_clear_bitmap_shift,
            "blocks": blocks,
        }
        if self.layouts is not None:
            setup["mapped_ram"] = {"blocks": self.layouts.describe(), "path": out.uri.path,
                                   "direct": bool(out.params.direct_io)}
        try:
            writer.set_up(setup, fds)
        finally:
            os.close(bitmaps)
            os.close(stats_fd)
            self._close_channel_fds()  # the writer has its own
            if self.relay is not None:
                self.relay.handed_over()

    def _close_channel_fds(self) -> None:
        fds, self._channel_fds = self._channel_fds, []
        for fd in fds:
            os.close(fd)

    def _switch(self, writer: WriterProcess, tracking: WriteTracking) -> None:
        """Stop, device state to a buffer, protect, ``go``, resume: the downtime."""
        out = self.out
        stop_at = time.monotonic()
        out.guest.stop("paused")
        dev = BytesWriter()
        out.sections.write_late(dev)
        out.write_stream_end(dev)
        for hook in self.stopped_hooks:
            hook(self)
        tracking.start()
        self.protected.set()
        writer.go(dev.getvalue())
        tracking.release()  # the writer holds the only descriptor from here on
        out.guest.resume()
        out.downtime = int((time.monotonic() - stop_at) * 1000)

    def _tick(self) -> None:
        """While the writer runs: a new ``max-bandwidth`` reaches it within a tick."""
        self.stats["max_bandwidth"] = int(self.out.params.max_bandwidth)

    # -- query-migrate ---------------------------------------------------------------------------
    def info(self, ram: dict[str, Any]) -> None:
        st = self.stats
        if st["state"] == SharedStats.NOT_STARTED:
            return
        job = self.out.job
        ram["transferred"] = st["transferred"]
        ram["remaining"] = st["remaining"] * TARGET_PAGE_SIZE
        ram["normal"], ram["duplicate"] = st["normal"], st["duplicate"]
        ram["normal-bytes"] = st["normal"] * TARGET_PAGE_SIZE
        ram["pages-read"], ram["hole-pages-skipped"] = st["pages_read"], st["holes_skipped"]
        ram["precopy-bytes"] = st["transferred"]
        secs = max((job.end_time or time.monotonic()) - job.start_time, 1e-6)
        ram["pages-per-second"] = int((st["normal"] + st["duplicate"]) / secs)
        ram["mbps"] = round(st["transferred"] * 8 / secs / 1e6, 3)
        ram["write-faults"] = st["wp_faults"]
        ram["write-fault-pages"] = st["urgent_pages"]
        ram["x-write-fault-queue-peak"] = st["urgent_peak"]
        ram["x-unprotect-calls"] = st["unprotect_calls"]
        ram["x-partial-reads"] = st["partial_reads"]
        if self.tracking is not None:
            ram["write-protected-bytes"] = self.tracking.protected_bytes
        if self.writer is not None and self.writer.start_seconds is not None:
            ram["x-writer-start-ms"] = round(self.writer.start_seconds * 1000, 1)
