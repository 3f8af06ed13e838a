"""The migration source: QEMU's stream, one state machine, a mode, a RAM sink.

Stream written (reference 4):

    header, configuration
    [COMMAND OPEN_RETURN_PATH]                       socket URIs
    [mode commands: POSTCOPY_ADVISE]
    START ram (MEM_SIZE block list, EOS), footer
    FULL <early device sections> (virtio-mem bitmap), footer     before any page
    PART ram (pages, EOS), footer                    repeated while iterating
    --- guest stopped ---
    END ram (the last dirty pages, EOS), footer
    FULL <device sections>, footer
    EOF, VMDESCRIPTION

:class:`OutgoingMigration` assembles one migration from parts that each own one thing —
the :class:`~livemig.migration.core.job.MigrationJob` (status, cancel, run order), the
RAM state (bitmaps, the walk), a page sink (the stream, or multifd's channels), the
section table, guest stop/resume, the rate limit, the return path — and runs its *mode*
(:class:`SourceMode`: precopy here; postcopy and background snapshot in their packages).
Modes use the building blocks below; they never reach into another object's state.

Whatever goes wrong — a dead connection, the destination reporting an error on the
return path, ``migrate_cancel`` — the job's recovery stops the dirty log and, if the
guest was stopped for the switchover, lets it run again; then clean-ups close channels,
join threads and release the RamDiscardManager holds; only then is the final status
published. Guest memory is never modified by the source, so it is intact by construction.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from livemig.migration.channels import Liveness, MigrationURI, connect, open_file_for_write
from livemig.migration.core import status
from livemig.migration.core.deadline import Deadline
from livemig.migration.core.guest import GuestControl
from livemig.migration.core.job import Cancelled, JobView, MigrationJob, describe
from livemig.migration.core.params import STREAM_CAPABILITIES, Capabilities, Parameters
from livemig.migration.core.rate import RateLimiter
from livemig.migration.core.vm import MigratableVM
from livemig.migration.ram.codec import write_block_list
from livemig.migration.ram.sender import PageSink, StreamSink, send_pass
from livemig.migration.ram.state import TARGET_PAGE_SIZE, RamState
from livemig.migration.stream import savevm
from livemig.migration.stream.format import RAM_IDSTR, RAM_VERSION, MigCommand, SectionType
from livemig.migration.stream.qemu_file import QEMUFileWriter, StreamError
from livemig.migration.stream.return_channel import Handler, ReturnPathReader
from livemig.migration.stream.sections import SectionTable
from livemig.migration.switchover import SwitchoverEstimate, SwitchoverGate
from livemig.migration.throttle import MigrationThrottle
from livemig.migration.transport.tls import TLSClient

log = logging.getLogger(__name__)

RETURN_PATH_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
COMPLETION_DEADLINE = 30.0
"""Seconds from stopping the guest for the switchover to the destination's verdict."""
MigrationCancelled = Cancelled  # the name modes and older callers know


class SourceMode(Protocol):
    """What a mode decides about an outgoing migration (precopy, postcopy, snapshot)."""

    start_log: bool  # whether RAM set-up starts and syncs the dirty log
    return_path: bool  # whether a socket migration opens the return path

    def commands(self, w: QEMUFileWriter) -> None:
        """Mode commands after OPEN_RETURN_PATH, before RAM set-up (POSTCOPY_ADVISE)."""

    def run(self) -> None:
        """Everything after the stream's start: iterate and complete (raise on failure)."""

    def recover(self, final: str) -> None:
        """The migration failed or was cancelled: release what the mode holds."""

    def info(self, ram: dict[str, Any]) -> None:
        """Add the mode's figures to query-migrate's ``ram``."""


