"""Background snapshots into mapped-ram files: ``background-snapshot`` + ``mapped-ram``.

Real userfaultfd write protection, real files, a guest that keeps writing. The main file:
a soft guest with 1 GiB plugged of an 8 GiB virtio-mem region, half of its pages zero,
snapshotted with 2 writer channels while its vCPUs write and while a plain Python thread
overwrites pages the walk has not reached. What the guest looked like *at the snapshot's
stop* is taken inside the stop (``BackgroundSnapshot.stopped_hooks``). The file is
sparse, holds exactly the non-zero pages of the stop (the ones saved at write faults at
their own offsets too), restores with 1 and 2 channels and instantly, and ``livemig
inspect --check-discard`` reads it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_mapped_ram import (
    METADATA,
    blocks_of,
    boot,
    caps,
    check_readers,
    machine,
    nonzero_bytes,
    restore,
    wait_for,
)

from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.machine import Machine
from livemig.memory import userfaultfd as uf
from livemig.memory.checksum import content_ranges
from livemig.migration.mapped_ram import files as mr_files
from livemig.migration.mapped_ram.layout import PAGE_SIZE, read_bitmap
from livemig.migration.snapshot.snapshot import BackgroundSnapshot

MiB, GiB = 1 << 20, 1 << 30

pytestmark = pytest.mark.skipif(
    not uf.supported_features() & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    reason="no userfaultfd write protection here",
)


class AtStop:
    """What the guest looked like inside the snapshot's stop (a ``stopped_hooks`` hook),
    and two pages of the last plugged megabytes — one with data, one zero — for a test
    thread to overwrite once protection is on."""

    def __init__(self, pick: bool = False) -> None:
        self.pick = pick
        self.checksum = ""
        self.data = 0  # bytes of non-zero pages
        self.runstate = ""
        self.pages: dict[str, int] = {}  # "data"/"zero" -> page index in vm0-memdev
        self.content: dict[str, bytes] = {}

    def __call__(self, mode: BackgroundSnapshot) -> None:
        m = mode.vm
        assert isinstance(m, Machine)
        self.checksum = m.checksum()
        self.data = nonzero_bytes(m)
        self.runstate = m.runstate
        if self.pick:
            assert m.vmem_mr is not None
            off, length = content_ranges(m.vmem_mr)[-1]
            first = (off + length) // PAGE_SIZE - 256  # the walk reaches these last
            rows = m.vmem_mr.block.pages_array(first * PAGE_SIZE, 256 * PAGE_SIZE)
            nz = np.bitwise_or.reduce(rows.view(np.uint64), axis=1) != 0
            for name, i in (("data", int(np.flatnonzero(nz)[0])), ("zero", int(np.flatnonzero(~nz)[0]))):
                self.pages[name] = first + i
                self.content[name] = rows[i].tobytes()


def hooked(monkeypatch: pytest.MonkeyPatch, pick: bool = False) -> AtStop:
    st = AtStop(pick)
    monkeypatch.setattr(BackgroundSnapshot, "stopped_hooks", (st,))
    return st


def snap(ctl: VMController) -> BackgroundSnapshot:
    assert ctl.outgoing is not None and isinstance(ctl.outgoing.mode, BackgroundSnapshot)
    return ctl.outgoing.mode


def snapshot_into(ctl: VMController, path: Path, channels: int = 2, direct: bool = False,
                  bandwidth: int = 0) -> None:
    """Start a background snapshot into a mapped-ram file (does not wait)."""
    caps(ctl, "background-snapshot", "mapped-ram", *(("multifd",) if channels > 1 else ()))
    ctl.migrate_set_parameters(multifd_channels=max(channels, 1), direct_io=direct, max_bandwidth=bandwidth)
    ctl.migrate(f"file:{path}")


@pytest.fixture(scope="module")
def snapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running soft guest, 1 GiB plugged of 8 GiB, half zero, snapshotted with 2 channels."""
    path = tmp_path_factory.mktemp("snapmr") / "vm.snap"
    src = machine(8 * GiB, dirty_rate=64 * MiB)
    try:
        with pytest.MonkeyPatch.context() as mp:
            at_stop = hooked(mp, pick=True)
            boot(src, 1 * GiB)
            cs = VMController(src)
            written0 = src.workload.pages_written
            snapshot_into(cs, path, bandwidth=256 * MiB)  # ~2 s of data: the guest writes meanwhile
            assert snap(cs).protected.wait(60)
            # a plain Python thread writes pages the walk reaches last: their old content
            # is saved at the fault and must land at their own offsets
            base = src.vmem_mr.addr
            for name, fill in (("data", 0x5A), ("zero", 0x77)):
                src.accel.write(base + at_stop.pages[name] * PAGE_SIZE, bytes([fill]) * PAGE_SIZE)
            assert cs.outgoing.wait(120)
            info = cs.query_migrate()
            assert info["status"] == "completed", info
            yield {
                "path": path, "info": info, "at_stop": at_stop, "end_checksum": src.checksum(),
                "guest_writes": src.workload.pages_written - written0, "runstate": src.runstate,
                "unplugged-alloc": src.vmem_mr.block.allocated_in_runs(
                    *src.vmem.run_arrays(src.vmem_mr.whole(), False)),
            }
    finally:
        src.close()


