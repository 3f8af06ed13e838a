"""mapped-ram, source side: guest pages go to their own place in a ``file:`` migration.

:class:`MappedRamSaver` plugs into an :class:`~livemig.migration.outgoing.
OutgoingMigration` the way multifd does (the ``channels`` hook): it writes each block's
mapped-ram header into the RAM set-up (:class:`~.layout.FileLayouts`) and becomes the
migration's :class:`~livemig.migration.ram.sender.PageSink`. The walk is the usual one
(precopy iterates while the guest runs, as QEMU allows; a paused guest takes one pass);
each batch of dirty pages goes to a channel thread (:mod:`.files`), which runs the shared
page pipeline on guest RAM (holes of fd-backed memory are never read, zero pages found in
one pass) and writes the batch through the one mapped-ram write path,
:meth:`~.sink.MappedRamSink.write_batch`: every run of data pages with one ``pwritev`` at
the run's offset, zero pages, holes and unplugged memory as nothing (the file keeps a
hole), a page that became zero punched out again.

At the end of every round (after each sync and at completion) the channels are drained
and the bitmaps written at their offsets; the main stream itself carries only framing
(EOS) and, at the end, the device state. A background snapshot writes the same file from
its writer process with the same sink (:mod:`livemig.migration.snapshot.writer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livemig.migration.mapped_ram.files import Channel, FileChannels, aligned_pages, channel_count
from livemig.migration.mapped_ram.layout import FileLayouts, MappedRamConfigError
from livemig.migration.mapped_ram.sink import MappedRamSink
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.ram.pages import LocalMemory, prepare
from livemig.migration.ram.sender import CountingWriter, JobBatcher
from livemig.migration.ram.state import BATCH_PAGES, BlockState
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


class MappedRamSaver(MappedRamSink):
    """The page sink and channels of a mapped-ram migration (module docstring)."""

    def __init__(self, out: OutgoingMigration, chans: FileChannels, w: QEMUFileWriter):
        super().__init__(out.fd, chans, w, out.ram.stats, FileLayouts())
        self.batcher = JobBatcher()
        self._readers = {ch.index: LocalMemory(0) for ch in chans.channels}
        # where a channel gathers scattered pages: page-aligned, so O_DIRECT can write them
        self._gather = {ch.index: aligned_pages(JOB_PAGES + BATCH_PAGES) for ch in chans.channels}

    @classmethod
    def attach(cls, out: OutgoingMigration) -> MappedRamSaver:
        """Open the channels of ``out`` (main file open, nothing written yet) and take
        over its page sink and block list."""
        check_target(out.uri, out.caps)
        n = channel_count(out.caps, out.params)
        chans = FileChannels.open(out.fd, out.uri.path, n, write=True, direct=bool(out.params.direct_io))
        out.job.on_cleanup("mapped-ram channels", chans.close)
        w = out.writer
        assert w.bytes_written == 0, "mapped-ram must attach before the stream starts"
        counting = CountingWriter(w.transport, w.buffer_size, chans.bytes_done)
        saver = cls(out, chans, counting)
        out.use_writer(counting, saver)
        out.write_blocks = saver.layouts.write_blocks
        return saver

    # -- PageSink -------------------------------------------------------------------------------
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
        super().end_round()

    # -- a channel thread ---------------------------------------------------------------------------
    def _write(self, ch: Channel, b: BlockState, idx: np.ndarray, extents: np.ndarray | None) -> None:
        i = ch.index
        self.write_batch(ch, prepare(b, idx, self._readers[i], extents, out=self._gather[i]))
