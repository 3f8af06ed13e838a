"""Machines on the KVM accelerator: KVM's dirty log at migration setup, unplug, precopy.

Each machine runs the guest program (``guest_program``) on a real vCPU. The guest agent
keeps its target table equal to base RAM plus the plugged virtio-mem blocks, so the guest
writes every usable page once per pass and the pages always tell which pass wrote them:
``check_pages`` can then verify a migrated copy page by page. Memory is kept small (64 MiB
of base RAM, a 128 MiB virtio-mem region below 4 GiB) so a pass takes tens of ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.accel.kvm import kvm_available

_why = kvm_available()
if _why is not None:
    pytest.skip(f"KVM not usable here ({_why})", allow_module_level=True)

from waiting import waiter  # noqa: E402

from livemig.accel.kvm import guest_program as gp  # noqa: E402
from livemig.accel.kvm.accel import GENERAL_REGS, KvmLayoutError  # noqa: E402
from livemig.control.vm_controller import VMController  # noqa: E402
from livemig.guest.workload import WorkloadConfig  # noqa: E402
from livemig.machine import Machine, MachineConfig, VirtioMemConfig  # noqa: E402
from livemig.memory.ram_block import RAMBlock  # noqa: E402
from livemig.migration.ram.sender import StreamSink, send_pass  # noqa: E402
from livemig.migration.ram.state import RamState  # noqa: E402
from livemig.migration.stream.qemu_file import BytesWriter  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096
BLOCK = 2 * MiB
REGION = 128 * MiB


def kvm_machine(incoming: bool = False, dirty_rate: int = -1, **wl: int) -> Machine:
    return Machine(
        MachineConfig(
            memory=64 * MiB,
            accel="kvm",
            virtio_mem=VirtioMemConfig(size=REGION, block_size=BLOCK),
            incoming=incoming,
            workload=WorkloadConfig(dirty_rate=dirty_rate, **wl),
        )
    )


wait_for = waiter(30.0, step=0.005)


def heartbeat(m: Machine) -> int:
    return gp.read_heartbeat(m.ram.block)


def passes(m: Machine, n: int = 2) -> None:
    """Wait until the guest completed ``n`` more passes (so every table page was written)."""
    hb = heartbeat(m)
    wait_for(lambda: heartbeat(m) >= hb + n, what=f"{n} guest passes")


def resize(m: Machine, size: int) -> None:
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(size)
    wait_for(lambda: m.driver.plugged_size == size, what=f"plugged size {size >> 20} MiB")
    wait_for(m.workload.fill_done.is_set, what="the guest writing its new memory")


def bits(words: np.ndarray) -> np.ndarray:
    """Indices of the set bits of a dirty bitmap (KVM layout)."""
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


def raw_log(m: Machine, block: RAMBlock) -> np.ndarray:
    """The block's slot in KVM's own log: a raw KVM_GET_DIRTY_LOG, bypassing DirtyLog."""
    return m.accel.vm.get_dirty_log(m.accel.vm.slot_of(block).id)


def kvm_log(m: Machine) -> np.ndarray:
    """Pages of the virtio-mem slot set in KVM's own log."""
    assert m.vmem_mr is not None
    return bits(raw_log(m, m.vmem_mr.block))


def table_gpas(m: Machine) -> set[int]:
    return set(gp.pages_of(m.workload.table).tolist())


@pytest.fixture
def running() -> Iterator[Machine]:
    m = kvm_machine()
    try:
        m.start()
        yield m
    finally:
        m.close()


# -- layout -----------------------------------------------------------------------------------
def test_kvm_layout_puts_device_memory_below_4g() -> None:
    m = kvm_machine()
    try:
        assert m.config.accel == "kvm"
        assert m.vmem_mr is not None and m.vmem_mr.addr == 64 * MiB  # right after base RAM
        assert m.vmem_mr.addr + m.vmem_mr.size <= 4 * GiB
    finally:
        m.close()
    with pytest.raises(KvmLayoutError, match=r"at most 2G fits"):
        Machine(
            MachineConfig(memory=2 * GiB, accel="kvm", virtio_mem=VirtioMemConfig(size=3 * GiB))
        )
    with pytest.raises(KvmLayoutError, match="beyond 4 GiB"):
        Machine(
            MachineConfig(
                memory=64 * MiB,
                accel="kvm",
                virtio_mem=VirtioMemConfig(size=REGION, memaddr=4 * GiB),
            )
        )
    auto = Machine(MachineConfig(memory=64 * MiB, accel="auto"))
    try:
        assert auto.config.accel == "kvm" and auto.accel.name == "kvm"
    finally:
        auto.close()


