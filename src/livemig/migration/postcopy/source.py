"""Postcopy on the source: switchover, background push, urgent pages, completion.

:class:`PostcopySource` is the :class:`~livemig.migration.outgoing.SourceMode` of a
migration with ``postcopy-ram``. It iterates like precopy until the rest fits in the
downtime limit (then it completes like precopy: the destination was only advised) or until
``migrate-start-postcopy``; then (QEMU's ``postcopy_start``):

1. the postcopy channel connects (``postcopy-preempt``), the guest stops
   (``postcopy-device``), the dirty log is synced a last time;
2. the discard list: per block, the runs of pages still dirty (reference 3.7), so the
   destination drops what it holds of them. Discarded memory has bit 0 in the bitmap, so it
   is never in the list, never pushed and never read;
3. the device state, packaged with LISTEN and RUN (one PACKAGED command): once the
   destination has read it, its guest runs with pages missing (``postcopy-active``).

From then on pages flow two ways. *Urgent* ones are the destination's requests
(:mod:`~livemig.migration.postcopy.urgent`); the *background push* sends the rest of the
bitmap in PART sections at ``max-postcopy-bandwidth``, requested pages first when there is
no postcopy channel. Both take pages out of the one bitmap walk
(:class:`~livemig.migration.ram.state.RamState`) and send them through the one page
pipeline, so a page is sent twice only when a request races the main stream. When the
bitmap is empty: EOS on the postcopy channel, END, EOF and VMDESCRIPTION on the main
stream, and the destination's SHUT 0 completes the migration.

A connection failure from step 3 on pauses instead of failing
(:mod:`~livemig.migration.postcopy.source_recovery`); a destination that reports a failed
load fails the migration, and the source guest runs again.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.migration.channels import MigrationURI, connect
from livemig.migration.core import status
from livemig.migration.core.job import Cancelled, IllegalTransition, describe
from livemig.migration.core.rate import RateLimiter
from livemig.migration.outgoing import Precopy
from livemig.migration.postcopy import wire
from livemig.migration.postcopy.source_recovery import DestinationFailed, SourceRecovery
from livemig.migration.postcopy.urgent import PageAudit, UrgentPages
from livemig.migration.ram.sender import StreamSink
from livemig.migration.ram.state import BlockState
from livemig.migration.stream import savevm
from livemig.migration.stream.format import MigCommand, RPMessage, SectionType
from livemig.migration.stream.qemu_file import (
    BytesWriter,
    QEMUFileReader,
    QEMUFileWriter,
    StreamError,
)

if TYPE_CHECKING:
    from livemig.migration.outgoing import OutgoingMigration

PING_BEFORE_RUN = 3  # QEMU pings with 3 inside the package, just before RUN
IDLE_WAIT = 0.1  # longest sleep of the push while over its bandwidth (a request wakes it)


class PostcopySource:
    """The postcopy mode of an outgoing migration (module docstring)."""

    start_log = True
    return_path = True

    def __init__(self, out: OutgoingMigration):
        if out.uri.scheme not in ("tcp", "unix"):
            raise ValueError("postcopy-ram needs a socket migration URI (tcp: or unix:)")
        self.out = out
        self.preempt = bool(out.caps["postcopy-preempt"])
        if self.preempt and out.tls is not None:
            raise ValueError("postcopy-preempt over TLS is not supported; turn postcopy-preempt off")
        self.precopy = Precopy(out)  # the completion when it converges before the switch
        self.start_requested = threading.Event()
        self.rate = RateLimiter(lambda: int(out.params.max_postcopy_bandwidth))
        self.wake = threading.Event()
        self.audit = PageAudit(out.ram)
        self.requested, self.sent = self.audit.requested, self.audit.sent  # for the checks
        self.urgent = UrgentPages(out.ram, self.audit, self.wake)
        self.recovery = SourceRecovery(out, self.urgent, self.wake)
        if self.preempt:
            self.urgent.use_channel(self.recovery.lost)
        self.background_pages = 0
        out.rp_handler = self.rp_message

    # -- SourceMode --------------------------------------------------------------------
    def commands(self, w: QEMUFileWriter) -> None:
        """POSTCOPY_ADVISE: the destination gets ready (its fault handler starts now, so
        its start-up is not part of the downtime)."""
        savevm.write_command(w, MigCommand.POSTCOPY_ADVISE, wire.advise([b.block for b in self.out.ram.blocks]))

    def run(self) -> None:
        if self.out.iterate(stop=self.start_requested.is_set):
            self.precopy.complete()  # converged first: the destination was only advised
            return
        self._switchover()
        self._postcopy()

    def recover(self, final: str) -> None:
        """Nothing to undo here: the channel is closed by its clean-up, the guest is
        resumed by the orchestrator if the migration stopped it."""

    def info(self, ram: dict[str, Any]) -> None:
        """Postcopy figures, and what the postcopy channel sent besides the main stream."""
        ram.update(self.urgent.c.as_ram_info())
        ram["postcopy-background-pages"] = self.background_pages
        ram["postcopy-recoveries"] = self.recovery.recoveries
        ch = self.urgent.channel
        if ch is not None:
            st = ch.stats
            ram["postcopy-bytes"] += ch.bytes
            ram["normal"] += st.normal
            ram["normal-bytes"] += st.normal_bytes
            ram["duplicate"] += st.duplicate
            ram["pages-read"] += st.pages_read
            ram["hole-pages-skipped"] += st.holes_skipped

    # -- QMP -----------------------------------------------------------------------------
    def request_start(self) -> None:
        """``migrate-start-postcopy``: switch over at the end of the current section."""
        self.start_requested.set()

    def pause(self) -> None:
        """``migrate-pause``."""
        self.recovery.request_pause()

    def resume(self, uri: MigrationURI) -> None:
        """``migrate {uri, resume: true}``."""
        self.recovery.resume(uri)

    # -- the return path -----------------------------------------------------------------
    def rp_message(self, kind: int, payload: bytes, r: QEMUFileReader) -> bool:
        """Messages besides SHUT: page requests (without the postcopy channel), and the
        recovery handshake's bitmaps and acknowledgement."""
        if kind in (RPMessage.REQ_PAGES, RPMessage.REQ_PAGES_ID):
            self.urgent.serve_rp(kind, payload)
            return True
        return self.recovery.rp_message(kind, payload, r)

    # -- switchover ----------------------------------------------------------------------
    def _switchover(self) -> None:
        out = self.out
        w = out.writer
        self.urgent.freeze_plug_state()
        ch = self.urgent.channel
        if ch is not None:
            out.job.on_cleanup("postcopy channel", self.urgent.close_channel)
            ch.attach(connect(self.recovery.uri, tls=out.tls))
        # until the package is out, a stalled destination must not keep the guest stopped
        # here (the migration fails and the guest runs again, as in precopy)
        with out.completion_deadline() as deadline:
            try:
                stop_at = out.stop_guest_and_sync("finish-migrate", status.POSTCOPY_DEVICE)
                precopy_bytes = w.bytes_written
                self._send_discards(w)
                self._send_package(w)
            except (OSError, StreamError) as e:
                if deadline.expired:
                    raise StreamError(w.bytes_written, deadline.message()) from e
                raise
        st = out.ram.stats
        st.precopy_bytes = precopy_bytes
        st.downtime_bytes = w.bytes_written - precopy_bytes
        out.downtime = int((time.monotonic() - stop_at) * 1000)
        self.rate.restart(w.bytes_written)
        if not out.job.move(status.POSTCOPY_ACTIVE, status.POSTCOPY_DEVICE):
            out.job.check_cancel()
        if ch is not None:
            ch.start(self.recovery.gen)

    def _send_discards(self, w: QEMUFileWriter) -> None:
        """Reference 3.7: per block, the runs still dirty (discarded memory never is)."""
        ram = self.out.ram
        for b in ram.blocks:
            starts, lengths = ram.dirty_runs(b)
            for payload in wire.discards(b.idstr, starts, lengths):
                savevm.write_command(w, MigCommand.POSTCOPY_RAM_DISCARD, payload)

    def _send_package(self, w: QEMUFileWriter) -> None:
        """LISTEN, the device state, PING 3 and RUN, as one PACKAGED command."""
        pkg = BytesWriter()
        savevm.write_command(pkg, MigCommand.POSTCOPY_LISTEN)
        self.out.sections.write_late(pkg)
        savevm.write_command(pkg, MigCommand.PING, struct.pack(">I", PING_BEFORE_RUN))
        savevm.write_command(pkg, MigCommand.POSTCOPY_RUN)
        data = pkg.getvalue()
        savevm.write_command(w, MigCommand.PACKAGED, wire.packaged(len(data)))
        w.put_bytes(data)
        w.flush()

    # -- postcopy ------------------------------------------------------------------------
    def _postcopy(self) -> None:
        """Push until every page is sent and the destination confirms; pause on a lost
        connection and carry on after a recovery."""
        out, rec = self.out, self.recovery
        while True:
            try:
                if rec.paused:
                    rec.await_resume()
                    self.rate.restart(out.writer.bytes_written)
                    continue
                rec.check()
                if self._push_section():
                    self._finish()
                    return
            except (DestinationFailed, Cancelled, IllegalTransition):
                raise
            except Exception as e:  # noqa: BLE001 - in postcopy every other failure pauses
                rp_ = out.rp
                if rp_ is not None:
                    rp_.done.wait(0.2)  # a destination that failed says so: fail, not pause
                    if rp_.failed:
                        raise DestinationFailed.of(rp_) from e
                    if rp_.result == 0:  # it completed; only our goodbye was lost
                        self._completed()
                        return
                rec.pause(describe(e))

    def _main_sink(self) -> StreamSink:
        sink = self.out.page_sink
        assert isinstance(sink, StreamSink), "postcopy runs without multifd"
        return sink

    def _push_section(self) -> bool:
        """One PART section: queued requests first, then background pages up to the
        section budget; True when every page is sent.

        Over ``max-postcopy-bandwidth`` only requested pages go out; the push waits for the
        budget or for the next request, whichever comes first.
        """
        out = self.out
        w = out.writer
        ahead = self.rate.ahead(w.bytes_written)
        if ahead > 0 and not self.urgent.queued:
            self.wake.wait(min(ahead, IDLE_WAIT))
            self.wake.clear()
            return False
        budget = self.rate.slice_bytes()
        sink = self._main_sink()
        start = w.bytes_written
        savevm.start_section(w, SectionType.PART, out.ram_id)
        sink.start_section()
        done = False
        while True:
            self.urgent.send_queued(sink)
            if ahead > 0 or w.bytes_written - start >= budget or self.recovery.lost_why is not None:
                break
            batch = out.ram.next_batch()
            if batch is None:
                done = not self.urgent.queued
                break
            sink.send(*batch)
            self._pushed(*batch)
        sink.end_section()
        savevm.write_footer(w, out.ram_id)
        w.flush()
        out.ram.stats.postcopy_bytes += w.bytes_written - start
        return done

    def _pushed(self, b: BlockState, idx: np.ndarray) -> None:
        self.background_pages += len(idx)
        self.audit.note_sent(b, idx)

    # -- completion ----------------------------------------------------------------------
    def _finish(self) -> None:
        """Every page is sent: close both streams and wait for the destination's verdict
        (a connection lost meanwhile pauses, and the end is sent again after recovery)."""
        out = self.out
        w = out.writer
        if self.urgent.channel is not None:
            self.urgent.channel.finish()
        sink = self._main_sink()
        savevm.start_section(w, SectionType.END, out.ram_id)
        sink.start_section()
        sink.end_section()
        savevm.write_footer(w, out.ram_id)
        out.write_stream_end(w)
        w.flush()
        rp_ = out.rp
        assert rp_ is not None
        while rp_.result is None:
            self.recovery.check()
            rp_.done.wait(0.05)
        if rp_.failed:
            raise DestinationFailed.of(rp_, w.bytes_written)
        self._completed()

    def _completed(self) -> None:
        self.urgent.close_channel()
        self.out.completed()
