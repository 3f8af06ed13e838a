"""Instant restore's fault handler: missing guest pages served from the mapped-ram file.

It runs in a separate process (:mod:`.restore` starts it), for the reason postcopy's
handler is a process (docs/postcopy.md): a VM thread that faults on missing guest memory
while it holds the GIL would stop a handler thread of its own process too. The process
is a fork of the helper launcher (:mod:`livemig.migration.core.helpers`), not of the
multi-threaded VM process: a fork of the launcher takes a few milliseconds where starting
an interpreter takes hundreds, and the guest is meant to run within 100 ms of
``migrate-incoming``. It holds only what it needs (the userfaultfd, the file, its
control socket), ends when its control socket does (the VM process closed it, or died)
or with the launcher, and never touches guest memory through its own mapping (reading
a memfd hole there would allocate the page behind the VM's back).

For each fault: the page's bit in the block's bitmap is read from the file once per
block; a present page is read from the file together with the present pages after it
(up to :data:`RUN_PAGES`) and placed with ``UFFDIO_COPY``; any other page (zero, or
unplugged: never in the file) gets a zero page. A page the background reader placed a
moment earlier is reported ``EEXIST``: the faulting thread is woken and nothing is
placed twice.

Control messages are JSON on a unix socketpair: ``block`` (layout of one RAM block, acked
once the handler can serve it), ``stats``, ``stop``.

Standard library only (small to preload in the launcher).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import json
import os
import select
import socket

from livemig.migration.postcopy.placer import Placer, parse_faults, wake

PAGE = 4096
PAGE_SHIFT = 12
RUN_PAGES = 16  # a fault reads and places up to 64 KiB (platform notes: 2.5 GiB/s vs 0.4 for 4 KiB)
CTRL_MAX = 1 << 16


class Block:
    __slots__ = ("bitmap", "host", "idstr", "length", "npages", "pages_offset")

    def __init__(self, d: dict, file_fd: int):
        self.idstr = d["idstr"]
        self.host = d["host"]
        self.length = d["length"]
        self.npages = self.length >> PAGE_SHIFT
        self.pages_offset = d["pages_offset"]
        self.bitmap = os.pread(file_fd, d["bitmap_bytes"], d["bitmap_offset"])

    def present(self, page: int) -> bool:
        return bool((self.bitmap[page >> 3] >> (page & 7)) & 1)

    def run(self, page: int) -> int:
        """Present pages from ``page`` on (it is present), at most RUN_PAGES."""
        n = 1
        while n < RUN_PAGES and page + n < self.npages and self.present(page + n):
            n += 1
        return n


class FaultHandler:
    def __init__(self, uffd: int, file_fd: int, ctrl: socket.socket):
        self.uffd = uffd
        self.file_fd = file_fd
        self.ctrl = ctrl
        self.placer = Placer(uffd, PAGE)
        self.blocks: list[Block] = []
        self.hosts: list[int] = []
        self._buf = ctypes.create_string_buffer(RUN_PAGES * PAGE)
        self._addr = ctypes.addressof(self._buf)
        self._mv = memoryview(self._buf).cast("B")
        self.c = {"faults": 0, "pages-placed": 0, "zero-placed": 0, "pages-existed": 0, "bytes-read": 0}

    def add(self, d: dict) -> None:
        b = Block(d, self.file_fd)
        i = bisect.bisect(self.hosts, b.host)
        self.hosts.insert(i, b.host)
        self.blocks.insert(i, b)

    def block_at(self, addr: int) -> Block | None:
        i = bisect.bisect_right(self.hosts, addr) - 1
        if i < 0:
            return None
        b = self.blocks[i]
        return b if addr < b.host + b.length else None

    def fault(self, address: int) -> None:
        self.c["faults"] += 1
        addr = address & ~(PAGE - 1)
        b = self.block_at(addr)
        try:
            if b is None:
                wake(self.uffd, addr, PAGE)
                return
            page = (addr - b.host) >> PAGE_SHIFT
            if not b.present(page):
                placed, _ = self.placer.zeropage(addr, PAGE)
                self.c["zero-placed"] += placed >> PAGE_SHIFT
                return
            n = b.run(page)
            want = n << PAGE_SHIFT
            got = os.preadv(self.file_fd, [self._mv[:want]], b.pages_offset + (page << PAGE_SHIFT))
            if got < want:
                raise OSError(errno.EIO, f"{b.idstr}: the file ends in page data")
            self.c["bytes-read"] += want
            placed, existed = self.placer.copy(addr, self._addr, want)
            self.c["pages-placed"] += placed >> PAGE_SHIFT
            self.c["pages-existed"] += existed >> PAGE_SHIFT
            if existed:
                wake(self.uffd, addr, want)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):  # unregistered meanwhile (restore done)
                return
            raise

    def command(self) -> bool:
        data = self.ctrl.recv(CTRL_MAX)
        if not data:
            return False
        msg = json.loads(data)
        op = msg.get("op")
        if op == "block":
            self.add(msg)
            self.ctrl.sendall(b'{"ok":true}')
        elif op == "stats":
            self.ctrl.sendall(json.dumps(self.c).encode())
        elif op == "stop":
            self.ctrl.sendall(json.dumps(self.c).encode())
            return False
        return True

    def serve(self) -> None:
        poll = select.poll()
        poll.register(self.uffd, select.POLLIN)
        poll.register(self.ctrl.fileno(), select.POLLIN)
        while True:
            for fd, _ in poll.poll():
                if fd == self.uffd:
                    try:
                        data = os.read(self.uffd, 32 * 64)
                    except BlockingIOError:
                        continue
                    for address, _flags, _tid in parse_faults(data):
                        self.fault(address)
                elif not self.command():
                    return


def helper_main(fds: list[int]) -> int:
    """The process's entry, forked by the helper launcher with the userfaultfd, the file
    and the control socket."""
    uffd, file_fd, ctrl = fds
    FaultHandler(uffd, file_fd, socket.socket(fileno=ctrl)).serve()
    return 0
