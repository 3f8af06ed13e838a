"""mapped-ram files: QEMU 9's layout, sparse, written and read by parallel channels, and
restored at once (instant restore) — with real memory, real files, real userfaultfd.

The main file: a guest with 1 GiB plugged of an 8 GiB virtio-mem region, half of its
pages zero, saved stopped with 2 channels. Its allocated blocks are at most the non-zero
plugged data plus metadata; restoring it with 1, 2 and 4 channels, and instantly, gives
the guest's checksum; damaged copies of a small file fail with a clear error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import waiter

from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.memory.checksum import content_ranges
from livemig.migration.mapped_ram import files as mr_files
from livemig.migration.mapped_ram.layout import HEADER, PAGE_SIZE, BlockFileLayout, read_bitmap
from livemig.migration.ram.codec import read_block_list
from livemig.migration.stream import savevm
from livemig.migration.stream.format import RamFlag, SectionType
from livemig.migration.stream.qemu_file import open_reader

MiB, GiB = 1 << 20, 1 << 30
METADATA = 1 * MiB  # bitmaps (256 KiB for 8 GiB), headers, device state, VMDESCRIPTION


wait_for = waiter(60.0)


def machine(region: int, incoming: bool = False, dirty_rate: int = 0, accel: str = "soft") -> Machine:
    return Machine(
        MachineConfig(
            memory=64 * MiB,
            accel=accel,
            virtio_mem=VirtioMemConfig(size=region, block_size=2 * MiB),
            incoming=incoming,
            workload=WorkloadConfig(vcpus=1 if accel == "kvm" else 2, dirty_rate=dirty_rate, content="mixed"),
        )
    )


def boot(m: Machine, plugged: int) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(plugged)
    wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(), 120, "plug and fill")


def caps(ctl: VMController, *names: str) -> None:
    ctl.migrate_set_capabilities([{"capability": n, "state": True} for n in names])


def open_files() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def nonzero_bytes(m: Machine) -> int:
    """Bytes of non-zero pages in memory with defined content (plugged, base RAM)."""
    n = 0
    for mr in m.memory.regions:
        for off, length in content_ranges(mr):
            for s, e in mr.block.data_extents(off, length):
                rows = mr.block.pages_array(s, e - s).view(np.uint64)
                n += int(np.count_nonzero(np.bitwise_or.reduce(rows, axis=1)))
    return n * PAGE_SIZE


def save(m: Machine, path: Path, channels: int = 2, direct: bool = False, live: bool = False) -> dict[str, Any]:
    ctl = VMController(m)
    caps(ctl, "mapped-ram", "multifd")
    ctl.migrate_set_parameters(multifd_channels=channels, direct_io=direct)
    if not live:
        ctl.stop()
    ctl.migrate(f"file:{path}")
    assert ctl.outgoing is not None and ctl.outgoing.wait(120)
    info = ctl.query_migrate()
    assert info["status"] == "completed", info
    return info


def restore(region: int, path: Path, *names: str, channels: int = 1, autostart: bool = False,
            direct: bool = False, dirty_rate: int = 0, accel: str = "soft") -> tuple[Machine, VMController]:
    m = machine(region, incoming=True, dirty_rate=dirty_rate, accel=accel)
    ctl = VMController(m, autostart=autostart)
    caps(ctl, *(names or ("mapped-ram", "multifd")))
    ctl.migrate_set_parameters(multifd_channels=channels, direct_io=direct)
    ctl.migrate_incoming(f"file:{path}")
    return m, ctl


def blocks_of(path: Path) -> list[tuple[int, BlockFileLayout]]:
    """(header offset, layout) of every block, read the way QEMU's loader does."""
    out: list[tuple[int, BlockFileLayout]] = []
    with open_reader(path) as r:
        savevm.read_header(r)
        savevm.read_section_header(r)
        savevm.read_configuration(r)
        hdr = savevm.read_section_header(r)
        assert hdr.idstr == "ram"

        def entry(r: Any, e: Any) -> None:
            off = r.tell()
            _, _, bitmap, pages = HEADER.unpack(r.read_exact(HEADER.size))
            lay = BlockFileLayout(e.name, e.length, bitmap, pages)
            out.append((off, lay))
            r.seek(lay.end)

        read_block_list(r, after_entry=entry)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """1 GiB plugged of 8 GiB, half zero, saved with mapped-ram and 2 channels."""
    path = tmp_path_factory.mktemp("mr") / "vm.mapped"
    m = machine(8 * GiB)
    try:
        boot(m, 1 * GiB)
        info = save(m, path)
        yield {
            "path": path,
            "info": info,
            "checksum": m.checksum(),
            "data": nonzero_bytes(m),
            "unplugged-alloc": m.vmem_mr.block.allocated_in_runs(*m.vmem.run_arrays(m.vmem_mr.whole(), False)),
            "pages": {b.idstr: b.pages_array(0, b.used_length)[:4096].copy() for b in m.memory.blocks},
        }
    finally:
        m.close()