def test_guest_follows_plug_and_unplug_without_touching_unplugged_memory(running) -> None:  # noqa: ANN001
    """The quiesce hook: UNPLUG is sent only once the guest's table has let go of the blocks.

    Unplugged blocks are holes in the memfd, so a single guest write to one after the
    device discarded it would show up as allocated memory in an unplugged range.
    """
    m = running
    assert m.vmem_mr is not None
    base = m.vmem_mr.addr
    for plugged, unplugged in [(64 * MiB, 16 * MiB), (96 * MiB, 32 * MiB), (48 * MiB, 0)]:
        resize(m, plugged)
        assert {g for g in table_gpas(m) if g >= base} == set(range(base, base + plugged, PAGE))
        resize(m, unplugged)
        assert max(table_gpas(m)) < base + max(unplugged, 1)
        passes(m)
        block = m.vmem_mr.block
        assert block.allocated_bytes(unplugged, REGION - unplugged) == 0
        assert m.accel.discarded_writes == 0
    assert m.driver is not None and m.driver.plugged_size == 0


def test_without_the_quiesce_hook_unplugged_memory_is_written(running) -> None:  # noqa: ANN001
    """The checks above can fail: with the hook gone, UNPLUG overtakes the guest's table.

    The driver then unplugs while a pass over the blocks is in flight; the guest writes
    them after the device discarded them (the memfd holes fill again) and the agent finds
    them in its table at the end of the pass. A cycle can escape only if the removal lands
    just before a pass exit, so three cycles are allowed for one detection.
    """
    m = running
    assert m.vmem_mr is not None
    m.usable.quiesce_hook = None
    caught = False
    for _ in range(3):
        resize(m, 64 * MiB)
        passes(m)
        resize(m, 0)
        passes(m)
        if m.accel.discarded_writes and m.vmem_mr.block.allocated_bytes() > 0:
            caught = True
            break
    assert caught


