"""Postcopy and postcopy recovery, discard-aware: two machines in this process, real
userfaultfd (the fault handler is its own process), real sockets.

Checksums with a guest that writes during postcopy: the source's memory is frozen at the
switchover, the destination's keeps changing. :class:`Mirror` applies every guest write the
destination makes to the source's (stopped) memory as well, under one lock, and checks every
guest read against it. At the end, with the destination paused, the two checksums must be
equal: every page the destination did not write holds the source's switchover content, and
every page it wrote holds its last write (a late page from the source never overwrote one).
Pages the destination wrote were already sent, so the mirrored content never travels.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from waiting import wait_for

from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.memory.ram_block import RAMBlock
from livemig.migration.postcopy import placer as postcopy_uffd
from livemig.migration.postcopy.handler import RECV_ZERO
from livemig.migration.postcopy.handler_control import HandlerControl
from livemig.migration.postcopy.received import ReceivedMap

MiB, GiB = 1 << 20, 1 << 30
PLUGGED = 160 * MiB

pytestmark = pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")


def make(incoming: bool, backend: str = "memfd") -> Machine:
    return Machine(
        MachineConfig(
            memory=64 * MiB,
            ram_backend=backend,
            virtio_mem=VirtioMemConfig(size=2 * GiB, backend=backend),
            incoming=incoming,
            workload=WorkloadConfig(vcpus=2, dirty_rate=16 * MiB, content="mixed", reads=16),
        )
    )


class Mirror:
    """Destination guest writes go to the source too; destination reads are checked."""

    def __init__(self, src: Machine, dst: Machine):
        self.lock = threading.Lock()
        self.src, self.dst = src, dst
        self.writes = self.reads = self.bad_reads = 0
        acc = dst.accel
        write, read = acc.write_pages, acc.read_pages

        def write_pages(mr, pages, data):  # noqa: ANN001, ANN202
            with self.lock:
                write(mr, pages, data)
                smr = src.memory.by_block(mr.block.idstr)
                smr.block.pages_array(0, smr.block.used_length)[pages] = data
                self.writes += len(pages)

        def read_pages(mr, pages):  # noqa: ANN001, ANN202
            with self.lock:
                got = read(mr, pages)
                smr = src.memory.by_block(mr.block.idstr)
                want = smr.block.pages_array(0, smr.block.used_length)[pages]
                self.reads += len(pages)
                self.bad_reads += int(np.count_nonzero((got != want).any(axis=1)))
                return got

        acc.write_pages = write_pages
        acc.read_pages = read_pages


class Proxy:
    """A TCP forwarder whose connections the test can cut (RST both ends) at any moment.

    ``back_limit``: after that many bytes from the destination back to the source (over
    all connections), every connection is cut — a failure in the middle of a handshake.
    """

    def __init__(self, port: int, back_limit: int | None = None):
        self.target = ("127.0.0.1", port)
        self.back_limit = back_limit
        self.back = 0
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.lsock.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        self.cut_done = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self._lock:
                self.socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, True), daemon=True).start()

    def _pump(self, r: socket.socket, w: socket.socket, back: bool) -> None:
        try:
            while True:
                data = r.recv(1 << 16)
                if not data:
                    break
                if back and self.back_limit is not None:
                    room = self.back_limit - self.back
                    if room <= 0:
                        self.cut()
                        return
                    data = data[:room]
                    self.back += len(data)
                w.sendall(data)
        except OSError:
            pass
        try:
            w.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every connection (like a link that drops): both ends see ECONNRESET."""
        with self._lock:
            socks, self.socks = self.socks, []
        for s in socks:  # wake the pumps blocked in recv(), so close() really closes
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        time.sleep(0.05)
        for s in socks:
            s.close()  # linger 0: the peers get a reset
        self.cut_done.set()

    def close(self) -> None:
        self.lsock.close()
        self.cut()


