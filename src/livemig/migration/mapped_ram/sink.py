"""mapped-ram's page sink: batches of pages written at their own offsets of the file.

The one write path of a mapped-ram file, shared by both writers of one:

* a ``file:`` migration (:class:`~.save.MappedRamSaver`, in the VM process): the walk's
  batches go to the channel threads (:mod:`.files`), each of which runs the page pipeline
  on this process's mapping of guest RAM and then :meth:`MappedRamSink.write_batch`;
* a background snapshot's writer process (:mod:`livemig.migration.snapshot.writer`), which
  has no mapping of guest RAM: its main thread reads each batch out of the VM into rows
  of :meth:`MappedRamSink.slots`, un-protects it, and hands the prepared batch over with
  :meth:`MappedRamSink.put`; a channel thread writes it. The reading and the writing
  overlap, and the writer's fault thread never waits for the file.

:meth:`~MappedRamSink.write_batch` writes each run of data pages with one ``pwritev`` of
the batch's rows at the run's offset. Those rows are page-aligned wherever they are —
guest RAM, the saver's gather buffers, :meth:`~MappedRamSink.slots` (all
:func:`~.files.aligned_pages`) — so channels opened with ``O_DIRECT`` (``direct-io``) can
write them. Zero pages, holes and unplugged memory are written as nothing: their bit
stays clear and the file keeps a hole. A page written earlier that is zero now (a later
pass of a live migration) gets its bit cleared and its file block punched out, so the
file holds only data. :meth:`~MappedRamSink.end_round` drains the channels and writes
the present-pages bitmaps at their offsets; the main stream itself carries only framing
(EOS).
"""

from __future__ import annotations

import errno
import threading

import numpy as np

from livemig.memory import hostmem
from livemig.memory.bitmap import Bitmap, index_runs
from livemig.migration.mapped_ram.files import Channel, FileChannels, aligned_pages, pwrite_all
from livemig.migration.mapped_ram.layout import (
    PAGE_SHIFT,
    BlockFileLayout,
    FileLayouts,
    write_bitmap,
)
from livemig.migration.ram.pages import PageBatch
from livemig.migration.ram.state import BATCH_PAGES, RamStats
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileWriter


class MappedRamSink:
    """Writes prepared page batches into a mapped-ram file (module docstring).

    ``fd``: the migration's own descriptor of the file (bitmaps: small writes, never
    ``O_DIRECT``); ``w``: the main stream; ``layouts``: where each block's pages go
    (filled while the RAM set-up is written, before the first page).
    """

    syncs_missed_zerocopy = 0  # query-migrate asks every channels object

    def __init__(self, fd: int, chans: FileChannels, w: QEMUFileWriter, stats: RamStats, layouts: FileLayouts):
        self.fd = fd
        self.chans = chans
        self.w = w
        self.stats = stats
        self.layouts = layouts
        self.lock = threading.Lock()  # the bitmaps, the statistics, the free buffers
        self._present: dict[str, Bitmap] = {}
        self._free: list[np.ndarray] = []  # buffers of slots() that a channel wrote out
        self._lent: np.ndarray | None = None  # the buffer of the last slots(), until put()

    def present(self, name: str) -> Bitmap:
        """The pages of block ``name`` in the file so far (with :attr:`lock`)."""
        bm = self._present.get(name)
        if bm is None:
            bm = self._present[name] = Bitmap(self.layouts.blocks[name].npages)
        return bm

    # -- PageSink ---------------------------------------------------------------------------
    def start_section(self) -> None:
        pass

    def end_round(self) -> None:
        """Every page handed over is in the file: drain the channels, write the bitmaps."""
        self.chans.drain()
        with self.lock:
            for name, lay in self.layouts.blocks.items():
                write_bitmap(self.fd, lay, self.present(name))

    def end_section(self) -> None:
        self.w.put_be64(RamFlag.EOS)
        with self.lock:
            self.stats.transferred += 8

    # -- batches prepared by the caller (the snapshot writer) --------------------------------
    def slots(self, n: int) -> np.ndarray:
        """Page-aligned rows to read ``n`` pages into; the next :meth:`put` hands them
        to a channel with its batch. No wait: a buffer comes back when a channel has
        written it, and :meth:`put` blocks while the channels have their queues full, so
        at most ``3 * channels + 1`` buffers ever exist."""
        with self.lock:
            buf = self._free.pop() if self._free else None
        if buf is None or len(buf) < n:
            buf = aligned_pages(max(n, BATCH_PAGES))
        self._lent = buf
        return buf[:n]

    def put(self, batch: PageBatch) -> None:
        """Have a channel write ``batch`` (its rows in the buffer of the last :meth:`slots`)."""
        buf, self._lent = self._lent, None

        def job(ch: Channel) -> None:
            try:
                self.write_batch(ch, batch)
            finally:
                if buf is not None:
                    with self.lock:
                        self._free.append(buf)

        self.chans.submit(job)

    # -- a channel thread -------------------------------------------------------------------
    def write_batch(self, ch: Channel, batch: PageBatch) -> None:
        """Write the batch's data pages at their offsets (one ``pwritev`` per run), mark
        them present, and give back the file blocks of pages that became zero."""
        lay = self.layouts.blocks[batch.b.idstr]
        starts, lengths = index_runs(batch.data)
        if len(starts):
            # a run of data pages is a run of rows too: rows follow read_idx, which holds
            # every page of the run and nothing between them
            at = np.searchsorted(batch.read_idx, starts)
            rows = batch.rows
            for s, r, n in zip(starts.tolist(), at.tolist(), lengths.tolist(), strict=True):
                pwrite_all(ch.fd, memoryview(rows[r : r + n]).cast("B"), lay.page_offset(s))
        nbytes = len(batch.data) << PAGE_SHIFT
        ch.bytes += nbytes
        with self.lock:
            present = self.present(lay.idstr)
            present.set_indices(batch.data)
            was = batch.zero[present.test_indices(batch.zero)] if len(batch.zero) else batch.zero
            if len(was):
                bit = np.left_shift(np.uint64(1), (was & 63).astype(np.uint64))
                np.bitwise_and.at(present.words, was >> 6, ~bit)
            st = self.stats
            st.normal += len(batch.data)
            st.duplicate += len(batch.zero)
            st.holes_skipped += batch.holes
            st.pages_read += len(batch.read_idx)
            st.transferred += nbytes
        self._punch(ch, lay, was)

    @staticmethod
    def _punch(ch: Channel, lay: BlockFileLayout, pages: np.ndarray) -> None:
        """Give back the file blocks of ``pages`` (their bit is clear: a file system that
        cannot punch holes only keeps the file larger)."""
        zs, zl = index_runs(pages)
        for s, n in zip(zs.tolist(), zl.tolist(), strict=True):
            try:
                hostmem.punch_hole(ch.fd, lay.page_offset(s), n << PAGE_SHIFT)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise

    # -- what OutgoingMigration asks of its channels object ----------------------------------
    def bytes_sent(self) -> int:
        return self.chans.bytes_done()

    def abort(self) -> None:
        self.chans.abort()
