"""Discard-aware precopy between two machines in this process, over real sockets and files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from waiting import waiter

from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.migration.ram.state import RamState

MiB, GiB = 1 << 20, 1 << 30


def machine(incoming: bool, dirty_rate: int = 16 * MiB, prefill: bool = True, content: str = "mixed") -> Machine:
    return Machine(
        MachineConfig(
            memory=64 * MiB,
            virtio_mem=VirtioMemConfig(size=2 * GiB),
            incoming=incoming,
            workload=WorkloadConfig(vcpus=2, dirty_rate=dirty_rate, content=content, prefill=prefill),
        )
    )


wait_for = waiter(30.0, step=0.02)


def boot(m: Machine, plugged: int) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(plugged)
    wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(), what="plug")


def unplugged_allocation(ctl: VMController) -> int:
    return sum(b.get("allocated-discarded", 0) for b in ctl.x_query_ram_allocation())


def total_allocation(ctl: VMController) -> int:
    return sum(b["allocated"] for b in ctl.x_query_ram_allocation())


@pytest.fixture
def pair() -> Iterator[tuple[Machine, Machine, VMController, VMController]]:
    src, dst = machine(False), machine(True)
    try:
        yield src, dst, VMController(src), VMController(dst, autostart=False)
    finally:
        src.close()
        dst.close()


def uri_for(kind: str, tmp_path: Path) -> str:
    if kind == "tcp":
        return "tcp:127.0.0.1:0"
    return f"{kind}:{tmp_path / ('mig.sock' if kind == 'unix' else 'mig.stream')}"


@pytest.mark.parametrize("kind", ["tcp", "unix", "file"])
def test_live_migration_keeps_discard_promises(kind: str, tmp_path: Path, pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src, 256 * MiB)
    src.vmem.set_requested_size(160 * MiB)  # unplug: these blocks were written and given back
    wait_for(lambda: src.driver.plugged_size == 160 * MiB, what="unplug")
    before_total, before_unplugged = total_allocation(cs), unplugged_allocation(cs)
    assert before_unplugged == 0
    uri = uri_for(kind, tmp_path)
    if kind != "file":
        cd.migrate_incoming(uri)
        uri = str(cd.incoming.uri)  # the bound port for tcp:...:0
    cs.migrate(uri)
    assert cs.outgoing.wait(60)
    info = cs.query_migrate()
    assert info["status"] == "completed", info
    if kind == "file":
        cd.migrate_incoming(uri)
    assert cd.incoming.wait(60)
    assert cd.query_migrate()["status"] == "completed", cd.query_migrate()
    assert src.runstate == "postmigrate" and dst.runstate == "paused"
    assert src.checksum() == dst.checksum()
    # nothing discarded was read on the source, nothing grew, nothing populated on the destination
    assert unplugged_allocation(cs) == 0
    assert total_allocation(cs) <= before_total
    # what the load itself did, measured before post_load discards unplugged ranges
    dram = cd.query_migrate()["ram"]
    assert dram["unplugged-pages-received"] == 0 and dram["unplugged-bytes-populated"] == 0
    assert unplugged_allocation(cd) == 0
    ram = info["ram"]
    assert ram["discarded-skipped-bytes"] == 2 * GiB - 160 * MiB
    assert ram["total"] == 2 * GiB + 64 * MiB
    assert ram["remaining"] == 0 and ram["normal"] > 0 and ram["duplicate"] > 0
    # the guest continues on the destination
    cd.cont()
    written = dst.workload.pages_written
    wait_for(lambda: dst.workload.pages_written > written, what="destination guest writes")
    assert src.accel.discarded_writes == 0 and dst.accel.discarded_writes == 0


def test_discarded_ranges_leave_the_dirty_log_after_the_first_sync() -> None:
    """Bits set in the log before setup must be gone from it (and the bitmap) after setup."""
    m = machine(False, dirty_rate=0)
    try:
        boot(m, 128 * MiB)
        m.stop()
        vmem, mr, log = m.vmem, m.vmem_mr, m.accel.dirty_log
        log.start()
        # a misbehaving guest writes unplugged memory after logging started
        unplugged_gpa = mr.addr + 1 * GiB
        m.accel.write(unplugged_gpa, b"\x55" * 4096)
        plugged_gpa = mr.addr
        m.accel.write(plugged_gpa, b"\x66" * 4096)
        page = (unplugged_gpa - mr.addr) // 4096
        assert log.peek(mr.block).test(page)
        saver = RamState(m.memory.regions, log)
        saver.init_bitmaps(start_log=False)  # sync first, then clear discarded
        discarded = Bitmap(mr.block.pages)
        offs, sizes = vmem.discarded_runs(Section(mr, 0, mr.size))
        for o, s in zip(offs, sizes, strict=True):
            discarded.set_range(o // 4096, s // 4096)
        in_log = log.peek(mr.block)
        assert not np.any(in_log.words & discarded.words), "dirty log kept discarded pages"
        bmap = next(b for b in saver.blocks if b.mr is mr).bmap
        assert not np.any(bmap.words & discarded.words)
        assert bmap.count() == 128 * MiB // 4096  # every plugged page still to send
        # plugged memory is still tracked after setup
        m.accel.write(plugged_gpa + 4096, b"\x77" * 4096)
        assert Bitmap(mr.block.pages, words=log.sync(mr.block)).test(1)
        assert saver.remaining_bytes == (128 * MiB + 64 * MiB)
    finally:
        m.close()


def test_late_write_to_unplugged_memory_is_migrated(tmp_path: Path) -> None:
    """Reference 3.4: a guest writing unplugged memory after the start still gets it moved."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        cs.params.set({"max-bandwidth": 64 * MiB})  # slow enough to write while active
        path = tmp_path / "late.stream"
        cs.migrate(f"file:{path}")
        wait_for(lambda: cs.outgoing.status == "active", what="active")
        gpa = src.vmem_mr.addr + 1 * GiB
        src.accel.write(gpa, b"\xab" * 4096)
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed"
        cd.migrate_incoming(f"file:{path}")
        assert cd.incoming.wait(60) and cd.incoming.status == "completed"
        page = (gpa - src.vmem_mr.addr) // 4096
        assert cd.incoming.loader.received[src.vmem_mr.block.idstr].test(page)
        # ... and the destination then discards unplugged ranges (reference 2.5)
        assert unplugged_allocation(cd) == 0
        assert cs.query_migrate()["ram"]["normal"] >= 1
    finally:
        src.close()
        dst.close()


