"""multifd: RAM pages on extra connections, with the discard rules on every channel."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from test_precopy import GiB, MiB, boot, machine, total_allocation, unplugged_allocation, wait_for

from livemig.control.vm_controller import VMController
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.migration.multifd import channels as multifd

MULTIFD = [{"capability": "multifd", "state": True}]


def uri_for(kind: str, tmp_path: Path) -> str:
    return "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'mfd.sock'}"


def start(cs: VMController, cd: VMController, kind: str, tmp_path: Path) -> None:
    cd.migrate_incoming(uri_for(kind, tmp_path))
    cs.migrate(str(cd.incoming.uri))


def discarded_bitmap(m) -> Bitmap:  # noqa: ANN001
    mr = m.vmem_mr
    bm = Bitmap(mr.block.pages)
    offs, sizes = m.vmem.discarded_runs(Section(mr, 0, mr.size))
    for o, s in zip(offs, sizes, strict=True):
        bm.set_range(o // 4096, s // 4096)
    return bm


@pytest.fixture
def pipes(monkeypatch) -> list:  # noqa: ANN001
    """Every splice_io.PipeSplicer made during the test (one per channel and side using it)."""
    from livemig.migration.ram import splice_io

    made: list[object] = []
    real = splice_io.PipeSplicer

    def counting(sock):  # noqa: ANN001, ANN202
        made.append(sock)
        return real(sock)

    monkeypatch.setattr(splice_io, "PipeSplicer", counting)
    return made


@pytest.mark.parametrize(("kind", "channels", "content"), [("tcp", 2, "random"), ("unix", 3, "random"),
                                                      ("tcp", 2, "mixed")])
def test_multifd_migration_keeps_discard_promises(kind: str, channels: int, content: str, tmp_path: Path,
                                                  monkeypatch, pipes: list) -> None:  # noqa: ANN001
    """Random content: long runs of data pages, received (tcp) or sent and received (unix)
    through pipes (splice_io, opt-in). Mixed content: many short runs per packet, gathered
    and scattered through staging, with the default data path."""
    splice = {"unix": "both", "tcp": "recv"}[kind] if content == "random" else "none"
    monkeypatch.setenv("LIVEMIG_SPLICE", splice)
    src, dst = machine(False, content=content), machine(True, content=content)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        src.vmem.set_requested_size(160 * MiB)  # written, then given back
        wait_for(lambda: src.driver.plugged_size == 160 * MiB, what="unplug")
        before_total = total_allocation(cs)
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        cs.migrate_set_parameters(multifd_channels=channels)
        start(cs, cd, kind, tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "completed", info
        assert cd.incoming.status == "completed", cd.query_migrate()
        assert src.checksum() == dst.checksum()
        if content == "random":  # page data went through pipes: received, and sent too on unix
            assert len(pipes) == (2 if kind == "unix" else 1) * channels
        ram = info["ram"]
        # every page went over a channel; the main stream carried only framing and state
        assert ram["multifd-bytes"] > ram["normal"] * 4096 > 0
        assert ram["transferred"] - ram["multifd-bytes"] < 1 * MiB
        assert ram["remaining"] == 0 and (ram["duplicate"] > 0 or content == "random")
        assert ram["discarded-skipped-bytes"] == 2 * GiB - 160 * MiB
        assert len(cd.incoming.multifd.channels) == channels
        # no page of an unplugged block travelled on any channel
        received = cd.incoming.loader.received[dst.vmem_mr.block.idstr]
        assert not np.any(received.words & discarded_bitmap(src).words)
        assert received.count() >= 160 * MiB // 4096
        # nothing read or grown on the source, nothing populated in unplugged memory here
        assert unplugged_allocation(cs) == 0 and total_allocation(cs) <= before_total
        assert unplugged_allocation(cd) == 0
        cd.cont()
        written = dst.workload.pages_written
        wait_for(lambda: dst.workload.pages_written > written, what="destination guest writes")
        assert src.accel.discarded_writes == 0 and dst.accel.discarded_writes == 0
    finally:
        src.close()
        dst.close()


def test_multifd_holes_are_not_read(tmp_path: Path) -> None:
    """Plugged, never-written memory travels as zero runs without a read, in a few bytes."""
    src, dst = machine(False, dirty_rate=0, prefill=False), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        src.accel.write(src.vmem_mr.addr, b"\x01" * 8192)
        before = total_allocation(cs)
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        start(cs, cd, "unix", tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        ram = cs.query_migrate()["ram"]
        assert ram["pages-read"] == 2 and ram["normal"] == 2
        assert ram["hole-pages-skipped"] == (256 + 64) * MiB // 4096 - 2
        assert ram["transferred"] < 256 * 1024  # zero runs, not a record per page
        assert total_allocation(cs) == before
        assert total_allocation(cd) == 2 * 4096
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("side", ["source", "destination"])
def test_channel_dying_fails_cleanly_and_retry_succeeds(side: str, tmp_path: Path) -> None:
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 192 * MiB)
        before = src.checksum()
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        cs.params.set({"max-bandwidth": 48 * MiB})  # about 5 s: time to cut a channel
        start(cs, cd, "tcp", tmp_path)
        wait_for(lambda: cs.outgoing.multifd is not None and cs.outgoing.multifd.bytes_sent() > 16 * MiB,
                 what="channel traffic")
        if side == "source":
            victim = cs.outgoing.multifd.channels[1].sock
        else:
            wait_for(lambda: len(cd.incoming.multifd.channels) == 2, what="channels")
            victim = cd.incoming.multifd.channels[0].sock
        victim.shutdown(socket.SHUT_RDWR)
        assert cs.outgoing.wait(30) and cd.incoming.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "failed", info
        assert "multifd channel" in info["error-desc"] or "destination" in info["error-desc"], info
        assert src.runstate == "running"
        assert src.checksum() == before  # the source never writes guest memory
        assert cd.incoming.status == "failed" and dst.runstate == "inmigrate"
        assert "multifd channel" in cd.query_migrate()["error-desc"]
        # the device answers again and a new attempt goes through
        cs.params.set({"max-bandwidth": 0})
        start(cs, cd, "tcp", tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        assert cs.outgoing.status == "completed", cs.query_migrate()
        assert cd.incoming.status == "completed"
        assert src.checksum() == dst.checksum() == before
    finally:
        src.close()
        dst.close()


def test_zero_copy_send(tmp_path: Path) -> None:
    """MSG_ZEROCOPY over tcp completes; on unix sockets it is refused with a clear error."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        cs.migrate_set_capabilities([{"capability": "zero-copy-send", "state": True}])
        start(cs, cd, "unix", tmp_path)
        assert cs.outgoing.wait(30) and cs.outgoing.status == "failed"
        assert "zero-copy-send" in cs.query_migrate()["error-desc"]
        assert cd.incoming.wait(30) and cd.incoming.status == "failed"
        assert src.runstate == "running"
        start(cs, cd, "tcp", tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        assert cs.outgoing.status == "completed", cs.query_migrate()
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


def test_destination_without_multifd_fails_cleanly(tmp_path: Path) -> None:
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        cs.migrate_set_capabilities(MULTIFD)  # the destination does not expect channels
        start(cs, cd, "unix", tmp_path)
        assert cs.outgoing.wait(30) and cd.incoming.wait(30)
        assert cs.outgoing.status == "failed" and src.runstate == "running"
        assert cd.incoming.status == "failed" and dst.runstate == "inmigrate"
    finally:
        src.close()
        dst.close()


def test_channel_format_rejects_pages_outside_the_block() -> None:
    """A channel packet with a run beyond the block fails the load, naming the channel."""
    m = machine(True, dirty_rate=0)
    try:
        from livemig.migration.ram.load import RamLoader

        loader = RamLoader(m.blocks)
        rx = multifd.MultifdReceiver(loader)
        a, b = socket.socketpair()
        rx.count, rx.session = 1, b"x" * 16
        ch = multifd._RecvChannel(rx, 0, b)
        rx.channels[0] = ch
        ch.thread.start()
        rx.section_started()
        name = b"pc.ram"
        runs = np.array([[64 * MiB, 4096]], ">u8")
        a.sendall(multifd.PACKET.pack(multifd.KIND_PAGES, 0, 1, 0, 1) + bytes([len(name)]) + name
                  + runs.tobytes() + bytes(4096))
        ch.thread.join(10)
        assert rx.error is not None and "multifd channel 0" in rx.error and "outside" in rx.error
        a.close()
        rx.close()
    finally:
        m.close()


def test_multifd_over_tls(tmp_path: Path) -> None:
    """With tls-creds set, every channel is a TLS channel and the migration completes."""
    tls_certs = pytest.importorskip("livemig.migration.tls_certs")
    creds = tls_certs.write_creds(tmp_path / "creds", tls_certs.make_ca())
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
            c.params.set({"tls-creds": str(creds)})
        start(cs, cd, "tcp", tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        assert cs.outgoing.status == "completed", cs.query_migrate()
        assert cd.incoming.status == "completed", cd.query_migrate()
        kinds = {type(ch.sock).__name__ for ch in cs.outgoing.multifd.channels}
        kinds |= {type(ch.sock).__name__ for ch in cd.incoming.multifd.channels.values()}
        assert kinds == {"TLSChannel"}
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


def test_channel_dying_at_switchover_resumes_the_guest(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A channel lost while the guest is stopped for the switchover: the guest runs again."""
    real = multifd._SendChannel._send_sync
    stopped_at_failure: list[str] = []

    def failing_sync(self, rnd: int) -> None:  # noqa: ANN001
        if self.owner.round >= 2:  # the switchover's round (the first pass was round 1)
            stopped_at_failure.append(src.runstate)
            raise ConnectionResetError(104, "Connection reset by peer")
        real(self, rnd)

    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        before = src.checksum()
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        monkeypatch.setattr(multifd._SendChannel, "_send_sync", failing_sync)
        start(cs, cd, "unix", tmp_path)
        assert cs.outgoing.wait(30) and cd.incoming.wait(30)
        assert stopped_at_failure and stopped_at_failure[0] == "finish-migrate"
        info = cs.query_migrate()
        assert info["status"] == "failed" and "multifd channel" in info["error-desc"], info
        assert src.runstate == "running" and src.checksum() == before
        assert cd.incoming.status == "failed" and dst.runstate == "inmigrate"
    finally:
        src.close()
        dst.close()


def test_nonzero_pages_finds_any_nonzero_byte() -> None:
    rng = np.random.default_rng(7)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        rows = np.zeros((n, 4096), np.uint8)
        if trial % 3:  # zero stretches with a few pages that have one byte set anywhere
            for p in rng.choice(n, size=int(rng.integers(0, min(n, 3) + 1)), replace=False):
                rows[p, int(rng.choice([0, 7, 8, 9, 4095, int(rng.integers(0, 4096))]))] = 1
        else:  # data pages, some of them with a zero first word
            rows[:] = rng.integers(0, 256, rows.shape, dtype=np.uint8)
            rows[rng.random(n) < 0.5, :8] = 0
            rows[rng.random(n) < 0.3] = 0
        assert np.array_equal(multifd.nonzero_pages(rows), rows.any(axis=1)), trial


def test_pipe_splicer_moves_memory_to_a_file_without_clearing_it() -> None:
    """vmsplice + splice from one block's memory to another block's file, over a socket."""
    from livemig.memory.ram_block import RAMBlock
    from livemig.migration.ram import splice_io

    src, dst = RAMBlock("s", 8 * MiB), RAMBlock("d", 8 * MiB)
    a, b = socket.socketpair()
    try:
        data = np.random.default_rng(1).integers(0, 256, 3 * MiB + 4096, dtype=np.uint8)
        src.view[MiB : MiB + len(data)] = data.tobytes()
        tx, rx = splice_io.PipeSplicer(a), splice_io.PipeSplicer(b)
        import threading

        t = threading.Thread(target=tx.send_from_memory, args=(src.host + MiB, len(data)))
        t.start()
        got = rx.recv_to_file(dst.fd, 2 * MiB, len(data))
        t.join()
        assert got == len(data)
        assert bytes(dst.view[2 * MiB : 2 * MiB + len(data)]) == data.tobytes()
        assert dst.allocated_bytes() == len(data)  # only what was written exists
        a.shutdown(socket.SHUT_WR)
        assert rx.recv_to_file(dst.fd, 0, 4096) == 0  # end of stream: short count, no error
        tx.close()
        rx.close()
    finally:
        a.close()
        b.close()
        src.close()
        dst.close()


def test_multifd_default_data_path(tmp_path: Path, monkeypatch, pipes: list) -> None:  # noqa: ANN001
    """The default (LIVEMIG_SPLICE unset): sendmsg from guest RAM and recv_into it, populated
    ahead by the populate threads; no pipe on either side."""
    monkeypatch.delenv("LIVEMIG_SPLICE", raising=False)
    src, dst = machine(False, content="random"), machine(True, content="random")
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        for c in (cs, cd):
            c.migrate_set_capabilities(MULTIFD)
        start(cs, cd, "tcp", tmp_path)
        assert cs.outgoing.wait(60) and cd.incoming.wait(30)
        assert cs.query_migrate()["status"] == "completed"
        assert src.checksum() == dst.checksum()
        assert pipes == []  # neither side used a pipe
    finally:
        src.close()
        dst.close()
