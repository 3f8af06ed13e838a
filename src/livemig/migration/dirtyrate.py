"""``calc-dirty-rate`` / ``query-dirty-rate``: how fast the guest dirties its memory.

QEMU's ``migration/dirtyrate.c``, with its arguments, limits, result fields and error
texts. Management layers (libvirt's ``domdirtyrate-calc``, KubeVirt) ask it before a
migration to choose a downtime limit or a bandwidth. Two modes:

* ``page-sampling`` (the default): hash ``sample-pages`` random pages per GiB of guest
  memory, wait ``calc-time``, hash them again; the share that changed, times the memory
  sampled, over the time, is the rate. Unlike QEMU, which samples the whole used length
  of every block, livemig samples only *plugged* memory — the populated ranges of each
  block's RamDiscardManager, under a hold so that nothing is unplugged while it reads —
  and never reads a hole of fd-backed memory (that would allocate it): a hole is the
  zero page's hash until it fills in. So the measurement reads no memory the guest gave
  back, and the rate is scaled by the memory that can be dirtied.
* ``dirty-bitmap``: start the dirty log, sync and clear it, wait, sync again; the pages
  set are the pages dirtied in the period. The dirty log has one reader at a time (its
  sync/clear contract is a migration's): while a migration runs this mode is refused,
  and while it measures, a migration blocker (``blocked-reasons``) keeps ``migrate``
  from starting.

``dirty-ring`` needs KVM's dirty ring, which livemig does not use (docs/convergence.md):
it is refused with QEMU's "not enabled" message.

The rate is in MB/s (MiB, as QEMU computes it). The pages are read with one gather per
block and chunk (numpy), never page by page.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import numpy as np

from livemig.memory.discard_manager import Section
from livemig.memory.region import MemoryRegion
from livemig.migration.core.vm import MigratableVM

PAGE = 4096
DEFAULT_SAMPLE_PAGES = 512
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 16384
MIN_CALC_TIME_MS, MAX_CALC_TIME_MS = 50, 60000
MIN_RAMBLOCK_SIZE = 128 << 10
MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
UNITS = {"second": 1000, "millisecond": 1}
GATHER_PAGES = 1024  # pages copied per numpy gather
BLOCKER = "the dirty rate is being measured in mode dirty-bitmap, which uses the dirty log"

_rng_keys = np.random.default_rng(0x5EED)
_K1 = _rng_keys.integers(1, 1 << 63, PAGE // 8, dtype=np.uint64) | np.uint64(1)
_K2 = _rng_keys.integers(1, 1 << 63, PAGE // 8, dtype=np.uint64) | np.uint64(1)


class DirtyRateError(ValueError):
    """A refused ``calc-dirty-rate``; the message is QEMU's."""


