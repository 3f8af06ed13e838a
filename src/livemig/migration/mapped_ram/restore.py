"""Instant restore: the guest runs from a mapped-ram file before its memory is read.

QEMU's "fast snapshot load" (docs/devel/migration/fast-snapshot-load.rst): with the
``mapped-ram`` and ``postcopy-ram`` capabilities on, ``migrate-incoming file:PATH`` loads
the device state and starts the guest at once; guest RAM comes in as the guest touches
it, and a background reader completes the copy.

How (the choice the issue leaves open: userfaultfd, not a private file mapping). Guest
RAM stays what it always is — the VM's own memfd (or anonymous) blocks — so the restored
VM can later migrate, cpr-transfer or snapshot like any other, and the file is not
needed once the copy is complete. A private mapping of the file would leave the guest
running on file-backed copy-on-write memory that must be copied out anyway before the
file can go.

1. While the RAM set-up is read, each block's bitmap is read and its range is registered
   for userfaultfd MISSING faults (it is all missing: a fresh incoming VM holds nothing);
   a fault-handler process is started at the first block (:mod:`.fault_handler`, a fork
   of the helper launcher, :mod:`livemig.migration.core.helpers`) and told each block's
   layout before the stream goes on. No page is read now.
2. The device state loads (virtio-mem as in postcopy: nothing is discarded or populated),
   the guest starts — status ``postcopy-active`` — and every page it touches is read from
   the file by the handler and placed with ``UFFDIO_COPY``, or a zero page if it is not
   in the file. Unplugged memory has no bit: it is never read, and never placed unless
   the guest touches it.
3. Meanwhile this thread reads the present pages in order (a window of the file at a
   time, one ``preadv``) and places each run with ``UFFDIO_COPY``; pages the handler
   placed already are skipped by the kernel (``EEXIST``), so nothing is placed twice.
4. When every present page is in, the ranges are unregistered (a page still missing is a
   zero page: its hole reads as zero), the handler stops, the file is closed: it can be
   deleted. Status ``completed``.

If anything fails before the guest runs, the registration and the handler go and the VM
stays in ``inmigrate``. If the background read fails after the guest runs, the handler
keeps serving faults from the file (unregistering would turn missing pages into zeros
under a running guest) and the status is ``failed``.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.ram_block import RAMBlock
from livemig.migration.core import status
from livemig.migration.core.helpers import Helper, launcher
from livemig.migration.incoming import IncomingMigration
from livemig.migration.mapped_ram import fault_handler
from livemig.migration.mapped_ram.layout import (
    PAGE_SHIFT,
    PAGE_SIZE,
    BlockFileLayout,
    MappedRamConfigError,
)
from livemig.migration.mapped_ram.load import read_block_entry, window_pieces
from livemig.migration.postcopy.placer import Placer, open_uffd, register_missing, unregister
from livemig.migration.ram.codec import BlockEntry
from livemig.migration.stream.qemu_file import QEMUFileReader

WINDOW_PAGES = 512  # the background reader's unit: 2 MiB of the file per preadv
RUNNING = "running"
STOP_TIMEOUT = 5.0  # seconds for the fault handler to exit once told to stop


class InstantRestore:
    """The ``postcopy`` part of an incoming mapped-ram migration (module docstring)."""

    def __init__(self, inc: IncomingMigration):
        self.inc = inc
        self.vm = inc.vm
        self.blocks_by_name = {b.idstr: b for b in inc.vm.memory.blocks}
        self.blocks: list[tuple[RAMBlock, BlockFileLayout, Bitmap]] = []
        self.state = ""  # "running" once the guest started (incoming.info shows info())
        self.uffd = -1
        self.file_fd = -1
        self.ctrl: socket.socket | None = None
        self.handler: Helper | None = None
        self.registered: list[tuple[int, int]] = []
        self.started = time.monotonic()
        self.running_ms: int | None = None
        self.pages_total = 0
        self.pages_done = 0
        self.done = False
        self._stats: dict[str, Any] = {}
        self._ctrl_lock = threading.Lock()  # QMP's query-migrate asks the handler too
        self._stage_map = mmap.mmap(-1, WINDOW_PAGES * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._stage = np.frombuffer(self._stage_map, np.uint8)
        self._stage_addr = self._stage.ctypes.data

    @classmethod
    def attach(cls, inc: IncomingMigration) -> InstantRestore:
        if inc.uri.scheme != "file":
            raise MappedRamConfigError(f"instant restore needs a file: migration URI, not {inc.uri.scheme}:")
        r = cls(inc)
        inc.loader.block_extra = r.block_entry
        inc.load_ctx.postcopy = True  # pages come after the device state: nothing to discard
        inc.postcopy = r
        inc.job.on_cleanup("instant restore", r.close)
        return r

    # -- 1. the block list ----------------------------------------------------------------------
    def block_entry(self, r: QEMUFileReader, e: BlockEntry) -> None:
        block, lay, present = read_block_entry(self.blocks_by_name, self.inc.fd, r, e)
        name, length = e.name, e.length
        if self.handler is None:
            self._start_handler()
        register_missing(self.uffd, block.host, block.used_length)
        self.registered.append((block.host, block.used_length))
        self._ask({"op": "block", "idstr": name, "host": block.host, "length": length,
                   "pages_offset": lay.pages_offset, "bitmap_offset": lay.bitmap_offset,
                   "bitmap_bytes": lay.bitmap_bytes})  # fmt: skip
        self.blocks.append((block, lay, present))
        self.pages_total += present.count()
        r.seek(lay.end)

    def _start_handler(self) -> None:
        """The fault handler gets the userfaultfd, the file and its control socket, and
        nothing else of this process."""
        self.uffd = open_uffd()
        self.file_fd = os.dup(self.inc.fd)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.handler = launcher().spawn(
                fault_handler.helper_main, [self.uffd, self.file_fd, child.fileno()], "restore-faults"
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctrl = parent

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._ctrl_lock:
            if self.ctrl is None:
                raise OSError("the instant-restore fault handler is gone")
            self.ctrl.sendall(json.dumps(msg).encode())
            data = self.ctrl.recv(1 << 16)
        if not data:
            raise OSError("the instant-restore fault handler exited")
        return json.loads(data)

    # -- 2-4. IncomingMigration's postcopy hook ----------------------------------------------------
    def load(self, reader: QEMUFileReader) -> bool:
        inc = self.inc
        inc.load_stream(reader)
        inc.audit_unplugged()
        self.vm.start_incoming_guest()
        self.state = RUNNING
        inc.job.move(status.POSTCOPY_ACTIVE, status.ACTIVE)
        if inc.autostart:
            self.vm.cont()
        else:
            self.vm.set_runstate("paused")
        self.running_ms = int((time.monotonic() - self.started) * 1000)
        self._copy_all()
        self._finish()
        return True

    def _copy_all(self) -> None:
        """3: every present page, in file order, placed unless the guest's faults did."""
        placer = Placer(self.uffd, PAGE_SIZE)
        stage = memoryview(self._stage)
        for block, lay, present in self.blocks:
            for starts, lengths in window_pieces(present, WINDOW_PAGES):
                first = int(starts[0])
                span = (int(starts[-1] + lengths[-1]) - first) << PAGE_SHIFT
                got = 0
                while got < span:
                    k = os.preadv(self.file_fd, [stage[got:span]], lay.page_offset(first) + got)
                    if k == 0:
                        raise OSError(f"mapped-ram block {lay.idstr}: the file ends in its page data")
                    got += k
                for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                    placer.copy(block.host + (s << PAGE_SHIFT), self._stage_addr + ((s - first) << PAGE_SHIFT),
                                n << PAGE_SHIFT)  # fmt: skip
                self.pages_done += int(lengths.sum())

    def _finish(self) -> None:
        """4: unregister, stop the handler, let the file go."""
        for host, length in self.registered:
            unregister(self.uffd, host, length)
        self.registered.clear()
        self._stop_handler()
        self.done = True

    def _stop_handler(self) -> None:
        if self.ctrl is not None:
            try:
                self._stats = self._ask({"op": "stop"})
            except (OSError, ValueError):
                pass
            with self._ctrl_lock:
                self.ctrl.close()
                self.ctrl = None
        if self.handler is not None:
            self.handler.close(STOP_TIMEOUT)  # it exits after "stop"; else it is killed
            self.handler = None
        for fd in (self.uffd, self.file_fd):
            if fd >= 0:
                os.close(fd)
        self.uffd = self.file_fd = -1

    def close(self) -> None:
        """The migration's clean-up: after a failure before the guest ran, undo step 1."""
        if self.done or self.state == RUNNING:
            return  # done already, or the guest runs on what the handler serves
        if self.uffd >= 0:
            for host, length in self.registered:
                try:
                    unregister(self.uffd, host, length)
                except OSError:
                    pass
            self.registered.clear()
        self._stop_handler()

    # -- query-migrate ---------------------------------------------------------------------------
    def handler_stats(self) -> dict[str, Any]:
        if self.ctrl is None or self.done:
            return self._stats
        try:
            return self._ask({"op": "stats"})
        except (OSError, ValueError):
            return self._stats

    def info(self) -> dict[str, Any]:
        st = self.handler_stats()
        out: dict[str, Any] = {
            "restore-pages-total": self.pages_total,
            "restore-pages-copied": self.pages_done,
            "restore-fault-pages": int(st.get("pages-placed", 0)),
            "restore-fault-zero-pages": int(st.get("zero-placed", 0)),
            "restore-faults": int(st.get("faults", 0)),
        }
        if self.running_ms is not None:
            out["restore-guest-running-ms"] = self.running_ms
        return out
