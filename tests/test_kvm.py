"""KVM accelerator groundwork: ioctls, the guest program, the dirty log, pausing vCPUs.

These run a real guest under /dev/kvm (kvm_pvm on the project machines, so only real-mode
and 32-bit protected-mode guests; our program is 32-bit). Guest writes are kept to a few
thousand pages per pass so the module runs in a few seconds.
"""

from __future__ import annotations

import ctypes
import errno
import time

import numpy as np
import pytest

from livemig.accel.kvm import kvm_available

_why = kvm_available()
if _why is not None:
    pytest.skip(f"KVM not usable here ({_why})", allow_module_level=True)

from livemig.accel.kvm import guest_program as gp  # noqa: E402
from livemig.accel.kvm import ioctls as k  # noqa: E402
from livemig.accel.kvm.runner import VcpuRunner  # noqa: E402
from livemig.accel.kvm.vm import (  # noqa: E402
    KvmDirtyLog,
    KvmError,
    KvmVm,
    install_kick_signal,
    uninstall_kick_signal,
)
from livemig.memory.ram_block import RAMBlock  # noqa: E402

MiB = 1 << 20
PAGE = 4096
CONTROL_PAGE = gp.CONTROL_GPA // PAGE


def dirty_pages(words: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).tolist())


def page_set(ranges: list[tuple[int, int]], base_gpa: int = 0) -> set[int]:
    return set(((gp.pages_of(ranges) - base_gpa) // PAGE).tolist())


class Guest:
    """A VM with one memfd block at GPA 0, the program loaded and one vCPU pointed at it."""

    def __init__(self, size: int = 64 * MiB, yield_every: int = gp.DEFAULT_YIELD_EVERY):
        self.block = RAMBlock("ram", size)
        self.vm = KvmVm()
        self.slot = self.vm.add_slot(self.block, 0)
        self.layout = gp.load(self.block, yield_every=yield_every)
        self.vcpu = self.vm.create_vcpu()
        gp.prepare_vcpu(self.vcpu, self.layout)
        self.log = KvmDirtyLog(self.vm)

    def table(self, ranges: list[tuple[int, int]]) -> None:
        gp.write_table(self.block, ranges, layout=self.layout)

    @property
    def heartbeat(self) -> int:
        return gp.read_heartbeat(self.block, self.layout)

    def close(self) -> None:
        self.vm.close()
        self.block.close()


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


RANGES = [
    (gp.DATA_GPA, 100),  # 256..355: crosses a 64-page word boundary
    (gp.DATA_GPA + 2 * MiB, 64),  # exactly one aligned chunk: 768..831
    (gp.DATA_GPA + 8 * MiB + 5 * PAGE, 1),  # a lone page
    (48 * MiB, 700),  # a larger range near the end of the block
]


# -- ABI ------------------------------------------------------------------------------------
def test_structure_layout_matches_kernel_abi():
    assert ctypes.sizeof(k.kvm_regs) == 144
    assert ctypes.sizeof(k.kvm_sregs) == 312
    assert ctypes.sizeof(k.kvm_enable_cap) == 104
    assert k.kvm_run.exit_reason.offset == 8
    assert k.kvm_run.immediate_exit.offset == 1
    assert k.kvm_run.exit.offset + k.kvm_run_io.port.offset == 34


def test_vm_enables_manual_protect_and_reports_caps(guest):
    assert guest.vm.check_extension(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1
    assert guest.vm.immediate_exit
    assert guest.vm.vcpu_mmap_size >= PAGE


def test_ioctl_errors_name_the_ioctl(guest):
    with pytest.raises(OSError) as ei:
        k.get_dirty_log(guest.vm.fd, 999, 0)
    assert ei.value.errno in (errno.EINVAL, errno.ENOENT)
    assert "KVM_GET_DIRTY_LOG" in str(ei.value) and ei.value.ioctl == "KVM_GET_DIRTY_LOG"


def test_slot_rules(guest):
    other = RAMBlock("other", 4 * MiB)
    try:
        with pytest.raises(KvmError, match="overlaps"):
            guest.vm.add_slot(other, 32 * MiB)
        with pytest.raises(KvmError, match="already mapped"):
            guest.vm.add_slot(guest.block, 128 * MiB)
        with pytest.raises(KvmError, match="not page aligned"):
            guest.vm.add_slot(other, 128 * MiB + 512)
    finally:
        other.close()


# -- the guest program ----------------------------------------------------------------------
def test_guest_runs_and_heartbeat_rises(guest):
    guest.table(RANGES)
    for n in range(1, 5):
        assert gp.run_passes(guest.vcpu) == n  # eax at the pass exit
        assert guest.heartbeat == n
        check = gp.check_pages(guest.block, RANGES, n)
        assert check.ok and check.written == 0, check
    values = gp.page_values(guest.block, RANGES)
    assert (values == 4).all()
    # The code, control and table pages are intact; nothing outside the targets was written.
    assert bytes(guest.block.view[gp.CODE_GPA : gp.CODE_GPA + 0x44]) == gp.program()
    written = np.flatnonzero(guest.block.pages_array().any(axis=1))
    expect = page_set(RANGES) | {gp.CODE_GPA // PAGE, CONTROL_PAGE, gp.TABLE_GPA // PAGE}
    assert set(written.tolist()) == expect


def test_new_table_takes_effect_at_next_pass(guest):
    guest.table(RANGES[:2])
    gp.run_passes(guest.vcpu, 2)
    new = [RANGES[1], RANGES[3]]  # keep one range, drop one, add one
    guest.table(new)
    assert gp.check_pages(guest.block, new, 2, table_since=2).ok
    assert not gp.check_pages(guest.block, new, 2).ok  # range 3 never written yet
    gp.run_passes(guest.vcpu)
    assert gp.check_pages(guest.block, new, 3, table_since=2).ok
    assert (gp.page_values(guest.block, [RANGES[0]]) == 2).all()  # dropped: left behind


def test_check_pages_detects_a_wrong_page(guest):
    guest.table(RANGES)
    gp.run_passes(guest.vcpu, 2)
    gpa = RANGES[3][0] + 10 * PAGE
    guest.block.view[gpa : gpa + 4] = (1).to_bytes(4, "little")  # a stale page
    check = gp.check_pages(guest.block, RANGES, 2)
    assert not check.ok and check.bad == [(gpa, 1, "2")]
    assert "INCONSISTENT" in str(check)


def test_yield_exits_report_progress(guest):
    gp.write_control(guest.block, yield_every=64)
    guest.table([(gp.DATA_GPA, 200)])
    seen = []
    while True:
        ex = guest.vcpu.run()
        if gp.is_pass_exit(ex):
            break
        assert gp.is_yield_exit(ex), ex
        seen.append(ex.value)
        # Mid-pass: a prefix of pages carries pass 1, the rest still 0.
        check = gp.check_pages(guest.block, [(gp.DATA_GPA, 200)], 0)
        assert check.ok and check.written == (ex.value - gp.DATA_GPA) // PAGE
    assert seen == [gp.DATA_GPA + PAGE * n for n in (64, 128, 192)]


def test_table_validation():
    with pytest.raises(ValueError, match="overlaps"):
        gp.validate_ranges([(gp.DATA_GPA, 10), (gp.DATA_GPA + 9 * PAGE, 1)])
    with pytest.raises(ValueError, match="program"):
        gp.validate_ranges([(gp.TABLE_GPA + PAGE, 1)])
    with pytest.raises(ValueError, match="unaligned"):
        gp.validate_ranges([(gp.DATA_GPA + 1, 1)])
    with pytest.raises(ValueError, match="beyond"):
        gp.validate_ranges([(gp.DATA_GPA, 10)], memory_end=gp.DATA_GPA + PAGE)
    with pytest.raises(ValueError, match="capacity"):
        gp.validate_ranges([(gp.DATA_GPA + 2 * i * PAGE, 1) for i in range(9000)])


# -- the dirty log --------------------------------------------------------------------------
def test_dirty_log_reports_exactly_the_guest_writes(guest):
    guest.table(RANGES)
    gp.run_passes(guest.vcpu)  # writes before start() must not show up
    log = guest.log
    assert not log.active
    log.start()
    assert log.active
    assert not guest.log.sync(guest.block).any()
    gp.run_passes(guest.vcpu, 2)
    words = log.sync(guest.block)
    assert words.dtype == np.uint64 and len(words) == guest.block.max_length // PAGE // 64
    dirty = dirty_pages(words)
    # Target pages + the heartbeat's page; never the code or table pages (only read), nor
    # pages the host wrote (the table itself).
    assert dirty == page_set(RANGES) | {CONTROL_PAGE}
    assert gp.CODE_GPA // PAGE not in dirty and gp.TABLE_GPA // PAGE not in dirty
    # sync does not clear (manual protect), and returns a copy.
    words[:] = 0
    assert dirty_pages(log.sync(guest.block)) == dirty
    log.stop()
    assert not log.active


def test_clear_aligned_range_rearms_it(guest):
    guest.table(RANGES)
    log = guest.log
    log.start()
    gp.run_passes(guest.vcpu)
    everything = page_set(RANGES) | {CONTROL_PAGE}
    assert dirty_pages(log.sync(guest.block)) == everything
    # Pages 256..383 cover most of range 0 (256..355) plus nothing else.
    log.clear(guest.block, 256, 128)
    after = dirty_pages(log.sync(guest.block))
    assert after == everything - set(range(256, 384))
    # The whole of range 3 (48 MiB = page 12288, 700 pages) via aligned chunks.
    log.clear(guest.block, 12288, 704)
    assert dirty_pages(log.sync(guest.block)) == after - set(range(12288, 12988))
    gp.run_passes(guest.vcpu)  # the next pass dirties them again
    assert dirty_pages(log.sync(guest.block)) == everything
    # Clearing the whole slot (the tail rule: npages may be unaligned at the slot end).
    log.clear(guest.block, 0, guest.block.max_length // PAGE)
    assert not log.sync(guest.block).any()


def test_clear_misaligned_range_is_rejected(guest):
    guest.table(RANGES)
    guest.log.start()
    gp.run_passes(guest.vcpu)
    before = guest.log.sync(guest.block)
    for first, n in [(3, 64), (256, 100), (-64, 64), (16320, 128)]:
        with pytest.raises(ValueError, match="aligned|out of range"):
            guest.log.clear(guest.block, first, n)
    # Without our check, the kernel says EINVAL, and the error names the ioctl.
    with pytest.raises(k.KvmIoctlError, match="KVM_CLEAR_DIRTY_LOG") as ei:
        guest.vm.clear_dirty_log(guest.slot, 257, 64)
    assert ei.value.errno == errno.EINVAL
    assert (guest.log.sync(guest.block) == before).all()  # nothing was cleared


def test_two_slots_log_pages_relative_to_their_slot():
    g = Guest(size=32 * MiB)
    high = RAMBlock("high", 8 * MiB)
    try:
        base = 256 * MiB
        g.vm.add_slot(high, base)
        log = KvmDirtyLog(g.vm)
        ranges = [(gp.DATA_GPA, 10), (base + 64 * PAGE, 3), (base + 8 * MiB - 2 * PAGE, 2)]
        gp.write_table(g.block, ranges, memory_end=base + high.max_length)
        log.start()
        gp.run_passes(g.vcpu)
        assert dirty_pages(log.sync(g.block)) == page_set(ranges[:1]) | {CONTROL_PAGE}
        assert dirty_pages(log.sync(high)) == {64, 65, 66, 2046, 2047}
        assert high.view[64 * PAGE] == 1
    finally:
        g.close()
        high.close()


# -- pausing a vCPU thread ------------------------------------------------------------------
def test_vcpu_thread_pauses_and_resumes_promptly():
    g = Guest(size=128 * MiB)
    ranges = [(gp.DATA_GPA, 16384)]  # 64 MiB: a pass takes tens of ms or more
    g.table(ranges)
    runner = VcpuRunner(g.vcpu)
    try:
        runner.start()
        latencies = []
        mid_pass = 0
        last_hb = -1
        for i in range(6):
            time.sleep(0.05 + 0.03 * i)
            latencies.append(runner.pause(timeout=2.0))
            assert runner.paused
            hb = g.heartbeat
            snapshot = gp.page_values(g.block, ranges)
            time.sleep(0.02)  # really paused: nothing moves
            assert g.heartbeat == hb
            assert (gp.page_values(g.block, ranges) == snapshot).all()
            check = gp.check_pages(g.block, ranges, hb)
            assert check.ok, check
            mid_pass += 0 < check.written < len(snapshot)
            assert hb >= last_hb
            last_hb = hb
            runner.resume()
        assert max(latencies) < 0.1, latencies
        deadline = time.monotonic() + 10
        while g.heartbeat <= last_hb and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.heartbeat > last_hb  # it runs again after resume
        assert mid_pass >= 1  # pauses land mid-pass too, and the check still holds
    finally:
        runner.stop()
        g.close()
    assert runner.error is None


def test_pause_at_pass_exit_and_swap_table():
    g = Guest()
    first = [(gp.DATA_GPA, 3000)]
    second = [(gp.DATA_GPA + 16 * MiB, 500), (gp.DATA_GPA + 3 * PAGE, 10)]
    g.table(first)
    g.log.start()
    runner = VcpuRunner(g.vcpu)
    try:
        runner.start()
        runner.pause(timeout=5.0, at=gp.is_pass_exit)
        hb = g.heartbeat
        assert runner.park_exit is not None and runner.park_exit.value == hb >= 1
        assert gp.check_pages(g.block, first, hb).written == 0
        g.table(second)
        g.log.sync(g.block)  # clear re-arms only what a sync reported (dirty_log contract)
        for first_page, n in [(0, g.block.max_length // PAGE)]:
            g.log.clear(g.block, first_page, n)
        runner.resume()
        runner.pause(timeout=5.0, at=gp.is_pass_exit)
        hb2 = g.heartbeat
        assert hb2 > hb
        assert gp.check_pages(g.block, second, hb2, table_since=hb).ok
        assert dirty_pages(g.log.sync(g.block)) == page_set(second) | {CONTROL_PAGE}
    finally:
        runner.stop()
        g.close()
    assert runner.error is None


def test_signal_kick_stops_a_guest_that_never_exits():
    g = Guest()
    g.block.view[gp.DATA_GPA : gp.DATA_GPA + 2] = gp.SPIN_PROGRAM
    g.vcpu.setup_flat32(gp.DATA_GPA)
    runner = VcpuRunner(g.vcpu)
    install_kick_signal()
    try:
        runner.start()
        time.sleep(0.05)
        for _ in range(3):
            assert runner.pause(timeout=1.0) < 0.1
            assert runner.park_exit.reason == k.KVM_EXIT_INTR
            assert g.vcpu.get_regs().rip == gp.DATA_GPA  # still spinning on `jmp $`
            runner.resume()
            time.sleep(0.02)
    finally:
        runner.stop()
        uninstall_kick_signal()
        g.close()
    assert runner.error is None


def test_immediate_exit_returns_without_running(guest):
    guest.table(RANGES)
    guest.vcpu.kick()  # no thread inside KVM_RUN: only immediate_exit is set
    assert guest.vcpu.immediate_exit
    ex = guest.vcpu.run()
    assert ex.reason == k.KVM_EXIT_INTR and not guest.vcpu.immediate_exit
    assert guest.heartbeat == 0
    assert gp.run_passes(guest.vcpu) == 1


def test_complete_pending_io_keeps_rip_after_the_out(guest):
    guest.table(RANGES)
    gp.run_passes(guest.vcpu)
    guest.vcpu.complete_pending_io()
    # After completion RIP is past `out 0xF0, eax` (offset 0x40, 2 bytes) at `jmp start`.
    assert guest.vcpu.get_regs().rip == gp.CODE_GPA + 0x42
    assert gp.run_passes(guest.vcpu) == 2


def test_sync_and_clear_while_the_vcpu_runs():
    """Migration's pattern: GET/CLEAR from another thread while the guest keeps writing.

    Whatever interleaving happens, a page cleared at time T and written after T must be in
    the log; a full pass that starts after the clear writes every target page.
    """
    g = Guest()
    ranges = [(gp.DATA_GPA, 4000), (40 * MiB, 1000)]
    g.table(ranges)
    runner = VcpuRunner(g.vcpu)
    targets = page_set(ranges)
    try:
        runner.start()
        for _ in range(5):
            for p in range(0, g.block.max_length // PAGE, 1024):
                g.log.clear(g.block, p, 1024)
            hb = g.heartbeat
            deadline = time.monotonic() + 5
            while g.heartbeat < hb + 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            dirty = dirty_pages(g.log.sync(g.block))
            assert targets <= dirty and dirty <= targets | {CONTROL_PAGE}
    finally:
        runner.stop()
        g.close()
    assert runner.error is None
