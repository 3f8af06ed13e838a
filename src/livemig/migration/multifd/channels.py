"""Multi-channel RAM transfer: QEMU's ``multifd`` capability, on livemig's channel format.

With ``multifd`` on, the main channel keeps QEMU's framing (header, sections, device
state, EOF) and carries no page at all; RAM pages travel on ``multifd-channels`` extra
connections to the same URI (tcp or unix). docs/multifd.md describes the wire format.

Source (:class:`MultifdSender`). The migration thread walks the migration bitmap as
without multifd — it clears dirty bits and re-arms the dirty log before a page can be
read — but hands each batch of page indices (about 4 MiB) to the least busy channel
instead of encoding records. A channel thread does the rest: hole lookup against the
pass's data extents (holes of memfd memory are never read), zero-page detection with one
``bitwise_or.reduce``, and one ``sendmsg`` whose iovecs point straight into guest RAM
(optionally with ``MSG_ZEROCOPY``). Zero pages and holes travel as runs, not one record
per page. At the end of every pass (and at switchover) the migration thread puts a SYNC
packet on every channel, waits until all were sent, and writes ``MULTIFD_FLUSH`` in the
main stream: everything of a round is on the wire before the next round or the device
state. Pages of unplugged virtio-mem blocks never reach a channel: the bitmap they come
from had them cleared (ram_save, rule 3).

Destination (:class:`MultifdReceiver`). The listener accepts the main connection and the
channels in any order (a channel starts with its own magic). A channel thread receives
page data with ``recv_into(MSG_WAITALL)`` straight into guest RAM (a packet of many short
runs goes through a staging buffer and one numpy scatter). The data runs of a packet are
populated (``MADV_POPULATE_WRITE``) 2 MiB at a time by populate threads running ahead of
the receiving thread, or by that thread itself when it gets there first: a page fault
inside ``recv`` would hold the socket lock and stall the sender. Only what a packet is
about to fill is populated; zero runs are applied without populating anything. A channel stops at each SYNC until the main stream's
``MULTIFD_FLUSH`` has seen every channel reach it, so pages of two rounds never race.

Failure. Any channel error fails the whole migration. On the source, the migration thread
sees it at its next call into the sender (or while waiting for a sync) and fails as
usual: dirty log stopped, guest resumed, memory never written. On the destination, the
main stream is woken (its socket is shut for reading), the load fails and the VM stays in
``inmigrate``; channel threads are joined before anything else happens.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.channels import Listener, connect
from livemig.migration.ram import splice_io
from livemig.migration.ram.save import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream.format import RamFlag
from livemig.migration.stream.qemu_file import QEMUFileWriter, StreamError

if TYPE_CHECKING:
    from livemig.migration.incoming import IncomingMigration
    from livemig.migration.outgoing import OutgoingMigration
    from livemig.migration.ram.load import RamLoader
    from livemig.migration.ram.save import BlockSaveState

log = logging.getLogger(__name__)

MAGIC = 0x4C4D4644  # "LMFD"
VERSION = 1
MAX_CHANNELS = 255
HANDSHAKE = struct.Struct(">IIHH16s")  # magic, version, channel id, channel count, session
PACKET = struct.Struct(">IIIIQ")  # kind, round, normal runs, zero runs, normal pages
KIND_PAGES = 1
KIND_SYNC = 2
MAX_PACKET_PAGES = 1 << 16  # 256 MiB of page data in one packet
MAX_PACKET_RUNS = 1 << 16
JOB_PAGES = 4096  # pages handed to a channel at once (16 MiB): Python work per byte stays small
QUEUE_DEPTH = 2  # jobs waiting per channel
DIRECT_RUNS = 64  # up to this many data runs per packet go to sendmsg/recv_into directly
STAGING_PAGES = JOB_PAGES + 2048  # a job ends with the batch that reached JOB_PAGES
POPULATE_CHUNK = 2 << 20
POPULATE_THREADS = 2
ZERO_CHUNK_PAGES = 1 << 14  # zero runs are checked on the destination 64 MiB at a time
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
CHANNEL_WAIT_TIMEOUT = 30.0  # destination: the channels must all be there by then
IOV_MAX = 1024

SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
_EXT_ERR = struct.Struct("=IBBBBII")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


def nonzero_pages(rows: np.ndarray) -> np.ndarray:
    """For ``rows`` (n, page size) uint8, C-contiguous: True where the page is not zero.

    Reading is the cost (about 10 GB/s here, and a TLB miss per 4 KiB page), so read as
    little as possible: a page whose first word is set is data without reading the rest
    (random data: one cache line per page); only the other pages are read completely — as
    one ``memcmp`` of the batch with itself shifted by a word when they are the whole
    batch (a zero stretch), else with one
    ``bitwise_or.reduce``.
    """
    w = rows.view(np.uint64)
    nz = w[:, 0] != 0
    rest = np.flatnonzero(~nz)
    if len(rest) == 0:
        return nz
    if len(rest) == len(nz):
        # every word equals the next one, and the first is zero: one pass over the
        # memory (both operands share cache lines), where comparing with a zero buffer
        # as large would read twice as much
        if _libc.memcmp(rows.ctypes.data, rows.ctypes.data + 8, rows.nbytes - 8) == 0:
            return nz
        return np.bitwise_or.reduce(w, axis=1) != 0
    nz[rest] = np.bitwise_or.reduce(w[rest], axis=1) != 0
    return nz


class MultifdError(ConnectionError):
    """A channel failed; the message names the channel."""


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted page indices -> (starts, lengths) of consecutive runs."""
    if len(idx) == 0:
        e = np.zeros(0, np.int64)
        return e, e
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], brk))]
    ends = idx[np.concatenate((brk - 1, [len(idx) - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def _sendmsg_all(sock: socket.socket, views: list[Any], flags: int = 0) -> int:
    """Send every view completely, IOV_MAX at a time; returns the number of sendmsg calls."""
    calls = 0
    views = [v for v in views if len(v)]
    while views:
        n = sock.sendmsg(views[:IOV_MAX], [], flags)
        calls += 1
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return calls


# -- source ---------------------------------------------------------------------------------


class _Counters:
    __slots__ = ("bytes", "duplicate", "holes", "normal", "pages_read")

    def __init__(self) -> None:
        self.bytes = self.normal = self.duplicate = self.holes = self.pages_read = 0


class _SendChannel:
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
        self._gather = np.empty((STAGING_PAGES, TARGET_PAGE_SIZE), np.uint8)
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

    def _send_pages(self, b: BlockSaveState, idx: np.ndarray, extents: np.ndarray | None, rnd: int) -> None:
        block: RAMBlock = b.block
        # 1. holes of fd-backed memory: zero without reading (reading would allocate them)
        in_data = b.data_mask(idx, extents)
        pos = np.flatnonzero(in_data)
        data_idx = idx[pos]
        n = len(data_idx)
        is_normal = np.zeros(len(idx), bool)
        rows = None
        contiguous = False
        if n:
            first, last = int(data_idx[0]), int(data_idx[-1])
            contiguous = last - first + 1 == n
            if contiguous:
                rows = b.pages[first : last + 1]
            else:
                rows = self._gather[:n]
                np.take(b.pages, data_idx, axis=0, out=rows)
            # 2. zero-page detection, in this thread (numpy and memcmp release the GIL)
            nz = nonzero_pages(rows)
            is_normal[pos[nz]] = True
            self.c.pages_read += n
        else:
            nz = np.zeros(0, bool)
        normal_idx = idx[is_normal]
        zero_idx = idx[~is_normal]
        ns, nl = _runs(normal_idx)
        zs, zl = _runs(zero_idx)
        k = len(normal_idx)
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
            else:
                assert rows is not None
                out = self._stage[:k]
                if k == n:
                    np.copyto(out, rows)
                else:
                    np.compress(nz, rows, axis=0, out=out)
                views.append(memoryview(out.reshape(-1)))
        if direct and self.zerocopy:
            _sendmsg_all(self.sock, views[:2])
            self.zc_calls += _sendmsg_all(self.sock, views[2:], MSG_ZEROCOPY)
            self._reap_zerocopy(wait=False)
        elif direct and splice_io.usable(self.sock, "send"):
            # guest RAM -> pipe -> socket by reference: no copy into socket buffers
            _sendmsg_all(self.sock, views[:2], socket.MSG_MORE)
            if self._splicer is None:
                self._splicer = splice_io.PipeSplicer(self.sock)
            for s, ln in zip(ns.tolist(), nl.tolist(), strict=True):
                self._splicer.send_from_memory(block.host + (s << TARGET_PAGE_BITS), ln << TARGET_PAGE_BITS)
        else:
            _sendmsg_all(self.sock, views)
        self.c.bytes += len(head) + runs.nbytes + k * TARGET_PAGE_SIZE
        self.c.normal += k
        self.c.duplicate += len(zero_idx)
        self.c.holes += len(idx) - n

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
                if len(data) < _EXT_ERR.size:
                    continue
                ee_errno, origin, _t, code, _p, lo, hi = _EXT_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    if ee_errno:
                        raise OSError(ee_errno, os.strerror(ee_errno))
                    continue
                count = (hi - lo + 1) & 0xFFFFFFFF
                self.zc_done += count
                if code & SO_EE_CODE_ZEROCOPY_COPIED:
                    self.zc_copied += count


class _CountingWriter(QEMUFileWriter):
    """The main channel's writer; ``bytes_written`` includes what the channels sent.

    The migration's rate limit, bandwidth estimate (hence convergence) and ``transferred``
    all read ``bytes_written``, so they see the whole migration with no change to them.
    """

    def __init__(self, transport: Any, buffer_size: int, extra: Callable[[], int]):
        super().__init__(transport, buffer_size)
        self._extra = extra

    @property
    def bytes_written(self) -> int:  # type: ignore[override]
        return self._sent + self._pos + self._extra()


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
        self.channels = [_SendChannel(self, i, s, zerocopy) for i, s in enumerate(sockets)]
        self._rr = 0
        self._acc: list[tuple[BlockSaveState, np.ndarray]] = []  # pages not yet handed out
        self._acc_pages = 0
        self.max_bandwidth: Callable[[], int] = lambda: 0
        for ch in self.channels:
            hs = HANDSHAKE.pack(MAGIC, VERSION, ch.index, len(sockets), self.session)
            ch.sock.sendall(hs)
            ch.c.bytes += len(hs)
        for ch in self.channels:
            ch.thread.start()

    # -- wiring into an outgoing migration ------------------------------------------------------
    @classmethod
    def attach(cls, mig: OutgoingMigration) -> MultifdSender:
        """Open the channels of ``mig`` and route its RAM pages through them.

        Called right after the main channel is open and before anything is written on it.
        """
        caps, params, uri = mig.caps, mig.params, mig.uri
        if uri.scheme not in ("tcp", "unix"):
            raise MultifdError(errno.EINVAL, f"multifd needs a tcp or unix URI, not {uri.scheme}")
        for other in ("postcopy-ram", "background-snapshot"):
            if caps.enabled.get(other):
                raise MultifdError(errno.EINVAL, f"multifd together with {other} is not supported")
        tls = getattr(mig, "tls", None)  # the migration's TLSClient: every channel uses it
        zerocopy = bool(caps.enabled.get("zero-copy-send"))
        if tls is not None and zerocopy:
            raise MultifdError(errno.EINVAL,
                               "Zero copy only available for non-compressed non-TLS multifd migration")
        n = int(getattr(params, "multifd_channels", 2))
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                try:
                    s = connect(uri, timeout=CONNECT_TIMEOUT, tls=tls) if tls else connect(uri, CONNECT_TIMEOUT)
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
        w = mig._w
        assert w is not None and w.bytes_written == 0, "multifd must attach before the stream starts"
        mig._w = _CountingWriter(w.transport, w.buffer_size, sender.bytes_sent)
        mig.saver.multifd = sender
        sender.max_bandwidth = lambda: int(mig.params.max_bandwidth)
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

    def queue_pages(self, w: QEMUFileWriter, b: BlockSaveState, idx: np.ndarray) -> None:
        """Hand the pages ``idx`` (sorted, dirty bits already cleared) to a channel.

        The main stream is flushed first (a no-op unless something is buffered): the
        destination applies channel pages only once its main stream has reached the RAM
        section they belong to, after the early device state.
        """
        w.flush()
        if self._acc and self._acc[0][0] is not b:
            self._dispatch()
        self._acc.append((b, idx))
        self._acc_pages += len(idx)
        if self._acc_pages >= self._job_pages():
            self._dispatch()

    def _job_pages(self) -> int:
        """JOB_PAGES, or less under max-bandwidth: a job is then at most what the rate
        window allows (so channel traffic follows the limit instead of bursting)."""
        bw = self.max_bandwidth()
        if not bw:
            return JOB_PAGES
        return int(min(JOB_PAGES, max(256, bw // 10 // TARGET_PAGE_SIZE // len(self.channels))))

    def _dispatch(self) -> None:
        """Batches of the migration thread (about 1024 pages) go out in jobs of JOB_PAGES."""
        if not self._acc:
            return
        b = self._acc[0][0]
        idx = np.concatenate([i for _, i in self._acc]) if len(self._acc) > 1 else self._acc[0][1]
        self._acc.clear()
        self._acc_pages = 0
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
                what = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
                self.error = f"multifd channel {index}: {what}"
                log.info("%s", self.error)
            self.cond.notify_all()
        for ch in self.channels:  # the others stop too; the destination sees the failure
            _shutdown(ch.sock)

    def abort(self) -> None:
        """Stop every channel now (cancel)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for ch in self.channels:
            _shutdown(ch.sock)

    def close(self, stats: Any = None) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for ch in self.channels:
            _shutdown(ch.sock)
        for ch in self.channels:
            if ch.thread.is_alive():
                ch.thread.join(timeout=10)
            ch.sock.close()
        if stats is not None:
            self._fold_stats(stats)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- destination ------------------------------------------------------------------------------


class _Chunk:
    __slots__ = ("block", "n", "off", "state")

    def __init__(self, block: RAMBlock, off: int, n: int):
        self.block, self.off, self.n, self.state = block, off, n, 0  # 0 todo, 1 busy, 2 done


class _Populator:
    """Populate (``MADV_POPULATE_WRITE``) the data runs of received packets ahead of the
    threads receiving into them.

    A channel thread hands over a packet's data runs in 2 MiB chunks and receives them in
    order; a chunk nobody has started yet it populates itself, so it never waits for these
    threads, and never faults inside ``recv``. Only ranges that a packet is about to fill
    are populated: no unplugged memory, no zero pages, nothing to give back afterwards.
    """

    def __init__(self, threads: int):
        self._cond = threading.Condition()
        self._todo: deque[_Chunk] = deque()
        self._stop = False
        self.bytes_ahead = 0  # populated by these threads before the receiver got there
        self._threads = [threading.Thread(target=self._work, name=f"multifd-populate{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, block: RAMBlock, starts: np.ndarray, lengths: np.ndarray) -> list[_Chunk]:
        chunks = []
        for s, ln in zip(starts.tolist(), lengths.tolist(), strict=True):
            off, end = s << TARGET_PAGE_BITS, (s + ln) << TARGET_PAGE_BITS
            while off < end:
                n = min(POPULATE_CHUNK - off % POPULATE_CHUNK, end - off)
                chunks.append(_Chunk(block, off, n))
                off += n
        if self._threads and len(chunks) > 1:
            with self._cond:
                self._todo.extend(chunks[1:])  # the receiver starts on the first itself
                self._cond.notify_all()
        return chunks

    @staticmethod
    def _populate(c: _Chunk) -> None:
        try:
            c.block.populate(c.off, c.n)
        except OSError:
            pass  # only an optimisation: the receive faults the pages in

    def ensure(self, c: _Chunk) -> None:
        """Return once chunk ``c`` is populated (populating it here if nobody started)."""
        with self._cond:
            if c.state == 0:
                c.state = 1
            else:
                while c.state == 1:
                    self._cond.wait()
                return
        self._populate(c)
        with self._cond:
            c.state = 2
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._todo:
                    self._cond.wait()
                if self._stop:
                    return
                c = self._todo.popleft()
                if c.state != 0:
                    continue
                c.state = 1
            self._populate(c)
            with self._cond:
                c.state = 2
                self.bytes_ahead += c.n
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for c in self._todo:  # nobody waits for these any more
                if c.state == 0:
                    c.state = 2
            self._todo.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)


class _ChannelReader:
    """Exact reads from a channel socket with ``MSG_WAITALL``: one system call (and one
    GIL round trip) per header or data run instead of one per arriving segment."""

    def __init__(self, sock: Any, offset: int):
        self.sock = sock
        self.offset = offset

    def tell(self) -> int:
        return self.offset

    def read_into(self, view: memoryview) -> int:
        """Fill ``view``; fewer bytes only at end of stream."""
        n, got = len(view), 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if not k:
                break
            got += k
        self.offset += got
        return got

    def read_exact_into(self, view: memoryview, what: str) -> None:
        at = self.offset
        got = self.read_into(view)
        if got < len(view):
            raise StreamError(at, f"truncated {what}: wanted {len(view)} bytes, got {got}")

    def read_exact(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        self.read_exact_into(memoryview(buf), what)
        return buf


class _RecvChannel:
    def __init__(self, owner: MultifdReceiver, index: int, sock: socket.socket):
        self.owner = owner
        self.index = index
        self.sock = sock
        self.round = 0
        self.thread = threading.Thread(target=self._run, name=f"multifd-recv{index}", daemon=True)
        self._stage: np.ndarray | None = None
        self._head = memoryview(bytearray(PACKET.size + 1))
        self._splicer: splice_io.PipeSplicer | None = None

    def _run(self) -> None:
        owner = self.owner
        r = _ChannelReader(self.sock, HANDSHAKE.size)
        try:
            if not owner.wait_gate():
                return
            while True:
                at = r.tell()
                got = r.read_into(self._head)
                if got < len(self._head):
                    if owner.finishing:
                        return
                    raise StreamError(at, "channel closed by the source" if not got
                                      else "truncated packet header")
                kind, rnd, nn, nzr, npages = PACKET.unpack_from(self._head)
                namelen = self._head[PACKET.size]
                if kind == KIND_SYNC:
                    if rnd != self.round + 1 or nn or nzr or npages or namelen:
                        raise StreamError(at, f"bad SYNC packet (round {rnd}, expected {self.round + 1})")
                    if not owner.channel_synced(self, rnd):
                        return
                    continue
                if kind != KIND_PAGES:
                    raise StreamError(at, f"unknown packet kind {kind}")
                if rnd != self.round:
                    raise StreamError(at, f"pages of round {rnd} in round {self.round}")
                self._pages(r, at, namelen, nn, nzr, npages)
        except Exception as e:  # noqa: BLE001
            owner.channel_failed(self.index, e)
        finally:
            if self._splicer is not None:
                self._splicer.close()

    def _pages(self, r: _ChannelReader, at: int, namelen: int, nn: int, nzr: int, npages: int) -> None:
        owner = self.owner
        loader = owner.loader
        if nn + nzr > MAX_PACKET_RUNS or npages > MAX_PACKET_PAGES or (npages == 0) != (nn == 0):
            raise StreamError(at, f"bad packet size ({nn} data runs, {nzr} zero runs, {npages} pages)")
        meta = r.read_exact(namelen + (nn + nzr) * 16, "packet header")
        name = bytes(meta[:namelen]).decode(errors="replace")
        block = loader.blocks.get(name)
        if block is None:
            raise StreamError(at, f"Unknown ramblock \"{name}\"")
        runs = np.frombuffer(meta, ">u8", offset=namelen).reshape(-1, 2).astype(np.int64)
        if len(runs):
            offs, lens = runs[:, 0], runs[:, 1]
            used = block.used_length
            if ((offs | lens) & (TARGET_PAGE_SIZE - 1)).any() or (lens <= 0).any() or (offs < 0).any() \
                    or (offs > used).any() or (lens > used).any() or (offs + lens > used).any():
                raise StreamError(at, f"packet run outside block \"{name}\" or not page aligned")
        starts = runs[:, 0] >> TARGET_PAGE_BITS
        lens = runs[:, 1] >> TARGET_PAGE_BITS
        ds, dl = starts[:nn], lens[:nn]
        if int(dl.sum()) != npages:
            raise StreamError(at, f"packet announces {npages} pages, runs hold {int(dl.sum())}")
        if nn:
            if nn <= DIRECT_RUNS and block.fd >= 0 and splice_io.usable(self.sock, "recv"):
                # opt-in (LIVEMIG_SPLICE=recv): socket -> pipe -> memfd, no page fault and
                # no clearing, but one writer at a time (splice_io, docs/multifd.md)
                if self._splicer is None:
                    self._splicer = splice_io.PipeSplicer(self.sock)
                lock = owner.file_lock(block)
                for s, ln in zip(ds.tolist(), dl.tolist(), strict=True):
                    off, n = s << TARGET_PAGE_BITS, ln << TARGET_PAGE_BITS
                    got = self._splicer.recv_to_file(block.fd, off, n, lock)
                    r.offset += got
                    if got < n:
                        raise StreamError(r.tell(), f"truncated page data: wanted {n} bytes, got {got}")
            elif nn <= DIRECT_RUNS:
                # straight into guest RAM, in chunks that are populated first: by the
                # populate threads running ahead, or here (a fault inside recv would hold
                # the socket lock and stall the sender)
                chunks = owner.populator.submit(block, ds, dl)
                mv = block.view
                for c in chunks:
                    owner.populator.ensure(c)
                    r.read_exact_into(mv[c.off : c.off + c.n], "page data")
            else:  # many short runs: one receive into staging, one numpy scatter
                if self._stage is None or len(self._stage) < npages:
                    self._stage = np.empty((max(npages, STAGING_PAGES), TARGET_PAGE_SIZE), np.uint8)
                buf = self._stage[:npages]
                r.read_exact_into(memoryview(buf.reshape(-1)), "page data")
                csum = np.cumsum(dl) - dl
                idx = np.repeat(ds - csum, dl) + np.arange(npages)
                loader._pages[name][idx] = buf
            with owner.lock:
                rec, md = loader.received[name], loader.maybe_data[name]
                for s, ln in zip(ds.tolist(), dl.tolist(), strict=True):
                    rec.set_range(s, ln)
                    md.set_range(s, ln)
                loader.pages_loaded += npages
                loader.bytes_loaded += npages * TARGET_PAGE_SIZE
        if nzr:
            self._zero_runs(block, starts[nn:], lens[nn:])

    def _zero_runs(self, block: RAMBlock, zs: np.ndarray, zl: np.ndarray) -> None:
        """Zero pages arrive as runs: write only where the page may hold data here."""
        owner = self.owner
        loader = owner.loader
        name = block.idstr
        with owner.lock:
            rec, md = loader.received[name], loader.maybe_data[name]
            work: list[tuple[int, int]] = []
            for s, ln in zip(zs.tolist(), zl.tolist(), strict=True):
                rec.set_range(s, ln)
                ms, ml = md.runs(True, s, ln)
                work += zip(ms.tolist(), ml.tolist(), strict=True)
            loader.zero_records += int(zl.sum())
        if not work:
            return
        view = loader._pages[name]
        written = 0
        for s, ln in work:
            for c in range(s, s + ln, ZERO_CHUNK_PAGES):
                rows = view[c : min(c + ZERO_CHUNK_PAGES, s + ln)]
                nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
                if nz.any():
                    rows[nz] = 0
                    written += int(np.count_nonzero(nz))
        if written:
            with owner.lock:
                loader.zero_pages_written += written


class MultifdReceiver:
    """The destination side: accepts the channels and applies their pages."""

    def __init__(self, loader: RamLoader, on_error: Callable[[], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False):
        self.loader = loader
        self.on_error = on_error
        self.cancelled = cancelled
        self.lock = threading.Lock()  # bitmaps and counters of the loader
        self.cond = threading.Condition()
        self._file_locks: dict[str, threading.Lock] = {}
        self.channels: dict[int, _RecvChannel] = {}
        self.count: int | None = None
        self.session: bytes | None = None
        self.round = 0  # rounds released by the main stream
        self.error: str | None = None
        self.finishing = False
        self.closed = False
        self.listener: Listener | None = None
        self._gate = False
        self._main: socket.socket | None = None
        self._accept_error: OSError | None = None
        self.populator = _Populator(POPULATE_THREADS)
        self._acceptor: threading.Thread | None = None
        loader.multifd = self

    @classmethod
    def attach(cls, inc: IncomingMigration) -> socket.socket:
        """Accept ``inc``'s main connection; channels are accepted as they come."""
        assert inc._listener is not None

        def wake_main() -> None:
            if inc._sock is not None:
                try:
                    inc._sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

        rx = cls(inc.loader, wake_main, inc._cancel.is_set)
        inc.multifd = rx
        sock = rx.accept_main(inc._listener)
        inc._listener = None
        return sock

    # -- connections ----------------------------------------------------------------------------
    def accept_main(self, listener: Listener) -> socket.socket:
        """Return the main connection; channels are accepted around it, in any order.

        One thread accepts everything and sorts connections by their first bytes: a
        channel starts with the channel magic, the main stream with QEMU's. Nothing blocks
        on a connection that has not written yet (the source connects every channel before
        it writes its stream header).
        """
        self.listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="multifd-accept", daemon=True)
        self._acceptor.start()
        with self.cond:
            while self._main is None:
                if self._accept_error is not None:
                    raise self._accept_error
                if self.closed or self.error is not None or self.listener is None:
                    raise OSError(errno.ECONNABORTED, self.error or "incoming migration cancelled")
                self.cond.wait(0.5)
            return self._main

    def _accept_failed(self, e: OSError) -> None:
        """A connection failed on arrival (TLS): before the main one it is the main one's
        failure, as without multifd; after it, a channel's."""
        with self.cond:
            if self._main is None:
                self._accept_error = e
                self.cond.notify_all()
                return
        self._fail(f"multifd channel: {e}")

    def _accept_loop(self) -> None:
        listener = self.listener
        assert listener is not None
        pending: list[socket.socket] = []
        try:
            while not self.closed:
                with self.cond:
                    if self._main is not None and self.count is not None and len(self.channels) >= self.count:
                        return
                # a TLS channel may hold its first bytes already (they came with the handshake)
                buffered = [s for s in pending if getattr(s, "pending", None) and s.pending()]
                ready, _, _ = select.select([listener.sock, *pending], [], [], 0 if buffered else 0.5)
                for s in dict.fromkeys([*buffered, *ready]):
                    if s is listener.sock:
                        try:
                            pending.append(listener.accept(timeout=1.0))
                        except (TimeoutError, BlockingIOError):
                            pass
                        except OSError as e:  # e.g. a TLS handshake refused
                            if self.closed:
                                raise
                            self._accept_failed(e)
                        continue
                    try:
                        head = s.recv(4, socket.MSG_PEEK)
                    except OSError:
                        head = b""
                    if 0 < len(head) < 4:
                        time.sleep(0.001)
                        continue
                    pending.remove(s)
                    # a connection closed before its first byte counts as the main one, as
                    # without multifd: the load then fails on the truncated header
                    if head and struct.unpack(">I", head)[0] == MAGIC:
                        self._add_channel(s)
                        continue
                    with self.cond:
                        if self._main is None:
                            self._main = s
                            self.cond.notify_all()
                            continue
                    log.info("multifd: dropping a second main connection")
                    s.close()
        except (OSError, ValueError):
            pass  # listener shut: finished, failed or cancelled
        finally:
            for s in pending:
                s.close()
            self._close_listener()

    def _close_listener(self) -> None:
        with self.cond:
            listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def _add_channel(self, conn: socket.socket) -> None:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            raw = b""
            while len(raw) < HANDSHAKE.size:
                part = conn.recv(HANDSHAKE.size - len(raw))
                if not part:
                    break
                raw += part
        except OSError:
            raw = b""
        conn.settimeout(None)
        if len(raw) < HANDSHAKE.size:
            conn.close()
            return
        magic, version, index, count, session = HANDSHAKE.unpack(raw)
        problem = None
        with self.cond:
            if version != VERSION:
                problem = f"multifd channel version {version} (expected {VERSION})"
            elif not 1 <= count <= MAX_CHANNELS or index >= count:
                problem = f"multifd channel {index} of {count}: bad channel number"
            elif self.session is not None and session != self.session:
                log.info("multifd: dropping channel %d of another migration", index)
                conn.close()
                return
            elif self.count is not None and count != self.count:
                problem = f"multifd channel {index}: {count} channels announced, earlier {self.count}"
            elif index in self.channels:
                problem = f"multifd channel {index} connected twice"
            if problem is None:
                self.session, self.count = session, count
                ch = _RecvChannel(self, index, conn)
                self.channels[index] = ch
                ch.thread.start()
                self.cond.notify_all()
        if problem is not None:
            conn.close()
            self._fail(problem)

    # -- synchronisation with the main stream ------------------------------------------------------
    def file_lock(self, block: RAMBlock) -> threading.Lock:
        """One writer at a time into a block's memfd (see ``PipeSplicer.recv_to_file``)."""
        with self.lock:
            return self._file_locks.setdefault(block.idstr, threading.Lock())

    def section_started(self) -> None:
        """The main stream reached its first RAM iteration: early device state is loaded,
        channel pages may be applied from now on."""
        if not self._gate:
            with self.cond:
                self._gate = True
                self.cond.notify_all()

    def wait_gate(self) -> bool:
        with self.cond:
            while not self._gate and not self.finishing and self.error is None:
                self.cond.wait(0.5)
            return self._gate and not self.finishing and self.error is None

    def channel_synced(self, ch: _RecvChannel, rnd: int) -> bool:
        """A channel read SYNC ``rnd``: wait until the main stream releases the round."""
        with self.cond:
            ch.round = rnd
            self.cond.notify_all()
            while self.round < rnd:
                if self.finishing or self.error is not None:
                    return False
                self.cond.wait(0.5)
            return True

    def flush(self, at: int) -> None:
        """MULTIFD_FLUSH in the main stream: wait until every channel's round is in."""
        self.section_started()
        with self.cond:
            rnd = self.round + 1
            start = time.monotonic()
            while True:
                if self.error is not None:
                    raise StreamError(at, self.error)
                if self.cancelled():
                    raise StreamError(at, "cancelled")
                if self.count is not None and len(self.channels) == self.count and all(
                        ch.round >= rnd for ch in self.channels.values()):
                    break
                if self.count is None or len(self.channels) < self.count:
                    if time.monotonic() - start > CHANNEL_WAIT_TIMEOUT:
                        raise StreamError(at, f"MULTIFD_FLUSH: only {len(self.channels)} multifd "
                                              f"channels of {self.count or '?'} connected")
                self.cond.wait(0.5)
            self.round = rnd
            self.cond.notify_all()

    # -- failure and end ---------------------------------------------------------------------------
    def channel_failed(self, index: int, e: BaseException) -> None:
        what = str(e) if isinstance(e, StreamError) else (
            e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}")
        self._fail(f"multifd channel {index}: {what}")

    def _fail(self, problem: str) -> None:
        with self.cond:
            if self.error is not None or self.finishing:
                return
            self.error = problem
            self.cond.notify_all()
        log.info("%s", problem)
        if self.on_error is not None:
            self.on_error()

    def finish(self) -> None:
        """The main stream loaded completely: stop the channels before the guest runs."""
        with self.cond:
            self.finishing = True
            self.cond.notify_all()
        self._stop_all()
        if self.error is not None:
            raise StreamError(0, self.error)

    def abort(self) -> None:
        self._fail("multifd: cancelled")
        self._stop_all()

    def _stop_all(self) -> None:
        self._close_listener()
        with self.cond:
            chans = list(self.channels.values())
        for ch in chans:
            _shutdown(ch.sock)
        for ch in chans:
            if ch.thread.is_alive() and ch.thread is not threading.current_thread():
                ch.thread.join(timeout=10)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=10)
        self.populator.stop()

    def close(self) -> None:
        with self.cond:
            self.finishing = True
            self.closed = True
            self.cond.notify_all()
        self._stop_all()
        for ch in list(self.channels.values()):
            ch.sock.close()


__all__ = ["MultifdError", "MultifdReceiver", "MultifdSender"]
