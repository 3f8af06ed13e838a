"""Guest RAM blocks in real host memory.

A RAM block is QEMU's RAMBlock: one contiguous host mapping with a name (``idstr``) that the
migration stream uses to address it. Two backends exist because they behave differently
when memory is given back and when holes are read (platform notes, section 1):

* ``memfd`` (default): shared file mapping. Discard punches a hole in the file; reading a
  hole *allocates* a page, so livemig never reads holes of memfd-backed RAM.
* ``anon``: private anonymous mapping. Discard is ``MADV_DONTNEED``; reading a discarded
  page maps the shared zero page and allocates nothing.

A memfd block can also *adopt* the memfd of another process's block (``fd=``: cpr-transfer
hands guest RAM to a new process over a unix socket). Such memory is :attr:`RAMBlock.shared`
with the other process, and so is a block whose memfd this process handed out: closing a
shared block only unmaps it, it never punches the memory out from under the other side.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import numpy as np

from livemig.memory import hostmem

PAGE_SIZE = mmap.PAGESIZE
BACKENDS = ("memfd", "anon")
PROBE_PAGES = 16
"""Ranges of up to this many pages are probed page by page (see :meth:`RAMBlock.data_extents`)."""


class RAMBlockError(ValueError):
    """A request on a RAM block that breaks its rules (alignment, bounds)."""


class BlockLayout:
    """Where a RAM block is and what backs it, without a mapping of its memory.

    Geometry (name, used/max length, page size), the host address of its mapping in the
    process that owns it, and the backing file's data extents (``SEEK_DATA``/
    ``SEEK_HOLE`` read nothing and allocate nothing). :class:`RAMBlock` is a layout with
    its mapping; the background-snapshot writer describes the VM process's blocks with a
    bare layout, so it cannot map guest RAM by accident (it reads with
    ``process_vm_readv``).
    """

    def __init__(
        self,
        idstr: str,
        size: int,
        max_length: int | None = None,
        page_size: int = PAGE_SIZE,
        fd: int = -1,
        host: int = 0,
    ):
        if not idstr or len(idstr.encode()) > 255:
            raise RAMBlockError("RAM block id must be 1..255 bytes")
        max_length = size if max_length is None else max_length
        if size <= 0 or size % page_size or max_length % page_size or max_length < size:
            raise RAMBlockError(
                f"RAM block {idstr!r}: size {size} and max length {max_length} must be "
                f"positive multiples of the page size {page_size}, size <= max length"
            )
        self.idstr = idstr
        self.used_length = size
        self.max_length = max_length
        self.page_size = page_size
        self.fd = fd
        self.host = host

    # -- geometry -------------------------------------------------------------------------
    @property
    def pages(self) -> int:
        return self.used_length // self.page_size

    def check_range(self, offset: int, length: int, what: str = "range") -> None:
        """Raise RAMBlockError unless [offset, offset+length) is page-aligned and inside."""
        if offset < 0 or length < 0:
            raise RAMBlockError(f"{self.idstr}: negative {what} offset/length")
        if offset % self.page_size or length % self.page_size:
            raise RAMBlockError(
                f"{self.idstr}: unaligned {what} offset 0x{offset:x} length 0x{length:x} "
                f"(page size 0x{self.page_size:x})"
            )
        if offset + length > self.max_length:
            raise RAMBlockError(
                f"{self.idstr}: overrun block: offset 0x{offset:x} + length 0x{length:x} "
                f"> max length 0x{self.max_length:x}"
            )

    # -- where is data? ---------------------------------------------------------------------
    def data_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Yield (start, end) sub-ranges that may hold data; the rest are holes (zero).

        For memfd this asks the file (``SEEK_DATA``/``SEEK_HOLE``), which reads nothing and
        allocates nothing. Private anonymous memory reads holes as the zero page without
        allocating, so the whole range is reported.

        ``SEEK_HOLE`` costs as much as the run of data it skips, which may reach far beyond
        the range (25 ms for one page at the start of a populated 1 GiB memfd), so a small
        range — a postcopy request, a write fault — is probed page by page with
        ``SEEK_DATA`` alone, about a microsecond each.
        """
        end = offset + length
        if self.fd < 0:
            if length:
                yield offset, end
            return
        if length <= PROBE_PAGES * self.page_size:
            yield from self._probed_extents(offset, end)
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            if data >= end:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data, hole
            pos = hole

    def _probed_extents(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        """:meth:`data_extents` of a small range: one ``SEEK_DATA`` per page with data, one
        per hole (it lands on the next data)."""
        ps = self.page_size
        start: int | None = None
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # no data from here to the end of the file
            if data <= pos:  # pos is in data
                if start is None:
                    start = pos
                pos = min(pos - pos % ps + ps, end)
                continue
            if start is not None:
                yield start, pos
                start = None
            pos = min(data - data % ps, end)
        if start is not None:
            yield start, end

    def data_extent_pages(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Data extents of [offset, offset+length) as an (n, 2) array of [first, end) pages.

        One ``SEEK_DATA``/``SEEK_HOLE`` walk; each call scans the file from its position to
        the next hole or data, so callers should walk a range once and reuse the result
        rather than probe piece by piece (that is quadratic on a populated file).
        """
        length = self.used_length - offset if length is None else length
        shift = self.page_size.bit_length() - 1
        ext = list(self.data_extents(offset, length))
        if not ext:
            return np.zeros((0, 2), np.int64)
        return np.asarray(ext, np.int64) >> shift

    @staticmethod
    def pages_in_extents(pages: np.ndarray, extents: np.ndarray) -> np.ndarray:
        """For sorted page indices: True where the page lies in one of ``extents``."""
        if len(extents) == 0:
            return np.zeros(len(pages), bool)
        i = np.searchsorted(extents[:, 0], pages, side="right") - 1
        return (i >= 0) & (pages < extents[np.maximum(i, 0), 1])

    def data_page_mask(self, pages: np.ndarray) -> np.ndarray:
        """For sorted page indices: True where the page may hold data, False in a hole.

        Nothing is read. Walks the span of ``pages``; for many calls over one block, take
        :meth:`data_extent_pages` once and use :meth:`pages_in_extents`.
        """
        if len(pages) == 0 or self.fd < 0:
            return np.ones(len(pages), bool)
        shift = self.page_size.bit_length() - 1
        lo = int(pages[0]) << shift
        hi = (int(pages[-1]) + 1) << shift
        return self.pages_in_extents(pages, self.data_extent_pages(lo, hi - lo))


class RAMBlock(BlockLayout):
    """One guest RAM block: ``idstr``, used/max length, page size and host mapping."""

    def __init__(
        self,
        idstr: str,
        size: int,
        backend: str = "memfd",
        max_length: int | None = None,
        page_size: int = PAGE_SIZE,
        fd: int | None = None,
    ):
        if backend not in BACKENDS:
            raise RAMBlockError(f"unknown RAM backend {backend!r} (expected one of {BACKENDS})")
        super().__init__(idstr, size, max_length, page_size)
        max_length = self.max_length
        self.backend = backend
        self.shared = False  # another process maps this memory too (cpr-transfer)
        if fd is not None:
            if backend != "memfd":
                raise RAMBlockError(f"RAM block {idstr!r}: only a memfd backend can adopt a memfd")
            have = os.fstat(fd).st_size
            if have != max_length:
                os.close(fd)
                raise RAMBlockError(
                    f"RAM block {idstr!r}: the adopted memfd has 0x{have:x} bytes, "
                    f"this block needs 0x{max_length:x}"
                )
            self.fd = fd
            self.shared = True
            self.mmap = mmap.mmap(self.fd, max_length, flags=mmap.MAP_SHARED)
        elif backend == "memfd":
            self.fd = os.memfd_create(f"livemig:{idstr}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, max_length)
            self.mmap = mmap.mmap(self.fd, max_length, flags=mmap.MAP_SHARED)
        else:
            self.mmap = mmap.mmap(
                -1, max_length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
        self._anchor = ctypes.c_char.from_buffer(self.mmap)
        self.host = ctypes.addressof(self._anchor)
        self.view = memoryview(self.mmap)
        hostmem.madvise(self.host, max_length, hostmem.MADV_HUGEPAGE, check=False)

    def pages_array(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """A (pages, page_size) uint8 numpy view of host memory; no copy."""
        length = self.used_length - offset if length is None else length
        self.check_range(offset, length)
        return np.frombuffer(self.mmap, np.uint8, count=length, offset=offset).reshape(
            -1, self.page_size
        )

    # -- discard / populate -----------------------------------------------------------------
    def discard_range(self, offset: int, length: int) -> None:
        """Give host memory back: the range reads as zero afterwards.

        fd-backed memory punches a hole in the file (``MADV_DONTNEED`` alone would only
        unmap the shared pages, not free them); private anonymous memory uses
        ``MADV_DONTNEED``.
        """
        self.check_range(offset, length, "discard")
        if length == 0:
            return
        if self.fd >= 0:
            hostmem.punch_hole(self.fd, offset, length)
        else:
            hostmem.madvise(self.host + offset, length, hostmem.MADV_DONTNEED)

    def populate(self, offset: int, length: int, write: bool = True) -> None:
        """Fault pages in ahead of use (``MADV_POPULATE_WRITE``/``_READ``)."""
        self.check_range(offset, length, "populate")
        if length:
            advice = hostmem.MADV_POPULATE_WRITE if write else hostmem.MADV_POPULATE_READ
            hostmem.madvise(self.host + offset, length, advice)

    def allocated_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Host memory backing [offset, offset+length): file extents or resident pages."""
        length = self.max_length - offset if length is None else length
        if self.fd >= 0:
            return sum(e - s for s, e in self.data_extents(offset, length))
        return hostmem.resident_bytes(self.host + offset, length)

    def allocated_in_runs(self, offsets: np.ndarray, lengths: np.ndarray) -> int:
        """Host memory backing the byte runs ``(offsets, lengths)`` (sorted, disjoint).

        fd-backed: one walk of the file's data extents intersected with the runs; private
        anonymous: resident pages, run by run.
        """
        offsets = np.asarray(offsets, np.int64)
        lengths = np.asarray(lengths, np.int64)
        if not len(offsets):
            return 0
        if self.fd < 0:
            return sum(self.allocated_bytes(o, n) for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True))
        lo, hi = int(offsets[0]), int(offsets[-1] + lengths[-1])
        ext = np.asarray(list(self.data_extents(lo, hi - lo)), np.int64).reshape(-1, 2)
        if not len(ext):
            return 0
        starts, sizes = ext[:, 0], ext[:, 1] - ext[:, 0]
        before = np.concatenate(([0], np.cumsum(sizes)[:-1]))

        def data_below(x: np.ndarray) -> np.ndarray:
            """Bytes of data extents below each offset ``x``."""
            i = np.searchsorted(starts, x, side="right") - 1
            j = np.maximum(i, 0)
            inside = np.clip(x - starts[j], 0, sizes[j])
            return np.where(i >= 0, before[j] + inside, 0)

        return int((data_below(offsets + lengths) - data_below(offsets)).sum())

    def close(self) -> None:
        """Give the memory back and unmap; the block is unusable afterwards.

        The memory is released first (hole punch / DONTNEED), so it is freed even while a
        numpy view still pins the mapping; the mapping itself then goes when the last
        view does.
        """
        if self.mmap.closed or getattr(self, "_closed", False):
            return
        self._closed = True
        if not self.shared:  # shared memory stays for the other process (cpr-transfer)
            self.discard_range(0, self.max_length)
        self.view.release()
        del self._anchor
        try:
            self.mmap.close()
        except BufferError:
            pass  # exported views remain; munmap happens when they are collected
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return (
            f"RAMBlock({self.idstr!r}, used=0x{self.used_length:x}, "
            f"max=0x{self.max_length:x}, backend={self.backend})"
        )
