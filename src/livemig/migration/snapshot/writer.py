"""The snapshot writer: a separate process that writes a background snapshot's RAM.

Started by the VM process (:mod:`~livemig.migration.snapshot.writer_process`) as a fork
of the helper launcher (:mod:`livemig.migration.core.helpers`), not of the multi-threaded
VM process: no lock that a VM thread held at the start can be held here forever, and
nothing of the VM process is inherited but the control socket. Everything else arrives
in the set-up message (:mod:`~livemig.migration.snapshot.setup_message`).

Why a process at all: a thread of the VM process that stores into guest RAM while holding
the GIL blocks on a write-protect fault *with the GIL*; a resolver that needed that
interpreter would never run. This process has its own interpreter.

Two threads:

* the *fault thread* (:class:`~livemig.migration.snapshot.faults.FaultServer`) saves the
  old content of faulting pages and un-protects them; it never waits for the stream or
  for the VM process;
* the *main thread* waits for ``go`` (the guest is stopped and protected by then), then
  walks the migration bitmap once (:meth:`RamState.next_batch`, the one walk), sends each
  batch through the page pipeline (:func:`~livemig.migration.ram.pages.prepare` with a
  :class:`~livemig.migration.snapshot.remote_memory.RemoteMemory` reader: holes never read,
  pages read straight into the record slots) and the one record encoder
  (:class:`~livemig.migration.ram.sender.StreamSink`), un-protecting each batch's span
  right after the copy; the pages saved on faults go first. ``max-bandwidth`` limits it
  (:class:`~livemig.migration.core.rate.RateLimiter`). Then END ram, and the device state
  the VM process took at the stop.

**Into a mapped-ram file** (the set-up has ``mapped_ram``) the sink is mapped-ram's
(:class:`~livemig.migration.mapped_ram.sink.MappedRamSink`), on channel threads of this
process (one per descriptor of the file the set-up brings: ``multifd-channels``, or one).
The main thread reads each batch — and the saved pages — into a page-aligned buffer
instead of record slots, un-protects as before, and hands the batch to a channel thread,
which writes its data pages at their offsets (``O_DIRECT`` under ``direct-io``); zero
pages and holes are written as nothing. The fault thread is untouched: it never waits for
the file. When every page is handed over, the channels are drained and the present-pages
bitmaps written at their offsets (QEMU's layout); the stream's PART and END sections
carry only EOS, then comes the device state. The VM process wrote the header, the block
headers and the early devices; the stream continues at the file offset it left.

If this process dies — an error, ``migrate_cancel`` (SIGKILL), the VM process exiting
(the launcher kills its helpers then, and a helper dies with the launcher) — its
userfaultfd goes with it: the VM process dropped its own copy once protection was on, so
this is the last reference, and the kernel unregisters the ranges and wakes every
blocked fault. Guest RAM is never mapped here.
"""

from __future__ import annotations

import gc
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from livemig.memory import userfaultfd as uf
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import MemoryRegion
from livemig.migration.core.rate import RateLimiter
from livemig.migration.mapped_ram.files import FileChannels
from livemig.migration.mapped_ram.layout import FileLayouts
from livemig.migration.mapped_ram.sink import MappedRamSink
from livemig.migration.ram.pages import batch_of_rows, prepare
from livemig.migration.ram.sender import CountingWriter, PreparedSink, StreamSink
from livemig.migration.ram.state import BATCH_PAGES, BlockState, RamState
from livemig.migration.snapshot import setup_message as msg
from livemig.migration.snapshot.faults import FaultServer, SavedChunk
from livemig.migration.snapshot.remote_memory import RemoteMemory
from livemig.migration.snapshot.shared_stats import SharedStats
from livemig.migration.snapshot.tracking import SnapshotError
from livemig.migration.stream import savevm
from livemig.migration.stream.format import SectionType
from livemig.migration.stream.qemu_file import QEMUFileWriter

SWITCH_INTERVAL = 0.0002  # the fault thread gets the GIL within 0.2 ms of a fault


def stream_transport(fd: int) -> Any:
    """A socket object for a socket, else a raw file object; blocking writes either way.

    A socket's blocking mode is a flag of the open file, shared with the VM process's
    descriptor of it: the VM process no longer uses the main channel (only to shut it
    down on cancel, which does not care).
    """
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        return sock
    return os.fdopen(fd, "wb", buffering=0)


