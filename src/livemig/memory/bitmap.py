"""Packed bitmaps on numpy ``uint64`` words.

One layout serves every bitmap in livemig: bit *i* is bit ``i % 64`` of word ``i // 64``
(little-endian within the word). That is KVM's dirty-log layout, so a bitmap fetched with
KVM_GET_DIRTY_LOG can be OR-ed in without conversion, and it is also what virtio-mem's
plugged bitmap and the migration bitmap use.

The point of this module is that no operation loops in Python per bit or per word: range
updates touch at most two edge words by hand, and run extraction unpacks only the words
that are partly set (a 1 TiB region of 2 MiB blocks is 8192 words; of 4 KiB pages, 4 Mi
words).
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def words_for(nbits: int) -> int:
    """Number of u64 words that hold ``nbits`` bits."""
    return (nbits + WORD_BITS - 1) // WORD_BITS


def word_bit_indices(words: np.ndarray, word_index: np.ndarray) -> np.ndarray:
    """Indices of the set bits of ``words`` (uint64), whose word numbers are
    ``word_index``, in ascending order: the one "bitmap words to bit indices" step."""
    if not len(words):
        return np.zeros(0, np.int64)
    bits = np.unpackbits(np.ascontiguousarray(words, np.uint64).view(np.uint8), bitorder="little")
    r, c = np.nonzero(bits.reshape(-1, 64))
    return np.asarray(word_index, np.int64)[r] * 64 + c


def index_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, distinct indices -> ``(starts, lengths)`` (int64) of their consecutive runs."""
    idx = np.asarray(idx, np.int64)
    if len(idx) == 0:
        e = np.zeros(0, np.int64)
        return e, e
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], brk))]
    ends = idx[np.concatenate((brk - 1, [len(idx) - 1]))] + 1
    return starts, ends - starts


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the runs of True in a boolean array."""
    d = np.diff(np.concatenate(([0], np.asarray(mask, bool).view(np.int8), [0])))
    starts = np.flatnonzero(d == 1).astype(np.int64)
    return starts, np.flatnonzero(d == -1).astype(np.int64) - starts


def _edge_mask(lo: int, hi: int) -> int:
    """Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64."""
    return ((1 << (hi - lo)) - 1) << lo


class Bitmap:
    """A fixed-size bitmap; bits beyond ``nbits`` in the last word are kept zero."""

    __slots__ = ("nbits", "words")

    def __init__(self, nbits: int, fill: bool = False, words: np.ndarray | None = None):
        if nbits < 0:
            raise ValueError(f"bitmap size must be non-negative, got {nbits}")
        self.nbits = nbits
        if words is not None:
            if words.dtype != np.uint64 or words.shape != (words_for(nbits),):
                raise ValueError("words must be a uint64 array of words_for(nbits) entries")
            self.words = words
        else:
            self.words = np.zeros(words_for(nbits), dtype=np.uint64)
            if fill:
                self.set_range(0, nbits)

    # -- checks -------------------------------------------------------------------------
    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.nbits:
            raise IndexError(f"bit range [{start}, {start + count}) outside bitmap of {self.nbits} bits")

    # -- single bits ----------------------------------------------------------------------
    def test(self, i: int) -> bool:
        self._check(i, 1)
        return bool((int(self.words[i >> 6]) >> (i & 63)) & 1)

    def __len__(self) -> int:
        return self.nbits

    # -- ranges ---------------------------------------------------------------------------
    def _apply(self, start: int, count: int, value: bool) -> None:
        self._check(start, count)
        if count == 0:
            return
        end = start + count
        w0, w1 = start >> 6, (end - 1) >> 6
        words = self.words
        if w0 == w1:
            m = np.uint64(_edge_mask(start & 63, ((end - 1) & 63) + 1))
            words[w0] = (words[w0] | m) if value else (words[w0] & ~m)
            return
        m0 = np.uint64(_edge_mask(start & 63, 64))
        m1 = np.uint64(_edge_mask(0, ((end - 1) & 63) + 1))
        if value:
            words[w0] |= m0
            words[w1] |= m1
            words[w0 + 1 : w1] = _ALL
        else:
            words[w0] &= ~m0
            words[w1] &= ~m1
            words[w0 + 1 : w1] = 0

    def set_range(self, start: int, count: int) -> None:
        self._apply(start, count, True)

    def clear_range(self, start: int, count: int) -> None:
        self._apply(start, count, False)

    def set_all(self) -> None:
        self.set_range(0, self.nbits)

    def clear_all(self) -> None:
        self.words[:] = 0

    def _masked_words(self, start: int, count: int) -> np.ndarray:
        """Copy of the words covering [start, start+count) with bits outside zeroed."""
        end = start + count
        w0, w1 = start >> 6, (end - 1) >> 6
        w = self.words[w0 : w1 + 1].copy()
        w[0] &= np.uint64(_edge_mask(start & 63, 64))
        w[-1] &= np.uint64(_edge_mask(0, ((end - 1) & 63) + 1))
        return w

    def count(self, start: int = 0, count: int | None = None) -> int:
        """Number of set bits in [start, start+count)."""
        if count is None:
            count = self.nbits - start
        self._check(start, count)
        if count == 0:
            return 0
        if start & 63 == 0 and (start + count) & 63 == 0:
            w = self.words[start >> 6 : (start + count) >> 6]
        else:
            w = self._masked_words(start, count)
        return int(np.bitwise_count(w).sum(dtype=np.int64))

    def all_set(self, start: int, count: int) -> bool:
        return self.count(start, count) == count

    def none_set(self, start: int, count: int) -> bool:
        return self.count(start, count) == 0

    def test_and_clear_range(self, start: int, count: int) -> int:
        """Clear a range and return how many bits were set in it."""
        n = self.count(start, count)
        self.clear_range(start, count)
        return n

    def set_indices(self, idx: np.ndarray) -> None:
        """Set the bits ``idx`` (any order, repeats allowed) in one vectorized step."""
        idx = np.asarray(idx, np.int64)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.nbits):
            raise IndexError("bit index outside bitmap")
        np.bitwise_or.at(self.words, idx >> 6, np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64)))

    def test_indices(self, idx: np.ndarray) -> np.ndarray:
        """For each index of ``idx``: is its bit set (bool array)."""
        idx = np.asarray(idx, np.int64)
        return ((self.words[idx >> 6] >> (idx & 63).astype(np.uint64)) & np.uint64(1)) != 0

    def take_words(self, word_index: np.ndarray) -> np.ndarray:
        """Indices of the set bits in words ``word_index``, which are then cleared."""
        words = self.words[word_index]
        keep = words != 0
        word_index, words = word_index[keep], words[keep]
        self.words[word_index] = 0
        return word_bit_indices(words, word_index)

    def clear_runs(self, starts: np.ndarray, lengths: np.ndarray) -> int:
        """Clear many ranges at once; return how many bits were set in them.

        Runs that start and end on word boundaries (the usual case: discard runs are whole
        blocks of 256+ pages) cost one slice count and one slice clear each, a few
        microseconds; only unaligned ends take the general path.
        """
        starts = np.asarray(starts, np.int64)
        lengths = np.asarray(lengths, np.int64)
        if not len(starts):
            return 0
        ends = starts + lengths
        if int(starts.min()) < 0 or int(ends.max()) > self.nbits:
            raise IndexError("run outside bitmap")
        aligned = ((starts & 63) == 0) & (((ends & 63) == 0) | (ends == self.nbits))
        total = 0
        for s_, n_ in zip(starts[~aligned].tolist(), lengths[~aligned].tolist(), strict=True):
            total += self.test_and_clear_range(s_, n_)
        if aligned.any():
            # one popcount before and after instead of one per run: the runs are many
            before = self.count()
            words = self.words
            for w0, w1 in zip(
                (starts[aligned] >> 6).tolist(), ((ends[aligned] + 63) >> 6).tolist(), strict=True
            ):
                words[w0:w1] = 0
            total += before - self.count()
        return total

    # -- whole-bitmap operations ----------------------------------------------------------
    def or_words(self, other: np.ndarray) -> int:
        """OR ``other`` (same word count) in; return how many bits were newly set.

        Works in cache-sized slices and skips slices where ``other`` is all zero (a dirty
        log is mostly empty), so a 1 TiB bitmap (32 MiB) merges without a 32 MiB
        temporary.
        """
        words = self.words
        new = 0
        step = 1 << 16
        for i in range(0, len(words), step):
            o = other[i : i + step]
            if not o.any():
                continue
            w = words[i : i + step]
            new += int(np.bitwise_count(o & ~w).sum(dtype=np.int64))
            w |= o
        return new

    def complement(self) -> None:
        np.invert(self.words, out=self.words)
        tail = self.nbits & 63
        if tail and len(self.words):
            self.words[-1] &= np.uint64(_edge_mask(0, tail))

    def copy(self) -> Bitmap:
        return Bitmap(self.nbits, words=self.words.copy())

    def indices(self) -> np.ndarray:
        """Indices of all set bits (for tests and small bitmaps)."""
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: self.nbits]
        return np.flatnonzero(bits)

    # -- runs -----------------------------------------------------------------------------
    def runs(
        self, value: bool = True, start: int = 0, count: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Maximal runs of bits equal to ``value`` within [start, start+count).

        Returns ``(starts, lengths)`` as int64 arrays, in ascending order. Runs are clipped
        to the range. Word-level runs of full words are found with one ``diff`` over the
        word array; only partly-set words are unpacked to bits.
        """
        if count is None:
            count = self.nbits - start
        self._check(start, count)
        empty = np.zeros(0, np.int64)
        if count == 0:
            return empty, empty
        end = start + count
        w0 = start >> 6
        w = self.words[w0 : ((end - 1) >> 6) + 1]
        w = w.copy() if value else ~w
        w[0] &= np.uint64(_edge_mask(start & 63, 64))
        w[-1] &= np.uint64(_edge_mask(0, ((end - 1) & 63) + 1))
        return _runs_of_ones(w, w0 * 64)

    def to_le_bytes(self) -> bytes:
        return self.words.astype("<u8").tobytes()

    def to_be_words(self) -> bytes:
        return self.words.astype(">u8").tobytes()

    @classmethod
    def from_be_words(cls, nbits: int, data: bytes | memoryview) -> Bitmap:
        words = np.frombuffer(data, dtype=">u8").astype(np.uint64)
        bm = cls(nbits, words=words)
        bm._check_tail()
        return bm

    @classmethod
    def from_le_bytes(cls, nbits: int, data: bytes | memoryview) -> Bitmap:
        words = np.frombuffer(data, dtype="<u8", count=words_for(nbits)).astype(np.uint64)
        bm = cls(nbits, words=words)
        bm._check_tail()
        return bm

    def _check_tail(self) -> None:
        tail = self.nbits & 63
        if tail and len(self.words) and int(self.words[-1]) >> tail:
            raise ValueError(f"bitmap has bits set beyond its size of {self.nbits} bits")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Bitmap)
            and other.nbits == self.nbits
            and bool(np.array_equal(other.words, self.words))
        )

    def __repr__(self) -> str:
        return f"Bitmap(nbits={self.nbits}, set={self.count()})"


