"""Memory layer: bitmaps against a plain reference, RAM blocks, dirty logs, checksums."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.memory.bitmap import Bitmap
from livemig.memory.checksum import memory_checksum
from livemig.memory.dirty_log import BitmapDirtyLog
from livemig.memory.ram_block import RAMBlock, RAMBlockError
from livemig.memory.region import MemoryRegion

MiB = 1 << 20


def ref_runs(bits: list[bool], value: bool, start: int, end: int) -> list[tuple[int, int]]:
    out, i = [], start
    while i < end:
        if bits[i] == value:
            j = i
            while j < end and bits[j] == value:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


@st.composite
def bitmaps_and_ranges(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bool]], int, int]:
    nbits = draw(st.integers(1, 700))
    ops = draw(
        st.lists(
            st.tuples(st.integers(0, nbits - 1), st.integers(0, 200), st.booleans()), max_size=12
        )
    )
    start = draw(st.integers(0, nbits - 1))
    end = draw(st.integers(start, nbits))
    return nbits, ops, start, end


@given(bitmaps_and_ranges())
@settings(max_examples=300, deadline=None)
def test_bitmap_matches_reference(case: tuple[int, list[tuple[int, int, bool]], int, int]) -> None:
    nbits, ops, start, end = case
    bm = Bitmap(nbits)
    ref = [False] * nbits
    for s, n, v in ops:
        n = min(n, nbits - s)
        (bm.set_range if v else bm.clear_range)(s, n)
        ref[s : s + n] = [v] * n
    assert [bm.test(i) for i in range(nbits)] == ref
    assert bm.count(start, end - start) == sum(ref[start:end])
    for value in (True, False):
        starts, lengths = bm.runs(value, start, end - start)
        assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == ref_runs(
            ref, value, start, end
        )
    # the tail bits beyond nbits stay clear, so counts of the whole map are exact
    assert bm.count() == sum(ref)
    assert Bitmap.from_be_words(nbits, bm.to_be_words()) == bm
    assert Bitmap.from_le_bytes(nbits, bm.to_le_bytes()) == bm


def test_bitmap_rejects_out_of_range_and_tail_bits() -> None:
    bm = Bitmap(100)
    with pytest.raises(IndexError):
        bm.set_range(90, 11)
    words = np.zeros(2, ">u8")
    words[1] = 1 << 40  # bit 104 > 100 bits
    with pytest.raises(ValueError, match="beyond its size"):
        Bitmap.from_be_words(100, words.tobytes())


def test_bitmap_complement_and_or() -> None:
    bm = Bitmap(130)
    bm.set_range(0, 10)
    bm.complement()
    assert bm.count() == 120 and not bm.test(9) and bm.test(129)
    other = Bitmap(130)
    other.set_range(0, 12)
    assert bm.or_words(other.words) == 10  # only bits 0..9 are new
    assert bm.count() == 130


@pytest.mark.parametrize("backend", ["memfd", "anon"])
def test_ram_block_discard_frees_memory(backend: str) -> None:
    block = RAMBlock("t", 16 * MiB, backend)
    try:
        block.pages_array()[:] = 1
        assert block.allocated_bytes() >= 16 * MiB
        block.discard_range(4 * MiB, 8 * MiB)
        assert block.allocated_bytes(4 * MiB, 8 * MiB) == 0
        assert not block.pages_array(4 * MiB, 8 * MiB).any()
        assert block.pages_array(0, 4 * MiB).all()
        with pytest.raises(RAMBlockError, match="unaligned"):
            block.discard_range(100, 4096)
        with pytest.raises(RAMBlockError, match="overrun"):
            block.discard_range(12 * MiB, 8 * MiB)
    finally:
        block.close()


def test_memfd_data_extents_never_read_holes() -> None:
    block = RAMBlock("t", 64 * MiB)
    try:
        rows = block.pages_array()
        rows[10] = 5
        rows[1000:1010] = 7
        pages = np.array([0, 10, 11, 1000, 1009, 1010, 16000])
        assert block.data_page_mask(pages).tolist() == [False, True, False, True, True, False, False]
        # asking did not allocate anything
        assert block.allocated_bytes() == 11 * 4096
    finally:
        block.close()


def test_memfd_data_extents_of_small_ranges_are_probed_exactly_and_fast() -> None:
    """Small ranges are probed page by page (SEEK_HOLE would scan the whole run of data
    after them): the same extents as the walk of a large range, at any position."""
    rng = np.random.default_rng(7)
    block = RAMBlock("t", 4 * MiB)
    try:
        npages = block.used_length // 4096
        data = rng.random(npages) < 0.6
        data[:64] = True  # a run of data at the start, then a few short ones
        block.pages_array()[data] = 1
        walked = list(block.data_extents(0, block.used_length))  # the SEEK_HOLE walk
        for _ in range(300):
            first = int(rng.integers(0, npages))
            n = int(rng.integers(1, 17))
            n = min(n, npages - first)
            lo, hi = first * 4096, (first + n) * 4096
            want = [(max(s, lo), min(e, hi)) for s, e in walked if s < hi and e > lo]
            assert list(block.data_extents(lo, hi - lo)) == want, (first, n)
        # and it stays quick where SEEK_HOLE would scan the 1 GiB behind the page
        big = RAMBlock("big", 256 * MiB)
        try:
            big.pages_array()[:] = 3
            t0 = time.perf_counter()
            for _ in range(100):
                assert big.data_extent_pages(0, 4096).tolist() == [[0, 1]]
            assert (time.perf_counter() - t0) / 100 < 1e-3
        finally:
            big.close()
    finally:
        block.close()


def test_dirty_log_keeps_writes_between_sync_and_clear() -> None:
    """A page first written after a sync must survive the lazy clear of its chunk."""
    block = RAMBlock("t", 4 * MiB)
    try:
        log = BitmapDirtyLog([block])
        log.start()
        log.mark(block, np.array([1, 2]))
        synced = Bitmap(block.pages, words=log.sync(block))
        assert synced.indices().tolist() == [1, 2]
        log.mark(block, np.array([3]))  # after the sync: nobody has this page yet
        log.mark(block, np.array([2]))  # re-written: already reported, may be cleared
        log.clear(block, 0, block.pages)
        assert log.peek(block).indices().tolist() == [3]
        with pytest.raises(ValueError, match="64-page aligned"):
            log.clear(block, 3, 64)
    finally:
        block.close()


def test_checksum_ignores_how_zero_pages_are_stored() -> None:
    a, b = RAMBlock("pc.ram", 32 * MiB), RAMBlock("pc.ram", 32 * MiB)
    try:
        a.pages_array()[5] = 3
        b.pages_array()[5] = 3
        b.pages_array()[100:200] = 0  # allocated zeros on one side only
        ra, rb = MemoryRegion("pc.ram", a), MemoryRegion("pc.ram", b)
        assert memory_checksum([ra]) == memory_checksum([rb])
        b.pages_array()[7, 9] = 1
        assert memory_checksum([ra]) != memory_checksum([rb])
    finally:
        a.close()
        b.close()