def test_snapshot_file_is_sparse_and_holds_the_stop(snapped: dict[str, Any]) -> None:
    path, info, at_stop = snapped["path"], snapped["info"], snapped["at_stop"]
    ram = info["ram"]
    assert snapped["runstate"] == "running" and at_stop.runstate == "paused"
    # the guest kept writing, and the pages it overwrote were saved at write faults first
    assert snapped["guest_writes"] > 1000
    assert ram["write-faults"] > 10 and ram["write-fault-pages"] > 500
    assert snapped["end_checksum"] != at_stop.checksum
    # only the non-zero pages of the stop were written; nothing unplugged was read
    assert ram["normal"] * PAGE_SIZE == at_stop.data
    assert ram["discarded-skipped-bytes"] == 7 * GiB
    assert snapped["unplugged-alloc"] == 0
    st = os.stat(path)
    assert st.st_size > 8 * GiB  # every page has its place ...
    assert at_stop.data <= st.st_blocks * 512 <= at_stop.data + METADATA, (st.st_blocks * 512, at_stop.data)


def test_pages_saved_at_write_faults_are_at_their_offsets(snapped: dict[str, Any]) -> None:
    """The test thread overwrote a data page and a zero page after protection started:
    the file holds the data page's old content at its offset and no bit for the zero one."""
    path, at_stop = snapped["path"], snapped["at_stop"]
    lay = dict((lay.idstr, lay) for _, lay in blocks_of(path))["vm0-memdev"]
    fd = os.open(path, os.O_RDONLY)
    try:
        present = read_bitmap(fd, lay)
        data, zero = at_stop.pages["data"], at_stop.pages["zero"]
        assert present.test_indices(np.array([data, zero])).tolist() == [True, False]
        assert os.pread(fd, PAGE_SIZE, lay.page_offset(data)) == at_stop.content["data"] != b"\x5a" * PAGE_SIZE
        assert at_stop.content["zero"] == bytes(PAGE_SIZE)
        assert os.lseek(fd, lay.page_offset(zero), os.SEEK_DATA) != lay.page_offset(zero)  # a hole
    finally:
        os.close(fd)


@pytest.mark.parametrize("channels", [1, 2])
def test_snapshot_restores_with_channels(snapped: dict[str, Any], channels: int) -> None:
    m, ctl = restore(8 * GiB, snapped["path"], channels=channels)
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(120)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        assert m.checksum() == snapped["at_stop"].checksum
        assert info["ram"]["unplugged-pages-received"] == 0
        alloc = {b["id"]: b for b in ctl.x_query_ram_allocation()}
        assert alloc["vm0-memdev"]["allocated-discarded"] == 0
    finally:
        m.close()


