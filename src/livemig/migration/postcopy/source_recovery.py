"""Postcopy on the source after a failure: pause, and recovery over a new connection.

Once the device state is sent the destination guest may run, so a failed connection (the
main stream, the postcopy channel or the return path) is not a failed migration: the
source goes to ``postcopy-paused`` with its guest stopped, and ``migrate {uri, resume:
true}`` reconnects (reference 5.1):

    postcopy-recover-setup   connect the main channel (and the postcopy channel)
    postcopy-recover         RECV_BITMAP per block; each block's received bitmap comes back
                             on the return path and is complemented into the migration
                             bitmap (not received = dirty), discarded ranges cleared again
                             (RamState.rebuild); the dirty count rebuilt (RamState.recount)
                             POSTCOPY_RESUME, then wait for RESUME_ACK
    postcopy-active          the push carries on; the postcopy channel serves again

A failure during that handshake pauses again; the next resume starts over.

Connections come in *generations*: every reconnection starts a new one with its own
return-path reader and postcopy-channel thread, and a report from an older generation's
thread (which may still be on its way out) is ignored.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from livemig.migration.channels import MigrationURI
from livemig.migration.core import status
from livemig.migration.core.job import SILENT_PEER
from livemig.migration.postcopy.urgent import UrgentPages
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    MIGRATION_RESUME_ACK_VALUE,
    RAMBLOCK_RECV_BITMAP_ENDING,
    MigCommand,
    RPMessage,
)
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError
from livemig.migration.stream.return_channel import ReturnPathReader

if TYPE_CHECKING:
    from livemig.migration.outgoing import OutgoingMigration

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
RESUMABLE = (status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER_SETUP, status.POSTCOPY_RECOVER)


class PostcopyConnectionLost(ConnectionError):
    """A connection of the current generation failed: postcopy pauses."""


class DestinationFailed(StreamError):
    """The destination reported a failed load (its guest never ran): the migration fails."""

    @classmethod
    def of(cls, reader: ReturnPathReader, at: int = 0) -> DestinationFailed:
        why = "destination reported a failed migration"
        return cls(at, f"{why}: {reader.reason}" if reader.reason else why)


class SourceRecovery:
    """The source's connection generations, pause and recovery (module docstring)."""

    def __init__(self, out: OutgoingMigration, urgent: UrgentPages, wake: threading.Event):
        self.out = out
        self.urgent = urgent
        self.wake = wake  # the migration thread's waits end when a connection is lost
        self.uri = out.uri  # where the postcopy channel connects; a resume replaces it
        self.gen = 0
        self.lost_why: str | None = None
        self.paused = False
        self.recoveries = 0
        self._lock = threading.Lock()
        self._resume_uri: MigrationURI | None = None
        self._resume_requested = threading.Event()
        self._bitmaps_pending: set[str] = set()
        self._bitmaps_done = threading.Event()
        self._resume_ack = threading.Event()
        out.rp_lost = self.lost_callback()

    # -- connection health -------------------------------------------------------------
    def lost_callback(self) -> functools.partial[None]:
        """``on_lost`` for the readers of this generation."""
        return functools.partial(self.lost, self.gen)

    def lost(self, gen: int, why: str) -> None:
        """A connection of generation ``gen`` failed: shut every channel down, so each
        thread blocked on one notices, and wake the migration thread."""
        if gen != self.gen:
            return
        if self.lost_why is None:
            self.lost_why = why
        self.out.shutdown_channel()
        if self.urgent.channel is not None:
            self.urgent.channel.shutdown()
        self.wake.set()
        self._bitmaps_done.set()
        self._resume_ack.set()

    def check(self) -> None:
        """Raise if the destination failed (DestinationFailed) or a connection of this
        generation is gone (PostcopyConnectionLost)."""
        rp_ = self.out.rp
        if rp_ is not None and rp_.failed:
            raise DestinationFailed.of(rp_)
        if self.lost_why is not None:
            raise PostcopyConnectionLost(self.lost_why)
        if rp_ is not None and rp_.done.is_set() and rp_.result is None:
            raise PostcopyConnectionLost(rp_.error or "return path closed")

    # -- pause -------------------------------------------------------------------------
    def pause(self, why: str) -> None:
        """The migration thread: close this generation and wait in ``postcopy-paused``."""
        out = self.out
        # the first channel to fail saw the cause — unless this failure is the cause: a
        # silent link's ETIMEDOUT is reported once, to whichever call on the socket comes
        # first, and the others see an end of stream
        if self.lost_why is not None and SILENT_PEER not in why:
            why = self.lost_why
        log.info("postcopy paused: %s", why)
        self.paused = True
        out.job.note_error(why)
        out.shutdown_channel()
        self.urgent.close_channel()
        if not out.job.move(status.POSTCOPY_PAUSED, RESUMABLE):
            out.job.check_cancel()

    def request_pause(self) -> None:
        """QMP ``migrate-pause``: drop the connection on purpose."""
        if self.out.status not in RESUMABLE:
            raise RuntimeError(
                "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
            )
        self.lost(self.gen, "paused by migrate-pause")

    # -- recovery ----------------------------------------------------------------------
    def resume(self, uri: MigrationURI) -> None:
        """QMP ``migrate {uri, resume: true}``."""
        with self._lock:
            if self.out.status != status.POSTCOPY_PAUSED or self._resume_requested.is_set():
                raise RuntimeError("Cannot resume if there is no paused migration")
            self._resume_uri = uri
            self._resume_requested.set()

    def await_resume(self) -> None:
        """The migration thread, paused: wait for ``resume``, then reconnect (raises if the
        handshake fails: the caller pauses again)."""
        out = self.out
        while not self._resume_requested.wait(0.2):
            out.job.check_cancel()
        uri = self._resume_uri
        assert uri is not None
        try:
            self._reconnect(uri)
        finally:
            self._resume_requested.clear()
        self.paused = False

    def _reconnect(self, uri: MigrationURI) -> None:
        out, job = self.out, self.out.job
        if not job.move(status.POSTCOPY_RECOVER_SETUP, status.POSTCOPY_PAUSED):
            job.check_cancel()
        self.uri = uri
        sock = out.connect(uri)
        try:
            chan = out.connect(uri) if self.urgent.channel is not None else None
        except BaseException:
            sock.close()
            raise
        if out.rp is not None:  # the old reader must be gone before the new one reports
            out.rp.join()
        with self._lock:
            self.gen += 1
            self.lost_why = None
            self._bitmaps_pending = {b.idstr for b in out.ram.blocks}
        self._bitmaps_done.clear()
        self._resume_ack.clear()
        out.use_channel(sock, QEMUFileWriter(sock, 4 << 20))
        if chan is not None and self.urgent.channel is not None:
            self.urgent.channel.attach(chan)
        self.recoveries += 1
        if not job.move(status.POSTCOPY_RECOVER, status.POSTCOPY_RECOVER_SETUP):
            job.check_cancel()
        self.urgent.new_return_path()
        out.rp_lost = self.lost_callback()
        out.start_return_path()
        w = out.writer
        for b in out.ram.blocks:
            name = b.idstr.encode()
            savevm.write_command(w, MigCommand.RECV_BITMAP, bytes([len(name)]) + name)
        w.flush()
        self._wait(self._bitmaps_done, "received bitmaps")
        if self._bitmaps_pending:
            raise PostcopyConnectionLost("return path closed before all received bitmaps arrived")
        out.ram.recount()
        savevm.write_command(w, MigCommand.POSTCOPY_RESUME)
        w.flush()
        self._wait(self._resume_ack, "RESUME_ACK")
        job.note_error(None)
        if not job.move(status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER):
            job.check_cancel()
        if self.urgent.channel is not None:
            self.urgent.channel.start(self.gen)

    def _wait(self, evt: threading.Event, what: str) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while not evt.wait(0.05):
            self.check()
            if time.monotonic() > deadline:
                raise PostcopyConnectionLost(f"recovery handshake: no {what} from the destination")
        self.check()

    # -- the return path's recovery messages -------------------------------------------
    def rp_message(self, kind: int, payload: bytes, r: QEMUFileReader) -> bool:
        """RECV_BITMAP and RESUME_ACK; False for other messages."""
        if kind == RPMessage.RECV_BITMAP:
            self._reload_bitmap(payload, r)
            return True
        if kind == RPMessage.RESUME_ACK:
            (value,) = struct.unpack(">I", payload) if len(payload) == 4 else (None,)
            if value != MIGRATION_RESUME_ACK_VALUE:
                raise rp.ReturnPathError(f"illegal resume ack value {value}")
            self._resume_ack.set()
            return True
        return False

    def _reload_bitmap(self, payload: bytes, r: QEMUFileReader) -> None:
        """RECV_BITMAP (reference 5.1): size and end mark checked, then the block's bitmap
        is rebuilt from it (the bitmap itself follows the message, outside its framing)."""
        out = self.out
        if out.status != status.POSTCOPY_RECOVER:
            raise rp.ReturnPathError("RECV_BITMAP received outside postcopy-recover")
        name = rp.parse_recv_bitmap_name(payload)
        b = out.ram.by_name.get(name)
        if b is None:
            raise rp.ReturnPathError(f"RECV_BITMAP for unknown ramblock '{name}'")
        nbits = b.used_pages
        expect = rp.recv_bitmap_size(nbits)
        size = r.get_be64()
        if size != expect:
            raise rp.ReturnPathError(f"ramblock '{name}' bitmap size mismatch (0x{size:x} != 0x{expect:x})")
        data = r.read_exact(size)
        end = r.get_be64()
        if end != RAMBLOCK_RECV_BITMAP_ENDING:
            raise rp.ReturnPathError(f"ramblock '{name}' end mark incorrect: 0x{end:x}")
        received = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:nbits].astype(bool)
        out.ram.rebuild(b, received)
        with self._lock:
            self._bitmaps_pending.discard(name)
            if not self._bitmaps_pending:
                self._bitmaps_done.set()