def setup_pair(
    src: Machine, dst: Machine, preempt: bool = True
) -> tuple[VMController, VMController, list[tuple[str, str]]]:
    cs, cd = VMController(src), VMController(dst, autostart=True)
    events: list[tuple[str, str]] = []

    def emitter(who: str):  # noqa: ANN202
        def emit(name: str, data: dict | None = None) -> None:
            if name == "MIGRATION":
                events.append((who, (data or {})["status"]))

        return emit

    cs.emit = emitter("src")  # type: ignore[method-assign]
    cd.emit = emitter("dst")  # type: ignore[method-assign]
    names = ("postcopy-ram", "postcopy-blocktime", "events") + (("postcopy-preempt",) if preempt else ())
    caps = [{"capability": c, "state": True} for c in names]
    cs.caps.set(caps)
    cd.caps.set(caps)
    src.start()
    src.vmem.set_requested_size(256 * MiB)
    wait_for(lambda: src.driver.plugged_size == 256 * MiB and src.workload.fill_done.is_set(), what="plug")
    src.vmem.set_requested_size(PLUGGED)  # unplugged blocks were written, then given back
    wait_for(lambda: src.driver.plugged_size == PLUGGED, what="unplug")
    return cs, cd, events


@pytest.fixture
def pair(request) -> Iterator[tuple[Machine, Machine]]:  # noqa: ANN001
    backend = getattr(request, "param", "memfd")
    src, dst = make(False, backend), make(True, backend)
    try:
        yield src, dst
    finally:
        src.close()
        dst.close()


def start_postcopy(cs: VMController, cd: VMController, uri: str) -> None:
    cs.params.set({"max-bandwidth": 48 * MiB})
    cs.migrate(uri)
    wait_for(lambda: cs.outgoing.status == "active", what="active")
    time.sleep(0.3)  # some precopy, so the discard list has work to do
    cs.migrate_start_postcopy()
    wait_for(lambda: cd.incoming.status == "postcopy-active" and cs.outgoing.status == "postcopy-active",
             what="postcopy-active")


