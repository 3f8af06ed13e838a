"""multifd, source side: N channel threads fed by the migration thread.

The migration thread walks the migration bitmap as without multifd (it takes pages out
of :class:`~livemig.migration.ram.state.RamState`, which re-arms the dirty log before a
page can be read) but hands each batch of page indices (about 16 MiB per job) to the
least busy channel through :class:`MultifdSink` instead of encoding records. A channel
thread does the rest with the shared page pipeline (:func:`~livemig.migration.ram.pages.
prepare`: holes of memfd memory are never read, zero pages found with one pass) and one
``sendmsg`` whose iovecs point straight into guest RAM (optionally with
``MSG_ZEROCOPY``). Zero pages and holes travel as runs, not one record per page. At the
end of every pass (and at switchover) the migration thread puts a SYNC packet on every
channel, waits until all were sent, and writes ``MULTIFD_FLUSH`` in the main stream:
everything of a round is on the wire before the next round or the device state.

Failure. Any channel error fails the whole migration: the migration thread sees it at its
next call into the sender (or while waiting for a sync) and fails as usual. The channel
threads are joined by the migration's clean-up, before it releases the RamDiscardManager
holds: no thread reads guest memory once the guest may unplug again.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.bitmap import index_runs
from livemig.migration.core.job import describe
from livemig.migration.core.threads import join_for_good
from livemig.migration.multifd.wire import (
    CONNECT_TIMEOUT,
    EXT_ERR,
    HANDSHAKE,
    JOB_PAGES,
    KIND_PAGES,
    KIND_SYNC,
    MAGIC,
    MSG_ZEROCOPY,
    PACKET,
    QUEUE_DEPTH,
    SO_EE_CODE_ZEROCOPY_COPIED,
    SO_EE_ORIGIN_ZEROCOPY,
    SO_ZEROCOPY,
    STAGING_PAGES,
    VERSION,
    MultifdError,
    sendmsg_all,
    shutdown_quietly,
)
from livemig.migration.ram import splice_io
from livemig.migration.ram.codec import RecordEncoder
from livemig.migration.ram.pages import LocalMemory, prepare
from livemig.migration.ram.sender import CountingWriter, JobBatcher
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE, BlockState, RamStats
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileWriter

if TYPE_CHECKING:
    from livemig.migration.outgoing import OutgoingMigration

log = logging.getLogger(__name__)

DIRECT_RUNS = 64  # up to this many data runs per packet go to sendmsg directly


class _Counters:
    __slots__ = ("bytes", "duplicate", "holes", "normal", "pages_read")

    def __init__(self) -> None:
        self.bytes = self.normal = self.duplicate = self.holes = self.pages_read = 0


class SendChannel:
    def __init__(self, owner: MultifdSender, index: int, sock: socket.socket, zerocopy: bool):
        self.owner = owner
        self.index = index
        self.sock = sock
        self.zerocopy = zerocopy
        self.jobs: deque[tuple[Any, ...]] = deque()
        self.synced = 0
        self.c = _Counters()
        self.folded = _Counters()
        self.zc_calls = 0  # MSG_ZEROCOPY sendmsg calls
        self.zc_done = 0  # completions reaped
        self.zc_copied = 0  # completions the kernel served by copying
        self.reader = LocalMemory(STAGING_PAGES)
        self._stage = np.empty((STAGING_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self._splicer: splice_io.PipeSplicer | None = None
        self.thread = threading.Thread(target=self._run, name=f"multifd-send{index}", daemon=True)

    # -- thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        owner = self.owner
        try:
            while True:
                with owner.cond:
                    while not self.jobs and not owner.closing:
                        owner.cond.wait()
                    if owner.closing:
                        return
                    job = self.jobs[0]
                if job[0] == KIND_SYNC:
                    self._send_sync(job[1])
                else:
                    self._send_pages(job[1], job[2], job[3], job[4])
                with owner.cond:
                    self.jobs.popleft()
                    if job[0] == KIND_SYNC:
                        self.synced = job[1]
                    owner.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - every failure fails the migration
            owner.channel_failed(self.index, e)
        finally:
            if self._splicer is not None:
                self._splicer.close()

    def _send_sync(self, rnd: int) -> None:
        hdr = PACKET.pack(KIND_SYNC, rnd, 0, 0, 0) + b"\x00"
        self.sock.sendall(hdr)
        self.c.bytes += len(hdr)
        if self.zerocopy:
            self._reap_zerocopy(wait=True)

    def _send_pages(self, b: BlockState, idx: np.ndarray, extents: np.ndarray | None, rnd: int) -> None:
        block = b.block
        # holes, read, zero check: the shared pipeline, in this thread (numpy and memcmp
        # release the GIL, so the channels check pages in parallel)
        batch = prepare(b, idx, self.reader, extents)
        ns, nl = index_runs(batch.data)
        zs, zl = index_runs(batch.zero)
        k = len(batch.data)
        runs = np.empty((len(ns) + len(zs), 2), ">u8")
        runs[: len(ns), 0] = ns << TARGET_PAGE_BITS
        runs[: len(ns), 1] = nl << TARGET_PAGE_BITS
        runs[len(ns) :, 0] = zs << TARGET_PAGE_BITS
        runs[len(ns) :, 1] = zl << TARGET_PAGE_BITS
        name = block.idstr.encode()
        head = PACKET.pack(KIND_PAGES, rnd, len(ns), len(zs), k) + bytes([len(name)]) + name
        views: list[Any] = [head, memoryview(runs.view(np.uint8).reshape(-1))]
        direct = False
        if k:
            if len(ns) <= DIRECT_RUNS:
                # 3. large sends straight from guest RAM: one iovec per run, no copy
                mv = block.view
                views += [mv[s << TARGET_PAGE_BITS : (s + ln) << TARGET_PAGE_BITS] for s, ln in
                          zip(ns.tolist(), nl.tolist(), strict=True)]
                direct = True
            else:  # many short runs: one copy into staging, one iovec
                out = batch.data_rows(out=self._stage[:k])
                views.append(memoryview(out.reshape(-1)))
        if direct and self.zerocopy:
            sendmsg_all(self.sock, views[:2])
            self.zc_calls += sendmsg_all(self.sock, views[2:], MSG_ZEROCOPY)
            self._reap_zerocopy(wait=False)
        elif direct and splice_io.usable(self.sock, "send"):
            # guest RAM -> pipe -> socket by reference: no copy into socket buffers
            sendmsg_all(self.sock, views[:2], socket.MSG_MORE)
            if self._splicer is None:
                self._splicer = splice_io.PipeSplicer(self.sock)
            for s, ln in zip(ns.tolist(), nl.tolist(), strict=True):
                self._splicer.send_from_memory(block.host + (s << TARGET_PAGE_BITS), ln << TARGET_PAGE_BITS)
        else:
            sendmsg_all(self.sock, views)
        self.c.bytes += len(head) + runs.nbytes + k * TARGET_PAGE_SIZE
        self.c.normal += k
        self.c.duplicate += len(batch.zero)
        self.c.holes += batch.holes
        self.c.pages_read += len(batch.read_idx)

    # -- MSG_ZEROCOPY completions -------------------------------------------------------------
    def _reap_zerocopy(self, wait: bool) -> None:
        deadline = time.monotonic() + 30
        while self.zc_done < self.zc_calls:
            try:
                _, anc, _, _ = self.sock.recvmsg(0, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait:
                    return
                if time.monotonic() > deadline:
                    raise MultifdError(errno.ETIMEDOUT, "zero-copy completions did not arrive") from None
                select.select([], [], [self.sock], 0.5)
                continue
            for _level, _type, data in anc:
                if len(data) < EXT_ERR.size:
                    continue
                ee_errno, origin, _t, code, _p, lo, hi = EXT_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    if ee_errno:
                        raise OSError(ee_errno, os.strerror(ee_errno))
                    continue
                count = (hi - lo + 1) & 0xFFFFFFFF
                self.zc_done += count
                if code & SO_EE_CODE_ZEROCOPY_COPIED:
                    self.zc_copied += count


class MultifdSender:
    """The source side: N channel threads fed by the migration thread."""

    def __init__(self, sockets: list[socket.socket], zerocopy: bool = False):
        self.session = os.urandom(16)
        self.cond = threading.Condition()
        self.closing = False
        self.error: str | None = None
        self.round = 0  # syncs done; pages queued now belong to this round
        self.zerocopy = zerocopy
        self.syncs_missed_zerocopy = 0
        self.channels = [SendChannel(self, i, s, zerocopy) for i, s in enumerate(sockets)]
        self._rr = 0
        self.batcher = JobBatcher()  # pages not yet handed out
        self.max_bandwidth: Callable[[], int] = lambda: 0
        for ch in self.channels:
            hs = HANDSHAKE.pack(MAGIC, VERSION, ch.index, len(sockets), self.session)
            ch.sock.sendall(hs)
            ch.c.bytes += len(hs)
        for ch in self.channels:
            ch.thread.start()

    # -- wiring into an outgoing migration ------------------------------------------------------
    @classmethod
    def attach(cls, out: OutgoingMigration) -> MultifdSender:
        """Open the channels of ``out`` and route its RAM pages through them.

        Called right after the main channel is open and before anything is written on it.
        The channels are closed (their threads joined) by the migration's clean-up.
        """
        caps, params, uri = out.caps, out.params, out.uri
        if uri.scheme not in ("tcp", "unix"):
            raise MultifdError(errno.EINVAL, f"multifd needs a tcp or unix URI, not {uri.scheme}")
        for other in ("postcopy-ram", "background-snapshot"):
            if caps.enabled.get(other):
                raise MultifdError(errno.EINVAL, f"multifd together with {other} is not supported")
        tls = out.tls  # every channel uses the migration's TLSClient
        zerocopy = bool(caps.enabled.get("zero-copy-send"))
        if tls is not None and zerocopy:
            raise MultifdError(errno.EINVAL,
                               "Zero copy only available for non-compressed non-TLS multifd migration")
        n = int(params.multifd_channels)
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                try:
                    s = out.connect(uri, timeout=CONNECT_TIMEOUT)
                except OSError as e:
                    raise MultifdError(e.errno or errno.ECONNREFUSED,
                                       f"multifd channel {i}: cannot connect: {e.strerror or e}") from e
                socks.append(s)
                if zerocopy:
                    try:
                        s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
                    except OSError as e:
                        raise MultifdError(e.errno or errno.EOPNOTSUPP,
                                           f"zero-copy-send is not available on {uri.scheme} "
                                           f"sockets here ({e.strerror})") from e
            sender = cls(socks, zerocopy)
        except BaseException:
            for s in socks:
                s.close()
            raise
        stats = out.ram.stats
        out.job.on_cleanup("multifd channels", lambda: sender.close(stats))
        w = out.writer
        assert w.bytes_written == 0, "multifd must attach before the stream starts"
        counting = CountingWriter(w.transport, w.buffer_size, sender.bytes_sent)
        out.use_writer(counting, MultifdSink(sender, counting, stats))
        sender.max_bandwidth = lambda: int(out.params.max_bandwidth)
        return sender

    # -- accounting -------------------------------------------------------------------------------
    def bytes_sent(self) -> int:
        return sum(ch.c.bytes for ch in self.channels)

    def _fold_stats(self, stats: Any) -> None:
        """Add what the channels counted since the last fold to the saver's RamStats."""
        for ch in self.channels:
            c, f = ch.c, ch.folded
            stats.normal += c.normal - f.normal
            stats.duplicate += c.duplicate - f.duplicate
            stats.holes_skipped += c.holes - f.holes
            stats.pages_read += c.pages_read - f.pages_read
            stats.transferred += c.bytes - f.bytes
            f.normal, f.duplicate, f.holes, f.pages_read, f.bytes = (
                c.normal, c.duplicate, c.holes, c.pages_read, c.bytes)

    # -- called by the migration thread -------------------------------------------------------------
    def _check(self) -> None:
        if self.error is not None:
            raise MultifdError(errno.EPIPE, self.error)
        if self.closing:
            raise MultifdError(errno.ECANCELED, "multifd channels closed")

    def queue_pages(self, w: QEMUFileWriter, b: BlockState, idx: np.ndarray) -> None:
        """Hand the pages ``idx`` (sorted, dirty bits already cleared) to a channel.

        The main stream is flushed first (a no-op unless something is buffered): the
        destination applies channel pages only once its main stream has reached the RAM
        section they belong to, after the early device state.
        """
        w.flush()
        for job in self.batcher.add(b, idx, self._job_pages()):
            self._hand_out(*job)

    def _job_pages(self) -> int:
        """JOB_PAGES, or less under max-bandwidth: a job is then at most what the rate
        window allows (so channel traffic follows the limit instead of bursting)."""
        bw = self.max_bandwidth()
        if not bw:
            return JOB_PAGES
        return int(min(JOB_PAGES, max(256, bw // 10 // TARGET_PAGE_SIZE // len(self.channels))))

    def _dispatch(self) -> None:
        """The pages collected so far go out as a job now (end of a round)."""
        for job in self.batcher.take():
            self._hand_out(*job)

    def _hand_out(self, b: BlockState, idx: np.ndarray) -> None:
        """One job (JOB_PAGES or so of one block) to the least busy channel."""
        job = (KIND_PAGES, b, idx, b.extents, self.round)
        with self.cond:
            while True:
                self._check()
                n = len(self.channels)
                best = min(range(n), key=lambda i: (len(self.channels[(self._rr + i) % n].jobs), i))
                ch = self.channels[(self._rr + best) % n]
                if len(ch.jobs) < QUEUE_DEPTH:
                    break
                self.cond.wait(0.5)
            self._rr = (ch.index + 1) % n
            ch.jobs.append(job)
            self.cond.notify_all()

    def flush(self, w: QEMUFileWriter, stats: Any = None) -> None:
        """End of a round: SYNC on every channel, wait until sent, then MULTIFD_FLUSH."""
        self._dispatch()
        with self.cond:
            self._check()
            self.round += 1
            rnd = self.round
            for ch in self.channels:
                ch.jobs.append((KIND_SYNC, rnd))
            self.cond.notify_all()
            while not all(ch.synced >= rnd for ch in self.channels):
                self._check()
                self.cond.wait(0.5)
        if self.zerocopy and any(ch.zc_copied for ch in self.channels):
            self.syncs_missed_zerocopy += 1
            for ch in self.channels:
                ch.zc_copied = 0
        if stats is not None:
            self._fold_stats(stats)
        w.put_be64(RamFlag.MULTIFD_FLUSH)

    # -- failure and end -------------------------------------------------------------------------------
    def channel_failed(self, index: int, e: BaseException) -> None:
        with self.cond:
            if self.error is None and not self.closing:
                what = describe(e)
                self.error = f"multifd channel {index}: {what}"
                log.info("%s", self.error)
            self.cond.notify_all()
        for ch in self.channels:  # the others stop too; the destination sees the failure
            shutdown_quietly(ch.sock)

    def abort(self) -> None:
        """Stop every channel now (cancel)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for ch in self.channels:
            shutdown_quietly(ch.sock)

    def close(self, stats: Any = None) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for ch in self.channels:
            shutdown_quietly(ch.sock)
        for ch in self.channels:
            if ch.thread.is_alive():
                join_for_good(ch.thread)
            ch.sock.close()
        if stats is not None:
            self._fold_stats(stats)


class MultifdSink:
    """The page sink of a multifd migration: batches go to the channels; the main stream
    keeps the section framing and gets a MULTIFD_FLUSH record at the end of each round."""

    def __init__(self, sender: MultifdSender, w: QEMUFileWriter, stats: RamStats):
        self.sender = sender
        self.w = w
        self.stats = stats
        self.encoder = RecordEncoder(stats)

    def start_section(self) -> None:
        self.encoder.start_section()

    def send(self, b: BlockState, idx: np.ndarray) -> None:
        self.sender.queue_pages(self.w, b, idx)

    def end_round(self) -> None:
        self.sender.flush(self.w, self.stats)

    def end_section(self) -> None:
        self.encoder.put_eos(self.w)