class Writer:
    """The writer's state, built from the set-up message (module docstring)."""

    def __init__(self, ctrl: socket.socket, setup: dict[str, Any], fds: list[int]):
        self.ctrl = ctrl
        self.times: dict[str, float] = {}  # CLOCK_MONOTONIC, the same clock in every process
        self.uffd = fds[msg.FD_UFFD]
        self.stats = SharedStats(fds[msg.FD_STATS])
        block_fds, channel_fds = msg.split_fds(setup, fds)
        layouts = msg.layouts(setup["blocks"], block_fds)
        # blocks of the VM process, described (no mapping): RamState only needs the layout
        regions = [MemoryRegion(lay.idstr, cast(RAMBlock, lay)) for lay in layouts]
        self.ram = RamState(regions, None, clear_bitmap_shift=setup["clear_bitmap_shift"], log_clear=False)
        msg.load_bitmaps(self.ram, fds[msg.FD_BITMAPS])
        self.base = int(setup["stream_offset"])
        self.ram_id = int(setup["ram_id"])
        pid = int(setup["vm_pid"])
        self.reader = RemoteMemory(pid, BATCH_PAGES)
        self.faults = FaultServer(self.ram, self.uffd, RemoteMemory(pid, 0))
        transport = stream_transport(fds[msg.FD_STREAM])
        self.chans: FileChannels | None = None
        self.sink: PreparedSink
        mr = setup.get("mapped_ram")
        if mr is None:  # RAM records on the stream
            self.w = QEMUFileWriter(transport, 4 << 20)
            self.sink = StreamSink(self.w, self.ram.stats, self.reader)
        else:  # pages at their offsets of a mapped-ram file, by channel threads
            self.chans = chans = FileChannels(channel_fds, mr["path"], bool(mr["direct"]))
            self.w = CountingWriter(transport, 4 << 20, chans.bytes_done)
            self.sink = MappedRamSink(fds[msg.FD_STREAM], chans, self.w, self.ram.stats,
                                      FileLayouts.from_description(mr["blocks"]))
        self.rate = RateLimiter(lambda: self.stats["max_bandwidth"])

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        faults = threading.Thread(target=self.faults.run, name="snapshot-faults", daemon=True)
        faults.start()  # before "ready": protection starts right after it
        self.stats["state"] = SharedStats.RUNNING
        self.publish()
        msg.send_msg(self.ctrl, {"op": "ready", "pid": os.getpid(), **self.times,
                                 "ready_at": time.monotonic()})
        device_state = self.wait_go()
        try:
            try:
                self.write_ram()
            finally:
                self.faults.stop()
                faults.join()
                self.faults.close()
            self.faults.check()
            # every page was saved and un-protected; drop the registration before the end
            for b in self.ram.blocks:
                try:
                    uf.unregister(self.uffd, b.block.host, b.block.max_length)
                except OSError:
                    pass
            self.sink.end_round()  # mapped-ram: every page in the file, then the bitmaps
            self.send_section(SectionType.END, lambda: True)  # END ram: no page, EOS only
            self.w.put_bytes(device_state)  # device sections, EOF, VMDESCRIPTION
            self.w.flush()
            self.publish()
        finally:
            if self.chans is not None:
                self.chans.close()

    def wait_go(self) -> bytes:
        """The device-state buffer, sent once the guest is stopped and protected."""
        m, fds = msg.recv_msg(self.ctrl)
        if m is None:
            raise SnapshotError("snapshot cancelled before the guest was stopped")
        if m.get("op") != "go" or len(fds) != 1:
            raise SnapshotError(f"snapshot writer: unexpected control message {m.get('op')!r}")
        return msg.read_memfd(fds[0], int(m["device_state"]))

    def write_ram(self) -> None:
        """PART sections until every page is written: the saved queue first, then the
        next batch of the bitmap, within ``max-bandwidth``."""
        w = self.w
        while True:
            self.faults.check()
            done = self.send_section(SectionType.PART, self.send_some)
            self.publish()
            self.rate.wait(w.bytes_written, time.sleep)  # faults are saved meanwhile
            if done and not self.faults.busy:
                return
            if done:  # faults still waiting for room in the queue
                time.sleep(0.001)

    def send_section(self, kind: SectionType, body: Callable[[], bool]) -> bool:
        """One RAM section: ``body()`` sends batches (True: the walk is over), then the
        pages saved on faults meanwhile, EOS."""
        w = self.w
        savevm.start_section(w, kind, self.ram_id)
        self.sink.start_section()
        done = body()
        self.send_saved()
        self.sink.end_section()
        savevm.write_footer(w, self.ram_id)
        w.flush()
        return done

    def send_some(self) -> bool:
        """Batches for one section's budget; True when the walk is over."""
        w = self.w
        end = w.bytes_written + self.rate.slice_bytes()
        while w.bytes_written < end:
            self.faults.check()
            self.send_saved()
            batch = self.ram.next_batch(claim=self.faults.claim)
            if batch is None:
                return True
            self.send_batch(*batch)
        return False

    def send_batch(self, b: BlockState, idx: np.ndarray) -> None:
        """Copy a batch into the sink's slots, un-protect its span, hand it to the sink
        (records written, or pages queued for the file's channels)."""
        try:
            batch = prepare(b, idx, self.reader, out=self.sink.slots(len(idx)))
        finally:
            self.faults.copied(b, idx)  # copied (or failed: the snapshot fails anyway)
        self.sink.put(batch)

    def send_saved(self) -> None:
        """Write the pages saved on faults, merged per block into sorted batches."""
        got = self.faults.take_saved()
        if got is None:
            return
        chunks, rows = got
        by_block: dict[int, list[SavedChunk]] = {}
        for c in chunks:
            by_block.setdefault(id(c.b), []).append(c)
        for group in by_block.values():
            group.sort(key=lambda c: int(c.idx[0]))
            b = group[0].b
            idx = np.concatenate([c.idx for c in group])
            was_read = np.concatenate([c.was_read for c in group])
            order = np.concatenate([c.first_row + np.arange(int(np.count_nonzero(c.was_read)))
                                    for c in group])  # queue rows in page order
            r = 0
            for s in range(0, len(idx), BATCH_PAGES):
                read = was_read[s : s + BATCH_PAGES]
                k = int(np.count_nonzero(read))
                slots = self.sink.slots(BATCH_PAGES)[:k]
                np.take(rows, order[r : r + k], axis=0, out=slots, mode="clip")  # unbuffered
                self.sink.put(batch_of_rows(b, idx[s : s + BATCH_PAGES], read, slots))
                r += k
        self.faults.give_back()

    def publish(self) -> None:
        """Progress for query-migrate in the VM process."""
        st, f = self.ram.stats, self.faults
        self.stats.update({
            "transferred": self.base + self.w.bytes_written,
            "remaining": self.ram.dirty_pages + f.queued_pages + f.waiting,
            "normal": st.normal,
            "duplicate": st.duplicate,
            "pages_read": st.pages_read,
            "holes_skipped": st.holes_skipped,
            "wp_faults": f.wp_faults,
            "urgent_pages": f.urgent_pages,
            "urgent_peak": f.urgent_peak,
            "unprotect_calls": f.unprotect_calls,
            "partial_reads": self.reader.partial_reads + f.reader.partial_reads,
        })


def helper_main(fds: list[int]) -> int:
    """The process's entry, forked by the helper launcher with the control socket
    ``fds[0]``; exit status 0 when the stream is complete."""
    started_at = time.monotonic()  # the helper runs (forked, its modules loaded)
    ctrl = socket.socket(fileno=fds[0])
    m, fds = msg.recv_msg(ctrl)
    if m is None or m.get("op") != "setup":
        return 2
    setup_at = time.monotonic()
    gc.disable()  # no collector pauses while a fault waits; this process lives seconds
    stats: SharedStats | None = None
    try:
        writer = Writer(ctrl, m, fds)
        writer.times.update(started_at=started_at, setup_at=setup_at)
        stats = writer.stats
        writer.run()
        stats["state"] = SharedStats.DONE
        msg.send_msg(ctrl, {"op": "done"})
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the VM process
        if stats is not None:
            stats["state"] = SharedStats.FAILED
        try:
            msg.send_msg(ctrl, {"op": "error", "why": str(e) or type(e).__name__})
        except OSError:
            pass
        return 1
