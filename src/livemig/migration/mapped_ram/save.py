"""mapped-ram, source side: guest pages go to their own place in a ``file:`` migration.

:class:`MappedRamSaver` plugs into an :class:`~livemig.migration.outgoing.
OutgoingMigration` the way multifd does (the ``channels`` hook): it writes each block's
mapped-ram header into the RAM set-up (:mod:`.layout`) and becomes the migration's
:class:`~livemig.migration.ram.sender.PageSink`. The walk is the usual one (precopy
iterates while the guest runs, as QEMU allows; a paused guest takes one pass); each batch
of dirty pages goes to a channel thread (:mod:`.files`), which runs the shared page
pipeline (holes of fd-backed memory are never read, zero pages found in one pass) and
writes every run of data pages straight from guest RAM with one ``pwritev`` at the run's
offset in the file. Zero pages, holes and unplugged memory are written as nothing: their
bit stays clear and the file keeps a hole. A page written earlier that is zero now gets
its bit cleared and its file block punched out, so the file holds only data.

At the end of every round (after each sync and at completion) the channels are drained
and the bitmaps written at their offsets; the main stream itself carries only framing
(EOS) and, at the end, the device state.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import numpy as np

from livemig.memory import hostmem
from livemig.memory.bitmap import Bitmap, index_runs
from livemig.memory.ram_block import RAMBlock
from livemig.migration.mapped_ram.files import Channel, FileChannels, pwrite_all
from livemig.migration.mapped_ram.layout import (
    PAGE_SHIFT,
    BlockFileLayout,
    MappedRamConfigError,
    write_bitmap,
    write_block_header,
)
from livemig.migration.multifd.sender import CountingWriter
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.ram.codec import write_block_list
from livemig.migration.ram.pages import LocalMemory, prepare
from livemig.migration.ram.sender import JobBatcher
from livemig.migration.ram.state import BATCH_PAGES, BlockState
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileWriter

JOB_PAGES = 4096  # pages handed to a channel at once (16 MiB)


def check_target(uri: Any, caps: Any) -> None:
    """Refuse what cannot work before the migration starts."""
    if uri.scheme != "file":
        raise MappedRamConfigError(
            f"mapped-ram needs a file: migration URI (pages go to fixed file offsets), not {uri.scheme}:"
        )
    if caps.enabled.get("postcopy-ram"):
        raise MappedRamConfigError("Mapped-ram migration is incompatible with postcopy")
    if caps.enabled.get("background-snapshot"):
        raise MappedRamConfigError("mapped-ram together with background-snapshot is not supported by livemig")


class MappedRamSaver:
    """The page sink and channels of a mapped-ram migration (module docstring)."""

    syncs_missed_zerocopy = 0

    def __init__(self, out: OutgoingMigration, chans: FileChannels, w: QEMUFileWriter):
        self.out = out
        self.chans = chans
        self.w = w
        self.fd = out.fd
        self.stats = out.ram.stats
        self.lock = threading.Lock()
        self.layouts: dict[str, BlockFileLayout] = {}
        self.present: dict[str, Bitmap] = {}
        self.batcher = JobBatcher()
        self._readers = {ch.index: LocalMemory(JOB_PAGES + BATCH_PAGES) for ch in chans.channels}

    @classmethod
    def attach(cls, out: OutgoingMigration) -> MappedRamSaver:
        """Open the channels of ``out`` (main file open, nothing written yet) and take
        over its page sink and block list."""
        check_target(out.uri, out.caps)
        params = out.params
        n = int(params.multifd_channels) if out.caps.enabled.get("multifd") else 1
        chans = FileChannels(out.fd, out.uri.path, n, write=True, direct=bool(params.direct_io))
        out.job.on_cleanup("mapped-ram channels", chans.close)
        w = out.writer
        assert w.bytes_written == 0, "mapped-ram must attach before the stream starts"
        counting = CountingWriter(w.transport, w.buffer_size, chans.bytes_done)
        saver = cls(out, chans, counting)
        out.use_writer(counting, saver)
        out.write_blocks = saver.write_blocks
        return saver

    # -- the set-up -----------------------------------------------------------------------------
    def write_blocks(self, w: QEMUFileWriter, blocks: list[RAMBlock]) -> None:
        write_block_list(w, blocks, after_block=self._block_header)

    def _block_header(self, w: QEMUFileWriter, block: RAMBlock) -> None:
        lay = write_block_header(w, block.idstr, block.used_length)
        self.layouts[block.idstr] = lay
        self.present[block.idstr] = Bitmap(lay.npages)

    # -- PageSink -------------------------------------------------------------------------------
    def start_section(self) -> None:
        pass

    def send(self, b: BlockState, idx: np.ndarray) -> None:
        for job in self.batcher.add(b, idx, JOB_PAGES):
            self._submit(*job)

    def _dispatch(self) -> None:
        for job in self.batcher.take():
            self._submit(*job)

    def _submit(self, b: BlockState, idx: np.ndarray) -> None:
        extents = b.extents
        self.chans.submit(lambda ch: self._write(ch, b, idx, extents))

    def end_round(self) -> None:
        """Every page of the pass is in the file: drain the channels, write the bitmaps."""
        self._dispatch()
        self.chans.drain()
        with self.lock:
            for name, lay in self.layouts.items():
                write_bitmap(self.fd, lay, self.present[name])

    def end_section(self) -> None:
        self.w.put_be64(RamFlag.EOS)
        self.stats.transferred += 8

    # -- a channel thread ---------------------------------------------------------------------------
    def _write(self, ch: Channel, b: BlockState, idx: np.ndarray, extents: np.ndarray | None) -> None:
        block = b.block
        lay = self.layouts[block.idstr]
        batch = prepare(b, idx, self._readers[ch.index], extents)
        starts, lengths = index_runs(batch.data)
        view = block.view
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            pwrite_all(ch.fd, view[s << PAGE_SHIFT : (s + n) << PAGE_SHIFT], lay.page_offset(s))
        nbytes = len(batch.data) << PAGE_SHIFT
        ch.bytes += nbytes
        present = self.present[block.idstr]
        with self.lock:
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
        # pages written earlier that are zero now: give their file blocks back (their bit
        # is clear: a file system that cannot punch holes only keeps the file larger)
        zs, zl = index_runs(was)
        for s, n in zip(zs.tolist(), zl.tolist(), strict=True):
            try:
                hostmem.punch_hole(ch.fd, lay.page_offset(s), n << PAGE_SHIFT)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise

    # -- what OutgoingMigration asks of its channels object --------------------------------------
    def bytes_sent(self) -> int:
        return self.chans.bytes_done()

    def abort(self) -> None:
        self.chans.abort()