def page_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per page row (two wrapping dot products, xor-ed): a changed page
    hashes differently except with probability ~2^-64; the zero page hashes to 0."""
    w = rows.view(np.uint64)
    return (w * _K1).sum(axis=1, dtype=np.uint64) ^ ((w ^ (w >> np.uint64(29))) * _K2).sum(
        axis=1, dtype=np.uint64
    )


class _Samples:
    """The sampled pages of one region and their first hashes."""

    def __init__(self, mr: MemoryRegion, pages: np.ndarray, hashes: np.ndarray, mib: int):
        self.mr, self.pages, self.hashes, self.mib = mr, pages, hashes, mib


def _hold(mr: MemoryRegion) -> contextlib.AbstractContextManager[Any]:
    return mr.rdm.hold_state("calc-dirty-rate") if mr.rdm is not None else contextlib.nullcontext()


def _populated(mr: MemoryRegion) -> tuple[np.ndarray, np.ndarray]:
    """(first page, count) of the region's populated (plugged) runs."""
    used = mr.block.used_length
    if mr.rdm is None:
        return np.array([0], np.int64), np.array([used // PAGE], np.int64)
    offs, sizes = mr.rdm.populated_runs(Section(mr, 0, used))
    return np.asarray(offs, np.int64) // PAGE, np.asarray(sizes, np.int64) // PAGE


def _in_runs(pages: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    i = np.searchsorted(starts, pages, side="right") - 1
    return (i >= 0) & (pages < (starts + counts)[np.maximum(i, 0)])


def _hash_pages(mr: MemoryRegion, pages: np.ndarray) -> np.ndarray:
    """Hashes of sorted ``pages`` of ``mr``; holes of fd-backed memory are not read."""
    block = mr.block
    out = np.zeros(len(pages), np.uint64)
    data = block.data_page_mask(pages)  # nothing read: SEEK_DATA over the span
    idx = np.flatnonzero(data)
    view = block.pages_array()
    for lo in range(0, len(idx), GATHER_PAGES):
        sel = idx[lo : lo + GATHER_PAGES]
        out[sel] = page_hashes(view[pages[sel]])
    return out


class DirtyRateCalc:
    """One VM's dirty-rate measurement (QEMU keeps one per process, as here per VM)."""

    def __init__(self, vm: MigratableVM):
        self.vm = vm
        self.status = "unstarted"
        self.mode = "page-sampling"
        self.dirty_rate = -1
        self.start_time = 0
        self.calc_time_ms = 0
        self.sample_pages = 0
        self._thread: threading.Thread | None = None
        self._rng = np.random.default_rng()

    @property
    def measuring(self) -> bool:
        return self.status == "measuring"

    def start(self, calc_time: int, calc_time_unit: str | None = None,
              sample_pages: int | None = None, mode: str | None = None,
              log_in_use: bool = False) -> None:
        """``calc-dirty-rate``: checks in QEMU's order, then measure on a thread."""
        if self.measuring:
            raise DirtyRateError("the dirty rate is already being measured.")
        unit = calc_time_unit or "second"
        if unit not in UNITS:
            raise DirtyRateError(f"Parameter 'calc-time-unit' does not accept value '{unit}'")
        if mode is not None and mode not in MODES:
            raise DirtyRateError(f"Parameter 'mode' does not accept value '{mode}'")
        ms = calc_time * UNITS[unit]
        if not MIN_CALC_TIME_MS <= ms <= MAX_CALC_TIME_MS:
            raise DirtyRateError(
                f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]."
            )
        mode = mode or "page-sampling"
        if sample_pages is not None and mode != "page-sampling":
            raise DirtyRateError("sample-pages is used only in page-sampling mode")
        if sample_pages is not None and not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
            raise DirtyRateError(
                f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]."
            )
        if mode == "dirty-ring" or (mode == "dirty-bitmap" and log_in_use):
            raise DirtyRateError(f"mode {mode} is not enabled, use other method instead.")
        if mode == "dirty-bitmap":
            self.vm.state.add_blocker(BLOCKER)  # before returning: no migrate in between
        self.mode = mode
        self.sample_pages = sample_pages or DEFAULT_SAMPLE_PAGES
        self.calc_time_ms = ms
        self.start_time = int(time.time())
        self.dirty_rate = -1
        self.status = "measuring"
        self._thread = threading.Thread(target=self._run, args=(ms,), name="dirtyrate", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return not self.measuring

    def query(self, calc_time_unit: str | None = None) -> dict[str, Any]:
        """``query-dirty-rate``: QEMU's ``DirtyRateInfo``."""
        unit = calc_time_unit or "second"
        if unit not in UNITS:
            raise DirtyRateError(f"Parameter 'calc-time-unit' does not accept value '{unit}'")
        out: dict[str, Any] = {
            "status": self.status,
            "start-time": self.start_time,
            "calc-time": self.calc_time_ms // UNITS[unit],
            "calc-time-unit": unit,
            "sample-pages": self.sample_pages,
            "mode": self.mode,
        }
        if self.status == "measured":
            out["dirty-rate"] = self.dirty_rate
            if self.mode != "page-sampling":
                out["sample-pages"] = 0
        return out

    # -- the measuring thread ----------------------------------------------------------------
    def _run(self, ms: int) -> None:
        try:
            if self.mode == "dirty-bitmap":
                self.dirty_rate = self._bitmap(ms)
            else:
                self.dirty_rate = self._sampling(ms)
        except Exception:  # noqa: BLE001 - a measurement that cannot finish reports no rate
            self.dirty_rate = -1
        finally:
            if self.mode == "dirty-bitmap":
                self.vm.state.remove_blocker(BLOCKER)
            self.status = "measured"

    def _sampling(self, ms: int) -> int:
        samples: list[_Samples] = []
        t0 = time.monotonic()
        for mr in self.vm.memory.regions:
            if mr.block.used_length < MIN_RAMBLOCK_SIZE:
                continue
            with _hold(mr):
                starts, counts = _populated(mr)
                total = int(counts.sum())
                n = (total * PAGE * self.sample_pages) >> 30
                if n == 0:
                    continue
                pos = self._rng.integers(0, total, n)
                ends = np.cumsum(counts)
                r = np.searchsorted(ends, pos, side="right")
                pages = np.sort(starts[r] + pos - (ends[r] - counts[r]))
                samples.append(_Samples(mr, pages, _hash_pages(mr, pages), (total * PAGE) >> 20))
        ms = self._wait(ms, t0)
        dirty = count = mib = 0
        for s in samples:
            with _hold(s.mr):
                starts, counts = _populated(s.mr)
                keep = _in_runs(s.pages, starts, counts)  # unplugged meanwhile: not sampled
                now = _hash_pages(s.mr, s.pages[keep])
            dirty += int(np.count_nonzero(now != s.hashes[keep]))
            count += int(keep.sum())
            mib += s.mib
        return dirty * mib * 1000 // (count * ms) if count else 0

    def _bitmap(self, ms: int) -> int:
        log = self.vm.dirty_log
        blocks = [mr.block for mr in self.vm.memory.regions]
        log.start()
        try:
            for b in blocks:
                log.sync(b)
                log.clear(b, 0, b.max_length // PAGE)
            t0 = time.monotonic()
            ms = self._wait(ms, t0)
            pages = 0
            for b in blocks:
                words = log.sync(b)
                used = b.used_length // PAGE
                pages += int(np.bitwise_count(words[: used // 64]).sum())
                if used % 64:
                    pages += int(words[used // 64] & np.uint64((1 << (used % 64)) - 1)).bit_count()
        finally:
            log.stop()
        return (pages * PAGE * 1000 >> 20) // ms

    def _wait(self, ms: int, t0: float) -> int:
        """Sleep until ``ms`` after ``t0``; the milliseconds that really passed."""
        left = t0 + ms / 1000 - time.monotonic()
        if left > 0:
            time.sleep(left)
        self.calc_time_ms = int((time.monotonic() - t0) * 1000)
        return max(self.calc_time_ms, 1)
