"""Postcopy on the destination: advise, discard, listen, run, fault handling, recovery.

The stream after ``migrate-start-postcopy`` (source: :mod:`postcopy_source`):

    COMMAND POSTCOPY_ADVISE (be64 page-size summary, be64 target page size)   at setup
    ... precopy iterations ...
    COMMAND POSTCOPY_RAM_DISCARD (per block, runs still dirty at the switchover)
    COMMAND PACKAGED (be32 len), then len bytes:
        COMMAND POSTCOPY_LISTEN, FULL <device sections>, COMMAND PING 3, COMMAND POSTCOPY_RUN
    PART ram ... (background push)   END ram, EOF, VMDESCRIPTION

The main loop of :class:`~livemig.migration.incoming.IncomingMigration` reads all of it;
this module handles the postcopy commands (hook in ``_command``), places the RAM pages
that arrive after LISTEN with ``UFFDIO_COPY`` (hook in ``RamLoader``), and, if the
connection fails after RUN, pauses and continues over a new connection
(:meth:`PostcopyIncoming.load`).

Faults are handled in a separate process (:mod:`livemig.migration.postcopy.handler`), never in this one:
see ``docs/postcopy.md`` for why that, plus GIL-free guest memory access in the soft
accelerator, means no fault can deadlock on the GIL.
"""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.migration.channels import Listener, MigrationURI
from livemig.migration.core import status
from livemig.migration.postcopy import placer as uffd
from livemig.migration.postcopy.handler import (
    RECV_DATA,
    RECV_LOCAL,
    RECV_NONE,
    RECV_ZERO,
    recv_ctrl,
    send_ctrl,
)
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import MigCommand, RPMessage, SectionType
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

if TYPE_CHECKING:
    from livemig.migration.incoming import IncomingMigration

log = logging.getLogger(__name__)

TARGET_PAGE_SIZE = 4096
PAGE_SHIFT = 12
POSTCOPY_COMMANDS = frozenset(
    {
        MigCommand.POSTCOPY_ADVISE,
        MigCommand.POSTCOPY_LISTEN,
        MigCommand.POSTCOPY_RUN,
        MigCommand.POSTCOPY_RAM_DISCARD,
        MigCommand.PACKAGED,
        MigCommand.POSTCOPY_RESUME,
        MigCommand.RECV_BITMAP,
    }
)
MAX_PACKAGED_SIZE = 1 << 24  # QEMU's MAX_VM_CMD_PACKAGED_SIZE
ACCEPT_TIMEOUT = 10.0
HANDLER_START_TIMEOUT = 10.0
STAGE_PAGES = 1024
PAUSE_STATES = (status.POSTCOPY_PAUSED,)

# postcopy states of the destination (QEMU's PostcopyState)
NONE, ADVISE, DISCARD, LISTENING, RUNNING, END = range(6)
_STATE_NAMES = ("none", "advise", "discard", "listening", "running", "end")


class PostcopyError(StreamError):
    pass


def pagesize_summary(blocks: list[RAMBlock]) -> int:
    """QEMU's ``ram_pagesize_summary``: the OR of every block's page size."""
    out = 0
    for b in blocks:
        out |= b.page_size
    return out


def incoming_command(inc: IncomingMigration, command: Any, r: QEMUFileReader, at: int) -> None:
    """The ``_command`` hook: one postcopy command of the main stream."""
    pc = getattr(inc, "postcopy", None)
    if pc is None:
        why = f"{command.cmd.name} while postcopy-ram is off here"
        if command.cmd == MigCommand.POSTCOPY_ADVISE and len(command.payload) == 16:
            why = "RAM postcopy is disabled but have 16 byte advise"
        raise StreamError(at, f"unsupported migration command {int(command.cmd)}: {why}")
    pc.command(command.cmd, command.payload, r, at)


