"""Write tracking for background snapshots (QEMU's ``ram_write_tracking_*``).

Plugged guest memory is write-protected with userfaultfd; unplugged ranges are never
read, populated or protected (reference 7.6). Holes of memfd memory are not populated
either: file-backed write protection installs a marker in an empty page-table entry, so a
write into a hole faults like any other write (docs/snapshot.md).
"""

from __future__ import annotations

import os
import time

from livemig.memory import hostmem
from livemig.memory import userfaultfd as uf
from livemig.memory.discard_manager import Section
from livemig.memory.region import MemoryRegion
from livemig.memory.userfaultfd import (
    NOT_COMPATIBLE,
    NOT_SUPPORTED,
    wp_features_for,
    write_tracking_problem,
)

__all__ = ["SnapshotError", "WriteTracking", "plugged_runs", "write_tracking_problem"]


class SnapshotError(RuntimeError):
    pass


def plugged_runs(mr: MemoryRegion) -> list[tuple[int, int]]:
    """(offset, length) of the parts of ``mr`` that are not discarded (all of it without an rdm)."""
    if mr.rdm is None:
        return [(0, mr.block.used_length)]
    offs, sizes = mr.rdm.populated_runs(Section(mr, 0, mr.block.used_length))
    return [(int(o), int(s)) for o, s in zip(offs, sizes, strict=True)]


class WriteTracking:
    """The VM-process side of write tracking (QEMU's ``ram_write_tracking_*``)."""

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = regions
        blocks = [mr.block for mr in regions]
        supported = uf.supported_features()
        if not supported & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise SnapshotError(NOT_SUPPORTED)
        self.features = wp_features_for(blocks, supported)
        try:
            self.fd = uf.open_uffd(self.features)
        except OSError as e:
            raise SnapshotError(f"{NOT_SUPPORTED} ({e.strerror})") from e
        self.protect = uf.WriteProtector(self.fd)
        self.unpopulated = bool(self.features & uf.UFFD_FEATURE_WP_UNPOPULATED)
        self.registered: list[MemoryRegion] = []
        self.protected_bytes = 0
        self.populated_bytes = 0
        self.protect_time = 0.0

    def prepare(self) -> None:
        """``ram_write_tracking_prepare``: populate-read plugged memory — never a hole.

        memfd: only the data extents inside plugged ranges (reading a hole would allocate
        it; holes are covered by write-protect markers). Anonymous memory: nothing with
        ``WP_UNPOPULATED``, else the plugged ranges (reads map the shared zero page).
        """
        for mr in self.regions:
            block = mr.block
            if block.fd < 0 and self.unpopulated:
                continue
            for off, length in plugged_runs(mr):
                ranges = block.data_extents(off, length) if block.fd >= 0 else [(off, off + length)]
                for s, e in ranges:
                    hostmem.madvise(block.host + s, e - s, hostmem.MADV_POPULATE_READ)
                    self.populated_bytes += e - s

    def start(self) -> None:
        """``ram_write_tracking_start``: register every block, protect only plugged ranges."""
        assert self.fd >= 0
        t = time.monotonic()
        try:
            for mr in self.regions:
                block = mr.block
                ioctls = uf.register_wp(self.fd, block.host, block.max_length)
                self.registered.append(mr)
                if not ioctls & uf.IOCTL_WRITEPROTECT:
                    raise SnapshotError(NOT_COMPATIBLE)
                for off, length in plugged_runs(mr):
                    self.protect(block.host + off, length, True)
                    self.protected_bytes += length
        except BaseException:
            self.stop()
            raise
        self.protect_time = time.monotonic() - t

    def stop(self) -> None:
        """Unregister what this process registered (waking any waiter) and drop the fd."""
        if self.fd < 0:
            return
        for mr in self.registered:
            try:
                uf.unregister(self.fd, mr.block.host, mr.block.max_length)
            except OSError:
                pass
        self.registered.clear()
        self.release()

    def release(self) -> None:
        """Close this process's descriptor; the kernel unregisters with the last one."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
