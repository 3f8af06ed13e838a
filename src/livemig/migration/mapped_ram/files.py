"""mapped-ram's channels: threads that read or write a file at fixed offsets, in parallel.

With the ``multifd`` capability a mapped-ram migration uses ``multifd-channels`` threads,
else one (QEMU's multifd file channels). Each thread has its own descriptor of the same
file, reopened through ``/proc/self/fd`` (the very file the migration opened, whatever
happened to its path since), with ``O_DIRECT`` under the ``direct-io`` parameter, and an
aligned staging buffer; jobs are plain callables run on a free thread. ``pwritev`` and
``preadv`` release the GIL, so the threads' I/O runs in parallel.

The descriptors are opened by :func:`open_channel_fds` in the process that has the
migration's file; a background snapshot's writer process gets them in its set-up and
builds its :class:`FileChannels` on them (it never opens the file itself). Buffers that
``O_DIRECT`` writes from are page-aligned (:func:`aligned_pages`).

Failure: the first error of any thread is kept, the pool stops taking jobs, and the
migration thread gets it at its next :meth:`FileChannels.submit` or
:meth:`FileChannels.drain`. The threads are joined by the migration's clean-up.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.migration.core.threads import join_for_good
from livemig.migration.mapped_ram.layout import PAGE_SIZE, MappedRamConfigError, MappedRamError

STAGING_PAGES = 4096  # 16 MiB per thread
QUEUE_PER_CHANNEL = 2


def aligned_pages(n: int) -> np.ndarray:
    """``n`` zeroed pages as (n, page size) rows, page-aligned (``O_DIRECT`` needs it;
    numpy's own allocations are not)."""
    m = mmap.mmap(-1, max(n, 1) * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(m, np.uint8).reshape(-1, PAGE_SIZE)[:n]


class Channel:
    """One thread's descriptor, staging buffer and byte count."""

    def __init__(self, index: int, fd: int):
        self.index = index
        self.fd = fd
        self.staging = aligned_pages(STAGING_PAGES)
        self.bytes = 0  # page data moved by this channel

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def channel_count(caps: Any, params: Any) -> int:
    """QEMU's rule: ``multifd-channels`` threads with the ``multifd`` capability, else one."""
    return int(params.multifd_channels) if caps["multifd"] else 1


def open_channel_fd(fd: int, path: str, write: bool, direct: bool) -> int:
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(f"/proc/self/fd/{fd}", flags)
    except OSError as e:
        if direct and e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            raise MappedRamConfigError(
                f"direct-io: the file system of {path} does not support O_DIRECT ({e.strerror})"
            ) from None
        raise


def open_channel_fds(fd: int, path: str, n: int, write: bool, direct: bool) -> list[int]:
    """``n`` descriptors of the file ``fd`` for channel threads (all or none)."""
    fds: list[int] = []
    try:
        for _ in range(n):
            fds.append(open_channel_fd(fd, path, write, direct))
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    return fds


class FileChannels:
    """The channel threads, one per descriptor of ``fds`` (closed by :meth:`close`)."""

    def __init__(self, fds: list[int], path: str, direct: bool = False):
        self.path = path
        self.direct = direct
        self.channels = [Channel(i, fd) for i, fd in enumerate(fds)]
        self.cond = threading.Condition()
        self.jobs: deque[Callable[[Channel], None]] = deque()
        self.busy = 0
        self.error: str | None = None
        self.closing = False
        self.threads = [
            threading.Thread(target=self._run, args=(ch,), name=f"mapped-ram{i}", daemon=True)
            for i, ch in enumerate(self.channels)
        ]
        for t in self.threads:
            t.start()

    @classmethod
    def open(cls, fd: int, path: str, n: int, write: bool, direct: bool = False) -> FileChannels:
        """``n`` channels on the file ``fd`` of this process."""
        return cls(open_channel_fds(fd, path, n, write, direct), path, direct)

    # -- threads ------------------------------------------------------------------------------
    def _run(self, ch: Channel) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.closing:
                    self.cond.wait()
                if self.closing:
                    return
                job = self.jobs.popleft()
                self.busy += 1
            try:
                job(ch)
            except Exception as e:  # noqa: BLE001 - every failure fails the migration
                with self.cond:
                    if self.error is None:
                        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                        self.error = f"mapped-ram channel {ch.index}: {what or type(e).__name__}"
                    self.jobs.clear()
            finally:
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

    # -- the migration thread -------------------------------------------------------------------
    def _check(self) -> None:
        if self.error is not None:
            raise MappedRamError(0, self.error)
        if self.closing:
            raise MappedRamError(0, "mapped-ram channels closed")

    def submit(self, job: Callable[[Channel], None]) -> None:
        with self.cond:
            while len(self.jobs) >= QUEUE_PER_CHANNEL * len(self.channels):
                self._check()
                self.cond.wait(0.5)
            self._check()
            self.jobs.append(job)
            self.cond.notify_all()

    def drain(self) -> None:
        """Wait until every job submitted so far is done; raise the first error."""
        with self.cond:
            while self.jobs or self.busy:
                if self.error is not None:
                    break
                self.cond.wait(0.5)
            self._check()

    def bytes_done(self) -> int:
        return sum(ch.bytes for ch in self.channels)

    def abort(self) -> None:
        with self.cond:
            self.closing = True
            self.jobs.clear()
            self.cond.notify_all()

    def close(self) -> None:
        self.abort()
        for t in self.threads:
            join_for_good(t)
        for ch in self.channels:
            ch.close()


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def pread_all(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read (fewer only at end of file)."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got