class OutgoingMigration(JobView):
    def __init__(
        self,
        vm: MigratableVM,
        uri: MigrationURI,
        caps: Capabilities,
        params: Parameters,
        emit: status.EventFn = status.no_events,
        mode: Callable[[OutgoingMigration], SourceMode] | None = None,
        channels: Callable[[OutgoingMigration], Any] | None = None,
        prepare: Callable[[OutgoingMigration], None] | None = None,
    ):
        self.vm = vm
        self.uri = uri
        self.caps = caps
        self.params = params
        self.emit = emit
        # TLS for every socket of this migration (None without tls-creds): pass it to
        # channels.connect() for extra channels and reconnects too (docs/security.md)
        self.tls: TLSClient | None = TLSClient.from_params(params, uri)
        self.job = MigrationJob("migration", emit, events=lambda: bool(caps["events"]))
        if self.tls is not None:  # migrate_cancel cuts short a handshake in progress
            self.tls = self.tls.with_abort(self.job.cancel_requested)
        self.ram = RamState(vm.memory.regions, vm.dirty_log, clear_bitmap_shift=params.x_clear_bitmap_shift)
        self.sections = SectionTable(vm.state)
        self.guest = GuestControl(vm)
        self.rate = RateLimiter(lambda: int(self.params.max_bandwidth))
        self.sock: Any = None  # the main channel (socket or TLS channel), or None for file:
        self.fd = -1
        self.w: QEMUFileWriter | None = None
        self.rp: ReturnPathReader | None = None
        self.rp_handler: Handler | None = None  # the mode's return-path messages
        # the mode's reaction to a return path lost before the verdict (postcopy pauses);
        # like rp_handler, set before the reader starts, read by each start_return_path()
        self.rp_lost: Callable[[str], None] | None = None
        self.sink: PageSink | None = None
        self.multifd: Any = None  # multifd.MultifdSender while the multifd capability is on
        self.config_desc: dict[str, Any] | None = None
        self.setup_time = 0
        self.downtime: int | None = None
        self.estimate = SwitchoverEstimate(params)  # bandwidth, expected-downtime, converged?
        self.throttle = MigrationThrottle(vm, caps, params)  # auto-converge, dirty-limit
        self.gate = SwitchoverGate(self.job, lambda: bool(caps["pause-before-switchover"]))
        # writes the RAM set-up's block list (mapped-ram adds each block's file layout: its
        # channels, or a background snapshot into a mapped-ram file — so set before the mode)
        self.write_blocks: Callable[[QEMUFileWriter, list[Any]], None] = write_block_list
        self.mode: SourceMode = (mode or Precopy)(self)
        self.postcopy: Any = None  # the postcopy mode, for its QMP commands
        self._attach_channels = channels  # multifd: opens its channels, takes over the sink
        # runs in the migration thread before the main channel opens (cpr-transfer: hands
        # the memory over and waits until the destination listens)
        self._prepare = prepare

    # -- public ----------------------------------------------------------------------------
    @property
    def bandwidth(self) -> float:
        """Bytes/s, measured over the last window or pass."""
        return self.estimate.bandwidth

    @property
    def expected_downtime(self) -> int:
        return self.estimate.expected_downtime

    def start(self) -> None:
        # plug state must not change while this migration has a view of it: one hold per
        # discard manager, released by the last clean-up, after every reader of guest RAM
        # (channel threads included) has stopped
        for mr in self.vm.memory.regions:
            if mr.rdm is not None:
                hold = mr.rdm.hold_state(f"migration to {self.uri}")
                self.job.on_cleanup("discard manager hold", hold.release)
        self.job.on_cleanup("vCPU throttle", self.throttle.stop)  # full speed, whatever the end
        self.job.start(self._body, self._recover, "migration-src", self._explain)

    def is_running(self) -> bool:
        """Started and not yet finished (clean-up included): no second migration now."""
        return self.job.running

    def cancel(self) -> None:
        if not self.job.request_cancel():
            return
        if self.multifd is not None:
            self.multifd.abort()
        self.shutdown_channel()

    def check_cancel(self) -> None:
        """Raise if cancelled or if the return path already brought bad news."""
        self.job.check_cancel()
        rp = self.rp
        if rp is not None:
            if rp.error is not None:
                raise StreamError(0, f"return path: {rp.error}")
            if rp.failed:
                raise StreamError(0, f"destination reported a failed migration: {rp.reason}"
                                  if rp.reason else "destination reported a failed migration")

    # -- the migration thread --------------------------------------------------------------
    def _body(self) -> None:
        if self._prepare is not None:
            self._prepare(self)
        self.open_channel()
        if self._attach_channels is not None:
            self.multifd = self._attach_channels(self)  # replaces the sink and the writer
        self.write_stream_start()
        self.mode.run()

    def _recover(self, final: str) -> None:
        self.throttle.stop()
        self.mode.recover(final)
        log_ = self.vm.dirty_log
        if log_.active:
            log_.stop()
        self.guest.resume()

    def _explain(self, e: BaseException) -> str:
        """Prefer the destination's verdict to our own symptom (a broken pipe, say).

        A destination that rejects the stream reports it on the return path and closes;
        our next write then fails first. Give the return path a moment to deliver.
        """
        rp = self.rp
        if rp is not None and isinstance(e, OSError):
            rp.done.wait(1.0)
        if rp is not None and rp.failed:
            if rp.reason:
                return f"destination reported a failed migration: {rp.reason}"
            return f"destination reported a failed migration ({describe(e)})"
        if isinstance(e, BrokenPipeError) and rp is not None and rp.error:
            # a broken pipe is a consequence; the reader saw the cause (a silent link's
            # ETIMEDOUT is reported once, to whichever call on the socket comes first)
            return rp.error
        return describe(e)

    # -- channels --------------------------------------------------------------------------
    def open_channel(self) -> None:
        if self.uri.scheme == "file":
            self.fd = open_file_for_write(self.uri.path, overwrite=self.params.x_file_overwrite)
            self.job.on_cleanup("stream file", self._close_file)
            self.w = QEMUFileWriter(os.fdopen(self.fd, "wb", buffering=0, closefd=False), 4 << 20)
        else:
            self.sock = self.connect(self.uri)
            self.job.on_cleanup("main channel", self.close_channel)
            self.w = QEMUFileWriter(self.sock, 4 << 20)
        self.sink = StreamSink(self.w, self.ram.stats)

    def connect(self, uri: MigrationURI, timeout: float = CONNECT_TIMEOUT) -> Any:
        """A new socket of this migration — the main channel, a multifd channel, the
        postcopy channel, a reconnection: TLS if ``tls-creds`` is set, and the liveness of
        ``x-tcp-user-timeout`` as it is now (a reconnection takes a changed value)."""
        return connect(uri, timeout=timeout, tls=self.tls, liveness=self.liveness())

    def liveness(self) -> Liveness:
        return Liveness(int(self.params.x_tcp_user_timeout))

    def use_channel(self, sock: Any, w: QEMUFileWriter) -> None:
        """Carry on over a new main connection (postcopy recovery); the old one is closed."""
        old_sock, old_w = self.sock, self.w
        self.sock, self.w = sock, w
        self.sink = StreamSink(w, self.ram.stats)
        if old_w is not None:
            try:
                old_w.close()
            except OSError:
                pass
        if old_sock is not None:
            old_sock.close()

    def use_writer(self, w: QEMUFileWriter, sink: PageSink) -> None:
        """multifd: the main stream's writer counts the channels' bytes; pages go to them."""
        self.w = w
        self.sink = sink

    def abort_io(self) -> None:
        """Make every blocked read or write of this migration return (a deadline expired)."""
        if self.multifd is not None:
            self.multifd.abort()
        self.shutdown_channel()

    def completion_deadline(self) -> Deadline:
        """A deadline from the switchover to the destination's verdict: a destination that
        stalls then must not keep the source's guest stopped (the migration fails and the
        guest runs again)."""
        return Deadline(COMPLETION_DEADLINE, self.abort_io, "the switchover")

    def shutdown_channel(self) -> None:
        """Wake every thread blocked on the main channel (cancel, postcopy pause)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_channel(self) -> None:
        if self.w is not None:
            try:
                self.w.close()
            except OSError:
                pass
        self.shutdown_channel()
        if self.rp is not None:
            self.rp.join()
        if self.sock is not None:
            self.sock.close()

    def _close_file(self) -> None:
        if self.w is not None:
            try:
                self.w.close()
            except OSError:
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release_main_channel(self) -> Any:
        """Hand the main socket over for good (cpr-transfer watches it after completion):
        the clean-up neither shuts it down nor closes it then."""
        sock, self.sock = self.sock, None
        return sock

    def cont_refused(self) -> str | None:
        """Why the guest must not run here now (a mode that handed it over says), or None."""
        why = getattr(self.mode, "cont_refused", None)
        return why() if why is not None else None

    def start_return_path(self) -> ReturnPathReader:
        """A reader for the current main socket (postcopy recovery calls this again)."""
        self.rp = ReturnPathReader(
            self.sock, self.rp_handler, on_lost=self.rp_lost, quiet=self.job.cancel_requested.is_set
        )
        return self.rp.start()

    # -- the stream ------------------------------------------------------------------------
    @property
    def ram_id(self) -> int:
        return self.sections.ram_id

    def write_stream_start(self) -> None:
        """Header, configuration, return path, the mode's commands, RAM set-up and the
        early device sections; then ``active``."""
        w = self.writer
        savevm.write_header(w)
        caps = [c for c in STREAM_CAPABILITIES if self.caps.enabled.get(c)]
        self.config_desc = savevm.write_configuration(w, self.vm.machine_type, capabilities=caps)
        if self.sock is not None and self.mode.return_path:
            savevm.write_command(w, MigCommand.OPEN_RETURN_PATH, b"")
            self.mode.commands(w)
            self.start_return_path()
        log_ = self.mode.start_log
        savevm.start_section(w, SectionType.START, self.ram_id, RAM_IDSTR, 0, RAM_VERSION)
        self.write_blocks(w, [b.block for b in self.ram.blocks])
        self.ram.init_bitmaps(start_log=log_, sync=log_)
        if log_:
            self.pass_event()
        savevm.write_footer(w, self.ram_id)
        self.sections.write_early(w)
        w.flush()
        self.throttle.start(w.bytes_written)
        self.setup_time = int((time.monotonic() - self.job.start_time) * 1000)
        self.job.move(status.ACTIVE, status.SETUP)

    @property
    def writer(self) -> QEMUFileWriter:
        assert self.w is not None
        return self.w

    @property
    def page_sink(self) -> PageSink:
        assert self.sink is not None
        return self.sink

    def pass_event(self) -> None:
        if self.caps["events"]:
            self.emit("MIGRATION_PASS", {"pass": self.ram.stats.dirty_sync_count})

    def send_ram_section(self, kind: SectionType, max_bytes: int | None) -> bool:
        """One PART or END section of RAM; True when the pass is complete."""
        w, sink = self.writer, self.page_sink
        savevm.start_section(w, kind, self.ram_id)
        sink.start_section()
        done = send_pass(self.ram, sink, w, max_bytes)
        sink.end_section()
        savevm.write_footer(w, self.ram_id)
        w.flush()
        return done

    def iterate(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """PART sections until the rest fits in ``downtime-limit`` (True) or ``stop()``.

        After each sync the throttle (auto-converge, dirty-limit) judges the pass that
        ended; the estimate (``migration.switchover``) decides whether to switch over.
        """
        w, est, ram = self.writer, self.estimate, self.ram
        est.start_pass(w.bytes_written)
        while True:
            self.check_cancel()
            if stop():
                return False
            done = self.send_ram_section(SectionType.PART, self.rate.slice_bytes())
            self.rate.wait(w.bytes_written, self.job.cancel_requested.wait)
            est.after_section(w.bytes_written, ram.remaining_bytes, ram.stats.dirty_pages_rate)
            self.throttle.tick()
            if not done:
                continue
            new = ram.sync()
            self.pass_event()
            self.throttle.after_sync(new, w.bytes_written)
            if est.end_pass(w.bytes_written, ram.remaining_bytes):
                return True

    def stop_guest_and_sync(self, runstate: str, new_status: str, sync: bool = True) -> float:
        """Switchover: stop the vCPUs, ``new_status``, the last sync (unless the RAM does
        not travel in the stream). Returns when it stopped (for the downtime)."""
        stop_at = time.monotonic()
        self.guest.stop(runstate)
        self.gate.wait(self.check_cancel)  # pause-before-switchover: until migrate-continue
        if not self.job.move(new_status, (status.ACTIVE, status.PRE_SWITCHOVER)):
            self.job.check_cancel()
        if sync:
            self.ram.last_stage = True
            self.ram.sync()
            self.pass_event()
        return stop_at

    def switch_over(self, send_ram: bool = True) -> None:
        """The end of a precopy stream, under the switchover deadline: stop the guest, the
        rest of RAM (``send_ram``; else an empty RAM END: cpr-transfer hands memory over
        as descriptors), the device state, EOF; then the destination's verdict. Sets the
        downtime; the guest stays stopped (``completed()`` or a recovery follows)."""
        w = self.writer
        with self.completion_deadline() as deadline:
            try:
                stop_at = self.stop_guest_and_sync("finish-migrate", status.DEVICE, sync=send_ram)
                precopy_bytes = w.bytes_written
                self.send_ram_section(SectionType.END, None if send_ram else 0)
                self.sections.write_late(w)
                self.write_stream_end(w)
                w.flush()
                st = self.ram.stats
                st.precopy_bytes = precopy_bytes
                st.downtime_bytes = w.bytes_written - precopy_bytes
                self.wait_verdict()
            except (OSError, StreamError) as e:
                if deadline.expired:
                    raise StreamError(w.bytes_written, deadline.message()) from e
                raise
        self.downtime = int((time.monotonic() - stop_at) * 1000)

    def write_stream_end(self, w: QEMUFileWriter) -> None:
        """EOF and the VMDESCRIPTION trailer."""
        savevm.write_eof(w)
        savevm.write_vmdesc(w, self.vmdesc())

    def vmdesc(self) -> dict[str, Any]:
        """VMDESCRIPTION: the vmstate sections in stream order (RAM is not described)."""
        return savevm.build_vmdesc(self.config_desc, self.sections.vmdesc_devices(), TARGET_PAGE_SIZE)

    def wait_verdict(self, timeout: float = RETURN_PATH_TIMEOUT) -> None:
        """Wait for the destination's SHUT; raise unless it loaded the stream."""
        rp = self.rp
        if rp is None:
            return
        w = self.writer
        if not rp.done.wait(timeout) and rp.result is None:
            raise StreamError(w.bytes_written, "destination did not confirm the migration")
        self.check_cancel()
        if rp.result is None:
            raise StreamError(w.bytes_written, rp.error or "return path closed early")

    def completed(self) -> None:
        """The destination has the guest: stop logging, stay stopped (``postmigrate``)."""
        log_ = self.vm.dirty_log
        if log_.active:
            log_.stop()
        self.guest.handed_over("postmigrate")

    # -- query-migrate ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        job = self.job
        out: dict[str, Any] = {"status": job.status}
        if job.status == status.NONE:
            return out
        now = job.end_time or time.monotonic()
        st = self.ram.stats
        transferred = self.w.bytes_written if self.w is not None else 0
        secs = max(now - job.start_time, 1e-6)
        out.update(job.times())
        out["setup-time"] = self.setup_time
        if job.status == status.COMPLETED and self.downtime is not None:
            out["downtime"] = self.downtime
        elif job.status not in status.FINISHED:
            out["expected-downtime"] = self.expected_downtime
        self.throttle.info(out)
        out["ram"] = {
            "transferred": transferred,
            "remaining": self.ram.remaining_bytes,
            "total": self.ram.total_bytes,
            "duplicate": st.duplicate,
            "normal": st.normal,
            "normal-bytes": st.normal_bytes,
            "dirty-pages-rate": st.dirty_pages_rate,
            "mbps": round(self.bandwidth * 8 / 1e6, 3),
            "dirty-sync-count": st.dirty_sync_count,
            "postcopy-requests": st.postcopy_requests,
            "page-size": TARGET_PAGE_SIZE,
            "multifd-bytes": self.multifd.bytes_sent() if self.multifd is not None else 0,
            "pages-per-second": int((st.normal + st.duplicate) / secs),
            "precopy-bytes": st.precopy_bytes or transferred,
            "downtime-bytes": st.downtime_bytes,
            "postcopy-bytes": st.postcopy_bytes,
            "dirty-sync-missed-zero-copy": self.multifd.syncs_missed_zerocopy if self.multifd else 0,
            "discarded-skipped-bytes": st.discarded_bytes,
            "hole-pages-skipped": st.holes_skipped,
            "pages-read": st.pages_read,
        }
        self.mode.info(out["ram"])
        if job.error_desc:
            out["error-desc"] = job.error_desc
        return out


class Precopy:
    """Iterate until the rest fits in the downtime limit, then stop the guest and finish."""

    start_log = True
    return_path = True

    def __init__(self, out: OutgoingMigration):
        self.out = out

    def commands(self, w: QEMUFileWriter) -> None:
        pass

    def run(self) -> None:
        self.out.iterate()
        self.complete()

    def complete(self) -> None:
        """Stop the guest, send what is still dirty and the device state, wait for the
        destination's verdict."""
        self.out.switch_over()
        self.out.completed()

    def recover(self, final: str) -> None:
        pass

    def info(self, ram: dict[str, Any]) -> None:
        pass
