"""Postcopy on the source: switchover, urgent pages, background push, pause and recovery.

Driven by :class:`~livemig.migration.outgoing.OutgoingMigration` through small hooks:
``send_advise`` at setup, :meth:`PostcopySource.run` instead of the precopy completion
once ``migrate-start-postcopy`` was given, and ``rp_message`` for return-path messages.

Switchover (QEMU's ``postcopy_start``): open the postcopy channel (``postcopy-preempt``),
stop the guest, final dirty sync, send the discard list (reference 3.7: runs of pages still
dirty, so the destination drops what it holds of them — discarded memory has bit 0 and is
never in it), then the device state packaged with LISTEN and RUN. From then on the
destination guest runs and pages flow two ways:

* urgent: a request (``REQ_PAGES(_ID)``) is answered at once, on the postcopy channel by
  the thread that reads it (with ``postcopy-preempt``) or ahead of the next background
  batch on the main stream (without). A request for a page that is no longer dirty is
  still answered on the postcopy channel (it may be in flight on the main stream, behind
  megabytes of other pages) — unless the page is discarded, which is never read or sent;
* background: the rest of the dirty bitmap, in PART sections, at ``max-postcopy-bandwidth``.

One lock covers the dirty bitmaps and count in postcopy: the urgent server clears a
page's bit before it reads the page, the background push clears a batch's bits before it
reads the batch, so a page is sent twice only when a request races the main stream.

A connection failure (either channel, or the return path) after the device state was sent
is not a failed migration: the source goes to ``postcopy-paused`` with the guest stopped,
and ``migrate {uri, resume: true}`` reconnects (reference 5.1): RECV_BITMAP per block, the
received bitmaps complemented into the dirty bitmaps, discarded ranges cleared again, the
count rebuilt, POSTCOPY_RESUME / RESUME_ACK, and the push continues. A failure during that
handshake pauses again.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.migration.channels import MigrationURI, connect
from livemig.migration.core import status
from livemig.migration.postcopy.destination import pagesize_summary, urgent_priority
from livemig.migration.ram.save import BlockSaveState
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    MIGRATION_RESUME_ACK_VALUE,
    RAMBLOCK_RECV_BITMAP_ENDING,
    MigCommand,
    RamFlag,
    RPMessage,
    SectionType,
)
from livemig.migration.stream.qemu_file import (
    BytesWriter,
    QEMUFileReader,
    QEMUFileWriter,
    StreamError,
)

if TYPE_CHECKING:
    from livemig.migration.outgoing import OutgoingMigration

log = logging.getLogger(__name__)

PAGE = 4096
PAGE_SHIFT = 12
BATCH_WORDS = 16  # at most 1024 pages per background batch
SLICE_BYTES = 32 << 20
RATE_WINDOW = 0.1
HANDSHAKE_TIMEOUT = 30.0
_ZERO_PAGE = bytes(PAGE)
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)


class PostcopyConnectionLost(ConnectionError):
    pass


class DestinationFailed(StreamError):
    """The destination reported a failed load (before its guest ran)."""


class PostcopySource:
    def __init__(self, out: OutgoingMigration):
        if out.uri.scheme not in ("tcp", "unix"):
            raise ValueError("postcopy-ram needs a socket migration URI (tcp: or unix:)")
        self.out = out
        self.machine = out.machine
        self.saver = out.saver
        self.preempt = bool(out.caps["postcopy-preempt"])
        if self.preempt and out.tls is not None:
            raise ValueError("postcopy-preempt over TLS is not supported; turn postcopy-preempt off")
        self.start_requested = threading.Event()
        self.active = False  # the destination may be running: failures pause from here on
        self.lock = threading.Lock()  # dirty bitmaps and count, in postcopy
        self._chan_lock = threading.Lock()  # the postcopy channel's writer
        self._state_lock = threading.Lock()
        self.gen = 0
        self.chan: Any = None
        self._chan_w: QEMUFileWriter | None = None
        self._chan_block: Any = None
        self._chan_finished = False
        self._paused = False
        self._resume_uri: MigrationURI | None = None
        self._resume_evt = threading.Event()
        self._wake = threading.Event()
        self._bitmaps_pending: set[str] = set()
        self._bitmaps_done = threading.Event()
        self._resume_ack = threading.Event()
        self._handshake_error: str | None = None
        self._urgent: deque[tuple[BlockSaveState, int, int]] = deque()
        self._by_name = {b.block.idstr: b for b in self.saver.blocks}
        self._blk = 0
        self._nzw: np.ndarray | None = None
        self._pos = 0
        self.requested = {b.block.idstr: Bitmap(b.total_pages) for b in self.saver.blocks}
        self.sent = {b.block.idstr: Bitmap(b.total_pages) for b in self.saver.blocks}
        self.c = {
            "requests": 0,
            "requested-pages": 0,
            "urgent-pages": 0,
            "resent-pages": 0,
            "discarded-requests": 0,
            "background-pages": 0,
            "recoveries": 0,
        }
        self.window = (time.monotonic(), 0)
        self._rp_last: list = [None]  # block named last on the original return path
        self._rp_thread: threading.Thread | None = None

    # -- setup and the start request --------------------------------------------------------------
    def send_advise(self, w: QEMUFileWriter) -> None:
        """POSTCOPY_ADVISE: be64 page-size summary, be64 target page size."""
        blocks = [b.block for b in self.saver.blocks]
        savevm.write_command(w, MigCommand.POSTCOPY_ADVISE, struct.pack(">QQ", pagesize_summary(blocks), PAGE))

    def request_start(self) -> None:
        self.start_requested.set()

    # -- switchover -------------------------------------------------------------------------------
    def run(self) -> None:
        out = self.out
        w = out._w
        assert w is not None
        try:
            if self.preempt:
                self._set_chan(connect(out.uri, tls=out.tls))
            out._was_running = self.machine.running
            stop_at = time.monotonic()
            out._stopped_guest = True
            self.machine.stop("finish-migrate")
            out._set_status(status.POSTCOPY_DEVICE)
            precopy_bytes = w.bytes_written
            saver = self.saver
            saver.last_stage = True
            saver.sync()
            out._pass_event()
            self._send_discards(w)
            pkg = BytesWriter()
            savevm.write_command(pkg, MigCommand.POSTCOPY_LISTEN)
            out.sections.write_late(pkg)
            savevm.write_command(pkg, MigCommand.PING, struct.pack(">I", 3))
            savevm.write_command(pkg, MigCommand.POSTCOPY_RUN)
            data = pkg.getvalue()
            savevm.write_command(w, MigCommand.PACKAGED, struct.pack(">I", len(data)))
            w.put_bytes(data)
            w.flush()
        except BaseException:
            self._close_chan()
            raise
        saver.stats.precopy_bytes = precopy_bytes
        saver.stats.downtime_bytes = w.bytes_written - precopy_bytes
        out.downtime = int((time.monotonic() - stop_at) * 1000)
        self.active = True
        self.window = (time.monotonic(), 0)
        out._set_status(status.POSTCOPY_ACTIVE)
        if self.preempt:
            self._start_chan_server()
        self._loop()

    def _send_discards(self, w: QEMUFileWriter) -> None:
        """Reference 3.7: runs of set bits (still dirty), in bytes, 12 per command."""
        for b in self.saver.blocks:
            starts, lengths = b.bmap.runs(True, 0, b.used_pages)
            if not len(starts):
                continue
            name = b.block.idstr.encode()
            head = bytes([0, len(name)]) + name + b"\0"
            pairs = np.empty((len(starts), 2), ">u8")
            pairs[:, 0] = starts << PAGE_SHIFT
            pairs[:, 1] = lengths << PAGE_SHIFT
            for i in range(0, len(pairs), 12):
                savevm.write_command(w, MigCommand.POSTCOPY_RAM_DISCARD, head + pairs[i : i + 12].tobytes())

    # -- the postcopy loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                if self._paused:
                    self._await_resume()
                    continue
                self._check_conn()
                if self._push_slice():
                    self._finish()
                    return
            except DestinationFailed:
                raise
            except Exception as e:  # noqa: BLE001 - in postcopy every failure pauses
                self.out._rp_done.wait(0.2)  # a destination that failed says so: fail, not pause
                if self.out._rp_result not in (None, 0):
                    raise DestinationFailed(0, "destination reported a failed migration") from e
                if self.out._rp_result == 0:  # it completed; only the goodbye was lost
                    self._completed()
                    return
                self._enter_pause(_describe(e))

    def _check_conn(self) -> None:
        out = self.out
        if out._rp_result not in (None, 0):
            raise DestinationFailed(0, "destination reported a failed migration")
        if out._rp_done.is_set() and out._rp_result is None:
            raise PostcopyConnectionLost(out._rp_error or "return path closed")

    def _reset_pass(self) -> None:
        self._blk, self._nzw, self._pos = 0, None, 0

    def _next_batch(self) -> tuple[BlockSaveState, np.ndarray] | None:
        blocks = self.saver.blocks
        with self.lock:
            while self._blk < len(blocks):
                b = blocks[self._blk]
                if self._nzw is None:
                    self._nzw = np.flatnonzero(b.bmap.words)
                    self._pos = 0
                    b.extents = b.block.data_extent_pages() if b.block.fd >= 0 and len(self._nzw) else None
                while self._pos < len(self._nzw):
                    widx = self._nzw[self._pos : self._pos + BATCH_WORDS]
                    self._pos += len(widx)
                    words = b.bmap.words[widx]
                    keep = words != 0
                    if not keep.any():
                        continue
                    widx, words = widx[keep], words[keep]
                    bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(-1, 64)
                    r, c = np.nonzero(bits)
                    idx = widx[r].astype(np.int64) * 64 + c
                    b.bmap.words[widx] = 0
                    self.saver.dirty_pages -= len(idx)
                    return b, idx
                self._blk += 1
                self._nzw = None
        return None

    def _push_slice(self) -> bool:
        """One PART section of background pages (urgent ones first); True when all is sent.

        Over the ``max-postcopy-bandwidth`` budget only requested pages go out (without
        the postcopy channel they travel here); the push waits for the budget or for the
        next request, whichever comes first.
        """
        out = self.out
        w = out._w
        assert w is not None
        over = self._over_budget()
        if over > 0 and not self._urgent:
            self._wake.wait(min(over, 0.1))
            self._wake.clear()
            return False
        bw = out.params.max_postcopy_bandwidth
        slice_bytes = max(int(bw * RATE_WINDOW), PAGE) if bw else SLICE_BYTES
        start = w.bytes_written
        savevm.start_section(w, SectionType.PART, out._ram_id)
        self.saver.start_section()
        done = False
        while w.bytes_written - start < slice_bytes:
            if self._urgent:
                self._send_urgent_main(w)
                continue
            if over > 0:
                break
            batch = self._next_batch()
            if batch is None:
                done = not self._urgent
                break
            b, idx = batch
            self.saver.send_pages(w, b, idx)
            _set_bits(self.sent[b.block.idstr], idx)
            self.c["background-pages"] += len(idx)
            if self._paused:
                break
        self.saver.write_eos(w)
        savevm.write_footer(w, out._ram_id)
        w.flush()
        sent = w.bytes_written - start
        self.saver.stats.postcopy_bytes += sent
        t0, n = self.window
        self.window = (t0, n + sent)
        return done

    def _over_budget(self) -> float:
        """Seconds the push is ahead of ``max-postcopy-bandwidth`` (0: may send)."""
        bw = self.out.params.max_postcopy_bandwidth
        now = time.monotonic()
        if not bw:
            self.window = (now, 0)
            return 0.0
        t0, n = self.window
        ahead = n / bw - (now - t0)
        if ahead <= 0:
            if now - t0 > 1.0:  # a new window; unused budget is not banked
                self.window = (now, 0)
            return 0.0
        return ahead

    # -- urgent pages -------------------------------------------------------------------------------
    def _serve_request(self, idstr: str | None, start: int, length: int, last: list) -> None:
        """One REQ_PAGES(_ID): validated like QEMU's ``migrate_handle_rp_req_pages``."""
        if idstr is None:
            b = last[0]
            if b is None:
                raise rp.ReturnPathError("MIG_RP_MSG_REQ_PAGES has no block name")
        else:
            b = self._by_name.get(idstr)
            if b is None:
                raise rp.ReturnPathError(f"MIG_RP_MSG_REQ_PAGES has invalid block name {idstr!r}")
        last[0] = b
        if start % PAGE or length <= 0 or length % PAGE or start + length > b.block.used_length:
            raise rp.ReturnPathError(
                f"MIG_RP_MSG_REQ_PAGES request overrun, start=0x{start:x} len=0x{length:x} "
                f"blocklen=0x{b.block.used_length:x}"
            )
        self.c["requests"] += 1
        self.saver.stats.postcopy_requests += 1
        first, n = start >> PAGE_SHIFT, length >> PAGE_SHIFT
        self.requested[b.block.idstr].set_range(first, n)
        self.c["requested-pages"] += n
        if self.preempt and self._chan_w is not None:
            self._serve_on_chan(b, first, n)
        else:
            self._urgent.append((b, first, n))
            self._wake.set()

    def _take_bits(self, b: BlockSaveState, first: int, n: int) -> list[tuple[int, bool]]:
        """(page, was dirty) for each page; dirty bits are cleared (under the lock)."""
        out = []
        with self.lock:
            words = b.bmap.words
            for page in range(first, first + n):
                w, bit = page >> 6, np.uint64(1 << (page & 63))
                was = bool(words[w] & bit)
                if was:
                    words[w] &= ~bit
                    self.saver.dirty_pages -= 1
                out.append((page, was))
        return out

    def _discarded(self, b: BlockSaveState, page: int) -> bool:
        rdm = b.mr.rdm
        return rdm is not None and not rdm.is_populated(Section(b.mr, page << PAGE_SHIFT, PAGE))

    def _serve_on_chan(self, b: BlockSaveState, first: int, n: int) -> None:
        with self._chan_lock:
            w = self._chan_w
            if w is None or self._chan_finished:
                return  # everything was sent; the page is on its way
            for page, was in self._take_bits(b, first, n):
                if not was:
                    if self._discarded(b, page):  # never read, never sent (reference 3.5)
                        self.c["discarded-requests"] += 1
                        log.warning("request for discarded page 0x%x of %s ignored", page << 12, b.block.idstr)
                        continue
                    self.c["resent-pages"] += 1
                before = w.bytes_written
                self._emit(w, b, page)
                self.saver.stats.postcopy_bytes += w.bytes_written - before
                self.c["urgent-pages"] += 1
                _set_bits(self.sent[b.block.idstr], np.array([page], np.int64))
            w.flush()

    def _emit(self, w: QEMUFileWriter, b: BlockSaveState, page: int) -> None:
        """One page record on the postcopy channel: ZERO for holes and zero pages."""
        block = b.block
        off = page << PAGE_SHIFT
        data = None
        if block.fd >= 0:
            try:
                has_data = os.lseek(block.fd, off, _SEEK_DATA) == off
            except OSError:
                has_data = False
        else:
            has_data = True
        if has_data:
            data = block.view[off : off + PAGE]
            if data == _ZERO_PAGE:
                data = None
        flag = RamFlag.PAGE if data is not None else RamFlag.ZERO
        if self._chan_block is block:
            w.put_be64(off | flag | RamFlag.CONTINUE)
        else:
            w.put_be64(off | flag)
            w.put_counted_string(block.idstr)
            self._chan_block = block
        if data is None:
            w.put_u8(0)
            self.saver.stats.duplicate += 1
        else:
            w.put_bytes(data)
            self.saver.stats.normal += 1
            self.saver.stats.pages_read += 1

    def _send_urgent_main(self, w: QEMUFileWriter) -> None:
        """Without the postcopy channel: requested pages ahead of the next batch (QEMU skips
        pages that are no longer dirty: they are already on their way)."""
        while self._urgent:
            b, first, n = self._urgent.popleft()
            pages = [p for p, was in self._take_bits(b, first, n) if was]
            if pages:
                idx = np.array(pages, np.int64)
                self.saver.send_pages(w, b, idx)
                _set_bits(self.sent[b.block.idstr], idx)
                self.c["urgent-pages"] += len(pages)

    # -- channels ---------------------------------------------------------------------------------------
    def _set_chan(self, sock: Any) -> None:
        self.chan = sock
        self._chan_w = QEMUFileWriter(sock, 1 << 20)
        self._chan_block = None
        self._chan_finished = False

    def _close_chan(self) -> None:
        s = self.chan
        if s is not None:  # first, without the lock: a send blocked on a dead link returns
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._chan_lock:
            s, self.chan, self._chan_w = self.chan, None, None
        if s is not None:
            s.close()

    def _start_chan_server(self) -> None:
        gen, chan = self.gen, self.chan
        threading.Thread(target=self._chan_server, args=(gen, chan), name="postcopy-urgent", daemon=True).start()

    def _chan_server(self, gen: int, chan: Any) -> None:
        """Read page requests from the postcopy channel and answer each at once."""
        r = QEMUFileReader(chan, 64 << 10)
        last: list = [None]
        urgent_priority(threading.get_native_id())
        try:
            while True:
                kind, payload = rp.read_message(r)
                if kind not in (RPMessage.REQ_PAGES, RPMessage.REQ_PAGES_ID):
                    raise rp.ReturnPathError(f"unexpected message {kind} on the postcopy channel")
                start, n, idstr = rp.parse_req_pages(kind, payload)
                self._serve_request(idstr, start, n, last)
        except Exception as e:  # noqa: BLE001
            if gen == self.gen and not (self._chan_finished and isinstance(e, StreamError)):
                self._lost(gen, f"postcopy channel: {_describe(e)}")

    def _lost(self, gen: int, why: str) -> None:
        """A channel of generation ``gen`` failed: shut everything so every thread notices."""
        if gen != self.gen:
            return
        out = self.out
        if out._rp_error is None:
            out._rp_error = why
        for s in (out._sock, self.chan):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._wake.set()

    # -- return path --------------------------------------------------------------------------------------
    def rp_message(self, kind: int, payload: bytes, r: QEMUFileReader, last: list | None = None) -> bool:
        """Messages of the return path besides SHUT and PONG; False if not ours."""
        if kind in (RPMessage.REQ_PAGES, RPMessage.REQ_PAGES_ID):
            start, n, idstr = rp.parse_req_pages(kind, payload)
            self._serve_request(idstr, start, n, last if last is not None else self._rp_last)
            return True
        if kind == RPMessage.RECV_BITMAP:
            self._reload_bitmap(payload, r)
            return True
        if kind == RPMessage.RESUME_ACK:
            (value,) = struct.unpack(">I", payload[:4]) if len(payload) == 4 else (None,)
            if value != MIGRATION_RESUME_ACK_VALUE:
                raise rp.ReturnPathError(f"illegal resume ack value {value}")
            self._resume_ack.set()
            return True
        return False

    def _return_path(self, gen: int, sock: Any) -> None:
        """The return-path reader of a reconnected channel (generation ``gen``)."""
        out = self.out
        r = QEMUFileReader(sock, 64 << 10)
        last: list = [None]
        try:
            for kind, payload in rp.read_messages(r):
                if kind == RPMessage.SHUT:
                    out._rp_result = rp.parse_shut(payload)
                    return
                if not self.rp_message(kind, payload, r, last):
                    raise rp.ReturnPathError(f"unexpected return-path message {kind}")
        except Exception as e:  # noqa: BLE001
            if out._rp_result is None and gen == self.gen:
                out._rp_error = f"return path lost: {_describe(e)}"
                self._lost(gen, out._rp_error)
        finally:
            if gen == self.gen:
                out._rp_done.set()
                self._bitmaps_done.set()
                self._resume_ack.set()

    def _reload_bitmap(self, payload: bytes, r: QEMUFileReader) -> None:
        """RECV_BITMAP (reference 5.1): check, complement, clear discarded; then recount."""
        if self.out.status != status.POSTCOPY_RECOVER:
            raise rp.ReturnPathError("RECV_BITMAP received outside postcopy-recover")
        name = rp.parse_recv_bitmap_name(payload)
        b = self._by_name.get(name)
        if b is None:
            raise rp.ReturnPathError(f"RECV_BITMAP for unknown ramblock '{name}'")
        nbits = b.used_pages
        expect = rp.recv_bitmap_size(nbits)
        size = r.get_be64()
        if size != expect:
            raise rp.ReturnPathError(
                f"ramblock '{name}' bitmap size mismatch (0x{size:x} != 0x{expect:x})"
            )
        data = r.read_exact(size)
        end = r.get_be64()
        if end != RAMBLOCK_RECV_BITMAP_ENDING:
            raise rp.ReturnPathError(f"ramblock '{name}' end mark incorrect: 0x{end:x}")
        received = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:nbits].astype(bool)
        dirty = np.zeros(len(b.bmap.words) * 64, bool)
        dirty[:nbits] = ~received  # complement: everything not received must be sent
        words = np.packbits(dirty, bitorder="little").view(np.uint64)
        with self.lock:
            b.bmap.words[:] = words
            rdm = b.mr.rdm
            if rdm is not None:  # the seed's rule: discarded ranges are clean again
                offs, sizes = rdm.discarded_runs(Section(b.mr, 0, b.block.used_length))
                if len(offs):
                    b.bmap.clear_runs(
                        np.asarray(offs, np.int64) >> PAGE_SHIFT, np.asarray(sizes, np.int64) >> PAGE_SHIFT
                    )
            self._bitmaps_pending.discard(name)
            if not self._bitmaps_pending:
                self._bitmaps_done.set()

    # -- pause and recovery ---------------------------------------------------------------------------
    def _enter_pause(self, why: str) -> None:
        out = self.out
        with self._state_lock:
            log.info("postcopy paused: %s", why)
            self._paused = True
            out.error_desc = why
            for s in (out._sock,):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._close_chan()
            out._set_status(status.POSTCOPY_PAUSED)

    def pause(self) -> None:
        """QMP ``migrate-pause``: drop the connection on purpose."""
        if self.out.status not in (status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER, status.POSTCOPY_RECOVER_SETUP):
            raise RuntimeError("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
        self._lost(self.gen, "paused by migrate-pause")
        self._wake.set()

    def resume(self, uri: MigrationURI) -> None:
        """QMP ``migrate {uri, resume: true}``."""
        if self.out.status != status.POSTCOPY_PAUSED or self._resume_evt.is_set():
            raise RuntimeError("Cannot resume if there is no paused migration")
        self._resume_uri = uri
        self._resume_evt.set()

    def _await_resume(self) -> None:
        out = self.out
        while not self._resume_evt.wait(0.2):
            if out._cancel.is_set():
                raise DestinationFailed(0, "cancelled")
        uri = self._resume_uri
        assert uri is not None
        # the old return-path reader must be gone before the new one reports anything
        for t in (out._rp_thread, self._rp_thread):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)
        try:
            self._recover(uri)
        finally:
            self._resume_evt.clear()
        self._paused = False

    def _recover(self, uri: MigrationURI) -> None:
        out = self.out
        out._set_status(status.POSTCOPY_RECOVER_SETUP)
        out.uri = uri
        sock = connect(uri, tls=out.tls)
        try:
            chan = connect(uri, tls=out.tls) if self.preempt else None
        except BaseException:
            sock.close()
            raise
        old_w, old_sock = out._w, out._sock
        self.gen += 1
        gen = self.gen
        out._sock, out._w = sock, QEMUFileWriter(sock, 4 << 20)
        for s in (old_sock,):
            if s is not None:
                s.close()
        if old_w is not None:
            try:
                old_w.close()
            except OSError:
                pass
        if chan is not None:
            with self._chan_lock:
                self._set_chan(chan)
        out._rp_result = None
        out._rp_error = None
        out._rp_done.clear()
        self._bitmaps_done.clear()
        self._resume_ack.clear()
        self.c["recoveries"] += 1
        out._set_status(status.POSTCOPY_RECOVER)
        self._rp_thread = threading.Thread(
            target=self._return_path, args=(gen, sock), name="migration-rp", daemon=True
        )
        self._rp_thread.start()
        w = out._w
        with self.lock:
            self._bitmaps_pending = {b.block.idstr for b in self.saver.blocks}
        for b in self.saver.blocks:
            name = b.block.idstr.encode()
            savevm.write_command(w, MigCommand.RECV_BITMAP, bytes([len(name)]) + name)
        w.flush()
        self._wait(self._bitmaps_done, "received bitmaps")
        if self._bitmaps_pending:
            raise PostcopyConnectionLost("return path closed before all received bitmaps arrived")
        with self.lock:
            self.saver.dirty_pages = sum(b.bmap.count() for b in self.saver.blocks)
            self._reset_pass()
        savevm.write_command(w, MigCommand.POSTCOPY_RESUME)
        w.flush()
        self._wait(self._resume_ack, "RESUME_ACK")
        self._check_conn()
        out.error_desc = None
        self.window = (time.monotonic(), 0)
        out._set_status(status.POSTCOPY_ACTIVE)
        if self.preempt:
            self._start_chan_server()

    def _wait(self, evt: threading.Event, what: str) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while not evt.wait(0.05):
            self._check_conn()
            if time.monotonic() > deadline:
                raise PostcopyConnectionLost(f"recovery handshake: no {what} from the destination")
        self._check_conn()

    # -- completion --------------------------------------------------------------------------------------
    def _finish(self) -> None:
        out = self.out
        w = out._w
        assert w is not None
        with self._chan_lock:
            if self._chan_w is not None:
                self._chan_finished = True
                self._chan_w.put_be64(RamFlag.EOS)
                self._chan_w.flush()
        savevm.start_section(w, SectionType.END, out._ram_id)
        self.saver.start_section()
        self.saver.write_eos(w)
        savevm.write_footer(w, out._ram_id)
        savevm.write_eof(w)
        savevm.write_vmdesc(w, out._vmdesc())
        w.flush()
        while out._rp_result is None:
            self._check_conn()
            out._rp_done.wait(0.05)
        if out._rp_result != 0:
            raise DestinationFailed(w.bytes_written, "destination reported a failed migration")
        self._completed()

    def _completed(self) -> None:
        out = self.out
        if self.machine.accel.dirty_log.active:
            self.machine.accel.dirty_log.stop()
        self.machine.set_runstate("postmigrate")
        out._stopped_guest = False
        out._set_status(status.COMPLETED)

    def close(self) -> None:
        self._close_chan()

    # -- query-migrate ----------------------------------------------------------------------------------
    def info_ram(self) -> dict[str, int]:
        return {
            "postcopy-requests": self.c["requests"],
            "postcopy-requested-pages": self.c["requested-pages"],
            "postcopy-urgent-pages": self.c["urgent-pages"],
            "postcopy-resent-pages": self.c["resent-pages"],
            "postcopy-discarded-requests": self.c["discarded-requests"],
            "postcopy-background-pages": self.c["background-pages"],
            "postcopy-recoveries": self.c["recoveries"],
        }


def _set_bits(bm: Bitmap, pages: np.ndarray) -> None:
    np.bitwise_or.at(bm.words, pages >> 6, np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64)))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
