"""The page pipeline: dirty page indices -> holes and data -> read -> zero check.

Every sender of RAM runs its pages through :func:`prepare` — the precopy stream, the
multifd channel threads, the postcopy background push and urgent pages, the snapshot
writer and its write faults — and then encodes the :class:`PageBatch` its own way (RAM
records on a stream, multifd packets). So the rules live in one place:

* holes of fd-backed memory are never read (reading a memfd hole allocates it); they are
  zero pages without a read;
* pages that may hold data are read once, through a :class:`PageReader`: this process's
  mapping (:class:`LocalMemory`, a view with no copy where the pages are consecutive), or
  another process's memory (the snapshot writer reads the VM with ``process_vm_readv``);
* zero pages are found with :func:`nonzero_pages`, which reads as little as it can.

No step loops per page in Python.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from livemig.migration.ram.state import TARGET_PAGE_SIZE, BlockState

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


def nonzero_pages(rows: np.ndarray) -> np.ndarray:
    """For ``rows`` (n, page size) uint8, C-contiguous rows: True where a page is not zero.

    Reading is the cost (about 10 GB/s here, and a TLB miss per 4 KiB page), so read as
    little as possible: a page whose first word is set is data without reading the rest
    (random data: one cache line per page); only the other pages are read completely — as
    one ``memcmp`` of the batch with itself shifted by a word when they are the whole
    batch and it is contiguous (a zero stretch), else with one ``bitwise_or.reduce``.
    """
    if not len(rows):
        return np.zeros(0, bool)
    w = rows.view(np.uint64)  # rows may be strided (record slots); each row is contiguous
    nz = w[:, 0] != 0
    rest = (~nz).nonzero()[0]  # not np.flatnonzero: its wrapper costs more than a 1-page batch
    if len(rest) == 0:
        return nz
    if len(rest) == len(nz) and rows.flags.c_contiguous:
        # every word equals the next one, and the first is zero: one pass over the memory
        # (both operands share cache lines), where comparing with a zero buffer as large
        # would read twice as much
        if _libc.memcmp(rows.ctypes.data, rows.ctypes.data + 8, rows.nbytes - 8) == 0:
            return nz
        return np.bitwise_or.reduce(w, axis=1) != 0
    nz[rest] = np.bitwise_or.reduce(w[rest], axis=1) != 0
    return nz


class PageReader(Protocol):
    """Reads page contents for the pipeline."""

    def read(self, b: BlockState, idx: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Rows (len(idx), page size) with the contents of pages ``idx`` (sorted) of ``b``.

        May return a view of guest memory (valid while nothing writes there), a buffer
        of its own, or ``out`` (an (n, page size) view the caller offers) after filling it.
        """
        ...


class LocalMemory:
    """Pages through this process's mapping of guest RAM.

    Consecutive pages are a view (no copy); scattered ones are gathered into a buffer of
    this reader, so a reader belongs to one thread.
    """

    def __init__(self, max_pages: int):
        self._gather = np.empty((max_pages, TARGET_PAGE_SIZE), np.uint8)
        self._views: dict[str, np.ndarray] = {}  # each block as rows, made once

    def read(self, b: BlockState, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        n = len(idx)
        pages = self._views.get(b.idstr)
        if pages is None:
            pages = self._views[b.idstr] = b.block.pages_array(0, b.block.max_length)
        if n == 0:
            return pages[:0]
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == n:
            return pages[first : last + 1]
        if out is None or not out.flags.c_contiguous:
            if n > len(self._gather):
                self._gather = np.empty((n, TARGET_PAGE_SIZE), np.uint8)
            out = self._gather[:n]
        np.take(pages, idx, axis=0, out=out[:n])
        return out[:n]


@dataclass
class PageBatch:
    """One batch of pages of one block, classified and read.

    ``zero``: pages to send as zero (holes, never read, and pages read as zero), sorted.
    ``data``: pages with content, sorted. ``rows`` holds the contents of every page that
    was *read* (in ``read_idx`` order) and ``nonzero`` which of those are data: a sender
    takes ``rows[nonzero]`` into its own buffer (or sends ``rows`` as is when every read
    page is data) without an intermediate copy.
    """

    b: BlockState
    zero: np.ndarray
    data: np.ndarray
    read_idx: np.ndarray
    rows: np.ndarray
    nonzero: np.ndarray
    holes: int

    @property
    def all_data(self) -> bool:
        return len(self.data) == len(self.read_idx)

    def data_rows(self, out: np.ndarray | None = None) -> np.ndarray:
        """Contents of ``data`` pages, one row each (copied into ``out`` if given)."""
        if self.all_data:
            if out is None:
                return self.rows
            # rows read straight into ``out`` are there already; any other rows (a view of
            # guest memory, a gather buffer) lie elsewhere, so bounds tell the two apart
            if not np.may_share_memory(out, self.rows):
                out[: len(self.rows)] = self.rows
            return out[: len(self.rows)]
        if out is None:
            return self.rows[self.nonzero]
        k = len(self.data)
        np.compress(self.nonzero, self.rows, axis=0, out=out[:k])
        return out[:k]


def prepare(
    b: BlockState,
    idx: np.ndarray,
    reader: PageReader,
    extents: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> PageBatch:
    """Classify, read and zero-check the pages ``idx`` (sorted) of ``b``.

    ``extents``: the data extents to classify against (default: this pass's, see
    :meth:`BlockState.data_mask`); ``out``: a buffer the reader may fill (a sender's
    record slots), at least ``len(idx)`` rows.
    """
    in_data = b.data_mask(idx, extents)
    read_idx = idx[in_data]
    n = len(read_idx)
    rows = reader.read(b, read_idx, out[:n] if out is not None else None)
    return batch_of_rows(b, idx, in_data, rows)


def batch_of_rows(b: BlockState, idx: np.ndarray, was_read: np.ndarray, rows: np.ndarray) -> PageBatch:
    """The batch of pages ``idx`` (sorted) whose ``was_read`` ones have contents ``rows``
    (in order); the others are holes. For pages read earlier (snapshot write faults)."""
    nz = nonzero_pages(rows)
    is_data = np.zeros(len(idx), bool)
    is_data[was_read.nonzero()[0][nz]] = True
    return PageBatch(
        b=b,
        zero=idx[~is_data],
        data=idx[is_data],
        read_idx=idx[was_read],
        rows=rows,
        nonzero=nz,
        holes=len(idx) - len(rows),
    )