def test_snapshot_restores_instantly(snapped: dict[str, Any]) -> None:
    m, ctl = restore(8 * GiB, snapped["path"], "mapped-ram", "postcopy-ram")
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(120)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        assert info["ram"]["restore-pages-total"] * PAGE_SIZE == snapped["at_stop"].data
        assert m.checksum() == snapped["at_stop"].checksum
    finally:
        m.close()


def test_inspect_reads_the_snapshot_file(snapped: dict[str, Any]) -> None:
    check_readers(snapped["path"], snapped["at_stop"].data)


def threads_of(pid: int) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out.append(f.read().strip())
        except FileNotFoundError:
            pass
    return out


def descriptors_of(pid: int) -> list[tuple[str, int]]:
    """(what it refers to, open flags) of each descriptor of process ``pid``."""
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
            with open(f"/proc/{pid}/fdinfo/{n}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except FileNotFoundError:
            continue
        out.append((target, flags))
    return out


def test_direct_io_snapshot_with_writer_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``direct-io``: the writer's channels write page-aligned buffers with O_DIRECT. The
    channels are threads of the writer process, on descriptors the VM process opened."""
    at_stop = hooked(monkeypatch)
    path = tmp_path / "direct.snap"
    src = machine(256 * MiB, dirty_rate=32 * MiB)
    try:
        boot(src, 64 * MiB)
        cs = VMController(src)
        snapshot_into(cs, path, channels=3, direct=True, bandwidth=32 * MiB)  # about 1 s
        assert snap(cs).protected.wait(60)
        pid = snap(cs).writer_pid
        files = [flags for target, flags in descriptors_of(pid) if target == str(path)]
        assert len(files) == 1 + 3, files  # the stream, and one per channel ...
        assert sum(bool(flags & os.O_DIRECT) for flags in files) == 3  # ... which write O_DIRECT
        # this process handed its copies over: it keeps only the migration's own descriptor
        assert [t for t, _ in descriptors_of(os.getpid())].count(str(path)) == 1
        # threads of the writer: its main thread, the fault thread and the three channels
        assert len(threads_of(pid)) == 2 + 3, threads_of(pid)
        assert cs.outgoing.wait(60)
        info = cs.query_migrate()
        assert info["status"] == "completed", info
        assert info["ram"]["write-faults"] > 0
    finally:
        src.close()
    m, ctl = restore(256 * MiB, path, channels=2, direct=True)
    try:
        assert ctl.incoming.wait(60) and ctl.query_migrate()["status"] == "completed"
        assert m.checksum() == at_stop.checksum
    finally:
        m.close()


def test_direct_io_refused_where_the_file_system_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM process opens the writer's descriptors: a file system without O_DIRECT fails
    the snapshot with one clear line before the guest is stopped or a writer started."""
    real_open = os.open

    def no_direct(p: Any, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(mr_files.os, "open", no_direct)
    at_stop = hooked(monkeypatch)
    src = machine(256 * MiB, dirty_rate=16 * MiB)
    try:
        boot(src, 16 * MiB)
        cs = VMController(src)
        snapshot_into(cs, tmp_path / "x.snap", direct=True)
        assert cs.outgoing.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "failed", info
        assert info["error-desc"].startswith("direct-io: the file system of") and "O_DIRECT" in info["error-desc"]
        assert snap(cs).writer is None and at_stop.runstate == ""  # nothing started, never stopped
        assert src.runstate == "running"
    finally:
        src.close()


def test_capabilities(tmp_path: Path) -> None:
    """multifd goes with background-snapshot only together with mapped-ram (the writer's
    channels); a mapped-ram snapshot needs a file."""
    m = machine(256 * MiB)
    try:
        ctl = VMController(m)
        with pytest.raises(QMPError, match="^Background-snapshot is not compatible with multifd$"):
            caps(ctl, "background-snapshot", "multifd")
        caps(ctl, "background-snapshot", "multifd", "mapped-ram")
        with pytest.raises(QMPError, match="^Background-snapshot is not compatible with multifd$"):
            ctl.migrate_set_capabilities([{"capability": "mapped-ram", "state": False}])
        with pytest.raises(QMPError, match="mapped-ram needs a file: migration URI"):
            ctl.migrate(f"unix:{tmp_path / 'x.sock'}")
    finally:
        m.close()


def test_writer_death_releases_the_guest(tmp_path: Path) -> None:
    """A mapped-ram writer killed mid-snapshot (its channel threads with it): the guest
    writes on, and a later snapshot completes."""
    src = machine(256 * MiB, dirty_rate=32 * MiB)
    try:
        boot(src, 128 * MiB)
        cs = VMController(src)
        snapshot_into(cs, tmp_path / "killed.snap", bandwidth=16 * MiB)
        wait_for(lambda: snap(cs).protected.is_set() and snap(cs).stats["normal"] > 1000, what="writing")
        pid = snap(cs).writer_pid
        os.kill(pid, signal.SIGKILL)
        assert cs.outgoing.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "failed" and "snapshot writer died (signal 9)" in info["error-desc"], info
        goal = src.workload.pages_written + 2000
        wait_for(lambda: src.workload.pages_written > goal, what="the guest writing on")
        src.accel.write(src.vmem_mr.addr, b"\x42" * PAGE_SIZE)  # this thread too
        snapshot_into(cs, tmp_path / "after.snap")
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
    finally:
        src.close()


def test_snapshot_of_a_kvm_guest_into_a_mapped_ram_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest program writes inside KVM_RUN during the snapshot; the file restores with
    mapped-ram and instantly (the vCPU runs at once and its accesses fault in pages)."""
    from livemig.accel.kvm import guest_program as gp
    from livemig.accel.kvm import kvm_available

    if (why := kvm_available()) is not None:
        pytest.skip(f"KVM not usable here ({why})")
    at_stop = hooked(monkeypatch)
    path = tmp_path / "kvm.snap"
    src = machine(128 * MiB, dirty_rate=-1, accel="kvm")
    try:
        boot(src, 48 * MiB)
        hb0 = gp.read_heartbeat(src.ram.block)
        wait_for(lambda: gp.read_heartbeat(src.ram.block) >= hb0 + 2, 60, "guest passes")
        cs = VMController(src)
        snapshot_into(cs, path, bandwidth=64 * MiB)
        assert cs.outgoing.wait(60)
        info = cs.query_migrate()
        assert info["status"] == "completed", info
        assert info["ram"]["write-faults"] > 0
        assert src.checksum() != at_stop.checksum
        table = src.workload.table
    finally:
        src.close()
    m, ctl = restore(128 * MiB, path, channels=2, accel="kvm")
    try:
        assert ctl.incoming.wait(60) and ctl.query_migrate()["status"] == "completed"
        assert m.checksum() == at_stop.checksum
    finally:
        m.close()
    m, ctl = restore(128 * MiB, path, "mapped-ram", "postcopy-ram", autostart=True, dirty_rate=-1, accel="kvm")
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(60)
        assert ctl.query_migrate()["status"] == "completed"
        hb = gp.read_heartbeat(m.ram.block)
        wait_for(lambda: gp.read_heartbeat(m.ram.block) >= hb + 2, 60, "passes on the restored guest")
        m.stop()
        assert m.workload.table == table
        check = gp.check_pages(m.memory, m.workload.table, gp.read_heartbeat(m.ram.block),
                               table_since=m.workload.table_since)  # fmt: skip
        assert check.ok, check
    finally:
        m.close()
