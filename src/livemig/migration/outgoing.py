"""The migration source: precopy in QEMU's stream format, with cancel and failure recovery.

Stream written (reference 4):

    header, configuration
    [COMMAND OPEN_RETURN_PATH]                       socket URIs
    START ram (MEM_SIZE block list, EOS), footer
    FULL <early device sections> (virtio-mem bitmap), footer     before any page
    PART ram (pages, EOS), footer                    repeated while iterating
    --- guest stopped ---
    END ram (the last dirty pages, EOS), footer
    FULL <device sections>, footer
    EOF, VMDESCRIPTION

Whatever goes wrong — a dead connection, the destination reporting an error on the return
path, ``migrate_cancel`` — the source stops its dirty log, closes the channel and, if it
had stopped the guest for the switchover, lets it run again. Guest memory is never
modified by the source, so it is intact by construction.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from livemig.machine import Machine
from livemig.migration.channels import MigrationURI, connect, open_file_for_write
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities, Parameters
from livemig.migration.ram.save import TARGET_PAGE_SIZE, RamSaver
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    RAM_IDSTR,
    RAM_VERSION,
    MigCommand,
    RPMessage,
    SectionType,
)
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError
from livemig.migration.stream.sections import SectionTable
from livemig.migration.tls import TLSClient

log = logging.getLogger(__name__)

RATE_WINDOW = 0.1  # seconds; max-bandwidth is enforced per window, like QEMU
SLICE_BYTES = 32 << 20  # bytes per PART section when unthrottled
RETURN_PATH_TIMEOUT = 30.0


class MigrationCancelled(Exception):
    pass


class OutgoingMigration:
    def __init__(
        self,
        machine: Machine,
        uri: MigrationURI,
        caps: Capabilities,
        params: Parameters,
        emit: status.EventFn = status.no_events,
    ):
        self.machine = machine
        self.uri = uri
        self.caps = caps
        self.params = params
        # TLS for every socket of this migration (None without tls-creds): pass it to
        # channels.connect() for extra channels and reconnects too (docs/security.md)
        self.tls: TLSClient | None = TLSClient.from_params(params, uri)
        self._emit = emit
        self.status = status.NONE
        self.error_desc: str | None = None
        self.saver = RamSaver(
            machine.memory.regions,
            machine.accel.dirty_log,
            clear_bitmap_shift=params.x_clear_bitmap_shift,
        )
        self.sections = SectionTable(machine.state)
        self.start_time = 0.0
        self.end_time: float | None = None
        self.setup_time = 0
        self.downtime: int | None = None
        self.expected_downtime = 0
        self.bandwidth = 0.0  # bytes/s, measured over the last pass
        self._cancel = threading.Event()
        self._sock: socket.socket | None = None
        self._fd = -1
        self._w: QEMUFileWriter | None = None
        self._rp_thread: threading.Thread | None = None
        self._rp_result: int | None = None
        self._rp_error: str | None = None
        self._rp_done = threading.Event()
        self._config_desc: dict[str, Any] | None = None
        self._ram_id = self.sections.ram_id
        self._stopped_guest = False
        self._was_running = False
        self._thread: threading.Thread | None = None
        self._holds: list[Any] = []
        self.multifd: Any = None  # multifd.MultifdSender while the multifd capability is on
        self.postcopy: Any = None  # postcopy_source.PostcopySource with postcopy-ram
        if caps["postcopy-ram"]:
            from livemig.migration.postcopy.source import PostcopySource

            self.postcopy = PostcopySource(self)
        self.done = threading.Event()

    # -- public -------------------------------------------------------------------------------
    def start(self) -> None:
        self.start_time = time.monotonic()
        self._set_status(status.SETUP)
        # plug state must not change while this migration has a view of it: one hold per
        # discard manager, released in clean-up after every reader of guest RAM stopped
        self._holds = [mr.rdm.hold_state(f"migration to {self.uri}")
                       for mr in self.machine.memory.regions if mr.rdm is not None]
        self._thread = threading.Thread(target=self._main, name="migration-src", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self.status not in status.FINISHED and self.status != status.NONE

    def cancel(self) -> None:
        if not self.is_running():
            return
        self._cancel.set()
        self._set_status(status.CANCELLING)
        if self.multifd is not None:
            self.multifd.abort()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # -- state --------------------------------------------------------------------------------
    def _set_status(self, new: str) -> None:
        if self.status == new:
            return
        self.status = new
        if self.caps["events"]:
            self._emit("MIGRATION", {"status": new})

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled()
        if self._rp_error is not None:
            raise StreamError(0, f"return path: {self._rp_error}")
        if self._rp_result not in (None, 0):
            raise StreamError(0, "destination reported a failed migration")

    # -- the migration thread -----------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._open()
            self._start_multifd()
            self._setup()
            self._iterate()
            if self.postcopy is not None and self.postcopy.start_requested.is_set():
                self.postcopy.run()  # switchover to postcopy; pauses instead of failing
            else:
                self._complete()
        except MigrationCancelled:
            self._fail(status.CANCELLED, None)
        except Exception as e:  # every failure ends here: keep the guest alive
            if self._cancel.is_set():
                self._fail(status.CANCELLED, None)
            else:
                log.info("migration failed: %s", e)
                self._fail(status.FAILED, self._failure_reason(e))
        finally:
            self.end_time = time.monotonic()
            self._close()
            for hold in self._holds:
                hold.release()
            self.done.set()

    def _open(self) -> None:
        if self.uri.scheme == "file":
            self._fd = open_file_for_write(self.uri.path, overwrite=self.params.x_file_overwrite)
            self._w = QEMUFileWriter(os.fdopen(self._fd, "wb", buffering=0, closefd=False), 4 << 20)
        else:
            self._sock = connect(self.uri, tls=self.tls)
            self._w = QEMUFileWriter(self._sock, 4 << 20)

    def _setup(self) -> None:
        w = self._w
        assert w is not None
        savevm.write_header(w)
        self._config_desc = savevm.write_configuration(w, self.machine_type)
        if self._sock is not None:
            savevm.write_command(w, MigCommand.OPEN_RETURN_PATH, b"")
            if self.postcopy is not None:
                self.postcopy.send_advise(w)
            self._rp_thread = threading.Thread(target=self._return_path, name="migration-rp", daemon=True)
            self._rp_thread.start()
        self._write_ram_start(w)

    def _write_ram_start(self, w: QEMUFileWriter, log: bool = True) -> None:
        """RAM START (block list; bitmaps set up meanwhile), the early device sections,
        then ``active``. Without ``log`` (background snapshot) there is no dirty log and
        no sync, but discarded ranges still leave the bitmap."""
        self._ram_id = self.sections.ram_id
        savevm.start_section(w, SectionType.START, self._ram_id, RAM_IDSTR, 0, RAM_VERSION)
        self.saver.write_setup(w)
        self.saver.init_bitmaps(start_log=log, sync=log)
        if log:
            self._pass_event()
        savevm.write_footer(w, self._ram_id)
        self.sections.write_early(w)
        w.flush()
        self.setup_time = int((time.monotonic() - self.start_time) * 1000)
        self._set_status(status.ACTIVE)

    @property
    def machine_type(self) -> str:
        return f"livemig-{self.machine.config.accel}"

    def _pass_event(self) -> None:
        if self.caps["events"]:
            self._emit("MIGRATION_PASS", {"pass": self.saver.stats.dirty_sync_count})

    def _iterate(self) -> None:
        w = self._w
        assert w is not None
        limit_ms = self.params.downtime_limit
        pass_start, pass_bytes = time.monotonic(), w.bytes_written
        window_start, window_bytes = time.monotonic(), w.bytes_written
        while True:
            self._check_cancel()
            if self.postcopy is not None and self.postcopy.start_requested.is_set():
                return  # migrate-start-postcopy
            bw = self.params.max_bandwidth
            slice_bytes = max(int(bw * RATE_WINDOW), TARGET_PAGE_SIZE) if bw else SLICE_BYTES
            savevm.start_section(w, SectionType.PART, self._ram_id)
            self.saver.start_section()
            done = self.saver.send(w, slice_bytes)
            self.saver.write_eos(w)
            savevm.write_footer(w, self._ram_id)
            w.flush()
            if bw:
                sent = w.bytes_written - window_bytes
                ahead = sent / bw - (time.monotonic() - window_start)
                if ahead > 0:
                    self._cancel.wait(ahead)
                if time.monotonic() - window_start > 1.0:
                    window_start, window_bytes = time.monotonic(), w.bytes_written
            if not done:
                continue
            now = time.monotonic()
            elapsed = max(now - pass_start, 1e-6)
            self.bandwidth = (w.bytes_written - pass_bytes) / elapsed
            pass_start, pass_bytes = now, w.bytes_written
            self.saver.sync()
            self._pass_event()
            remaining = self.saver.remaining_bytes
            bw_est = self.bandwidth if self.bandwidth > 0 else 1e9
            self.expected_downtime = int(remaining / bw_est * 1000)
            if remaining <= bw_est * limit_ms / 1000:
                return

    def _complete(self) -> None:
        w = self._w
        assert w is not None
        self._was_running = self.machine.running
        stop_at = time.monotonic()
        self._stopped_guest = True  # before stopping: a failure inside stop must resume
        self.machine.stop("finish-migrate")
        self._set_status(status.DEVICE)
        precopy_bytes = w.bytes_written
        saver = self.saver
        saver.last_stage = True
        saver.sync()
        self._pass_event()
        savevm.start_section(w, SectionType.END, self._ram_id)
        saver.start_section()
        saver.send(w)
        saver.write_eos(w)
        savevm.write_footer(w, self._ram_id)
        self.sections.write_late(w)
        savevm.write_eof(w)
        savevm.write_vmdesc(w, self._vmdesc())
        w.flush()
        saver.stats.precopy_bytes = precopy_bytes
        saver.stats.downtime_bytes = w.bytes_written - precopy_bytes
        if self._rp_thread is not None:
            if not self._rp_done.wait(RETURN_PATH_TIMEOUT) and self._rp_result is None:
                raise StreamError(w.bytes_written, "destination did not confirm the migration")
            self._check_cancel()
            if self._rp_result is None:
                raise StreamError(w.bytes_written, self._rp_error or "return path closed early")
        self.downtime = int((time.monotonic() - stop_at) * 1000)
        if self.machine.accel.dirty_log.active:
            self.machine.accel.dirty_log.stop()
        self.machine.set_runstate("postmigrate")
        self._stopped_guest = False
        self._set_status(status.COMPLETED)

    def _vmdesc(self) -> dict[str, Any]:
        """VMDESCRIPTION: the vmstate sections in stream order (RAM is not described)."""
        return savevm.build_vmdesc(self._config_desc, self.sections.vmdesc_devices(), TARGET_PAGE_SIZE)

    def _failure_reason(self, e: BaseException) -> str:
        """Prefer the destination's verdict to our own symptom (a broken pipe, say).

        A destination that rejects the stream reports it on the return path and closes;
        our next write then fails first. Give the return path a moment to deliver.
        """
        if self._rp_thread is not None and isinstance(e, OSError):
            self._rp_done.wait(1.0)
        if self._rp_result not in (None, 0):
            return f"destination reported a failed migration ({_describe(e)})"
        return _describe(e)

    def _fail(self, final: str, desc: str | None) -> None:
        self.error_desc = desc
        if desc:  # QEMU prints the reason on stderr too
            log.warning("migration %s: %s", final, desc)
        log_ = self.machine.accel.dirty_log
        if log_.active:
            log_.stop()
        if self._stopped_guest:
            if self._was_running:
                self.machine.cont()
            else:
                self.machine.set_runstate("paused")
            self._stopped_guest = False
        self._set_status(final)

    def _start_multifd(self) -> None:
        """multifd: open the channels; RAM pages travel on them (see multifd.py)."""
        if self.caps["multifd"]:
            from livemig.migration.multifd.channels import MultifdSender

            self.multifd = MultifdSender.attach(self)

    def _close(self) -> None:
        if self.multifd is not None:
            self.multifd.close(self.saver.stats)
        if self.postcopy is not None:
            self.postcopy.close()
        if self._w is not None:
            try:
                self._w.close()
            except OSError:
                pass
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- return path --------------------------------------------------------------------------
    def _return_path(self) -> None:
        """Read destination-to-source messages: SHUT carries the load result."""
        assert self._sock is not None
        r = QEMUFileReader(self._sock, 64 << 10)
        try:
            for kind, payload in rp.read_messages(r):
                if kind == RPMessage.SHUT:
                    self._rp_result = rp.parse_shut(payload)
                    return
                if self.postcopy is not None and self.postcopy.rp_message(kind, payload, r):
                    continue
                self._rp_error = f"unexpected return-path message {kind}"
                return
        except (StreamError, OSError, ValueError) as e:
            if self._rp_result is None and not self._cancel.is_set():
                self._rp_error = f"return path lost: {_describe(e)}"
        finally:
            self._rp_done.set()

    # -- query-migrate ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        now = self.end_time or time.monotonic()
        out: dict[str, Any] = {"status": self.status}
        if self.status == status.NONE:
            return out
        total_ms = int((now - self.start_time) * 1000)
        st = self.saver.stats
        transferred = self._w.bytes_written if self._w is not None else 0
        secs = max(now - self.start_time, 1e-6)
        out["total-time"] = total_ms
        out["setup-time"] = self.setup_time
        if self.status == status.COMPLETED and self.downtime is not None:
            out["downtime"] = self.downtime
        elif self.status not in status.FINISHED:
            out["expected-downtime"] = self.expected_downtime
        out["ram"] = {
            "transferred": transferred,
            "remaining": self.saver.remaining_bytes,
            "total": self.saver.total_bytes,
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
        if self.postcopy is not None:
            out["ram"].update(self.postcopy.info_ram())
        if self.error_desc:
            out["error-desc"] = self.error_desc
        return out


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__