class PostcopyIncoming:
    """The destination side of one postcopy migration (created with postcopy-ram on)."""

    def __init__(self, inc: IncomingMigration):
        self.inc = inc
        self.machine = inc.machine
        self.caps = inc.caps
        self.preempt = bool(inc.caps["postcopy-preempt"])
        self.state = NONE
        self.listener: Listener | None = None
        self.chan: socket.socket | None = None  # postcopy channel until handed to the handler
        self.regions = {mr.block.idstr: mr for mr in self.machine.memory.regions}
        self.blocks = [mr.block for mr in self.machine.memory.regions]
        self.uffd = -1
        self.registered: list[RAMBlock] = []
        self.placer: uffd.Placer | None = None
        self.recv_fd = -1
        self.recv_map: Any = None
        self.recv: np.ndarray | None = None  # one byte per page, shared with the handler
        self.recv_off: dict[str, int] = {}
        off = 0
        for b in self.blocks:
            self.recv_off[b.idstr] = off
            off += b.used_length >> PAGE_SHIFT
        self.recv_pages = off
        self._stage = np.empty((STAGE_PAGES, TARGET_PAGE_SIZE), np.uint8)
        self.proc: subprocess.Popen | None = None
        self.ctrl: socket.socket | None = None
        self._ctrl_thread: threading.Thread | None = None
        self._ctrl_lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self._stats_evt = threading.Event()
        self._ready = threading.Event()
        self._chan_eos = threading.Event()
        self._lost = threading.Event()
        self._lost_why: str | None = None
        self._recover = threading.Event()
        self._recover_listener: Listener | None = None
        self._pkg_end: int | None = None
        self._ram_section_id: int | None = None
        self._lock = threading.Lock()
        self.loaded_pages = 0
        self.loaded_existed = 0
        self.zero_records = 0
        self.recoveries = 0
        self.lost_pages = 0
        self.guest_started = False
        self.summary: dict[str, dict[str, int]] = {}
        self._stopping = False
        self.handler_restarts = 0
        self._holds: list[Any] = []

    # -- commands ---------------------------------------------------------------------------------
    def _expect(self, at: int, what: str, *states: int) -> None:
        if self.state not in states:
            want = "/".join(_STATE_NAMES[s] for s in states)
            raise StreamError(
                at, f"{what}: expected postcopy state {want}, got {_STATE_NAMES[self.state]}"
            )

    def command(self, cmd: MigCommand, payload: bytes, r: QEMUFileReader, at: int) -> None:
        if cmd == MigCommand.POSTCOPY_ADVISE:
            self._expect(at, "POSTCOPY_ADVISE", NONE)
            self._advise(payload, at)
        elif cmd == MigCommand.POSTCOPY_RAM_DISCARD:
            self._expect(at, "POSTCOPY_RAM_DISCARD", ADVISE, DISCARD)
            self._discard(payload, at)
        elif cmd == MigCommand.PACKAGED:
            self._expect(at, "PACKAGED", ADVISE, DISCARD)
            (length,) = struct.unpack(">I", payload)
            if length > MAX_PACKAGED_SIZE:
                raise StreamError(at, f"Unreasonably large packaged state: {length}")
            self._pkg_end = r.tell() + length
        elif cmd == MigCommand.POSTCOPY_LISTEN:
            self._expect(at, "POSTCOPY_LISTEN", ADVISE, DISCARD)
            self._listen(at)
        elif cmd == MigCommand.POSTCOPY_RUN:
            self._expect(at, "POSTCOPY_RUN", LISTENING)
            if self._pkg_end is not None and r.tell() != self._pkg_end:
                raise StreamError(at, "POSTCOPY_RUN is not the last record of the package")
            self._run(at)
        elif cmd in (MigCommand.RECV_BITMAP, MigCommand.POSTCOPY_RESUME):
            raise StreamError(at, f"{cmd.name} outside postcopy recovery")
        else:  # pragma: no cover - POSTCOPY_COMMANDS only
            raise StreamError(at, f"unsupported migration command {int(cmd)}")

    def _advise(self, payload: bytes, at: int) -> None:
        if len(payload) != 16:
            raise StreamError(at, "RAM postcopy is enabled but have 0 byte advise")
        remote_summary, remote_tps = struct.unpack(">QQ", payload)
        local = pagesize_summary(self.blocks)
        if remote_summary != local:
            raise StreamError(
                at, f"Postcopy needs matching RAM page sizes (s=0x{remote_summary:x} d=0x{local:x})"
            )
        if remote_tps != TARGET_PAGE_SIZE:
            raise StreamError(
                at, f"Postcopy needs matching target page sizes (s={remote_tps} d={TARGET_PAGE_SIZE})"
            )
        for b in self.blocks:
            if b.page_size != TARGET_PAGE_SIZE:
                raise StreamError(at, f"{b.idstr}: postcopy supports only 4 KiB pages")
        try:
            self.uffd = uffd.open_uffd()
        except OSError as e:
            raise StreamError(at, f"Postcopy is not supported by this host: {e}") from e
        self.placer = uffd.Placer(self.uffd)
        self.recv_fd = os.memfd_create("livemig:postcopy-received", os.MFD_CLOEXEC)
        os.ftruncate(self.recv_fd, max(self.recv_pages, 1))
        import mmap

        self.recv_map = mmap.mmap(self.recv_fd, max(self.recv_pages, 1), flags=mmap.MAP_SHARED)
        self.recv = np.frombuffer(self.recv_map, np.uint8, count=self.recv_pages)
        self._spawn_handler()  # started now, so its start-up is not part of the downtime
        # virtio-mem must not discard unplugged ranges when its state loads: pages arrive later
        self.inc.load_ctx.postcopy = True
        self.state = ADVISE

    def _stop_prefault(self) -> None:
        pf = self.inc.loader.prefault
        if pf is not None:
            pf.stop()
            pf.populated.clear()  # what it populated is dropped below, not "released" later

    def _discard(self, payload: bytes, at: int) -> None:
        """POSTCOPY_RAM_DISCARD: u8 version 0, u8 len, name, u8 0, then (be64 start, be64 len)*."""
        self._stop_prefault()
        if payload[0] != 0:
            raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD invalid version ({payload[0]})")
        n = payload[1]
        if len(payload) < 3 + n or payload[2 + n] != 0:
            raise StreamError(at, "CMD_POSTCOPY_RAM_DISCARD missing nil")
        name = payload[2 : 2 + n].decode(errors="replace")
        if (len(payload) - 3 - n) % 16:
            raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(payload)})")
        mr = self.regions.get(name)
        if mr is None:
            raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD: unknown block \"{name}\"")
        block = mr.block
        pairs = np.frombuffer(payload, ">u8", offset=3 + n).astype(np.int64).reshape(-1, 2)
        received = self.inc.loader.received[name]
        for start, length in pairs.tolist():
            if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or start + length > block.used_length:
                raise StreamError(
                    at, f"CMD_POSTCOPY_RAM_DISCARD: bad range 0x{start:x}+0x{length:x} in {name}"
                )
            received.clear_range(start >> PAGE_SHIFT, length >> PAGE_SHIFT)
            block.discard_range(start, length)
        self.state = DISCARD

    def _listen(self, at: int) -> None:
        """Everything not received is made missing, then guest RAM is registered."""
        self._stop_prefault()
        loader = self.inc.loader
        assert self.recv is not None and self.placer is not None
        for b in self.blocks:
            received = loader.received[b.idstr]
            npages = b.used_length >> PAGE_SHIFT
            starts, lengths = received.runs(False, 0, npages)
            for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                b.discard_range(s << PAGE_SHIFT, n << PAGE_SHIFT)
            bits = np.unpackbits(received.words.view(np.uint8), bitorder="little")[:npages]
            off = self.recv_off[b.idstr]
            self.recv[off : off + npages] = bits  # 1 = received (RECV_DATA)
        try:
            for b in self.blocks:
                uffd.register_missing(self.uffd, b.host, b.used_length)
                self.registered.append(b)
        except OSError as e:
            raise StreamError(at, f"postcopy: cannot register guest RAM with userfaultfd: {e}") from e
        self._setup_handler()
        # plug/unplug answer BUSY until postcopy ends: one hold per discard manager
        self._holds = [mr.rdm.hold_state("incoming postcopy")
                       for mr in self.machine.memory.regions if mr.rdm is not None]
        loader.placer = self
        if self.preempt:
            self.chan = self._accept_channel(self.listener)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.state = LISTENING
        self.inc._set_status(status.POSTCOPY_ACTIVE)

    def _accept_channel(self, listener: Listener | None) -> socket.socket:
        if listener is None:
            raise StreamError(0, "postcopy-preempt: no listener for the postcopy channel")
        if listener.tls is not None:
            raise StreamError(0, "postcopy-preempt over TLS is not supported")
        try:
            return listener.accept(timeout=ACCEPT_TIMEOUT)
        except OSError as e:
            raise StreamError(0, f"postcopy channel was not connected: {e}") from e

    def _run(self, at: int) -> None:
        """POSTCOPY_RUN: the guest runs here with pages missing."""
        self._give_channel()
        m = self.machine
        m.start_incoming_guest()
        self.guest_started = True
        tids = vcpu_native_ids(m)
        if tids:
            self._send({"op": "vcpus", "tids": tids})
        if self.inc.autostart:
            m.cont()
        else:
            m.set_runstate("paused")
        self.state = RUNNING

    # -- the handler process ------------------------------------------------------------------------
    def _spawn_handler(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # the directory that holds the livemig package: src/livemig/migration/postcopy/<this>
        src = str(pathlib.Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig.migration.postcopy.handler", str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.ctrl = parent

    def _setup_handler(self) -> None:
        blocks = []
        for b in self.blocks:
            mr = self.regions[b.idstr]
            plugged = None
            if mr.rdm is not None:
                offs, sizes = mr.rdm.populated_runs(Section(mr, 0, b.used_length))
                plugged = [[int(o), int(s)] for o, s in zip(offs, sizes, strict=True)]
            blocks.append(
                {
                    "idstr": b.idstr,
                    "host": b.host,
                    "length": b.used_length,
                    "recv_off": self.recv_off[b.idstr],
                    "plugged": plugged,
                }
            )
        setup = {
            "op": "setup",
            "blocks": blocks,
            "recv_size": max(self.recv_pages, 1),
            "preempt": self.preempt,
            "blocktime": bool(self.caps["postcopy-blocktime"]),
            "cpu": handler_cpu(),
            "nice": urgent_nice(),
        }
        assert self.ctrl is not None
        send_ctrl(self.ctrl, setup, [self.uffd, self.recv_fd])
        self._ctrl_thread = threading.Thread(target=self._ctrl_reader, name="postcopy-ctrl", daemon=True)
        self._ctrl_thread.start()
        if not self._ready.wait(HANDLER_START_TIMEOUT):
            raise StreamError(0, "postcopy fault handler did not start")

    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
        if self.ctrl is None:
            return
        with self._ctrl_lock:
            try:
                send_ctrl(self.ctrl, msg, fds)
            except OSError as e:
                log.warning("postcopy handler unreachable: %s", e)

    def _ctrl_reader(self) -> None:
        assert self.ctrl is not None
        while True:
            try:
                msg, _fds = recv_ctrl(self.ctrl)
            except OSError:
                msg = None
            if msg is None:
                self._stats_evt.set()
                if self.state == RUNNING and not self._stopping:
                    log.error("postcopy fault handler exited; starting a new one")
                    self._restart_handler()
                return
            op = msg.get("op")
            if op == "ready":
                self._ready.set()
            elif op == "stats":
                self._stats = msg
                self._stats_evt.set()
            elif op == "eos":
                self._chan_eos.set()
            elif op == "lost":
                self._channel_lost(msg.get("why", "postcopy channel lost"))
            elif op == "req":
                self._forward_requests(msg["pages"])
            elif op == "error":
                log.error("postcopy fault handler: %s", msg.get("why"))

    def _restart_handler(self) -> None:
        """The handler died: start another, make blocked threads fault again, and pause
        (the postcopy channel's position in its stream died with the old handler)."""
        old, old_proc = self.ctrl, self.proc
        if old_proc is not None:
            old_proc.wait()
        self._ready.clear()
        try:
            self._spawn_handler()
            self._setup_handler()
        except Exception as e:  # noqa: BLE001
            log.error("postcopy: cannot restart the fault handler: %s", e)
            return
        finally:
            if old is not None:
                old.close()
        self.handler_restarts += 1
        tids = vcpu_native_ids(self.machine)
        if tids:
            self._send({"op": "vcpus", "tids": tids})
        for b in self.registered:  # messages the old handler read are gone: fault again
            uffd.wake(self.uffd, b.host, b.used_length)
        self._channel_lost("postcopy fault handler restarted")

    def _forward_requests(self, pages: list) -> None:
        """postcopy-preempt off: the handler's requests go on the main return path."""
        sock = self.inc._sock
        if sock is None or self.inc.status != status.POSTCOPY_ACTIVE:
            return  # re-sent by the handler after recovery
        out = []
        last = None
        for idstr, page in pages:
            out.append(rp.req_pages(page << PAGE_SHIFT, TARGET_PAGE_SIZE, None if idstr == last else idstr))
            last = idstr
        try:
            with self.inc._rp_lock:
                sock.sendall(b"".join(out))
        except OSError as e:
            self._channel_lost(f"return path: {e.strerror or e}")

    def handler_stats(self, timeout: float = 1.0) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            return self._stats
        self._stats_evt.clear()
        self._send({"op": "stats"})
        self._stats_evt.wait(timeout)
        return self._stats

    def _give_channel(self) -> None:
        """Hand the postcopy channel (or, without preempt, nothing) to the handler."""
        if self.chan is not None:
            self._send({"op": "channel"}, [self.chan.fileno()])
            # the handler has its own descriptor now; ours stays for shutdown()
        else:
            self._send({"op": "channel"})

    # -- page placement (RamLoader hooks) -------------------------------------------------------
    def place_pages(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None:
        """Place received pages with UFFDIO_COPY; pages already here are left alone."""
        assert self.recv is not None and self.placer is not None
        base = self.recv_off[block.idstr]
        todo = self.recv[base + pages] == RECV_NONE
        if not todo.all():
            self.loaded_existed += int(np.count_nonzero(~todo))
            pages, data = pages[todo], data[todo]
        for s in range(0, len(pages), STAGE_PAGES):
            part = pages[s : s + STAGE_PAGES]
            n = len(part)
            stage = self._stage[:n]
            np.copyto(stage, data[s : s + n])
            brk = np.flatnonzero(np.diff(part) != 1) + 1
            firsts = np.r_[0, brk]
            ends = np.r_[brk, n]
            addr0 = stage.ctypes.data
            for i, e in zip(firsts.tolist(), ends.tolist(), strict=True):
                placed, existed = self.placer.copy(
                    block.host + (int(part[i]) << PAGE_SHIFT), addr0 + i * TARGET_PAGE_SIZE,
                    (e - i) * TARGET_PAGE_SIZE,
                )
                self.loaded_pages += placed >> PAGE_SHIFT
                self.loaded_existed += existed >> PAGE_SHIFT
            self.recv[base + part] = RECV_DATA

    def zero_pages(self, block: RAMBlock, pages: np.ndarray) -> None:
        """ZERO records: remembered, not placed (the first fault maps a zero page)."""
        assert self.recv is not None
        idx = self.recv_off[block.idstr] + pages
        cur = self.recv[idx]
        self.recv[idx[cur == RECV_NONE]] = RECV_ZERO
        self.zero_records += len(pages)

    # -- the load, with pause and recovery ----------------------------------------------------------
    def load(self, reader: QEMUFileReader) -> bool:
        """Run the incoming load; True if it ended in postcopy (completion handled here)."""
        err: BaseException | None = None
        try:
            self.inc._load(reader)
        except BaseException as e:
            if self.state != RUNNING:
                self.close()
                raise
            err = e
        else:
            if self.state in (NONE, ADVISE):  # advised but never started: precopy completion
                self.close()
                return False
            if self.state != RUNNING:
                self.close()
                raise StreamError(reader.tell(), "stream ended inside postcopy switchover")
            err = self._wait_channel_end()
        while err is not None:
            if self.inc._cancel.is_set():  # torn down on purpose (no QMP path does this)
                self.close()
                raise err
            log.info("postcopy paused: %s", _describe(err))
            self._pause(_describe(err))
            try:
                r = self._wait_recovery()
                self._load_rest(r)
                err = self._wait_channel_end()
            except BaseException as e:  # noqa: BLE001 - every failure is a pause in postcopy
                err = e
        self._complete()
        return True

    def _wait_channel_end(self) -> BaseException | None:
        """After EOF on the main stream: wait for the postcopy channel's EOS."""
        if not self.preempt:
            return None
        while not self._chan_eos.wait(0.05):
            if self._lost.is_set():
                return StreamError(0, self._lost_why or "postcopy channel lost")
        return None

    def _channel_lost(self, why: str) -> None:
        """A channel failed (handler or return path): pause by shutting the main socket down."""
        if self.state != RUNNING:
            return
        self._lost_why = why
        self._lost.set()
        for s in (self.inc._sock, self.chan):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pause(self, why: str) -> None:
        self.inc._set_status(status.POSTCOPY_PAUSED)
        self.inc.error_desc = why
        self._send({"op": "pause"})
        for s in (self.inc._sock, self.chan):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self.inc._sock = None
        self.chan = None
        self._chan_eos.clear()
        self._lost.clear()
        self._lost_why = None

    def pause(self) -> None:
        """QMP ``migrate-pause`` on the destination."""
        if self.inc.status not in (status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER):
            raise RuntimeError("migrate-pause is only allowed in postcopy-active or postcopy-recover")
        self._channel_lost("paused by migrate-pause")

    def recover(self, uri: MigrationURI) -> MigrationURI:
        """QMP ``migrate-recover``: listen for the source's reconnection."""
        if self.inc.status != status.POSTCOPY_PAUSED:
            raise RuntimeError("Migrate recover can only be run when postcopy is paused.")
        if self._recover.is_set():
            raise RuntimeError("Migrate recovery is triggered already")
        listener = Listener(uri, tls=self.inc.tls)
        self._recover_listener = listener
        self._recover.set()
        return listener.uri

    def _wait_recovery(self) -> QEMUFileReader:
        while not self._recover.wait(0.2):
            if self.inc._cancel.is_set():
                raise StreamError(0, "cancelled")
        self._recover.clear()
        listener, self._recover_listener = self._recover_listener, None
        assert listener is not None
        self.inc._set_status(status.POSTCOPY_RECOVER_SETUP)
        try:
            sock = listener.accept()
            self.inc._sock = sock
            if self.preempt:
                self.chan = self._accept_channel(listener)
        finally:
            listener.close()
        self.recoveries += 1
        self.inc._set_status(status.POSTCOPY_RECOVER)
        return QEMUFileReader(sock, 1 << 20)

    def _load_rest(self, r: QEMUFileReader) -> None:
        """The main stream after a reconnection: RECV_BITMAP and RESUME, RAM, EOF."""
        loader = self.inc.loader
        resumed = False
        while True:
            hdr = savevm.read_section_header(r)
            kind = hdr.type
            if kind == SectionType.EOF:
                if not resumed:
                    raise StreamError(hdr.offset, "EOF before POSTCOPY_RESUME")
                if len(r.fill(1)) and r.buffered()[0] == SectionType.VMDESCRIPTION:
                    savevm.read_section_header(r)
                    savevm.read_vmdesc(r)
                return
            if kind == SectionType.COMMAND:
                command = savevm.read_command(r)
                if command.cmd == MigCommand.RECV_BITMAP:
                    self._send_recv_bitmap(command.payload, hdr.offset)
                elif command.cmd == MigCommand.POSTCOPY_RESUME:
                    if self.inc.status != status.POSTCOPY_RECOVER:
                        raise StreamError(hdr.offset, "POSTCOPY_RESUME outside postcopy-recover")
                    self._resume()
                    resumed = True
                elif command.cmd == MigCommand.PING:
                    self._sock_send(rp.message(RPMessage.PONG, command.payload))
                else:
                    raise StreamError(hdr.offset, f"{command.cmd.name} not expected after a reconnection")
                continue
            if kind in (SectionType.PART, SectionType.END):
                if not resumed:
                    raise StreamError(hdr.offset, "RAM before POSTCOPY_RESUME")
                if self._ram_section_id is None:
                    self._ram_section_id = hdr.section_id
                if hdr.section_id != self._ram_section_id:
                    raise StreamError(hdr.offset, f"unknown section id {hdr.section_id}")
                loader.start_section()
                loader.load(r)
                savevm.check_footer(r, hdr.section_id)
                continue
            raise StreamError(hdr.offset, f"unexpected section type 0x{int(kind):02x} in postcopy")

    def _send_recv_bitmap(self, payload: bytes, at: int) -> None:
        if self.inc.status != status.POSTCOPY_RECOVER:
            raise StreamError(at, "RECV_BITMAP is only valid in postcopy-recover")
        n = payload[0]
        if len(payload) != 1 + n:
            raise StreamError(at, "CMD_RECV_BITMAP: bad block name length")
        name = payload[1:].decode(errors="replace")
        mr = self.regions.get(name)
        if mr is None:
            raise StreamError(at, f"CMD_RECV_BITMAP: unknown block \"{name}\"")
        self._sock_send(rp.recv_bitmap(name, self.received_le(name)))

    def received_le(self, idstr: str) -> bytes:
        """A block's received bitmap in the wire format (little-endian, size rounded to 8)."""
        assert self.recv is not None
        b = self.regions[idstr].block
        nbits = b.used_length >> PAGE_SHIFT
        off = self.recv_off[idstr]
        bits = np.packbits(self.recv[off : off + nbits] != RECV_NONE, bitorder="little").tobytes()
        return bits + bytes(rp.recv_bitmap_size(nbits) - len(bits))

    def _sock_send(self, data: bytes) -> None:
        sock = self.inc._sock
        if sock is None:
            raise StreamError(0, "return path is closed")
        with self.inc._rp_lock:
            sock.sendall(data)

    def _resume(self) -> None:
        self.inc._set_status(status.POSTCOPY_ACTIVE)
        self._sock_send(rp.resume_ack())
        self._give_channel()  # the handler re-sends its pending requests

    def _complete(self) -> None:
        """Every page is here or known to be zero: stop faulting, report, finish."""
        self.lost_pages = self._count_lost()
        if self.lost_pages:
            log.error("postcopy: %d plugged pages never arrived", self.lost_pages)
            self._send({"op": "lost-pages", "n": self.lost_pages})
        self.summary = {b.idstr: received_summary(self, b.idstr) for b in self.blocks}
        self.state = END
        self._unregister()
        try:
            self._stop_handler()
            self._drop_local_zero_pages()
        except Exception as e:  # noqa: BLE001 - the migration is complete regardless
            log.warning("postcopy cleanup: %s", e)
        self._release_holds()
        self.inc.loader.placer = None
        self.inc._send_shut(0)
        self.inc._set_status(status.COMPLETED)
        self.close()

    def _drop_local_zero_pages(self) -> None:
        """Zero pages placed for faults on discarded memory (a guest touching unplugged
        memory) are given back: unplugged memory has no content to keep, and the
        destination must not end up holding any of it (reference 2.5 ``post_load``)."""
        assert self.recv is not None
        for b in self.blocks:
            if self.regions[b.idstr].rdm is None:
                continue
            off = self.recv_off[b.idstr]
            local = self.recv[off : off + (b.used_length >> PAGE_SHIFT)] == RECV_LOCAL
            if not local.any():
                continue
            d = np.diff(np.concatenate(([0], local.view(np.int8), [0])))
            for s, e in zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True):
                b.discard_range(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT)

    def _count_lost(self) -> int:
        """Plugged pages with no data, no zero record and no local answer: must be 0."""
        assert self.recv is not None
        lost = 0
        for b in self.blocks:
            mr = self.regions[b.idstr]
            off = self.recv_off[b.idstr]
            missing = self.recv[off : off + (b.used_length >> PAGE_SHIFT)] == RECV_NONE
            if mr.rdm is not None:
                offs, sizes = mr.rdm.populated_runs(Section(mr, 0, b.used_length))
                for o, s in zip(offs, sizes, strict=True):
                    lost += int(np.count_nonzero(missing[o >> PAGE_SHIFT : (o + s) >> PAGE_SHIFT]))
            else:
                lost += int(np.count_nonzero(missing))
        return lost

    def _release_holds(self) -> None:
        for hold in self._holds:
            hold.release()
        self._holds = []

    def _unregister(self) -> None:
        for b in self.registered:
            try:
                uffd.unregister(self.uffd, b.host, b.used_length)
            except OSError as e:
                log.warning("UFFDIO_UNREGISTER %s: %s", b.idstr, e)
        self.registered.clear()

    def _stop_handler(self) -> None:
        self._stopping = True
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._stats_evt.clear()
            self._send({"op": "stop"})
            self._stats_evt.wait(2.0)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Release everything (idempotent); guest RAM is unregistered first."""
        self._unregister()
        self._stop_handler()
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        if self.inc.loader.placer is self:
            self.inc.loader.placer = None
        for s in (self.chan,):
            if s is not None:
                s.close()
        self.chan = None
        for lst in (self.listener, self._recover_listener):
            if lst is not None:
                lst.close()
        self.listener = self._recover_listener = None
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        self._release_holds()
        self.recv = None
        if self.recv_map is not None:
            try:
                self.recv_map.close()
            except BufferError:
                pass
            self.recv_map = None
        if self.recv_fd >= 0:
            os.close(self.recv_fd)
            self.recv_fd = -1

    # -- query-migrate ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        st = self.handler_stats() if self.state in (LISTENING, RUNNING) else self._stats
        out: dict[str, Any] = {
            "postcopy-requests": st.get("requests", 0),
            "postcopy-local-zero-pages": st.get("local-zero-pages", 0),
            "postcopy-urgent-pages": st.get("pages-placed", 0),
            "postcopy-duplicate-pages": st.get("pages-existed", 0) + self.loaded_existed,
            "postcopy-background-pages": self.loaded_pages,
            "postcopy-latency-p50-us": st.get("latency-p50-us", 0.0),
            "postcopy-latency-p99-us": st.get("latency-p99-us", 0.0),
            "postcopy-latency-count": st.get("latency-count", 0),
            "postcopy-faults": st.get("faults", 0),
            "postcopy-lost-pages": self.lost_pages,
            "postcopy-recoveries": self.recoveries,
            "postcopy-handler-restarts": self.handler_restarts,
        }
        if st.get("latency-mean-us"):
            out["postcopy-latency"] = int(st["latency-mean-us"] * 1000)  # ns, like QEMU
        if self.caps["postcopy-blocktime"]:
            out["postcopy-blocktime"] = st.get("blocktime-ms", 0)
            out["postcopy-vcpu-blocktime"] = st.get("vcpu-blocktime-ms", [])
        return out


def vcpu_native_ids(machine: Any) -> list[int]:
    """Kernel thread ids of the guest's vCPU threads (for per-vCPU blocktime)."""
    accel = machine.accel
    fn = getattr(accel, "vcpu_native_ids", None)
    if fn is not None:
        return [int(t) for t in fn()]
    threads = getattr(accel, "_threads", None) or []
    return [t.native_id for t in threads if getattr(t, "native_id", None)]


def handler_cpu() -> int:
    """CPU to pin the fault handler to (``LIVEMIG_POSTCOPY_HANDLER_CPU``; -1 = not pinned)."""
    try:
        return int(os.environ.get("LIVEMIG_POSTCOPY_HANDLER_CPU", "-1"))
    except ValueError:
        return -1


def urgent_nice() -> int:
    """Nice value of the urgent page path (``LIVEMIG_POSTCOPY_NICE``, default -10).

    The fault handler and the source's urgent-page thread compete for two CPUs with the
    bulk push and the guest; a higher priority took the p99 of a request from about 0.5 to
    0.35 ms with a throttled push and from 3-5 to about 2.2 ms with an unthrottled one
    (docs/postcopy.md). Needs CAP_SYS_NICE; without it the value is silently not applied.
    """
    try:
        return int(os.environ.get("LIVEMIG_POSTCOPY_NICE", "-10"))
    except ValueError:
        return 0


def urgent_priority(tid: int) -> None:
    """Give thread ``tid`` (of this process) the urgent path's priority, if allowed."""
    nice = urgent_nice()
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def received_summary(pc: PostcopyIncoming, idstr: str) -> dict[str, int]:
    """Counts of the received map's states for one block (tests and inspection)."""
    assert pc.recv is not None
    b = pc.regions[idstr].block
    off = pc.recv_off[idstr]
    states = np.bincount(pc.recv[off : off + (b.used_length >> PAGE_SHIFT)], minlength=4)
    return {"none": int(states[0]), "data": int(states[1]), "zero": int(states[2]), "local": int(states[3])}

