"""multifd, destination side: accept the channels and apply their pages.

The listener accepts the main connection and the channels in any order (a channel starts
with its own magic). A channel thread receives page data with ``recv_into(MSG_WAITALL)``
straight into guest RAM (a packet of many short runs goes through a staging buffer and
one numpy scatter), in chunks populated ahead of it (:mod:`.populate`). Zero runs are
applied by the RAM loader without populating anything; what a channel wrote is reported
to the loader (:meth:`~livemig.migration.ram.load.RamLoader.mark_data_runs`), the one
owner of what arrived. A channel stops at each SYNC until the main stream's
``MULTIFD_FLUSH`` has seen every channel reach it, so pages of two rounds never race.

Failure. Any channel error fails the whole migration: the main stream is woken (its
socket is shut for reading), the load fails and the VM stays in ``inmigrate``; channel
threads are joined before anything else happens.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.ram_block import RAMBlock
from livemig.migration.channels import Listener
from livemig.migration.core.job import describe
from livemig.migration.core.threads import join_for_good
from livemig.migration.multifd.populate import Populator
from livemig.migration.multifd.wire import (
    CHANNEL_WAIT_TIMEOUT,
    HANDSHAKE,
    HANDSHAKE_TIMEOUT,
    KIND_PAGES,
    KIND_SYNC,
    MAGIC,
    MAX_CHANNELS,
    MAX_PACKET_PAGES,
    MAX_PACKET_RUNS,
    PACKET,
    POPULATE_THREADS,
    STAGING_PAGES,
    VERSION,
    shutdown_quietly,
)
from livemig.migration.ram import splice_io
from livemig.migration.ram.load import RamLoader
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream.qemu_file import StreamError

if TYPE_CHECKING:
    from livemig.migration.incoming import IncomingMigration

log = logging.getLogger(__name__)

DIRECT_RUNS = 64  # up to this many data runs per packet are received straight into RAM


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


class RecvChannel:
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
                loader.page_view(block)[idx] = buf
            loader.mark_data_runs(block, ds, dl)
        if nzr:
            loader.zero_runs(block, starts[nn:], lens[nn:])


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
        self.channels: dict[int, RecvChannel] = {}
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
        self.populator = Populator(POPULATE_THREADS)
        self._acceptor: threading.Thread | None = None
        loader.on_section = self.section_started
        loader.on_flush = self.flush

    @classmethod
    def attach(cls, inc: IncomingMigration) -> socket.socket:
        """Accept ``inc``'s main connection; channels are accepted as they come.

        The receiver takes over ``inc``'s listener; its channel threads are joined by the
        incoming migration's clean-up.
        """
        listener = inc.take_listener()
        rx = cls(inc.loader, inc.wake_main, inc.job.cancel_requested.is_set)
        inc.multifd = rx
        inc.job.on_cleanup("multifd channels", rx.close)
        return rx.accept_main(listener)

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
                ch = RecvChannel(self, index, conn)
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

    def channel_synced(self, ch: RecvChannel, rnd: int) -> bool:
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
            describe(e) if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}")
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
            shutdown_quietly(ch.sock)
        for ch in chans:
            if ch.thread.is_alive() and ch.thread is not threading.current_thread():
                join_for_good(ch.thread)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            join_for_good(self._acceptor)
        self.populator.stop()

    def close(self) -> None:
        with self.cond:
            self.finishing = True
            self.closed = True
            self.cond.notify_all()
        self._stop_all()
        for ch in list(self.channels.values()):
            ch.sock.close()