def test_file_is_sparse_and_holds_only_data(saved: dict[str, Any]) -> None:
    path, info = saved["path"], saved["info"]
    st = os.stat(path)
    data = saved["data"]
    assert st.st_size > 8 * GiB  # every page has its place ...
    assert data <= st.st_blocks * 512 <= data + METADATA, (st.st_blocks * 512, data)  # ... few are used
    ram = info["ram"]
    assert ram["normal"] * PAGE_SIZE == data  # only non-zero pages were written
    assert ram["discarded-skipped-bytes"] == 7 * GiB
    assert saved["unplugged-alloc"] == 0  # nothing unplugged was read on the source
    # pages sit at their own offsets, and the bitmap says which are there
    fd = os.open(path, os.O_RDONLY)
    try:
        present = 0
        for _, lay in blocks_of(path):
            assert lay.pages_offset % (1 << 20) == 0
            bm = read_bitmap(fd, lay)
            present += bm.count()
            mine = saved["pages"][lay.idstr]
            idx = np.flatnonzero(bm.test_indices(np.arange(len(mine))))
            file_pages = np.stack([np.frombuffer(os.pread(fd, PAGE_SIZE, lay.page_offset(int(i))), np.uint8) for i in idx[:64]])
            assert np.array_equal(file_pages, mine[idx[:64]])
            zero = np.setdiff1d(np.arange(len(mine)), idx)
            assert not mine[zero].any()  # a clear bit is a zero page
        assert present * PAGE_SIZE == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_restore_with_channels(saved: dict[str, Any], channels: int) -> None:
    m, ctl = restore(8 * GiB, saved["path"], channels=channels)
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(120)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        assert m.runstate == "paused"
        assert m.checksum() == saved["checksum"]
        assert info["ram"]["normal"] * PAGE_SIZE == saved["data"]
        assert info["ram"]["unplugged-pages-received"] == 0
        assert info["ram"]["unplugged-bytes-populated"] == 0
        alloc = {b["id"]: b for b in ctl.x_query_ram_allocation()}
        assert alloc["vm0-memdev"]["allocated-discarded"] == 0
        assert alloc["vm0-memdev"]["allocated"] <= 1 * GiB
    finally:
        m.close()


