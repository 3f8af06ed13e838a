"""The postcopy fault handler: a separate process that owns the urgent page loop.

Why a process (docs/postcopy.md): a thread that faults on a missing page while holding
the GIL stops every Python thread of its process, including a handler thread that would
resolve the fault. This process has its own interpreter and its own GIL, so whatever the
VM process does while it faults (a vCPU in numpy, a checksum, the loader), the fault is
read, requested, received and placed here, without the VM process's GIL.

It is started by the destination (:mod:`livemig.migration.postcopy.handler_control`), a
fork of the helper launcher (:mod:`livemig.migration.core.helpers`: never a fork of the
multi-threaded VM process, and holding nothing of it but what is handed over), with:

* the userfaultfd of the VM's guest RAM (``UFFDIO_COPY`` from this process's buffers
  fills the VM process's memory: the fd carries the VM's mm);
* a shared memory map of one byte per guest page, the *received map*: 0 = not here,
  1 = data placed, 2 = the source sent it as zero (placed lazily, on the first fault),
  3 = discarded memory answered locally with a zero page. The VM's loader writes it for
  pages from the main stream, this process for pages it places; bytes are written whole,
  so neither side disturbs the other's pages;
* the postcopy channel (after switchover, and again after each recovery): page requests
  (``REQ_PAGES(_ID)``) go out on it, urgent page records come back on it and end with an
  EOS record when the source has nothing more to send there.

For each fault: a page already received (as zero, or placed a moment ago) gets a zero
page or a wake; a page the destination's virtio-mem state says is discarded gets a zero
page and is never requested; anything else is requested once, and every thread faulting
on it waits until it is placed. Nothing is placed twice: ``UFFDIO_COPY`` refuses a page
that is present (``EEXIST``), and the loser of such a race just counts it.

Without the postcopy channel (``postcopy-preempt`` off), requests are handed to the VM
process, which sends them on the main return path; pages then arrive on the main stream.

A *stopped* source (SIGSTOP, a debugger, a host that freezes the process but not its
kernel) is the one silence TCP cannot see: its kernel acknowledges the requests and
answers keepalives, so no socket call ever fails, and the guest would wait forever on its
faults. So this process watches for it: when a request has waited ``stall_ms``
(``x-tcp-user-timeout``) and nothing came from the source for as long — no byte on the
postcopy channel, no page of a request placed, no batch taken off the main stream by the
loader (the received map's counter) — it reports the link lost, and the destination pauses
(``postcopy-paused``) as for any other broken link, ready for ``migrate-recover``. A busy
source never trips it: it always sends something within seconds while pages are asked of it.

Standard library only (the launcher preloads it; it also keeps the handler small).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import json
import mmap
import os
import select
import socket
import struct
import time

from livemig.migration.core.job import describe
from livemig.migration.postcopy import placer as uffd
from livemig.migration.stream import return_path as rp
from livemig.migration.stream.format import RamFlag

PAGE = 4096
PAGE_SHIFT = 12
RECV_NONE, RECV_DATA, RECV_ZERO, RECV_LOCAL = 0, 1, 2, 3
_HDR = struct.Struct(">Q")
_FLAG_MASK = PAGE - 1
_BUF = 4 << 20
MAX_LATENCIES = 200_000
CTRL_MAX = 1 << 20


def send_ctrl(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_ctrl(sock: socket.socket) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, CTRL_MAX, 4)
    if not data:
        return None, fds
    return json.loads(data), fds


class Block:
    __slots__ = ("idstr", "host", "length", "npages", "recv_off", "plug_starts", "plug_ends")

    def __init__(self, d: dict):
        self.idstr = d["idstr"]
        self.host = d["host"]
        self.length = d["length"]
        self.npages = self.length >> PAGE_SHIFT
        self.recv_off = d["recv_off"]
        plugged = d.get("plugged")  # None: no discard manager, all populated
        if plugged is None:
            self.plug_starts = self.plug_ends = None
        else:
            self.plug_starts = [s >> PAGE_SHIFT for s, _ in plugged]
            self.plug_ends = [(s + n) >> PAGE_SHIFT for s, n in plugged]

    def discarded(self, page: int) -> bool:
        if self.plug_starts is None:
            return False
        i = bisect.bisect_right(self.plug_starts, page) - 1
        return i < 0 or page >= self.plug_ends[i]


class Handler:
    def __init__(self, ctrl: socket.socket, setup: dict, fds: list[int]):
        self.ctrl = ctrl
        self.uffd_fd, recv_fd = fds[0], fds[1]
        self.placer = uffd.Placer(self.uffd_fd)
        self.blocks = [Block(b) for b in setup["blocks"]]
        order = sorted(range(len(self.blocks)), key=lambda i: self.blocks[i].host)
        self.by_host = [self.blocks[i] for i in order]
        self.hosts = [b.host for b in self.by_host]
        self.by_name = {b.idstr: b for b in self.blocks}
        size = setup["recv_size"]
        self._recv_map = mmap.mmap(recv_fd, size, flags=mmap.MAP_SHARED)
        os.close(recv_fd)
        self.recv = memoryview(self._recv_map)
        self._progress_off = int(setup["progress_off"])
        self.stall = float(setup.get("stall_ms", 0)) / 1000  # 0: never declare a stall
        self._watching = False  # armed while a link is up (set_channel), until it is lost
        self._last_sign = time.perf_counter()  # the last time the source showed it is alive
        self._last_count = 0
        self.preempt = setup["preempt"]
        self.blocktime = setup.get("blocktime", False)
        try:  # the urgent path runs ahead of bulk work (docs/postcopy.md, measurements)
            os.setpriority(os.PRIO_PROCESS, 0, int(setup.get("nice", 0)))
        except OSError:
            pass
        cpu = setup.get("cpu", -1)
        if cpu is not None and cpu >= 0:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError:
                pass
        self.chan: socket.socket | None = None
        self.chan_eos = False
        self._buf = ctypes.create_string_buffer(_BUF)
        self._buf_addr = ctypes.addressof(self._buf)
        self._mv = memoryview(self._buf).cast("B")
        self._start = self._end = 0
        self._chan_block: Block | None = None
        self._req_block: Block | None = None
        # (block idstr, page) -> time the request was sent
        self.pending: dict[tuple[str, int], float] = {}
        # (block idstr, page) -> [(tid, time the fault was read)]
        self.waiting: dict[tuple[str, int], list[tuple[int, float]]] = {}
        self.vcpus: dict[int, int] = {}
        self.vcpu_time: list[float] = []
        self.blocked: set[int] = set()
        self.all_blocked_since: float | None = None
        self.all_blocked_total = 0.0
        self.other_blocktime = 0.0
        self.latencies: list[float] = []
        self.c = {
            "faults": 0,
            "requests": 0,
            "requests-discarded": 0,
            "local-zero-pages": 0,
            "zero-placed": 0,
            "pages-placed": 0,
            "pages-existed": 0,
            "urgent-bytes": 0,
            "lost-pages": 0,
        }
        self.stop = False

    # -- lookup -------------------------------------------------------------------------------
    def block_at(self, addr: int) -> Block | None:
        i = bisect.bisect_right(self.hosts, addr) - 1
        if i < 0:
            return None
        b = self.by_host[i]
        return b if addr < b.host + b.length else None

    # -- blocktime ----------------------------------------------------------------------------
    def _begin_wait(self, key: tuple[str, int], tid: int, now: float) -> None:
        self.waiting.setdefault(key, []).append((tid, now))
        if tid in self.vcpus and tid not in self.blocked:
            self.blocked.add(tid)
            if len(self.blocked) == len(self.vcpus) and self.all_blocked_since is None:
                self.all_blocked_since = now

    def _finish(self, key: tuple[str, int], now: float) -> None:
        self._last_sign = now
        t_req = self.pending.pop(key, None)
        if t_req is not None and len(self.latencies) < MAX_LATENCIES:
            self.latencies.append(now - t_req)
        for tid, t0 in self.waiting.pop(key, ()):
            idx = self.vcpus.get(tid)
            if idx is None:
                self.other_blocktime += now - t0
                continue
            self.vcpu_time[idx] += now - t0
            if tid in self.blocked:
                if self.all_blocked_since is not None:
                    self.all_blocked_total += now - self.all_blocked_since
                    self.all_blocked_since = None
                self.blocked.discard(tid)

    # -- faults ---------------------------------------------------------------------------------
    def read_faults(self) -> None:
        try:
            data = os.read(self.uffd_fd, uffd.MSG_SIZE * 64)
        except BlockingIOError:
            return
        now = time.perf_counter()
        out: list[bytes] = []
        fwd: list[list] = []
        for address, _flags, ptid in uffd.parse_faults(data):
            self.c["faults"] += 1
            addr = address & ~(PAGE - 1)
            b = self.block_at(addr)
            if b is None:
                uffd.wake(self.uffd_fd, addr, PAGE)
                continue
            page = (addr - b.host) >> PAGE_SHIFT
            state = self.recv[b.recv_off + page]
            try:
                if state != RECV_NONE:  # sent as zero (not placed yet), or placed just now
                    placed, _ = self.placer.zeropage(addr, PAGE)
                    self.c["zero-placed"] += placed >> PAGE_SHIFT
                    continue
                if b.discarded(page):  # reference 3.8: answered here, never requested
                    self.placer.zeropage(addr, PAGE)
                    self.recv[b.recv_off + page] = RECV_LOCAL
                    self.c["local-zero-pages"] += 1
                    continue
            except OSError as e:  # the range was unregistered meanwhile (completion)
                if e.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
                continue
            key = (b.idstr, page)
            self._begin_wait(key, ptid, now)
            if key in self.pending:
                continue
            self.pending[key] = now
            self.c["requests"] += 1
            if self.preempt:
                if self.chan is not None:
                    out.append(self._req(b, page))
            else:
                fwd.append([b.idstr, page])
        if out:
            self._send(b"".join(out))
        if fwd:
            send_ctrl(self.ctrl, {"op": "req", "pages": fwd})

    def _req(self, b: Block, page: int) -> bytes:
        name = None if b is self._req_block else b.idstr
        self._req_block = b
        return rp.req_pages(page << PAGE_SHIFT, PAGE, name)

    def _send(self, data: bytes) -> None:
        assert self.chan is not None
        try:
            self.chan.sendall(data)
        except OSError as e:
            self._lost(f"postcopy channel: {describe(e)}")

    def check_pending(self) -> None:
        """Pages requested but placed by the loader (from the main stream)."""
        if not self.pending:
            return
        now = time.perf_counter()
        for key in list(self.pending):
            b = self.by_name[key[0]]
            state = self.recv[b.recv_off + key[1]]
            if state == RECV_NONE:
                continue
            if state == RECV_ZERO:  # sent as zero on the main stream: nobody else places it
                try:
                    self.placer.zeropage(b.host + (key[1] << PAGE_SHIFT), PAGE)
                except OSError as e:  # unregistered already: the unregister woke the waiters
                    if e.errno not in (errno.ENOENT, errno.EINVAL):
                        raise
            self._finish(key, now)

    def check_stall(self) -> None:
        """Report a source that answers nothing (module docstring: a stopped source)."""
        if not (self.stall and self._watching and self.pending):
            return
        now = time.perf_counter()
        count = int.from_bytes(self._recv_map[self._progress_off : self._progress_off + 8], "little")
        if count != self._last_count:  # the loader took pages off the main stream
            self._last_count, self._last_sign = count, now
            return
        if now - self._last_sign < self.stall or now - min(self.pending.values()) < self.stall:
            return
        self._watching = False
        # the same words as a silent socket's (SILENT_PEER): from here, a silent link and
        # a stopped source look alike, and the way out (migrate-recover) is the same
        self._lost(f"Connection timed out: the link or the source went silent, or the source is stopped: "
                   f"a page request waited {self.stall:g} s with nothing from the source (x-tcp-user-timeout)")

    # -- the postcopy channel ---------------------------------------------------------------------
    def set_channel(self, fd: int | None) -> None:
        self._close_channel()
        self._watching, self._last_sign = True, time.perf_counter()
        self.chan_eos = False
        self._start = self._end = 0
        self._chan_block = None
        self._req_block = None
        if fd is not None:
            self.chan = socket.socket(fileno=fd)
            self.chan.setblocking(True)
        # re-send what is still missing (QEMU does this after RESUME_ACK)
        keys = [k for k in self.pending if self.recv[self.by_name[k[0]].recv_off + k[1]] == RECV_NONE]
        if not keys:
            return
        if self.preempt and self.chan is not None:
            self._send(b"".join(self._req(self.by_name[i], p) for i, p in keys))
        elif not self.preempt:
            send_ctrl(self.ctrl, {"op": "req", "pages": [[i, p] for i, p in keys]})

    def _close_channel(self) -> None:
        if self.chan is not None:
            try:
                self.chan.close()
            except OSError:
                pass
            self.chan = None

    def _lost(self, why: str) -> None:
        self._close_channel()
        send_ctrl(self.ctrl, {"op": "lost", "why": why})

    def read_channel(self) -> None:
        assert self.chan is not None
        if self._start and self._start == self._end:
            self._start = self._end = 0
        elif self._end > _BUF - PAGE - 512:  # make room: move the unread tail to the front
            n = self._end - self._start
            ctypes.memmove(self._buf_addr, self._buf_addr + self._start, n)
            self._start, self._end = 0, n
        try:
            n = self.chan.recv_into(self._mv[self._end :], _BUF - self._end, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(f"postcopy channel: {describe(e)}")
            return
        if n == 0:
            if not self.chan_eos:
                self._lost("postcopy channel closed by the source")
            else:
                self._close_channel()
            return
        self._end += n
        self._last_sign = time.perf_counter()
        self._parse()

    def _parse(self) -> None:
        mv = self._mv
        now = 0.0
        while self._end - self._start >= 8:
            s = self._start
            hdr = _HDR.unpack_from(mv, s)[0]
            flags = hdr & _FLAG_MASK
            offset = hdr & ~_FLAG_MASK
            pos = s + 8
            if flags == RamFlag.EOS:
                self._start = pos
                self.chan_eos = True
                send_ctrl(self.ctrl, {"op": "eos"})
                continue
            kind = flags & ~int(RamFlag.CONTINUE)
            if kind not in (RamFlag.PAGE, RamFlag.ZERO) or flags & ~int(RamFlag.PAGE | RamFlag.ZERO | RamFlag.CONTINUE):
                self._lost(f"postcopy channel: bad record flags 0x{flags:x}")
                return
            b = self._chan_block
            if not flags & RamFlag.CONTINUE:
                if self._end - pos < 1:
                    return
                n = mv[pos]
                if self._end - pos < 1 + n:
                    return
                name = bytes(mv[pos + 1 : pos + 1 + n]).decode(errors="replace")
                pos += 1 + n
                b = self.by_name.get(name)
                if b is None:
                    self._lost(f"postcopy channel: unknown block {name!r}")
                    return
            if b is None:
                self._lost("postcopy channel: CONTINUE without a block")
                return
            body = PAGE if kind == RamFlag.PAGE else 1
            if self._end - pos < body:
                return
            if offset >= b.length:
                self._lost(f"postcopy channel: offset 0x{offset:x} beyond {b.idstr}")
                return
            self._chan_block = b
            page = offset >> PAGE_SHIFT
            addr = b.host + offset
            try:
                if kind == RamFlag.PAGE:
                    placed, existed = self.placer.copy(addr, self._buf_addr + pos, PAGE)
                    state = RECV_DATA
                else:
                    placed, existed = self.placer.zeropage(addr, PAGE)
                    state = RECV_ZERO
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINVAL):  # unregistered already
                    placed, existed = 0, PAGE
                    state = RECV_DATA
                else:
                    raise
            if self.recv[b.recv_off + page] == RECV_NONE:
                self.recv[b.recv_off + page] = state
            self.c["pages-placed"] += placed >> PAGE_SHIFT
            self.c["pages-existed"] += existed >> PAGE_SHIFT
            self.c["urgent-bytes"] += pos + body - s
            self._start = pos + body
            if not now:
                now = time.perf_counter()
            self._finish((b.idstr, page), now)

    # -- control --------------------------------------------------------------------------------
    def control(self) -> None:
        try:
            msg, fds = recv_ctrl(self.ctrl)
        except OSError:
            msg, fds = None, []
        if msg is None:  # the VM process is gone
            self.stop = True
            return
        op = msg["op"]
        if op == "channel":
            self.set_channel(fds[0] if fds else None)
        elif op == "pause":
            self._watching = False
            self._close_channel()
        elif op == "vcpus":
            self.vcpus = {int(t): i for i, t in enumerate(msg["tids"])}
            self.vcpu_time = [0.0] * len(self.vcpus)
        elif op == "stats":
            send_ctrl(self.ctrl, {"op": "stats", **self.stats()})
        elif op == "lost-pages":
            self.c["lost-pages"] = msg["n"]
        elif op == "stop":  # settle what arrived meanwhile, then the last statistics
            self.check_pending()
            self.stop = True
            send_ctrl(self.ctrl, {"op": "stats", **self.stats()})

    def stats(self) -> dict:
        lat = sorted(self.latencies)
        now = time.perf_counter()
        vcpu = list(self.vcpu_time)
        for key, waiters in self.waiting.items():  # still blocked: count up to now
            del key
            for tid, t0 in waiters:
                if tid in self.vcpus:
                    vcpu[self.vcpus[tid]] += now - t0
        all_blocked = self.all_blocked_total + (now - self.all_blocked_since if self.all_blocked_since else 0)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6 if lat else 0.0

        return {
            **self.c,
            "pending": len(self.pending),
            "latency-count": len(lat),
            "latency-p50-us": round(pct(0.5), 1),
            "latency-p99-us": round(pct(0.99), 1),
            "latency-mean-us": round(sum(lat) / len(lat) * 1e6, 1) if lat else 0.0,
            "vcpu-blocktime-ms": [int(t * 1000) for t in vcpu],
            "blocktime-ms": int(all_blocked * 1000),
            "other-blocktime-ms": int(self.other_blocktime * 1000),
        }

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = select.poll()
        poller.register(self.uffd_fd, select.POLLIN)
        poller.register(self.ctrl.fileno(), select.POLLIN)
        chan_fd = -1
        while not self.stop:
            fd = self.chan.fileno() if self.chan is not None else -1
            if fd != chan_fd:
                if chan_fd >= 0:
                    try:
                        poller.unregister(chan_fd)
                    except KeyError:
                        pass
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
                chan_fd = fd
            timeout = 2 if self.pending else 200
            for fd_, _ev in poller.poll(timeout):
                if fd_ == self.uffd_fd:
                    self.read_faults()
                elif fd_ == self.ctrl.fileno():
                    self.control()
                elif self.chan is not None and fd_ == self.chan.fileno():
                    self.read_channel()
            self.check_pending()
            self.check_stall()


def helper_main(fds: list[int]) -> int:
    """The process's entry, forked by the helper launcher (:mod:`livemig.migration.core.helpers`)
    with the control socket ``fds[0]``; it waits for the set-up."""
    ctrl = socket.socket(fileno=fds[0])
    msg, fds = recv_ctrl(ctrl)
    if msg is None or msg.get("op") != "setup":
        return 2
    h = Handler(ctrl, msg, fds)
    send_ctrl(ctrl, {"op": "ready", "pid": os.getpid()})
    try:
        h.run()
    except Exception as e:  # report, then let the VM process decide
        try:
            send_ctrl(ctrl, {"op": "error", "why": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        raise
    return 0