# -- (a) KVM's own log at migration setup -----------------------------------------------------
@pytest.mark.parametrize("shift", [9, 18], ids=["2M-chunks", "1G-chunks"])
def test_setup_clears_unplugged_blocks_from_kvm_log(running, shift: int) -> None:  # noqa: ANN001
    """Reference 3.2: discarded ranges leave KVM's log right after the first sync.

    The guest writes 32 MiB of plugged blocks, then 16 MiB are unplugged. KVM's log still
    holds the bits of those writes (nothing re-armed it), and starting the log does not
    re-protect the slots, so it is ``init_bitmaps`` that must clear them — or the next sync
    would put unplugged memory back into the migration bitmap. Plugged blocks stay tracked.
    """
    m = running
    resize(m, 32 * MiB)
    passes(m)
    resize(m, 16 * MiB)
    passes(m)
    npages = REGION // PAGE
    plugged = np.arange(0, 16 * MiB // PAGE)
    unplugged = np.arange(16 * MiB // PAGE, 32 * MiB // PAGE)
    before = kvm_log(m)
    assert np.isin(unplugged, before).all()  # the writes from before the unplug

    # Without clearing the log, a sync brings unplugged memory back (what 3.2 fixes).
    naive = RamState(m.memory.regions, m.accel.dirty_log, clear_bitmap_shift=shift, log_clear=False)
    naive.init_bitmaps()
    naive.sync()
    vmem_state = next(b for b in naive.blocks if b.block is m.vmem_mr.block)
    assert np.isin(unplugged, bits(vmem_state.bmap.words)).all()

    saver = RamState(m.memory.regions, m.accel.dirty_log, clear_bitmap_shift=shift)
    saver.init_bitmaps()
    after = kvm_log(m)
    assert not np.isin(after, np.arange(16 * MiB // PAGE, npages)).any()
    if shift == 9:  # one chunk per block: plugged chunks wait for their pages to be sent
        assert np.isin(plugged, after).all()
    vmem_state = next(b for b in saver.blocks if b.block is m.vmem_mr.block)
    assert (bits(vmem_state.bmap.words) == plugged).all()
    assert saver.stats.discarded_bytes == REGION - 16 * MiB

    # A pass of the migration re-arms plugged chunks before reading them; the guest's next
    # writes are logged again, and nothing appears in unplugged blocks.
    w = BytesWriter()
    send_pass(saver, StreamSink(w, saver.stats), w)
    passes(m)
    again = kvm_log(m)
    assert np.isin(plugged, again).all()
    assert again.max() < 16 * MiB // PAGE
    saver.sync()
    assert (bits(vmem_state.bmap.words) == plugged).all()
    assert m.accel.discarded_writes == 0


def test_host_writes_are_logged(running) -> None:  # noqa: ANN001
    """KVM logs only guest writes; the accelerator adds the host's (the table, above all)."""
    m = running
    log = m.accel.dirty_log
    block = m.ram.block
    npages = block.max_length // PAGE
    log.start()
    log.clear(block, 0, npages)  # re-arms nothing: nothing was reported yet
    gpa = 0x30000  # above the table, below the targets: only the host writes here
    m.accel.write(gpa, b"\x01\x02")
    assert m.accel.read(gpa, 2) == b"\x01\x02"
    assert gpa // PAGE not in bits(raw_log(m, block))
    assert gpa // PAGE in bits(log.sync(block))
    log.clear(block, 0, npages)
    assert gpa // PAGE not in bits(log.sync(block))
    # The guest only reads its table, so a table page in the log is the agent's rewrite.
    table_page = gp.TABLE_GPA // PAGE
    resize(m, 8 * MiB)
    assert table_page in bits(log.sync(block))
    assert table_page not in bits(raw_log(m, block))
    log.stop()


# -- (b) precopy of a running KVM guest ----------------------------------------------------------
def test_precopy_migration_of_running_kvm_guest(tmp_path: Path) -> None:
    src, dst = kvm_machine(), kvm_machine(incoming=True)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        src.start()
        resize(src, 48 * MiB)
        resize(src, 24 * MiB)  # written, then given back: must be neither sent nor allocated
        passes(src)
        uri = f"unix:{tmp_path / 'kvm.sock'}"
        cd.migrate_incoming(uri)
        cs.migrate(uri)
        assert cs.outgoing is not None and cd.incoming is not None
        assert cs.outgoing.wait(120) and cd.incoming.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "completed", (info, cd.query_migrate())
        assert src.runstate == "postmigrate" and dst.runstate == "paused"

        # The switchover: the source vCPU stopped wherever it was (mid-pass or not).
        table, since = src.workload.table, src.workload.table_since
        hb = heartbeat(src)
        assert heartbeat(dst) == hb > since
        for m in (src, dst):
            check = gp.check_pages(m.memory, table, hb, table_since=since)
            assert check.ok, check
        sregs_src, sregs_dst = src.accel.vcpu.get_sregs(), dst.accel.vcpu.get_sregs()
        regs_src, regs_dst = src.accel.vcpu.get_regs(), dst.accel.vcpu.get_regs()
        assert [getattr(regs_dst, r) for r in GENERAL_REGS] == [
            getattr(regs_src, r) for r in GENERAL_REGS
        ]
        assert (sregs_dst.cr0, sregs_dst.cs.selector, sregs_dst.cs.limit) == (
            sregs_src.cr0,
            sregs_src.cs.selector,
            sregs_src.cs.limit,
        )
        assert src.checksum() == dst.checksum()

        ram = info["ram"]
        assert ram["dirty-sync-count"] >= 2
        assert ram["discarded-skipped-bytes"] == REGION - 24 * MiB
        assert src.accel.discarded_writes == 0
        for ctl in (cs, cd):
            vmem = next(b for b in ctl.x_query_ram_allocation() if "allocated-discarded" in b)
            assert vmem["allocated-discarded"] == 0

        # The destination guest carries on from the switchover.
        cd.cont()
        wait_for(lambda: heartbeat(dst) >= hb + 3, what="passes on the destination")
        dst.stop()
        hb2 = heartbeat(dst)
        assert dst.workload.table == table
        check = gp.check_pages(
            dst.memory, dst.workload.table, hb2, table_since=dst.workload.table_since
        )
        assert check.ok, check
        assert dst.accel.discarded_writes == 0
    finally:
        src.close()
        dst.close()


# -- (c) postcopy of a running KVM guest ---------------------------------------------------------
def test_postcopy_migration_of_running_kvm_guest(tmp_path: Path) -> None:
    """The destination vCPU runs with pages missing: it faults inside KVM_RUN on memory
    registered with userfaultfd, and the fault handler process places the pages."""
    from livemig.memory.discard_manager import Section
    from livemig.migration.postcopy import placer as postcopy_uffd

    if (why := postcopy_uffd.available()) is not None:
        pytest.skip(f"no userfaultfd ({why})")
    src, dst = kvm_machine(), kvm_machine(incoming=True)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=True)
        caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-blocktime")]
        cs.caps.set(caps)
        cd.caps.set(caps)
        src.start()
        resize(src, 96 * MiB)
        resize(src, 48 * MiB)  # written, then given back: never requested, sent or allocated
        passes(src)
        uri = f"unix:{tmp_path / 'kvm-postcopy.sock'}"
        cd.migrate_incoming(uri)
        # slow enough that most pages are still missing when the destination guest starts
        cs.params.set({"max-bandwidth": 16 * MiB, "max-postcopy-bandwidth": 16 * MiB})
        cs.migrate(uri)
        wait_for(lambda: cs.outgoing.status == "active", what="active")
        time.sleep(0.2)
        cs.migrate_start_postcopy()
        wait_for(lambda: cd.incoming.status == "postcopy-active", what="postcopy-active")
        hb_switch = heartbeat(dst)
        assert cs.outgoing.wait(120) and cs.outgoing.status == "completed", cs.query_migrate()
        assert cd.incoming.wait(30) and cd.incoming.status == "completed", cd.query_migrate()
        assert src.runstate == "postmigrate" and dst.runstate == "running"

        # the guest carried on from the switchover and every page it wrote is consistent
        wait_for(lambda: heartbeat(dst) >= hb_switch + 3, what="passes on the destination")
        dst.stop()
        hb = heartbeat(dst)
        check = gp.check_pages(dst.memory, dst.workload.table, hb, table_since=dst.workload.table_since)
        assert check.ok, check

        src_ram, dst_ram = cs.query_migrate()["ram"], cd.query_migrate()["ram"]
        # the vCPU really faulted on missing pages, inside KVM_RUN, and waited for them
        assert src_ram["postcopy-requests"] > 0 and dst_ram["postcopy-faults"] > 0
        assert dst_ram["postcopy-lost-pages"] == 0
        assert len(dst_ram["postcopy-vcpu-blocktime"]) == 1
        assert dst_ram["postcopy-vcpu-blocktime"][0] > 0

        # discard promises on both sides
        mr = src.vmem_mr
        assert mr is not None and src.vmem is not None
        gone = set()
        offs, sizes = src.vmem.discarded_runs(Section(mr, 0, mr.size))
        for o, s in zip(offs, sizes, strict=True):
            gone.update(range(o // PAGE, (o + s) // PAGE))
        assert len(gone) == (REGION - 48 * MiB) // PAGE
        ps = cs.outgoing.postcopy
        for name in ("requested", "sent"):
            hit = set(getattr(ps, name)[mr.block.idstr].indices().tolist())
            assert not hit & gone, f"unplugged page {name}"
        assert src_ram["postcopy-discarded-requests"] == 0
        assert src_ram["discarded-skipped-bytes"] == REGION - 48 * MiB
        assert src.accel.discarded_writes == 0 and dst.accel.discarded_writes == 0
        for ctl in (cs, cd):
            vmem = next(b for b in ctl.x_query_ram_allocation() if "allocated-discarded" in b)
            assert vmem["allocated-discarded"] == 0
    finally:
        src.close()
        dst.close()