def _runs_of_ones(w: np.ndarray, bit_base: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits in word array ``w`` whose bit 0 has index ``bit_base``."""
    full = w == _ALL
    partial = (w != 0) & ~full
    starts_parts: list[np.ndarray] = []
    ends_parts: list[np.ndarray] = []
    if full.any():
        f = np.concatenate(([False], full, [False])).astype(np.int8)
        d = np.diff(f)
        ws = np.flatnonzero(d == 1)
        we = np.flatnonzero(d == -1)
        starts_parts.append(ws.astype(np.int64) * 64)
        ends_parts.append(we.astype(np.int64) * 64)
    pidx = np.flatnonzero(partial)
    if len(pidx):
        bits = np.unpackbits(w[pidx].view(np.uint8), bitorder="little").reshape(-1, 64)
        padded = np.zeros((len(pidx), 66), np.int8)
        padded[:, 1:65] = bits
        d = np.diff(padded, axis=1)
        rs, cs = np.nonzero(d == 1)
        re_, ce = np.nonzero(d == -1)
        # np.nonzero walks row-major, so starts and ends pair up in order
        base = pidx.astype(np.int64) * 64
        starts_parts.append(base[rs] + cs)
        ends_parts.append(base[re_] + ce)
    if not starts_parts:
        empty = np.zeros(0, np.int64)
        return empty, empty
    s = np.concatenate(starts_parts)
    e = np.concatenate(ends_parts)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    # merge intervals that touch (a full-word run followed by a partial word, etc.)
    new = np.ones(len(s), bool)
    new[1:] = s[1:] != e[:-1]
    starts = s[new]
    last = np.append(np.flatnonzero(new)[1:] - 1, len(s) - 1)
    ends = e[last]
    return starts + bit_base, ends - starts