def test_instant_restore(saved: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "copy.mapped"
    subprocess.run(["cp", "--sparse=always", str(saved["path"]), str(copy)], check=True)
    m, ctl = restore(8 * GiB, copy, "mapped-ram", "postcopy-ram")
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(120)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        ram = info["ram"]
        assert ram["restore-pages-copied"] == ram["restore-pages-total"] == saved["data"] // PAGE_SIZE
        assert ram["restore-guest-running-ms"] < info["total-time"]
        assert m.runstate == "paused"
        # the copy is complete: the file is not needed (nobody holds it) and can go
        assert str(copy) not in open_files()
        copy.unlink()
        assert m.checksum() == saved["checksum"]
        alloc = {b["id"]: b for b in ctl.x_query_ram_allocation()}
        assert alloc["vm0-memdev"]["allocated-discarded"] == 0  # unplugged: never mapped in
        assert alloc["vm0-memdev"]["allocated"] <= 1 * GiB
    finally:
        m.close()


def test_instant_restore_runs_the_guest_before_its_memory_is_in(tmp_path: Path) -> None:
    """A guest that runs (and writes) while its memory still comes in."""
    path = tmp_path / "small.mapped"
    src = machine(1 * GiB)
    try:
        boot(src, 256 * MiB)
        save(src, path)
        want = src.checksum()
    finally:
        src.close()
    m, ctl = restore(1 * GiB, path, "mapped-ram", "postcopy-ram", autostart=True, dirty_rate=64 * MiB)
    try:
        wait_for(lambda: m.runstate == "running", 30, "the guest running")
        assert ctl.incoming is not None and ctl.incoming.wait(120)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        assert info["ram"]["restore-faults"] > 0  # the guest touched memory before it was in
        written = m.workload.pages_written
        wait_for(lambda: m.workload.pages_written > written, 30, "the guest writing")
        m.stop()
        assert m.accel.discarded_writes == 0
    finally:
        m.close()
    # and the same file restores to the saved guest exactly when it is not running
    m, ctl = restore(1 * GiB, path, "mapped-ram", "postcopy-ram")
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(60)
        assert m.checksum() == want
    finally:
        m.close()


@pytest.mark.parametrize("direct", [False, True])
def test_live_save_rewrites_pages_in_place(tmp_path: Path, direct: bool) -> None:
    """A running guest: re-dirtied pages go to the same place; pages that became zero
    leave a hole again; the restored guest is the source as it stopped. With direct-io:
    later passes take scattered pages, gathered into page-aligned buffers for O_DIRECT
    (a guest that dirties less: writes that bypass the page cache are slower here)."""
    path = tmp_path / "live.mapped"
    src = machine(1 * GiB, dirty_rate=(16 if direct else 256) * MiB)
    try:
        boot(src, 128 * MiB)
        info = save(src, path, live=True, direct=direct)
        assert info["ram"]["dirty-sync-count"] >= 2
        want = src.checksum()
        data = nonzero_bytes(src)
    finally:
        src.close()
    assert os.stat(path).st_blocks * 512 <= data + METADATA
    m, ctl = restore(1 * GiB, path, channels=2)
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(60)
        assert ctl.query_migrate()["status"] == "completed"
        assert m.checksum() == want
    finally:
        m.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("mrs") / "small.mapped"
    m = machine(256 * MiB)
    try:
        boot(m, 64 * MiB)
        save(m, path)
    finally:
        m.close()
    yield path


def damaged(small: Path, tmp: Path, how: str) -> Path:
    path = tmp / f"{how}.mapped"
    subprocess.run(["cp", "--sparse=always", str(small), str(path)], check=True)
    (h0, lay0), (h1, lay1) = blocks_of(path)
    with open(path, "r+b") as f:
        if how == "version":
            f.seek(h0)
            f.write((2).to_bytes(4, "big"))
        elif how == "page-size":
            f.seek(h1 + 4)
            f.write((8192).to_bytes(8, "big"))
        elif how == "alignment":
            f.seek(h0 + 20)
            f.write((lay0.pages_offset + 512).to_bytes(8, "big"))
        elif how == "bitmap-offset":
            f.seek(h1 + 12)
            f.write((lay1.pages_offset + 4096).to_bytes(8, "big"))
        elif how == "truncated-pages":
            f.truncate(lay1.pages_offset + 16 * MiB)
        elif how == "truncated-end":
            f.truncate(lay1.end + 100)
    return path


DAMAGE = {
    "version": "mapped-ram capability version not supported (expected <= 1, got 2)",
    "page-size": "mapped-ram block vm0-memdev: page size 8192",
    "alignment": "Error reading ramblock pc.ram pages, region has bad alignment",
    "bitmap-offset": "mapped-ram block vm0-memdev: bitmap at",
    "truncated-pages": "the file is truncated",
    "truncated-end": "truncated",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_files_fail_clearly(small: Path, tmp_path: Path, how: str) -> None:
    path = damaged(small, tmp_path, how)
    for names in (("mapped-ram",), ("mapped-ram", "postcopy-ram")):
        m, ctl = restore(256 * MiB, path, *names)
        try:
            assert ctl.incoming is not None and ctl.incoming.wait(30)
            info = ctl.query_migrate()
            assert info["status"] == "failed", info
            assert DAMAGE[how] in info["error-desc"], info["error-desc"]
            assert m.runstate == "inmigrate"  # no half-loaded guest runs
        finally:
            m.close()
    out = subprocess.run([sys.executable, "-m", "livemig", "inspect", str(path)], capture_output=True, text=True)
    assert out.returncode == 2, out
    assert DAMAGE[how] in out.stderr + out.stdout


def test_capabilities_must_match(small: Path, tmp_path: Path) -> None:
    m, ctl = restore(256 * MiB, small, "multifd")
    try:
        assert ctl.incoming.wait(30)
        assert "Capability mapped-ram is off, but received capability is on" in ctl.query_migrate()["error-desc"]
    finally:
        m.close()
    plain = tmp_path / "plain.stream"
    src = machine(256 * MiB)
    try:
        boot(src, 16 * MiB)
        ctl = VMController(src)
        ctl.migrate(f"file:{plain}")
        assert ctl.outgoing.wait(60)
    finally:
        src.close()
    m, ctl = restore(256 * MiB, plain, "mapped-ram")
    try:
        assert ctl.incoming.wait(30)
        assert "Capability mapped-ram is on, but received capability is off" in ctl.query_migrate()["error-desc"]
    finally:
        m.close()


def test_inspect_and_an_analyze_migration_walk(saved: dict[str, Any]) -> None:
    check_readers(saved["path"], saved["data"])


def check_readers(path: Path, data: int) -> None:
    """``livemig inspect`` and an analyze-migration.py-style walk read a mapped-ram file
    holding ``data`` bytes of non-zero pages."""
    out = subprocess.run([sys.executable, "-m", "livemig", "inspect", "--json", "--check-discard", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert "mapped-ram" in rep["configuration"]["capabilities"]
    assert rep["complete"] and rep["check_discard"]["ok"]
    assert rep["ram"]["normal"] * PAGE_SIZE == data  # present pages, from the bitmaps
    assert rep["ram"]["zero"] == 0  # no page records at all: the pages are at their offsets
    walk_like_analyze_migration(path)


def walk_like_analyze_migration(path: Path) -> None:
    """Read the file the way QEMU's scripts/analyze-migration.py does for mapped-ram: the
    configuration's capabilities, each block's header (version 1, the page size of the
    VMDESCRIPTION), a seek to ``pages_offset + length``; then the rest of the stream by
    section framing, up to the VMDESCRIPTION record found from the end of the file."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (10 << 20)))
        tail = f.read()
    jpos = tail.find(b"{", tail.rfind(b"\0"))
    assert tail[jpos - 5] == SectionType.VMDESCRIPTION
    desc = json.loads(tail[jpos : jpos + int.from_bytes(tail[jpos - 4 : jpos], "big")])
    page_size = desc["page_size"]
    vmdesc_at = size - len(tail) + jpos - 5
    with open_reader(path) as r:
        savevm.read_header(r)
        assert savevm.read_section_header(r).type == SectionType.CONFIGURATION
        assert "mapped-ram" in savevm.read_configuration(r)["capabilities"]
        while True:
            hdr = savevm.read_section_header(r)
            if hdr.type == SectionType.EOF:
                break
            if hdr.type in (SectionType.START, SectionType.PART, SectionType.END) and (hdr.idstr in (None, "ram")):
                while True:
                    v = r.get_be64()
                    flags = v & (page_size - 1)
                    if flags & RamFlag.MEM_SIZE:
                        total = v & ~(page_size - 1)
                        while total:
                            r.read_exact(r.get_u8())
                            length = r.get_be64()
                            total -= length
                            version, ps, _bitmap, pages = HEADER.unpack(r.read_exact(HEADER.size))
                            assert version == 1 and ps == page_size
                            r.seek(pages + length)
                    assert not flags & (RamFlag.PAGE | RamFlag.ZERO)  # no page records at all
                    if flags & RamFlag.EOS:
                        break
            else:
                step_vmsd(r, next(d for d in desc["devices"] if d["name"] == hdr.idstr))
            savevm.check_footer(r, hdr.section_id)
        assert r.tell() == vmdesc_at


def step_vmsd(r: Any, d: dict[str, Any]) -> None:
    """Step over a vmstate by the sizes and subsections its VMDESCRIPTION entry declares."""
    for f in d["fields"]:
        if f["type"] == "struct":
            step_vmsd(r, f["struct"])
        elif f["type"] == "capability":
            r.read_exact(r.get_u8())
        else:
            r.read_exact(f["size"])
    for sub in d.get("subsections", []):
        assert r.get_u8() == SectionType.SUBSECTION
        assert r.read_exact(r.get_u8()).decode() == sub["vmsd_name"]
        r.get_be32()
        step_vmsd(r, sub)


def test_direct_io_save_and_restore(tmp_path: Path) -> None:
    path = tmp_path / "direct.mapped"
    src = machine(256 * MiB)
    try:
        boot(src, 64 * MiB)
        save(src, path, direct=True)
        want = src.checksum()
    finally:
        src.close()
    m, ctl = restore(256 * MiB, path, channels=2, direct=True)
    try:
        assert ctl.incoming.wait(60) and ctl.query_migrate()["status"] == "completed"
        assert m.checksum() == want
    finally:
        m.close()


def test_direct_io_refused_where_the_file_system_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(mr_files.os, "open", no_direct)
    src = machine(256 * MiB)
    try:
        boot(src, 16 * MiB)
        ctl = VMController(src)
        caps(ctl, "mapped-ram")
        ctl.migrate_set_parameters(direct_io=True)
        ctl.migrate(f"file:{tmp_path / 'x.mapped'}")
        assert ctl.outgoing.wait(30)
        info = ctl.query_migrate()
        assert info["status"] == "failed"
        assert "direct-io: the file system of" in info["error-desc"] and "O_DIRECT" in info["error-desc"]
        assert src.runstate == "running"
    finally:
        src.close()


def test_refusals(tmp_path: Path) -> None:
    src = machine(256 * MiB)
    try:
        src.start()
        ctl = VMController(src)
        ctl.migrate_set_parameters(direct_io=True)
        with pytest.raises(QMPError, match="direct-io needs the mapped-ram capability"):
            ctl.migrate(f"file:{tmp_path / 'a'}")
        ctl.migrate_set_parameters(direct_io=False)
        caps(ctl, "mapped-ram")
        with pytest.raises(QMPError, match="mapped-ram needs a file: migration URI"):
            ctl.migrate("tcp:127.0.0.1:1")
        caps(ctl, "postcopy-ram")
        with pytest.raises(QMPError, match="incompatible with postcopy|Postcopy needs a socket"):
            ctl.migrate(f"file:{tmp_path / 'a'}")
        with pytest.raises(QMPError, match="does not accept value"):
            ctl.migrate_set_parameters(mode="fast")
    finally:
        src.close()


def test_file_can_be_copied_sparse(saved: dict[str, Any], tmp_path: Path) -> None:
    """What users do with snapshot files: copy them without filling the holes."""
    if shutil.which("cp") is None:
        pytest.skip("no cp")
    copy = tmp_path / "c.mapped"
    subprocess.run(["cp", "--sparse=always", str(saved["path"]), str(copy)], check=True)
    assert os.stat(copy).st_blocks * 512 <= saved["data"] + METADATA


def test_instant_restore_faults_bring_the_right_pages(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest memory read while the background reader is held back: every page comes
    through the fault handler, from the file, and is what was saved."""
    import threading

    from livemig.migration.mapped_ram.restore import InstantRestore

    gate = threading.Event()
    copy_all = InstantRestore._copy_all

    def held(self: InstantRestore) -> None:
        gate.wait(60)
        copy_all(self)

    monkeypatch.setattr(InstantRestore, "_copy_all", held)
    want = restore_checksum(small)
    m, ctl = restore(256 * MiB, small, "mapped-ram", "postcopy-ram")
    try:
        wait_for(lambda: ctl.query_migrate()["status"] == "postcopy-active", 30, "the guest started")
        check_restore_handler(ctl, small)
        # a page not yet in is a hole of the memfd: a checksum, which reads only data
        # extents, would see zeros; read every page with defined content (GIL-free: the
        # faults are served by the handler process) and then compare
        touch_all(m)
        assert m.checksum() == want  # all through faults: the background has not copied a page
        with pytest.raises(QMPError, match="incoming migration"):
            ctl.migrate(f"file:{small}.out")  # not while memory is still coming in
        ram = ctl.query_migrate()["ram"]
        assert ram["restore-pages-copied"] == 0 and ram["restore-fault-pages"] > 0
        gate.set()
        assert ctl.incoming.wait(60) and ctl.query_migrate()["status"] == "completed"
        assert m.checksum() == want
        alloc = {b["id"]: b for b in ctl.x_query_ram_allocation()}
        assert alloc["vm0-memdev"]["allocated-discarded"] == 0
    finally:
        gate.set()
        m.close()


def check_restore_handler(ctl: VMController, path: Path) -> None:
    """issue 17: the fault handler is a fork of the one-threaded helper launcher, not of
    this multi-threaded process, and holds the userfaultfd, the file and its control
    socket — none of the guest's memfds, no other socket."""
    from livemig.migration.core.helpers import launcher

    handler = ctl.incoming.postcopy.handler
    assert handler is not None
    with open(f"/proc/{handler.pid}/status") as f:
        assert f"PPid:\t{launcher().pid}" in f.read().splitlines() and launcher().pid != os.getpid()
    with open(f"/proc/{launcher().pid}/status") as f:
        assert "Threads:\t1" in f.read().splitlines()
    fds = {int(n): os.readlink(f"/proc/{handler.pid}/fd/{n}") for n in os.listdir(f"/proc/{handler.pid}/fd")}
    assert len(fds) == 3 + 3, fds
    assert sorted(t.split("[")[0] for fd, t in fds.items() if fd > 2) == sorted(
        [str(path), "anon_inode:", "socket:"]), fds


def touch_all(m: Machine) -> None:
    from livemig.memory import hostmem

    buf = np.empty(16 << 20, np.uint8)
    for mr in m.memory.regions:
        for off, length in content_ranges(mr):
            for s in range(off, off + length, len(buf)):
                n = min(len(buf), off + length - s)
                hostmem.memmove(buf.ctypes.data, mr.block.host + s, n)


def restore_checksum(path: Path) -> str:
    m, ctl = restore(256 * MiB, path, channels=2)
    try:
        assert ctl.incoming.wait(60) and ctl.query_migrate()["status"] == "completed"
        return m.checksum()
    finally:
        m.close()


def test_instant_restore_of_a_kvm_guest(tmp_path: Path) -> None:
    """A KVM vCPU runs at once on a restored VM: its own accesses fault (inside KVM_RUN)
    and are served from the file; the guest program's page check passes afterwards."""
    from livemig.accel.kvm import kvm_available

    why = kvm_available()
    if why is not None:
        pytest.skip(f"KVM not usable here ({why})")
    from livemig.accel.kvm import guest_program as gp

    path = tmp_path / "kvm.mapped"
    src = machine(128 * MiB, dirty_rate=-1, accel="kvm")
    try:
        boot(src, 48 * MiB)
        hb0 = gp.read_heartbeat(src.ram.block)
        wait_for(lambda: gp.read_heartbeat(src.ram.block) >= hb0 + 2, 60, "guest passes")
        save(src, path)
        hb = gp.read_heartbeat(src.ram.block)
        table = src.workload.table
    finally:
        src.close()
    m, ctl = restore(128 * MiB, path, "mapped-ram", "postcopy-ram", autostart=True, dirty_rate=-1, accel="kvm")
    try:
        assert ctl.incoming is not None and ctl.incoming.wait(60)
        info = ctl.query_migrate()
        assert info["status"] == "completed", info
        wait_for(lambda: gp.read_heartbeat(m.ram.block) >= hb + 3, 60, "passes on the restored guest")
        m.stop()
        assert m.workload.table == table
        check = gp.check_pages(m.memory, m.workload.table, gp.read_heartbeat(m.ram.block),
                               table_since=m.workload.table_since)  # fmt: skip
        assert check.ok, check
        assert m.accel.discarded_writes == 0
    finally:
        m.close()
