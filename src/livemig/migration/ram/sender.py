"""Sending RAM: pages leave the bitmap (:class:`~livemig.migration.ram.state.RamState`),
go through the page pipeline (:mod:`~livemig.migration.ram.pages`) and into a sink.

A :class:`PageSink` is the one thing a mode chooses about sending RAM (QEMU's
``migration_ops->ram_save_target_page``): :class:`StreamSink` writes RAM records on a
stream (precopy, the postcopy background push and its urgent channel, the snapshot
writer); multifd's sink hands batches to its channel threads. Every sink also frames the
RAM part of a section (block naming restarts per section, EOS at its end), so the main
stream looks the same whichever sink carries the pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from livemig.migration.ram.codec import RecordEncoder
from livemig.migration.ram.pages import LocalMemory, PageBatch, PageReader, prepare
from livemig.migration.ram.state import BATCH_PAGES, BlockState, RamState, RamStats
from livemig.migration.stream.qemu_file import QEMUFileWriter


class PageSink(Protocol):
    """Where a sender's pages go."""

    def start_section(self) -> None:
        """A RAM section begins on the main stream."""

    def send(self, b: BlockState, idx: np.ndarray) -> None:
        """Send pages ``idx`` (sorted) of ``b``, already taken out of the bitmap."""

    def end_round(self) -> None:
        """Every dirty page of the pass was handed over (multifd: SYNC + FLUSH)."""

    def end_section(self) -> None:
        """The section's RAM part ends (EOS)."""


class PreparedSink(Protocol):
    """A sink for a caller that prepares its batches itself — the snapshot writer reads the
    VM into :meth:`slots`, un-protects the pages, then hands the batch to :meth:`put`:
    :class:`StreamSink`, or mapped-ram's sink (pages at their own offsets of a file)."""

    def start_section(self) -> None: ...

    def slots(self, n: int) -> np.ndarray:
        """Rows for the next batch's ``n`` pages; the next :meth:`put` takes them."""
        ...

    def put(self, batch: PageBatch) -> None: ...

    def end_round(self) -> None: ...

    def end_section(self) -> None: ...


class StreamSink:
    """RAM records on ``w``: the page pipeline, then the record encoder."""

    def __init__(self, w: QEMUFileWriter, stats: RamStats, reader: PageReader | None = None):
        self.w = w
        self.encoder = RecordEncoder(stats)
        self.reader: PageReader = reader if reader is not None else LocalMemory(BATCH_PAGES)

    def start_section(self) -> None:
        self.encoder.start_section()

    def send(self, b: BlockState, idx: np.ndarray, extents: np.ndarray | None = None) -> None:
        self.put(prepare(b, idx, self.reader, extents, out=self.encoder.slots(len(idx))))

    def slots(self, n: int) -> np.ndarray:
        """Where a caller that prepares its own batches reads ``n`` pages: the PAGE-record
        slots (no copy when the records are written)."""
        return self.encoder.slots(n)

    def put(self, batch: PageBatch) -> None:
        """Records for a batch prepared already (read straight into the record slots)."""
        self.encoder.put_batch(self.w, batch)

    def end_round(self) -> None:
        pass

    def end_section(self) -> None:
        self.encoder.put_eos(self.w)


class JobBatcher:
    """Collects the walk's batches (about 1024 pages of one block each) into jobs of about
    ``job_pages`` pages of one block: what a channel thread takes at once, so the Python
    work per byte stays small (multifd channels, mapped-ram file channels)."""

    def __init__(self) -> None:
        self._acc: list[tuple[BlockState, np.ndarray]] = []
        self._pages = 0

    def add(self, b: BlockState, idx: np.ndarray, job_pages: int) -> list[tuple[BlockState, np.ndarray]]:
        """Take a batch; returns the jobs now complete (a block change ends a job too)."""
        out = []
        if self._acc and self._acc[0][0] is not b:
            out.extend(self.take())
        self._acc.append((b, idx))
        self._pages += len(idx)
        if self._pages >= job_pages:
            out.extend(self.take())
        return out

    def take(self) -> list[tuple[BlockState, np.ndarray]]:
        """The pages collected so far as one job (none if empty)."""
        if not self._acc:
            return []
        b = self._acc[0][0]
        idx = np.concatenate([i for _, i in self._acc]) if len(self._acc) > 1 else self._acc[0][1]
        self._acc.clear()
        self._pages = 0
        return [(b, idx)]


class CountingWriter(QEMUFileWriter):
    """The main channel's writer; ``bytes_written`` includes what the channels sent.

    The migration's rate limit, bandwidth estimate (hence convergence) and ``transferred``
    all read ``bytes_written``, so they see the whole migration with no change to them.
    """

    def __init__(self, transport: Any, buffer_size: int, extra: Callable[[], int]):
        super().__init__(transport, buffer_size)
        self._extra = extra

    @property
    def bytes_written(self) -> int:  # type: ignore[override]
        return self._sent + self._pos + self._extra()


def send_pass(ram: RamState, sink: PageSink, w: QEMUFileWriter, max_bytes: int | None = None) -> bool:
    """Send dirty pages until the pass is done (True) or ``max_bytes`` went out on ``w``.

    ``w.bytes_written`` counts what every channel sent (multifd's writer includes its
    channels), so the budget and the rate limit see the whole migration.
    """
    start = w.bytes_written
    while True:
        if max_bytes is not None and w.bytes_written - start >= max_bytes:
            return False
        batch = ram.next_batch()
        if batch is None:
            sink.end_round()
            return True
        sink.send(*batch)
