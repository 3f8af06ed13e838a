"""Urgent pages on the source: the destination's page requests, answered at once.

A request (``REQ_PAGES_ID`` / ``REQ_PAGES``) names a span of a block that a destination
thread is waiting for. It is checked like QEMU's ``migrate_handle_rp_req_pages`` (a
malformed one is a lost connection: postcopy pauses), then:

* with ``postcopy-preempt``, answered at once on the postcopy channel by the thread that
  read it (:class:`PostcopyChannel`). A page that is no longer dirty is answered anyway:
  it may be in flight on the main stream behind megabytes of background pages — unless it
  is discarded, which is never read or sent (reference 3.5) and only counted;
* without, queued; the migration thread sends what is still dirty of it ahead of its next
  background batch on the main stream (QEMU skips pages that are no longer dirty there:
  they are already on their way, in order).

Pages leave the migration bitmap through :meth:`RamState.take_range` (so the background
push never sends them again) and go through the one page pipeline and record encoder
(:class:`~livemig.migration.ram.sender.StreamSink`), with the data extents of just the
requested span: a request never walks the whole block's extents.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.migration.core.job import describe
from livemig.migration.core.threads import join_for_good
from livemig.migration.postcopy.priority import urgent_priority
from livemig.migration.ram.sender import StreamSink
from livemig.migration.ram.state import (
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
    BlockState,
    RamState,
    RamStats,
)
from livemig.migration.stream import return_path as rp
from livemig.migration.stream.format import RPMessage
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter

log = logging.getLogger(__name__)

CHANNEL_BUFFER = 1 << 20
LostFn = Callable[[int, str], None]
"""``lost(generation, why)``: a connection of that generation failed."""


@dataclass
class UrgentCounters:
    """query-migrate's ``postcopy-*`` figures of the urgent path (livemig's own names)."""

    requests: int = 0
    requested_pages: int = 0
    urgent_pages: int = 0
    resent_pages: int = 0
    discarded_requests: int = 0

    def as_ram_info(self) -> dict[str, int]:
        return {f"postcopy-{f.name.replace('_', '-')}": getattr(self, f.name) for f in fields(self)}


class PageAudit:
    """Every page requested and every page sent after the switchover, per block.

    What the discard promise is checked against (no page of an unplugged block requested
    or sent); two threads record, hence the lock.
    """

    def __init__(self, ram: RamState):
        self.requested = {b.idstr: Bitmap(b.total_pages) for b in ram.blocks}
        self.sent = {b.idstr: Bitmap(b.total_pages) for b in ram.blocks}
        self._lock = threading.Lock()

    def note_requested(self, b: BlockState, first: int, n: int) -> None:
        with self._lock:
            self.requested[b.idstr].set_range(first, n)

    def note_sent(self, b: BlockState, idx: np.ndarray) -> None:
        """Pages ``idx`` (sorted) were sent; a run (every urgent answer, nearly) costs a
        range update instead of a scatter."""
        if not len(idx):
            return
        first, last = int(idx[0]), int(idx[-1])
        with self._lock:
            if last - first + 1 == len(idx):
                self.sent[b.idstr].set_range(first, len(idx))
            else:
                self.sent[b.idstr].set_indices(idx)


class LastBlock:
    """The block a return path named last (``REQ_PAGES`` without a name means it)."""

    __slots__ = ("b",)

    def __init__(self) -> None:
        self.b: BlockState | None = None


class PostcopyChannel:
    """The source end of the postcopy channel: one socket per connection generation, a
    writer and record sink on it, and the thread that reads requests from it."""

    def __init__(self, serve: Callable[[str | None, int, int, LastBlock], None], lost: LostFn):
        self.serve = serve
        self.lost = lost
        self.lock = threading.Lock()  # the writer: request answers and the final EOS
        self.stats = RamStats()  # what the channel's sink encoded
        self.sock: Any = None
        self.w: QEMUFileWriter | None = None
        self.sink: StreamSink | None = None
        self.finished = False  # EOS written: nothing more goes out on this channel
        self.bytes = 0  # written on every generation of the channel
        self._closing = False
        self._thread: threading.Thread | None = None

    def attach(self, sock: Any) -> None:
        """A new connection (switchover, or recovery): the old one must be closed."""
        w = QEMUFileWriter(sock, CHANNEL_BUFFER)
        sink = StreamSink(w, self.stats)
        sink.start_section()  # the first record names its block, then CONTINUE
        with self.lock:
            self.sock, self.w, self.sink = sock, w, sink
            self.finished = self._closing = False

    def start(self, gen: int) -> None:
        """Serve the requests of connection generation ``gen``."""
        self._thread = threading.Thread(
            target=self._serve, args=(gen, self.sock), name="postcopy-urgent", daemon=True
        )
        self._thread.start()

    def _serve(self, gen: int, sock: Any) -> None:
        r = QEMUFileReader(sock, 64 << 10)
        last = LastBlock()
        urgent_priority(threading.get_native_id())
        try:
            while True:
                kind, payload = rp.read_message(r)
                if kind not in (RPMessage.REQ_PAGES, RPMessage.REQ_PAGES_ID):
                    raise rp.ReturnPathError(f"unexpected message {kind} on the postcopy channel")
                start, length, idstr = rp.parse_req_pages(kind, payload)
                self.serve(idstr, start, length, last)
        except Exception as e:  # noqa: BLE001 - whatever ends the channel, say why
            if not (self._closing or self.finished):
                self.lost(gen, f"postcopy channel: {describe(e)}")

    def answer(self, b: BlockState, take: Callable[[], np.ndarray], extents: np.ndarray | None) -> np.ndarray:
        """Send the pages ``take()`` chooses and return them. Under the writer's lock, so
        no page leaves the bitmap after the EOS without being sent."""
        with self.lock:
            if self.sink is None or self.w is None or self.finished:
                return np.zeros(0, np.int64)  # everything was sent: the page is on its way
            idx = take()
            if len(idx):
                before = self.w.bytes_written
                self.sink.send(b, idx, extents)
                self.w.flush()
                self.bytes += self.w.bytes_written - before
            return idx

    def finish(self) -> None:
        """EOS after the last urgent page: the destination may complete once it read it."""
        with self.lock:
            if self.sink is None or self.w is None:
                return
            self.finished = True
            self.sink.end_section()
            self.w.flush()

    def shutdown(self) -> None:
        """Wake whatever is blocked on the channel (its thread, a send); no lock needed."""
        s = self.sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """End this generation: shut down, join the thread, close (idempotent)."""
        self._closing = True
        self.shutdown()
        join_for_good(self._thread)  # it reads guest memory: gone before the holds are
        with self.lock:
            s, self.sock, self.w, self.sink = self.sock, None, None, None
        if s is not None:
            s.close()


class UrgentPages:
    """Requests checked, counted and answered (module docstring)."""

    def __init__(self, ram: RamState, audit: PageAudit, wake: threading.Event):
        self.ram = ram
        self.audit = audit
        self.wake = wake  # the migration thread waits on it between background sections
        self.c = UrgentCounters()
        self.channel: PostcopyChannel | None = None
        self.queue: deque[tuple[BlockState, int, int]] = deque()
        self.rp_last = LastBlock()  # the return path's named block (one reader at a time)
        self.plugged: dict[str, np.ndarray] = {}

    def use_channel(self, lost: LostFn) -> PostcopyChannel:
        """postcopy-preempt: requests are read, and answered, on a channel of their own."""
        self.channel = PostcopyChannel(self.serve, lost)
        return self.channel

    def freeze_plug_state(self) -> None:
        """Remember which pages are plugged, as extents, for the discard check of requests.

        The migration holds every RamDiscardManager (plugging answers BUSY), so this
        cannot change until it ends.
        """
        for b in self.ram.blocks:
            if b.mr.rdm is not None:
                starts, counts = b.populated_runs()
                self.plugged[b.idstr] = np.stack([starts, starts + counts], axis=1)

    def new_return_path(self) -> None:
        """A new return-path reader starts: it names its first block again."""
        self.rp_last = LastBlock()

    # -- requests ----------------------------------------------------------------------
    def serve_rp(self, kind: int, payload: bytes) -> None:
        """A request read on the return path."""
        start, length, idstr = rp.parse_req_pages(kind, payload)
        self.serve(idstr, start, length, self.rp_last)

    def serve(self, idstr: str | None, start: int, length: int, last: LastBlock) -> None:
        """One REQ_PAGES(_ID): validated like QEMU's ``migrate_handle_rp_req_pages``."""
        if idstr is None:
            b = last.b
            if b is None:
                raise rp.ReturnPathError("MIG_RP_MSG_REQ_PAGES has no block name")
        else:
            b = self.ram.by_name.get(idstr)
            if b is None:
                raise rp.ReturnPathError(f"MIG_RP_MSG_REQ_PAGES has invalid block name {idstr!r}")
        last.b = b
        used = b.block.used_length
        if start % TARGET_PAGE_SIZE or length <= 0 or length % TARGET_PAGE_SIZE or start + length > used:
            raise rp.ReturnPathError(
                f"MIG_RP_MSG_REQ_PAGES request overrun, start=0x{start:x} len=0x{length:x} "
                f"blocklen=0x{used:x}"
            )
        first, n = start >> TARGET_PAGE_BITS, length >> TARGET_PAGE_BITS
        self.c.requests += 1
        self.c.requested_pages += n
        self.ram.stats.postcopy_requests += 1
        self.audit.note_requested(b, first, n)
        if self.channel is not None:
            self._answer_on_channel(self.channel, b, first, n)
        else:
            self.queue.append((b, first, n))
            self.wake.set()

    def _answer_on_channel(self, ch: PostcopyChannel, b: BlockState, first: int, n: int) -> None:
        def take() -> np.ndarray:
            dirty = self.ram.take_range(b, first, n)
            if len(dirty) == n:
                return dirty
            span = np.arange(first, first + n, dtype=np.int64)
            clean = span[~np.isin(span, dirty)]
            gone = self.discarded(b, clean)
            if gone.any():  # never read, never sent (reference 3.5)
                self.c.discarded_requests += int(np.count_nonzero(gone))
                log.warning("request for discarded page 0x%x of %s ignored",
                            int(clean[gone][0]) << TARGET_PAGE_BITS, b.idstr)
            resent = clean[~gone]
            self.c.resent_pages += len(resent)
            return np.union1d(dirty, resent)

        sent = ch.answer(b, take, self.span_extents(b, first, n))
        if len(sent):
            self.c.urgent_pages += len(sent)
            self.audit.note_sent(b, sent)

    def discarded(self, b: BlockState, pages: np.ndarray) -> np.ndarray:
        """For sorted pages of ``b``: True where the page is discarded (unplugged)."""
        plugged = self.plugged.get(b.idstr)
        if plugged is None:
            return np.zeros(len(pages), bool)
        return ~b.block.pages_in_extents(pages, plugged)

    @staticmethod
    def span_extents(b: BlockState, first: int, n: int) -> np.ndarray | None:
        """Data extents of just the requested span (fd-backed memory; None otherwise)."""
        if b.block.fd < 0:
            return None
        return b.block.data_extent_pages(first << TARGET_PAGE_BITS, n << TARGET_PAGE_BITS)

    @property
    def queued(self) -> bool:
        return bool(self.queue)

    def send_queued(self, sink: StreamSink) -> int:
        """Without the postcopy channel: what is still dirty of the queued requests goes
        out on the main stream now (the migration thread, inside a RAM section)."""
        sent = 0
        while self.queue:
            b, first, n = self.queue.popleft()
            idx = self.ram.take_range(b, first, n)
            if not len(idx):
                continue
            sink.send(b, idx, self.span_extents(b, first, n))
            self.audit.note_sent(b, idx)
            sent += len(idx)
        self.c.urgent_pages += sent
        return sent

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