def discarded_pages(m: Machine) -> Bitmap:
    mr = m.vmem_mr
    bm = Bitmap(mr.block.max_length // 4096)
    offs, sizes = m.vmem.discarded_runs(Section(mr, 0, mr.size))
    for o, s in zip(offs, sizes, strict=True):
        bm.set_range(o // 4096, s // 4096)
    return bm


def unplugged_allocation(ctl: VMController) -> int:
    return sum(b.get("allocated-discarded", 0) for b in ctl.x_query_ram_allocation())


def read_unplugged(m: Machine) -> bytes:
    """A (misbehaving) access to unplugged memory, GIL-free like a vCPU's."""
    mr = m.vmem_mr
    buf = ctypes.create_string_buffer(4096)
    ctypes.memmove(buf, mr.block.host + mr.size - 4096, 4096)
    return buf.raw


def finish_and_compare(src: Machine, dst: Machine, cs: VMController, cd: VMController,
                       mirror: Mirror) -> None:
    assert cs.outgoing.wait(60), cs.query_migrate()
    assert cs.outgoing.status == "completed", cs.query_migrate()
    assert cd.incoming.wait(30) and cd.incoming.status == "completed", cd.query_migrate()
    assert src.runstate == "postmigrate" and dst.runstate == "running"
    cd.stop()
    with mirror.lock:
        assert src.checksum() == dst.checksum()
    assert mirror.writes > 0 and mirror.reads > 0 and mirror.bad_reads == 0
    pc = cd.incoming.postcopy
    assert pc.lost_pages == 0
    # discard promises: no request, no page sent, nothing received for unplugged blocks
    gone = discarded_pages(src)
    ps = cs.outgoing.postcopy
    vm_block = src.vmem_mr.block.idstr
    assert not np.any(ps.requested[vm_block].words & gone.words)
    assert not np.any(ps.sent[vm_block].words & gone.words)
    assert cs.query_migrate()["ram"]["postcopy-discarded-requests"] == 0
    assert cd.query_migrate()["ram"]["unplugged-pages-received"] == 0  # the destination's audit
    summary = pc.summary[vm_block]
    unplugged = gone.count()
    assert summary["none"] + summary["local"] >= unplugged  # no data/zero record there
    assert unplugged_allocation(cd) == 0 and unplugged_allocation(cs) == 0
    assert src.accel.discarded_writes == 0 and dst.accel.discarded_writes == 0


@pytest.mark.parametrize(
    ("pair", "preempt"),
    [("memfd", True), ("anon", True), ("memfd", False)],
    indirect=["pair"],
    ids=["memfd-preempt", "anon-preempt", "memfd-main-channel"],
)
def test_postcopy_with_a_guest_that_reads_and_writes(pair, preempt: bool) -> None:  # noqa: ANN001
    src, dst = pair
    cs, cd, events = setup_pair(src, dst, preempt)
    mirror = Mirror(src, dst)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.params.set({"max-postcopy-bandwidth": 32 * MiB})
    start_postcopy(cs, cd, str(cd.incoming.uri))
    # the destination guest runs with pages missing; a fault on unplugged memory is
    # answered here with a zero page and never requested
    assert read_unplugged(dst) == bytes(4096)
    # livemig's own accesses to missing pages (a checksum reads all of anonymous memory)
    # wait for the pages, they do not deadlock on the GIL
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(dst.checksum()), daemon=True)
    t.start()
    t.join(30)
    assert result, "checksum during postcopy did not finish"
    wait_for(lambda: mirror.writes > 2000 and mirror.reads > 200, what="guest activity")
    finish_and_compare(src, dst, cs, cd, mirror)
    src_ram, dst_ram = cs.query_migrate()["ram"], cd.query_migrate()["ram"]
    assert src_ram["postcopy-requests"] > 0 and src_ram["postcopy-bytes"] > 0
    assert dst_ram["postcopy-local-zero-pages"] >= 1
    assert dst_ram["postcopy-requests"] == src_ram["postcopy-requests"]
    assert len(dst_ram["postcopy-vcpu-blocktime"]) == 2
    assert sum(dst_ram["postcopy-vcpu-blocktime"]) > 0
    assert ("src", "postcopy-active") in events and ("dst", "postcopy-active") in events
    assert [s for who, s in events if who == "src"][-3:] == ["postcopy-device", "postcopy-active", "completed"]
    assert [s for who, s in events if who == "dst"] == ["setup", "active", "postcopy-active", "completed"]


def test_postcopy_recovers_after_the_connection_is_cut(pair) -> None:  # noqa: ANN001
    src, dst = pair
    cs, cd, events = setup_pair(src, dst)
    mirror = Mirror(src, dst)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    proxy = Proxy(cd.incoming.uri.port)
    cs.params.set({"max-postcopy-bandwidth": 8 * MiB})  # still busy when the link drops
    start_postcopy(cs, cd, proxy.uri)
    wait_for(lambda: mirror.writes > 500, what="guest activity")
    proxy.cut()
    wait_for(lambda: cs.outgoing.status == "postcopy-paused" and cd.incoming.status == "postcopy-paused",
             what="both paused")
    assert cs.query_migrate()["ram"]["remaining"] > 0  # cut in the middle, not at the end
    # the destination guest stays alive: its process is not stuck, it keeps running
    assert dst.runstate == "running" and cd.query_status()["status"] == "running"
    assert cd.query_migrate()["status"] == "postcopy-paused"
    time.sleep(0.3)
    cd.migrate_recover("tcp:127.0.0.1:0")
    proxy2 = Proxy(cd.incoming.uri.port)
    cs.migrate(proxy2.uri, resume=True)
    wait_for(lambda: cs.outgoing.status in ("postcopy-active", "completed"), what="resumed")
    cs.params.set({"max-postcopy-bandwidth": 0})
    finish_and_compare(src, dst, cs, cd, mirror)
    assert cs.query_migrate()["ram"]["postcopy-recoveries"] == 1
    src_states = [s for who, s in events if who == "src"]
    for st in ("postcopy-paused", "postcopy-recover-setup", "postcopy-recover"):
        assert st in src_states
    assert "postcopy-recover" in [s for who, s in events if who == "dst"]
    proxy.close()
    proxy2.close()


@pytest.mark.parametrize("paused_by", ["source", "destination"])
def test_postcopy_recovers_after_a_failed_recovery_handshake(pair, paused_by: str) -> None:  # noqa: ANN001
    src, dst = pair
    cs, cd, events = setup_pair(src, dst)
    mirror = Mirror(src, dst)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.params.set({"max-postcopy-bandwidth": 8 * MiB})
    start_postcopy(cs, cd, str(cd.incoming.uri))
    wait_for(lambda: mirror.writes > 500, what="guest activity")
    (cs if paused_by == "source" else cd).migrate_pause()  # like QEMU's recovery test
    wait_for(lambda: cs.outgoing.status == "postcopy-paused" and cd.incoming.status == "postcopy-paused",
             what="both paused")
    # first recovery: the link drops in the middle of the received bitmaps
    cd.migrate_recover("tcp:127.0.0.1:0")
    bad = Proxy(cd.incoming.uri.port, back_limit=600)
    cs.migrate(bad.uri, resume=True)
    assert bad.cut_done.wait(20)
    wait_for(lambda: cs.outgoing.status == "postcopy-paused" and cd.incoming.status == "postcopy-paused",
             what="both paused again")
    assert dst.runstate == "running"
    # second recovery, over a good connection
    cd.migrate_recover("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri), resume=True)
    cs.params.set({"max-postcopy-bandwidth": 0})
    finish_and_compare(src, dst, cs, cd, mirror)
    assert cs.query_migrate()["ram"]["postcopy-recoveries"] == 2
    assert [s for who, s in events if who == "dst"].count("postcopy-paused") == 2
    bad.close()


def test_postcopy_over_tls_with_recovery(pair, tmp_path) -> None:  # noqa: ANN001
    """TLS on every connection, the first and the reconnected one (postcopy-preempt off:
    requests on the main return path, pages on the main stream)."""
    from livemig.migration.transport import tls_certs

    src, dst = pair
    cs, cd, _ = setup_pair(src, dst, preempt=False)
    creds = str(tls_certs.write_creds(tmp_path / "creds", tls_certs.make_ca()))
    for ctl in (cs, cd):
        ctl.params.set({"tls-creds": creds})
    mirror = Mirror(src, dst)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.params.set({"max-postcopy-bandwidth": 8 * MiB})
    start_postcopy(cs, cd, str(cd.incoming.uri))
    wait_for(lambda: mirror.writes > 500, what="guest activity")
    cs.migrate_pause()
    wait_for(lambda: cs.outgoing.status == "postcopy-paused" and cd.incoming.status == "postcopy-paused",
             what="both paused")
    cd.migrate_recover("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri), resume=True)
    cs.params.set({"max-postcopy-bandwidth": 0})
    finish_and_compare(src, dst, cs, cd, mirror)
    assert cs.query_migrate()["ram"]["postcopy-requests"] > 0


def descriptors(pid: int) -> list[str]:
    """What each open descriptor of process ``pid`` refers to, in descriptor order."""
    out = []
    for fd in sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd")):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def check_helper(pid: int, name: str) -> None:
    """issue 17: a helper is a fork of the one-threaded helper launcher, not of this
    multi-threaded process."""
    from livemig.migration.core.helpers import launcher

    with open(f"/proc/{pid}/status") as f:
        status = f.read().splitlines()
    assert f"PPid:\t{launcher().pid}" in status and launcher().pid != os.getpid()
    with open(f"/proc/{launcher().pid}/status") as f:
        assert "Threads:\t1" in f.read().splitlines()
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == name


def test_fault_handler_death_pauses_and_recovers(pair) -> None:  # noqa: ANN001
    """The handler process is killed mid-postcopy: a new one takes over, threads that were
    waiting fault again, the migration pauses (the postcopy channel's position is lost)
    and recovers like after a network failure."""
    src, dst = pair
    cs, cd, _ = setup_pair(src, dst)
    mirror = Mirror(src, dst)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.params.set({"max-postcopy-bandwidth": 8 * MiB})
    start_postcopy(cs, cd, str(cd.incoming.uri))
    wait_for(lambda: mirror.writes > 500, what="guest activity")
    proc = cd.incoming.postcopy.handler.proc
    assert proc is not None
    check_helper(proc.pid, "postcopy-faults")
    fds = descriptors(proc.pid)
    # beside stdin, stdout and stderr: the userfaultfd, the received map (mmap keeps a
    # descriptor), the control socket and the postcopy channel — no guest memory of either
    # VM in this process, no other socket
    assert len(fds) == 3 + 4, fds
    assert sorted(t.split("[")[0] for t in fds[3:]) == [
        "/memfd:livemig:postcopy-received (deleted)", "anon_inode:", "socket:", "socket:"], fds
    proc.kill()
    wait_for(lambda: cs.outgoing.status == "postcopy-paused" and cd.incoming.status == "postcopy-paused",
             what="both paused")
    cd.migrate_recover("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri), resume=True)
    cs.params.set({"max-postcopy-bandwidth": 0})
    finish_and_compare(src, dst, cs, cd, mirror)
    assert cd.query_migrate()["ram"]["postcopy-handler-restarts"] == 1


def test_postcopy_ram_without_the_switch_completes_in_precopy(pair) -> None:  # noqa: ANN001
    src, dst = pair
    cs, cd, _ = setup_pair(src, dst)
    cd.autostart = False  # stays paused after completion, for the comparison
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))
    assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
    assert cd.incoming.wait(30) and cd.incoming.status == "completed", cd.query_migrate()
    pc = cd.incoming.postcopy
    assert pc.handler.proc is None and pc.uffd == -1  # the advised handler was stopped
    # ...at once: it was never set up, so there are no statistics to wait for (waiting
    # for them once held the source's guest stopped for the 2 s timeout: downtime > 2 s)
    assert pc.handler.stop_timeouts == 0
    assert cs.query_migrate()["downtime"] < 2000, cs.query_migrate()
    assert src.checksum() == dst.checksum()
    assert unplugged_allocation(cd) == 0


class HandlerEvents:
    """What a fault handler reports, recorded (no VM process around it)."""

    def __init__(self) -> None:
        self.requests: list[list] = []
        self.requested = threading.Event()
        self.exited = threading.Event()
        self.lost: list[str] = []
        self.was_lost = threading.Event()

    def channel_eos(self) -> None:
        pass

    def channel_lost(self, why: str) -> None:
        self.lost.append(why)
        self.was_lost.set()

    def forward_requests(self, pages: list[list]) -> None:
        self.requests += pages
        self.requested.set()

    def handler_exited(self) -> None:
        self.exited.set()


@dataclass
class HandlerRig:
    """A fault handler at work (:func:`fault_handler`)."""

    block: RAMBlock
    uffd: int
    received: ReceivedMap
    events: HandlerEvents
    handler: HandlerControl
    readers: list[threading.Thread] = field(default_factory=list)

    def touch(self, page: int) -> None:
        """A thread reads ``page``: it waits in a fault until the page is placed."""
        buf = ctypes.create_string_buffer(4096)
        t = threading.Thread(target=ctypes.memmove, args=(buf, self.block.host + page * 4096, 4096), daemon=True)
        self.readers.append(t)
        t.start()


@contextlib.contextmanager
def fault_handler(backend: str = "memfd", stall_ms: int = 0) -> Iterator[HandlerRig]:
    """The real handler process over a 64-page block registered with a real userfaultfd,
    set up as the destination does without a postcopy channel."""
    block = RAMBlock("pc.ram", 64 * 4096, backend)
    fd = postcopy_uffd.open_uffd()
    received = ReceivedMap([block])
    events = HandlerEvents()
    handler = HandlerControl(events)
    rig = HandlerRig(block, fd, received, events, handler)

    try:
        postcopy_uffd.register_missing(fd, block.host, block.used_length)
        handler.spawn()
        blocks = [{"idstr": block.idstr, "host": block.host, "length": block.used_length,
                   "recv_off": 0, "plugged": None}]
        handler.setup({"op": "setup", "blocks": blocks, "recv_size": received.size,
                       "progress_off": received.progress_off, "stall_ms": stall_ms, "preempt": False,
                       "blocktime": False, "cpu": -1, "nice": 0}, [fd, received.fd])  # fmt: skip
        handler.give_channel(None)  # requests come back through forward_requests
        handler.stats()  # a round trip: the channel is set before the fault (else it re-sends)
        yield rig
    finally:
        try:  # wakes readers still waiting, before their memory goes
            postcopy_uffd.unregister(fd, block.host, block.used_length)
        except OSError:
            pass
        for t in rig.readers:
            t.join(10)
        handler.close()
        received.close()
        os.close(fd)
        if not any(t.is_alive() for t in rig.readers):
            block.close()


@pytest.mark.parametrize("backend", ["memfd", "anon"])
def test_fault_handler_survives_a_zero_page_noted_after_unregistering(backend: str) -> None:
    """The race behind a rare failure of the anon-preempt case: a thread faults on a page
    and the handler requests it; the page then arrives as a ZERO record on the main stream
    just as completion unregisters guest RAM. Settling it (UFFDIO_ZEROPAGE) fails with
    ENOENT then; the handler used to die of it, and its final statistics (request count,
    blocktime) were lost. The real handler process, real userfaultfd."""
    with fault_handler(backend) as rig:
        page = 3
        rig.touch(page)
        assert rig.events.requested.wait(10) and rig.events.requests == [[rig.block.idstr, page]]
        # completion: wakes the reader
        postcopy_uffd.unregister(rig.uffd, rig.block.host, rig.block.used_length)
        rig.readers[0].join(10)
        assert not rig.readers[0].is_alive()
        rig.received.of(rig.block)[page] = RECV_ZERO  # the loader notes the ZERO record
        wait_for(lambda: rig.handler.stats().get("pending") == 0 or rig.events.exited.is_set(), what="settled")
        assert not rig.events.exited.is_set(), "the fault handler died"
        assert rig.handler.stats()["latency-count"] == 1


def test_fault_handler_reports_a_source_that_answers_nothing() -> None:
    """A stopped source (SIGSTOP): its kernel acknowledges the requests and answers
    keepalives, so no socket call ever fails. The handler reports the link lost once a
    request has waited ``stall_ms`` with nothing from the source meanwhile — and not while
    the loader still takes batches off the main stream (a busy source, requests queued
    behind its pushes)."""
    with fault_handler(stall_ms=600) as rig:
        events = rig.events
        rig.touch(3)
        assert events.requested.wait(10)
        busy_until = time.monotonic() + 1.5  # the main stream moves: a batch every 0.1 s
        while time.monotonic() < busy_until:
            rig.received.tick()
            time.sleep(0.1)
        assert not events.lost, events.lost
        quiet = time.monotonic()  # now nothing comes
        assert events.was_lost.wait(10), "a silent source was not reported"
        took = time.monotonic() - quiet
        assert 0.5 <= took < 3.0, took
        assert "a page request waited 0.6 s with nothing from the source" in events.lost[0], events.lost
        time.sleep(1.0)
        assert len(events.lost) == 1, events.lost  # once per link, until it is set again


def test_recv_bitmap_wire_format() -> None:
    """Reference 5.1: little-endian bitmap, size rounded to 8 bytes, end mark."""
    from livemig.migration.stream import return_path as rp

    assert rp.recv_bitmap_size(1) == 8
    assert rp.recv_bitmap_size(64) == 8
    assert rp.recv_bitmap_size(65) == 16
    msg = rp.recv_bitmap("pc.ram", bytes([0b0000_0101]) + bytes(7))
    assert msg[:4] == bytes([0, 5, 0, 7])  # type 5, len 1 + 6
    assert msg[4:11] == b"\x06pc.ram"
    assert msg[11:19] == (8).to_bytes(8, "big")
    assert msg[19] == 0b101  # pages 0 and 2 received
    assert msg[-8:] == (0x0123456789ABCDEF).to_bytes(8, "big")


def test_return_path_framing() -> None:
    """One reader of the framing for the source's return path and postcopy channel: PONGs
    are skipped, a SHUT too short to hold its value is an error, not a crash."""
    import io

    from livemig.migration.stream import return_path as rp
    from livemig.migration.stream.format import RPMessage
    from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

    data = (rp.message(RPMessage.PONG, bytes(4)) + rp.req_pages(4096, 8192, "pc.ram")
            + rp.shut(False) + rp.message(RPMessage.SHUT, b"\x00"))
    msgs = rp.read_messages(QEMUFileReader(io.BytesIO(data)))
    kind, payload = next(msgs)
    assert rp.parse_req_pages(kind, payload) == (4096, 8192, "pc.ram")
    kind, payload = next(msgs)
    assert kind == RPMessage.SHUT and rp.parse_shut(payload) == 0
    kind, payload = next(msgs)
    with pytest.raises(rp.ReturnPathError, match="SHUT with a 1-byte payload"):
        rp.parse_shut(payload)
    with pytest.raises(StreamError):
        next(msgs)
    r = QEMUFileReader(io.BytesIO(data))
    assert rp.read_message(r)[0] == RPMessage.PONG  # the single-message reader keeps PONGs
