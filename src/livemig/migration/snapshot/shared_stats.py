"""Counters of a background snapshot, shared by the VM process and the snapshot writer.

The writer is a separate process, forked from the helper launcher (no memory of the VM
process inherited), so the counters live in one page of a memfd that both map: the VM process creates it and passes
the descriptor in the writer's set-up message. The writer publishes its progress there
after every section; ``query-migrate`` in the VM process reads it without asking the
writer anything (a writer busy with faults, or a VM thread stuck behind one, never makes
the other wait). The VM process writes one value the other way: the current
``max-bandwidth``, so a change during the snapshot reaches the writer's rate limiter.

Values are aligned int64 words: each read or write of one is atomic on x86-64, which is
all the counters need (they are reported, never used to decide anything).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

PAGE = 4096


class SharedStats:
    """Named int64 counters in a shared memfd page (module docstring)."""

    FIELDS = (
        "state",  # NOT_STARTED, RUNNING (walking guest memory), DONE, FAILED
        "transferred",  # stream bytes, the VM process's part (header, set-up) included
        "remaining",  # pages not yet written: still in the bitmap, queued, or faulting
        "normal",
        "duplicate",
        "pages_read",
        "holes_skipped",
        "wp_faults",
        "urgent_pages",
        "urgent_peak",
        "unprotect_calls",
        "partial_reads",
        "max_bandwidth",  # written by the VM process: bytes/s, 0 = unlimited
    )
    NOT_STARTED, RUNNING, DONE, FAILED = 0, 1, 2, 3

    def __init__(self, fd: int, keep_fd: bool = False):
        """Map the page of ``fd``. This object owns ``fd``: it closes it now, or with
        ``keep_fd`` when :meth:`share` hands it on."""
        try:
            self._map = mmap.mmap(fd, PAGE, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd if keep_fd else -1
        if not keep_fd:
            os.close(fd)
        self._words = np.frombuffer(self._map, np.int64, count=len(self.FIELDS))
        self._index = {name: i for i, name in enumerate(self.FIELDS)}

    @classmethod
    def create(cls) -> SharedStats:
        """A new zeroed page (the VM process); :meth:`share` gives the writer its descriptor."""
        fd = os.memfd_create("livemig-snapshot-stats", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE)
        return cls(fd, keep_fd=True)

    def share(self) -> int:
        """The page's descriptor, once: the caller sends it (``SCM_RIGHTS``) and closes it."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise RuntimeError("statistics page already shared")
        return fd

    def close_fd(self) -> None:
        """Drop the descriptor if it was never shared (the mapping stays readable)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __getitem__(self, name: str) -> int:
        return int(self._words[self._index[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self._words[self._index[name]] = value

    def update(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            self[name] = value

    def as_dict(self) -> dict[str, int]:
        return {name: self[name] for name in self.FIELDS}
