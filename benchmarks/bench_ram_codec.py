"""The RAM record decoder alone, as its two users drive it: the destination's loader and
``livemig inspect``.

Three stream files are written once into a directory (default ``/tmp/livemig-bench-codec``,
kept for later runs so a before/after comparison reads the same bytes from the page cache):

* ``data``: one block, every page a PAGE record (runs of thousands of records, as livemig
  sends them): the loader's main path, copying 1 GiB into guest RAM;
* ``zero``: the same block, every page a ZERO record (the loader only checks);
* ``alternating``: PAGE and ZERO records alternate page by page, the way QEMU sends memory
  where zero and data pages alternate: every run is one record long, the decoder's worst
  case.

For each file, ``RamLoader.load`` is timed into a memfd block populated by a first load
(steady state: no page faults), and ``inspect_stream`` over the whole file. Prints JSON
with the best and median wall and CPU time of ``--repeat`` runs.

glibc's malloc is told to keep freed memory (fixed mmap and trim thresholds): each timed
run opens a new reader with a fresh 4 MiB buffer, and whether glibc hands it out already
faulted in or as a new mapping depends on its dynamic thresholds, that is on unrelated
allocation history; ~1000 page faults more or less would swamp a 3 ms measurement.
Usage:
``python benchmarks/bench_ram_codec.py [--size 1G] [--repeat 5] [--only loader]``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.ram.load import RamLoader
from livemig.migration.stream import savevm
from livemig.migration.stream.format import RamFlag, SectionType
from livemig.migration.stream.qemu_file import QEMUFileReader, open_reader, open_writer

PAGE = 4096
BLOCK = "pc.ram"
LOADER_BUFFER = 4 << 20  # what an incoming migration reads with
CHUNK_PAGES = 4096


def _records(kind: str, first: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` records of pages ``first..first+n`` (all CONTINUE: the block was named before)."""
    idx = np.arange(first, first + n, dtype=np.uint64) << np.uint64(12)
    if kind == "data":
        rec = np.zeros((n, 8 + PAGE), np.uint8)
        rec[:, :8] = (
            (idx | np.uint64(RamFlag.PAGE | RamFlag.CONTINUE))
            .astype(">u8")
            .view(np.uint8)
            .reshape(n, 8)
        )
        rec[:, 8:16] = rng.integers(1, 256, (n, 8), dtype=np.uint8)  # non-zero pages
        return rec.reshape(-1)
    if kind == "zero":
        rec = np.zeros((n, 9), np.uint8)
        rec[:, :8] = (
            (idx | np.uint64(RamFlag.ZERO | RamFlag.CONTINUE))
            .astype(">u8")
            .view(np.uint8)
            .reshape(n, 8)
        )
        return rec.reshape(-1)
    pair = np.zeros((n // 2, 8 + PAGE + 9), np.uint8)  # alternating: PAGE, ZERO, PAGE, ...
    hdr = idx.astype(">u8").view(np.uint8).reshape(n, 8)
    pair[:, :8] = hdr[0::2]
    pair[:, 7] |= np.uint8(RamFlag.PAGE | RamFlag.CONTINUE)
    pair[:, 8:16] = rng.integers(1, 256, (n // 2, 8), dtype=np.uint8)
    pair[:, 8 + PAGE : 16 + PAGE] = hdr[1::2]
    pair[:, 15 + PAGE] |= np.uint8(RamFlag.ZERO | RamFlag.CONTINUE)
    return pair.reshape(-1)


def write_stream(path: str, kind: str, size: int) -> dict[str, int]:
    """A whole stream (header, configuration, RAM set-up, one PART, END, EOF); returns the
    offsets the loader timing starts at."""
    rng = np.random.default_rng(1)
    pages = size // PAGE
    w = open_writer(path, 8 << 20)
    savevm.write_header(w)
    savevm.write_configuration(w, "livemig-soft")
    savevm.start_section(w, SectionType.START, 1, "ram", 0, 4)
    setup = w.tell()
    w.put_be64(size | RamFlag.MEM_SIZE)
    w.put_counted_string(BLOCK)
    w.put_be64(size)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 1)
    savevm.start_section(w, SectionType.PART, 1)
    part = w.tell()
    w.put_be64(RamFlag.ZERO)  # names the block
    w.put_counted_string(BLOCK)
    w.put_u8(0)
    for first in range(1, pages, CHUNK_PAGES):
        n = min(CHUNK_PAGES, pages - first)
        w.write_view(
            memoryview(_records(kind, first, n - n % 2 if kind == "alternating" else n, rng))
        )
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 1)
    savevm.start_section(w, SectionType.END, 1)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 1)
    savevm.write_eof(w)
    w.close()
    return {"setup": setup, "part": part}


def _skip_to(r: QEMUFileReader, offset: int) -> None:
    r.skip(offset - r.tell())


def time_loader(path: str, marks: dict[str, int], block: RAMBlock) -> tuple[float, float]:
    loader = RamLoader([block])
    with open_reader(path, LOADER_BUFFER) as r:
        _skip_to(r, marks["setup"])
        loader.load_setup(r)
        _skip_to(r, marks["part"])
        t, c = time.perf_counter(), time.process_time()
        loader.start_section()
        loader.load(r)
        return time.perf_counter() - t, time.process_time() - c


def time_inspect(path: str) -> tuple[float, float]:
    try:
        from livemig.inspect import inspect_stream
    except ImportError:  # a tree from before inspect left migration/ (for before/after runs)
        from livemig.migration.inspect import inspect_stream  # type: ignore[no-redef]

    t, c = time.perf_counter(), time.process_time()
    report = inspect_stream(path)
    times = time.perf_counter() - t, time.process_time() - c
    assert report.complete, report.stopped
    return times


def _stats(f: Callable[[], tuple[float, float]], repeat: int) -> dict[str, float]:
    """Wall and CPU seconds: on a shared machine the CPU time of this (single-threaded)
    work is the steadier figure."""
    runs = [f() for _ in range(repeat)]
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {
        "best_s": round(min(wall), 4),
        "median_s": round(statistics.median(wall), 4),
        "cpu_best_s": round(min(cpu), 4),
        "cpu_median_s": round(statistics.median(cpu), 4),
    }


def _keep_freed_memory() -> None:
    """Fixed glibc malloc thresholds (see the module docstring); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main() -> None:
    _keep_freed_memory()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="bytes of guest RAM per stream (K/M/G)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default="/tmp/livemig-bench-codec")
    p.add_argument("--only", choices=("loader", "inspect"), default=None)
    p.add_argument("--kinds", default="data,zero,alternating")
    a = p.parse_args()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(a.size[:-1]) * mult[a.size[-1]] if a.size[-1] in mult else int(a.size)
    os.makedirs(a.dir, exist_ok=True)
    out: dict[str, dict[str, object]] = {}
    for kind in a.kinds.split(","):
        path = os.path.join(a.dir, f"{kind}-{size}.stream")
        marks_path = path + ".json"
        if not os.path.exists(marks_path):
            marks = write_stream(path, kind, size)
            with open(marks_path, "w") as f:
                json.dump(marks, f)
        with open(marks_path) as f:
            marks = json.load(f)
        res: dict[str, object] = {"file_bytes": os.path.getsize(path)}
        if a.only != "inspect":
            block = RAMBlock(BLOCK, size)
            time_loader(path, marks, block)  # populate the destination once
            res["loader"] = _stats(lambda: time_loader(path, marks, block), a.repeat)  # noqa: B023
            block.close()
        if a.only != "loader":
            res["inspect"] = _stats(lambda: time_inspect(path), a.repeat)  # noqa: B023
        out[kind] = res
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
