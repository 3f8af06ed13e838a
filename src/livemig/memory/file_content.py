"""Load guest memory from a file: the benchmarks' way to give a livemig VM the same bytes
as a QEMU VM whose RAM is a ``memory-backend-file``.

Only the file's data extents are copied (``SEEK_DATA``/``SEEK_HOLE``), straight into guest
RAM with ``preadv`` (no GIL held while copying): a hole of the file stays a hole of the
block. Ranges a RamDiscardManager reports discarded (unplugged virtio-mem blocks) are
skipped and counted, never written.
"""

from __future__ import annotations

import os
from typing import Any

from livemig.memory.discard_manager import Section
from livemig.memory.region import MemoryRegion

CHUNK = 64 << 20


def load_from_file(mr: MemoryRegion, path: str, file_offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Copy ``path``'s data at [file_offset, file_offset+length) to offset 0 of ``mr``'s block."""
    block = mr.block
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if length is None:
            length = min(size - file_offset, block.used_length)
        if file_offset < 0 or length < 0 or file_offset + length > size or length > block.used_length:
            raise ValueError(f"range 0x{file_offset:x}+0x{length:x} does not fit {path} / {block.idstr}")
        copied = skipped = 0
        pos, end = file_offset, file_offset + length
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            off = data - data % block.page_size
            stop = -(-hole // block.page_size) * block.page_size
            for c in range(off, min(stop, end), CHUNK):
                n = min(CHUNK, min(stop, end) - c)
                dst = c - file_offset
                if mr.rdm is not None and not mr.rdm.is_populated(Section(mr, dst, n)):
                    skipped += n
                    continue
                view = block.view[dst : dst + n]
                got = 0
                while got < n:
                    r = os.preadv(fd, [view[got:]], c + got)
                    if r <= 0:
                        break
                    got += r
                copied += got
            pos = hole
        return {"copied": copied, "skipped-unplugged": skipped}
    finally:
        os.close(fd)