def test_holes_of_plugged_memory_are_not_read(tmp_path: Path) -> None:
    """Plugged but never-written memory is sent as ZERO records without a single read."""
    src, dst = machine(False, dirty_rate=0, prefill=False), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        src.accel.write(src.vmem_mr.addr, b"\x01" * 8192)  # two data pages in plugged memory
        before = total_allocation(cs)
        cd.migrate_incoming(f"unix:{tmp_path / 's'}")
        cs.migrate(f"unix:{tmp_path / 's'}")
        assert cs.outgoing.wait(60) and cd.incoming.wait(60)
        ram = cs.query_migrate()["ram"]
        assert ram["pages-read"] == 2
        assert ram["hole-pages-skipped"] == (256 + 64) * MiB // 4096 - 2
        assert total_allocation(cs) == before
        assert total_allocation(cd) == 2 * 4096  # zero records populate nothing
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


def test_cancel_leaves_guest_running_and_retry_succeeds(tmp_path: Path, pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src, 128 * MiB)
    events: list[tuple[str, dict]] = []
    cs.emit = lambda name, data=None: events.append((name, data or {}))  # type: ignore[method-assign]
    cs.caps.set([{"capability": "events", "state": True}])
    cs.params.set({"max-bandwidth": 32 * MiB})
    sink = tmp_path / "cancel.stream"
    cs.migrate(f"file:{sink}")
    wait_for(lambda: cs.outgoing.status == "active", what="active")
    cs.migrate_cancel()
    assert cs.outgoing.wait(10)
    assert cs.outgoing.status == "cancelled"
    assert src.runstate == "running"
    statuses = [d["status"] for n, d in events if n == "MIGRATION"]
    assert statuses == ["setup", "active", "cancelling", "cancelled"]
    assert any(n == "MIGRATION_PASS" for n, _ in events)
    # the virtio-mem device answers again after the migration
    src.vmem.set_requested_size(64 * MiB)
    wait_for(lambda: src.driver.plugged_size == 64 * MiB, what="unplug after cancel")
    cs.params.set({"max-bandwidth": 0})
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))
    assert cs.outgoing.wait(60) and cs.outgoing.status == "completed"
    assert cd.incoming.wait(30) and cd.incoming.status == "completed"
    assert src.checksum() == dst.checksum()


def test_virtio_mem_is_busy_while_migrating(tmp_path: Path, pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src, 128 * MiB)
    cs.params.set({"max-bandwidth": 32 * MiB})
    cs.migrate(f"file:{tmp_path / 'busy.stream'}")
    wait_for(lambda: cs.outgoing.status == "active", what="active")
    busy_before = src.driver.busy_replies
    src.vmem.set_requested_size(64 * MiB)
    wait_for(lambda: src.driver.busy_replies > busy_before, what="BUSY reply")
    assert src.vmem.size == 128 * MiB  # nothing unplugged during the migration
    cs.migrate_cancel()
    assert cs.outgoing.wait(10)
    wait_for(lambda: src.vmem.size == 64 * MiB, what="unplug once the migration ended")


def test_a_stopped_guest_plugs_and_unplugs_nothing() -> None:
    """The virtio-mem driver is guest code: while the vCPUs are stopped (``stop``, a
    paused destination, a source after its migration) a new requested size waits, and
    the guest's memory stays as it is; ``cont`` lets the driver act. (Once, a stopped
    destination unplugged memory right after a migration, and its checksum no longer
    matched the source's.)"""
    m = machine(False, dirty_rate=0)
    try:
        boot(m, 128 * MiB)
        assert m.vmem is not None and m.driver is not None
        m.stop()
        before = m.checksum()
        m.vmem.set_requested_size(64 * MiB)
        time.sleep(0.5)  # the driver retries every 50 ms: ten chances to act
        assert m.driver.plugged_size == 128 * MiB and m.vmem.size == 128 * MiB
        assert m.checksum() == before
        m.cont()
        wait_for(lambda: m.vmem.size == 64 * MiB and m.driver.settled, what="unplug after cont")
    finally:
        m.close()
