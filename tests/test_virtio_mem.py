"""Tests for the virtio-mem device model (reference sections 1, 2 and 7).

Real RAM blocks are used throughout: memfd for "unplug frees memory" checks (the file's
extents are exact), anon where the backend matters. Big regions are sparse memfds, which
cost nothing while unplugged.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.devices import virtio_mem_abi as vm
from livemig.devices.virtio_mem import VirtioMem
from livemig.devices.virtio_mem_abi import (
    REQ_PLUG,
    REQ_STATE,
    REQ_UNPLUG,
    REQ_UNPLUG_ALL,
    RESP_ACK,
    RESP_BUSY,
    RESP_ERROR,
    RESP_NACK,
    STATE_MIXED,
    STATE_PLUGGED,
    STATE_UNPLUGGED,
    VirtioMemDeviceError,
    VirtioMemError,
    decode_response,
    encode_request,
)
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import RamDiscardListener, Section
from livemig.memory.ram_block import PAGE_SIZE, RAMBlock
from livemig.memory.region import GuestMemoryMap, MemoryRegion

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BS = 2 * MiB
ADDR = 4 * GiB


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def make() -> Iterator:
    """Factory for (device, region) pairs on fresh RAM blocks, closed after the test."""
    blocks: list[RAMBlock] = []

    def _make(
        size: int = 64 * MiB,
        backend: str = "memfd",
        addr: int = ADDR,
        requested: int = 32 * MiB,
        block_size: int | None = BS,
        name: str = "vmem0",
        page_size: int = PAGE_SIZE,
        **kw,
    ) -> tuple[VirtioMem, MemoryRegion]:
        blk = RAMBlock(name, size, backend=backend, page_size=page_size)
        blocks.append(blk)
        mr = MemoryRegion(name, blk, addr=addr)
        return VirtioMem(name, mr, requested, block_size, **kw), mr

    yield _make
    for b in blocks:
        b.close()


def req(dev: VirtioMem, t: int, gpa: int = 0, nb: int = 0) -> tuple[int, int]:
    return decode_response(dev.handle_request(encode_request(t, gpa, nb)))


def plug(dev: VirtioMem, block: int, nb: int = 1) -> int:
    return req(dev, REQ_PLUG, dev.addr + block * dev.block_size, nb)[0]


def unplug(dev: VirtioMem, block: int, nb: int = 1) -> int:
    return req(dev, REQ_UNPLUG, dev.addr + block * dev.block_size, nb)[0]


def fill(mr: MemoryRegion, off: int, length: int, value: int = 0xAA) -> None:
    mr.block.pages_array(off, length)[:] = value


class Recorder(RamDiscardListener):
    """A listener that records its notifications and can object to populates."""

    def __init__(self, double: bool = False, refuse: int = 0, log: list | None = None):
        super().__init__(double_discard_supported=double)
        self.events: list[tuple[str, int, int]] = []
        self.refuse = refuse
        self.log = log

    def notify_populate(self, section: Section) -> int:
        self.events.append(("populate", section.offset, section.size))
        if self.log is not None:
            self.log.append((self, "populate", section.offset, section.size))
        return self.refuse

    def notify_discard(self, section: Section) -> None:
        self.events.append(("discard", section.offset, section.size))
        if self.log is not None:
            self.log.append((self, "discard", section.offset, section.size))


# -- plain-Python per-block reference -------------------------------------------------------
def ref_runs(bits: list[bool], bs: int, off: int, size: int, value: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    end = min(off + size, len(bits) * bs)
    if size <= 0:
        return out
    b = off // bs
    while b * bs < end:
        if bits[b] == value:
            lo = max(b * bs, off)
            hi = min((b + 1) * bs, end)
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        b += 1
    return out


def ref_is_populated(
    bits: list[bool], bs: int, addr: int, usable: int, off: int, size: int
) -> bool:
    start = (addr + off) // bs * bs
    end = -(-(addr + off + size) // bs) * bs
    if end - start == 0 or start < addr or end > addr + usable:
        return False
    return all(bits[(start - addr) // bs : (end - addr) // bs])


NBITS = 150  # not a multiple of 64: exercises the tail word
HBS = 1 * MiB


@pytest.fixture(scope="module")
def hdev() -> Iterator[VirtioMem]:
    blk = RAMBlock("hyp", NBITS * HBS)
    mr = MemoryRegion("hyp", blk, addr=ADDR)
    dev = VirtioMem("hyp", mr, NBITS * HBS, HBS)
    yield dev
    blk.close()


@st.composite
def bitmaps(draw) -> list[bool]:
    mode = draw(st.sampled_from(["random", "runs", "all", "none"]))
    if mode == "all":
        return [True] * NBITS
    if mode == "none":
        return [False] * NBITS
    if mode == "random":
        p = draw(st.floats(0.0, 1.0))
        seed = draw(st.integers(0, 2**32 - 1))
        return list(np.random.default_rng(seed).random(NBITS) < p)
    bits = [False] * NBITS
    for lo, n in draw(st.lists(st.tuples(st.integers(0, NBITS - 1), st.integers(1, 70)))):
        for i in range(lo, min(lo + n, NBITS)):
            bits[i] = True
    return bits


@st.composite
def sections(draw) -> tuple[int, int]:
    region = NBITS * HBS
    if draw(st.booleans()):  # block-aligned
        a = draw(st.integers(0, NBITS)) * HBS
        b = draw(st.integers(0, NBITS)) * HBS
    else:
        a = draw(st.integers(0, region))
        b = draw(st.integers(0, region))
    lo, hi = min(a, b), max(a, b)
    return lo, hi - lo


def load_bits(dev: VirtioMem, bits: list[bool], usable_blocks: int) -> None:
    arr = np.array(bits, dtype=bool)
    arr[usable_blocks:] = False  # nothing can be plugged beyond the usable region
    words = np.zeros(dev.bitmap.words.size * 64, dtype=bool)
    words[:NBITS] = arr
    dev.bitmap.words[:] = np.packbits(words, bitorder="little").view(np.uint64)
    dev.usable_region_size = usable_blocks * dev.block_size
    dev.size = int(arr.sum()) * dev.block_size


SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(bits=bitmaps(), sec=sections(), usable=st.integers(0, NBITS))
def test_replays_match_per_block_reference(hdev, bits, sec, usable):
    load_bits(hdev, bits, usable)
    eff = [b and i < usable for i, b in enumerate(bits)]
    off, size = sec
    s = Section(hdev.mr, off, size)
    pop: list[tuple[int, int]] = []
    disc: list[tuple[int, int]] = []
    assert hdev.replay_populated(s, lambda x: pop.append((x.offset, x.size)) or 0) == 0
    assert hdev.replay_discarded(s, lambda x: disc.append((x.offset, x.size)) or 0) == 0
    assert pop == ref_runs(eff, HBS, off, size, True)
    assert disc == ref_runs(eff, HBS, off, size, False)
    assert list(zip(*hdev.populated_runs(s), strict=True)) == pop
    assert list(zip(*hdev.discarded_runs(s), strict=True)) == disc
    assert hdev.is_populated(s) == ref_is_populated(eff, HBS, ADDR, usable * HBS, off, size)
    # together the two replays tile the section exactly, alternating states
    tiles = sorted([(o, n, True) for o, n in pop] + [(o, n, False) for o, n in disc])
    if size == 0:
        assert tiles == []
    else:
        assert tiles[0][0] == off
        assert tiles[-1][0] + tiles[-1][1] == off + size
        for (o1, n1, v1), (o2, _, v2) in zip(tiles, tiles[1:], strict=False):
            assert o1 + n1 == o2 and v1 != v2
        assert all(n > 0 for _, n, _ in tiles)


@SETTINGS
@given(bits=bitmaps(), sec=sections(), stop_at=st.integers(1, 10), populated=st.booleans())
def test_replay_early_stop_returns_callback_value(hdev, bits, sec, stop_at, populated):
    load_bits(hdev, bits, NBITS)
    s = Section(hdev.mr, *sec)
    expected = len(ref_runs(bits, HBS, sec[0], sec[1], populated))
    calls = []

    def cb(x: Section) -> int:
        calls.append(x)
        return -errno.EIO if len(calls) == stop_at else 0

    replay = hdev.replay_populated if populated else hdev.replay_discarded
    ret = replay(s, cb)
    if expected >= stop_at:
        assert ret == -errno.EIO and len(calls) == stop_at
    else:
        assert ret == 0 and len(calls) == expected


def test_replay_rejects_foreign_section(make):
    dev, _ = make()
    other, omr = make(name="other")
    with pytest.raises(ValueError):
        dev.replay_populated(omr.whole(), lambda s: 0)
    with pytest.raises(ValueError):
        dev.get_min_granularity(omr)
    assert dev.get_min_granularity(dev.mr) == BS


# -- realize -----------------------------------------------------------------------------------
def test_realize_state_and_rdm(make):
    dev, mr = make()
    assert mr.rdm is dev
    assert dev.addr == ADDR and dev.block_size == BS and dev.node == 0
    assert dev.bitmap.nbits == 32 and dev.bitmap.count() == 0
    assert dev.size == 0 and dev.requested_size == 32 * MiB
    assert dev.usable_region_size == 64 * MiB  # min(region, requested + 256 MiB)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"block_size": 512 * 1024}, "'block-size' property has to be at least 0x100000"),
        ({"block_size": 3 * MiB}, "'block-size' property has to be a power of two"),
        ({"requested": 3 * MiB}, "'requested-size' property has to be multiples of 'block-size'"),
        ({"addr": ADDR + MiB}, "'memaddr' property has to be multiples of 'block-size'"),
        ({"size": 65 * MiB}, "'memdev' property memory size has to be multiples of 'block-size'"),
        ({"requested": 66 * MiB, "size": 64 * MiB}, "cannot exceed the memory backend size"),
        ({"page_size": 4 * MiB, "size": 64 * MiB}, "has to be at least the page size (0x400000)"),
        ({"unplugged_inaccessible": "maybe"}, "unplugged-inaccessible"),
    ],
)
def test_realize_errors(make, kw, msg):
    with pytest.raises(VirtioMemError) as ei:
        make(**kw)
    assert msg in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_realize_rdm_busy(make):
    dev, mr = make()
    with pytest.raises(VirtioMemError, match="Failed to set RamDiscardManager"):
        VirtioMem("second", mr, 0, BS)
    assert mr.rdm is dev


def test_realize_refuses_mapped_region(make):
    blk = RAMBlock("m", 8 * MiB)
    try:
        mr = MemoryRegion("m", blk, addr=ADDR)
        GuestMemoryMap().add(mr)
        with pytest.raises(VirtioMemError, match="already mapped"):
            VirtioMem("m", mr, 0, BS)
    finally:
        blk.close()


@pytest.mark.parametrize("incoming", [False, True])
def test_realize_discards_unless_incoming(incoming):
    blk = RAMBlock("r", 16 * MiB)
    try:
        fill(MemoryRegion("x", blk), 0, 16 * MiB)
        assert blk.allocated_bytes() == 16 * MiB
        VirtioMem("r", MemoryRegion("r", blk, addr=ADDR), 0, BS, incoming=incoming)
        assert blk.allocated_bytes() == (16 * MiB if incoming else 0)
    finally:
        blk.close()


def test_default_block_size(tmp_path, make):
    assert vm.thp_size(str(tmp_path / "missing")) == MiB
    (tmp_path / "hpage_pmd_size").write_text("4194304\n")
    assert vm.thp_size(str(tmp_path)) == 4 * MiB
    (tmp_path / "hpage_pmd_size").write_text("garbage\n")
    fallback = vm.thp_size(str(tmp_path))
    assert fallback >= MiB and fallback & (fallback - 1) == 0
    (tmp_path / "hpage_pmd_size").write_text("2097152")
    assert vm.default_block_size(PAGE_SIZE, PAGE_SIZE, str(tmp_path)) == 2 * MiB
    # huge-page backends: at least one page, at least 1 MiB, THP irrelevant
    assert vm.default_block_size(64 * 1024, PAGE_SIZE, str(tmp_path)) == MiB
    assert vm.default_block_size(1 * GiB, PAGE_SIZE, str(tmp_path)) == GiB
    dev, _ = make(block_size=None)
    assert dev.block_size == vm.default_block_size(PAGE_SIZE)


def test_features(make):
    bit = 1 << vm.VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    dev, _ = make(backend="memfd")
    assert dev.features == bit  # no shared zeropage for a shared file mapping
    assert dev.validate_features(0) == -errno.EFAULT
    assert dev.validate_features(bit) == 0
    anon, _ = make(backend="anon", name="a")
    assert anon.features == 0 and anon.validate_features(0) == 0
    on, _ = make(backend="anon", name="b", unplugged_inaccessible="on")
    assert on.features == bit
    off, _ = make(name="c", unplugged_inaccessible="off", acpi_pxm=True, persistent_suspend=True)
    assert off.features == (1 << vm.VIRTIO_MEM_F_ACPI_PXM) | (
        1 << vm.VIRTIO_MEM_F_PERSISTENT_SUSPEND
    )


# -- requests ----------------------------------------------------------------------------------
def test_wire_sizes():
    assert len(encode_request(REQ_PLUG, 1, 2)) == 24
    assert vm.RESP_SIZE == 10 and vm.CONFIG_SIZE == 56
    raw = encode_request(REQ_STATE, 0x1122334455667788, 0x99AA)
    assert raw == struct.pack("<HHHHQHHHH", 3, 0, 0, 0, 0x1122334455667788, 0x99AA, 0, 0, 0)
    assert vm.decode_request(raw) == (3, 0x1122334455667788, 0x99AA)


def test_plug_unplug_ack(make):
    dev, mr = make()
    sizes: list[int] = []
    dev.on_size_change.append(lambda d, n: sizes.append(n))
    raw = dev.handle_request(encode_request(REQ_PLUG, ADDR + 4 * BS, 3))
    assert raw == struct.pack("<HHHHH", RESP_ACK, 0, 0, 0, 0)
    assert dev.size == 3 * BS and list(dev.bitmap.indices()) == [4, 5, 6]
    assert dev.is_populated(Section(mr, 4 * BS, 3 * BS))
    assert unplug(dev, 5) == RESP_ACK
    assert list(dev.bitmap.indices()) == [4, 6] and dev.size == 2 * BS
    assert sizes == [3 * BS, 2 * BS]
    assert dev.info()["size"] == 2 * BS


def test_plug_nack_beyond_requested(make):
    dev, _ = make(requested=8 * MiB)
    assert plug(dev, 0, 4) == RESP_ACK
    assert plug(dev, 4) == RESP_NACK
    assert dev.size == 8 * MiB
    # unplugging is always allowed, also when above the requested size
    dev.set_requested_size(0)
    assert unplug(dev, 0) == RESP_ACK


def test_error_when_not_all_blocks_in_opposite_state(make):
    dev, _ = make()
    assert plug(dev, 2, 2) == RESP_ACK
    assert plug(dev, 2) == RESP_ERROR  # already plugged
    assert plug(dev, 1, 2) == RESP_ERROR  # mixed
    assert unplug(dev, 0) == RESP_ERROR  # already unplugged
    assert unplug(dev, 3, 2) == RESP_ERROR  # mixed
    assert list(dev.bitmap.indices()) == [2, 3] and dev.size == 2 * BS


@pytest.mark.parametrize("t", [REQ_PLUG, REQ_UNPLUG, REQ_STATE])
@pytest.mark.parametrize(
    "gpa, nb",
    [
        (ADDR + MiB, 1),  # misaligned
        (ADDR, 0),  # zero blocks
        ((1 << 64) - BS, 2),  # overflow
        (ADDR - BS, 1),  # below the region
        (ADDR + 24 * MiB, 1),  # starts at the end of the usable region
        (ADDR + 22 * MiB, 2),  # ends beyond the usable region
        (ADDR + 64 * MiB, 1),  # beyond the region itself
    ],
)
def test_invalid_ranges_are_errors(make, t, gpa, nb):
    dev, _ = make(requested=16 * MiB, usable_extent=8 * MiB)
    assert dev.usable_region_size == 24 * MiB
    assert req(dev, t, gpa, nb) == (RESP_ERROR, 0)
    assert dev.size == 0 and not dev.broken


def test_last_usable_block_is_valid(make):
    dev, _ = make(requested=16 * MiB, usable_extent=8 * MiB)
    assert plug(dev, 11) == RESP_ACK
    assert req(dev, REQ_STATE, ADDR + 11 * BS, 1) == (RESP_ACK, STATE_PLUGGED)


def test_state_answers(make):
    dev, _ = make()
    assert plug(dev, 2, 2) == RESP_ACK
    assert req(dev, REQ_STATE, ADDR + 2 * BS, 2) == (RESP_ACK, STATE_PLUGGED)
    assert req(dev, REQ_STATE, ADDR + 4 * BS, 5) == (RESP_ACK, STATE_UNPLUGGED)
    assert req(dev, REQ_STATE, ADDR + BS, 2) == (RESP_ACK, STATE_MIXED)
    assert req(dev, REQ_STATE, ADDR, 32) == (RESP_ACK, STATE_MIXED)
    dev.hold_state("test")
    assert req(dev, REQ_STATE, ADDR + 2 * BS, 2) == (RESP_ACK, STATE_PLUGGED)  # no busy check


def test_busy(make):
    dev, mr = make()
    assert plug(dev, 0, 2) == RESP_ACK
    hold = dev.hold_state("migration 1")
    assert dev.is_busy() and dev.holders() == ["migration 1"]
    assert plug(dev, 4) == RESP_BUSY
    assert unplug(dev, 0) == RESP_BUSY
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_BUSY, 0)
    assert dev.size == 2 * BS and list(dev.bitmap.indices()) == [0, 1]
    # validity is checked before busy
    assert plug(dev, 0) == RESP_ERROR
    assert req(dev, REQ_PLUG, ADDR + 1, 1)[0] == RESP_ERROR
    hold.release()
    hold.release()  # idempotent
    assert not dev.is_busy()
    assert unplug(dev, 0, 2) == RESP_ACK
    hold = dev.hold_state("migration 2")
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)  # nothing plugged: no busy check
    hold.release()
    assert not dev.is_busy()


def test_busy_until_every_hold_is_released(make):
    """Two migrations' holds are independent: the first releasing its hold must not let
    the guest change plugged memory while the second still migrates."""
    dev, _ = make()
    assert plug(dev, 0, 2) == RESP_ACK
    first = dev.hold_state("first migration")
    second = dev.hold_state("second migration")
    first.release()
    assert dev.is_busy() and dev.holders() == ["second migration"]
    assert unplug(dev, 0) == RESP_BUSY
    with second:
        assert dev.is_busy()
    assert not dev.is_busy()
    assert unplug(dev, 0) == RESP_ACK


def test_device_errors_break_until_reset(make):
    dev, _ = make()
    with pytest.raises(VirtioMemDeviceError, match="invalid request size: 23"):
        dev.handle_request(encode_request(REQ_PLUG, ADDR, 1)[:23])
    assert dev.broken and "request size" in dev.broken_reason
    with pytest.raises(VirtioMemDeviceError, match="broken"):
        dev.handle_request(encode_request(REQ_STATE, ADDR, 1))
    dev.reset()
    assert not dev.broken and dev.broken_reason is None
    assert req(dev, REQ_STATE, ADDR, 1) == (RESP_ACK, STATE_UNPLUGGED)
    with pytest.raises(VirtioMemDeviceError, match="unknown request type: 4"):
        dev.handle_request(encode_request(4, ADDR, 1))
    assert dev.broken
    dev.reset()
    with pytest.raises(VirtioMemDeviceError, match="invalid response size: 8"):
        dev.handle_request(encode_request(REQ_STATE, ADDR, 1), resp_capacity=8)
    dev.reset()
    # longer requests are fine: only the struct is read
    raw = dev.handle_request(encode_request(REQ_PLUG, ADDR, 1) + b"\xff" * 8, resp_capacity=10)
    assert decode_response(raw) == (RESP_ACK, 0)


@pytest.mark.parametrize("backend", ["memfd", "anon"])
def test_unplug_frees_host_memory(make, backend):
    dev, mr = make(backend=backend)
    blk = mr.block
    assert plug(dev, 0, 8) == RESP_ACK
    fill(mr, 0, 8 * BS)
    assert blk.allocated_bytes(0, 8 * BS) == 8 * BS
    assert unplug(dev, 2, 3) == RESP_ACK
    assert blk.allocated_bytes(2 * BS, 3 * BS) == 0
    assert blk.allocated_bytes(0, 8 * BS) == 5 * BS
    assert not blk.pages_array(2 * BS, 3 * BS).any()
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert blk.allocated_bytes() == 0


def test_unplug_order_discard_then_notify_then_clear(make):
    dev, mr = make()
    assert plug(dev, 0, 4) == RESP_ACK
    fill(mr, 0, 4 * BS)
    seen = []

    def on_discard(s: Section) -> None:
        # host memory is already gone, the bits still say plugged
        seen.append((mr.block.allocated_bytes(s.offset, s.size), dev.bitmap.count(0, 4)))

    lst = RamDiscardListener(discard=on_discard)
    dev.register_listener(lst, Section(mr, BS, 2 * BS))
    assert unplug(dev, 1, 2) == RESP_ACK
    assert seen == [(0, 4)]
    assert dev.bitmap.count(0, 4) == 2


def test_plug_notifies_listeners_with_intersection(make):
    dev, mr = make()
    log: list = []
    a = Recorder(log=log)
    b = Recorder(log=log)
    far = Recorder(log=log)
    dev.register_listener(a, Section(mr, 0, 32 * MiB))
    dev.register_listener(b, Section(mr, 3 * MiB, 6 * MiB))  # not block aligned
    dev.register_listener(far, Section(mr, 40 * MiB, 8 * MiB))
    assert dev.listeners == [far, b, a]
    assert plug(dev, 1, 3) == RESP_ACK  # [2, 8) MiB
    # newest first; each gets its intersection; `far` does not intersect
    assert log == [(b, "populate", 3 * MiB, 5 * MiB), (a, "populate", 2 * MiB, 6 * MiB)]
    log.clear()
    assert unplug(dev, 2) == RESP_ACK  # [4, 6) MiB
    assert log == [(b, "discard", 4 * MiB, BS), (a, "discard", 4 * MiB, BS)]


def test_plug_objection_rolls_back(make):
    dev, mr = make()
    log: list = []
    first = Recorder(log=log)
    touch_then_refuse = Recorder(refuse=-errno.ENOMEM, log=log)
    last = Recorder(log=log)
    dev.register_listener(first, mr.whole())
    dev.register_listener(touch_then_refuse, mr.whole())
    dev.register_listener(last, mr.whole())  # notified first, so it gets the rollback

    orig = touch_then_refuse.notify_populate

    def populate(s: Section) -> int:
        fill(mr, s.offset, s.size)  # e.g. a mapper that touched memory before failing
        return orig(s)

    touch_then_refuse.notify_populate = populate  # type: ignore[method-assign]
    sizes: list[int] = []
    dev.on_size_change.append(lambda d, n: sizes.append(n))
    assert plug(dev, 4, 2) == RESP_BUSY
    assert log == [
        (last, "populate", 4 * BS, 2 * BS),
        (touch_then_refuse, "populate", 4 * BS, 2 * BS),
        (last, "discard", 4 * BS, 2 * BS),
    ]
    assert first.events == []
    assert dev.size == 0 and dev.bitmap.count() == 0 and sizes == []
    assert mr.block.allocated_bytes() == 0  # discarded again


def test_prealloc_populates_on_plug(make):
    dev, mr = make(prealloc=True)
    assert plug(dev, 0, 2) == RESP_ACK
    assert mr.block.allocated_bytes(0, 2 * BS) == 2 * BS


def test_unplug_all_and_listeners(make):
    dev, mr = make(requested=32 * MiB)
    assert plug(dev, 0, 2) == RESP_ACK
    assert plug(dev, 5) == RESP_ACK
    assert plug(dev, 7, 3) == RESP_ACK
    dbl = Recorder(double=True)
    single = Recorder()
    dev.register_listener(dbl, Section(mr, MiB, 30 * MiB))
    dev.register_listener(single, Section(mr, MiB, 30 * MiB))
    dbl.events.clear()
    single.events.clear()
    sizes: list[int] = []
    dev.on_size_change.append(lambda d, n: sizes.append(n))
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert dbl.events == [("discard", MiB, 30 * MiB)]
    assert single.events == [
        ("discard", MiB, 3 * MiB),
        ("discard", 5 * BS, BS),
        ("discard", 7 * BS, 3 * BS),
    ]
    assert dev.size == 0 and dev.bitmap.count() == 0 and sizes == [0]
    # with nothing plugged, unplug-all notifies nobody
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert len(dbl.events) == 1 and sizes == [0]


def test_register_and_unregister_replay(make):
    dev, mr = make()
    assert plug(dev, 1, 2) == RESP_ACK
    assert plug(dev, 6) == RESP_ACK
    single = Recorder()
    sec = Section(mr, 3 * MiB, 10 * MiB)
    dev.register_listener(single, sec)
    assert single.section == sec
    assert single.events == [("populate", 3 * MiB, 3 * MiB), ("populate", 12 * MiB, MiB)]
    with pytest.raises(ValueError):
        dev.register_listener(single, sec)
    single.events.clear()
    dev.unregister_listener(single)
    assert single.events == [("discard", 3 * MiB, 3 * MiB), ("discard", 12 * MiB, MiB)]
    assert single.section is None and dev.listeners == []
    with pytest.raises(ValueError):
        dev.unregister_listener(single)

    dbl = Recorder(double=True)
    dev.register_listener(dbl, sec)
    dbl.events.clear()
    dev.unregister_listener(dbl)
    assert dbl.events == [("discard", 3 * MiB, 10 * MiB)]

    # nothing plugged: unregister notifies nothing, even double-discard listeners
    assert req(dev, REQ_UNPLUG_ALL)[0] == RESP_ACK
    dev.register_listener(dbl, sec)
    dev.unregister_listener(dbl)
    assert dbl.events == [("discard", 3 * MiB, 10 * MiB)]


def test_register_objection_only_logged(make, caplog):
    dev, mr = make()
    assert plug(dev, 0) == RESP_ACK
    assert plug(dev, 3) == RESP_ACK
    lst = Recorder(refuse=-errno.EIO)
    dev.register_listener(lst, mr.whole())
    assert lst.events == [("populate", 0, BS)]  # stopped at the first failure
    assert dev.listeners == [lst]
    assert "replaying plugged ranges failed" in caplog.text


def test_reset(make):
    dev, mr = make()
    assert plug(dev, 0, 4) == RESP_ACK
    hold = dev.hold_state("test")
    assert not dev.reset()  # refused while migrating
    assert dev.size == 4 * BS
    assert dev.reset(wakeup=True) and dev.size == 4 * BS
    hold.release()
    assert dev.reset()
    assert dev.size == 0 and dev.bitmap.count() == 0 and mr.block.allocated_bytes() == 0


# -- requested size and usable region ---------------------------------------------------------
def test_usable_region_rules(make):
    dev, _ = make(size=1 * GiB, requested=0, usable_extent=3 * MiB)
    assert dev.usable_region_size == 0  # nothing requested: nothing usable
    events: list[tuple[int, int]] = []
    dev.on_config_change.append(lambda d: events.append((d.requested_size, d.usable_region_size)))
    dev.set_requested_size(10 * MiB)
    assert dev.usable_region_size == 14 * MiB  # 10 + 3, aligned up to the block size
    assert plug(dev, 0, 5) == RESP_ACK
    dev.set_requested_size(2 * MiB)
    assert dev.usable_region_size == 14 * MiB  # never shrinks at runtime
    dev.set_requested_size(GiB)
    assert dev.usable_region_size == GiB  # capped by the region
    dev.set_requested_size(0)
    assert dev.usable_region_size == GiB
    assert events == [(10 * MiB, 14 * MiB), (2 * MiB, 14 * MiB), (GiB, GiB), (0, GiB)]
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert dev.usable_region_size == 0  # unplug-all may shrink
    dev.set_requested_size(4 * MiB)
    assert req(dev, REQ_UNPLUG_ALL) == (RESP_ACK, 0)
    assert dev.usable_region_size == 8 * MiB


def test_set_requested_size_errors(make):
    dev, _ = make()
    with pytest.raises(VirtioMemError, match="multiples of 'block-size'"):
        dev.set_requested_size(3 * MiB)
    with pytest.raises(VirtioMemError, match="cannot exceed the memory backend size"):
        dev.set_requested_size(66 * MiB)
    assert dev.requested_size == 32 * MiB


def test_config_space(make):
    dev, _ = make(node=3, requested=8 * MiB)
    assert plug(dev, 1, 2) == RESP_ACK
    cfg = dev.config_space()
    assert len(cfg) == 56
    expected = (
        BS.to_bytes(8, "little")
        + (3).to_bytes(2, "little")
        + bytes(6)
        + ADDR.to_bytes(8, "little")
        + (64 * MiB).to_bytes(8, "little")
        + (64 * MiB).to_bytes(8, "little")
        + (4 * MiB).to_bytes(8, "little")
        + (8 * MiB).to_bytes(8, "little")
    )
    assert cfg == expected


def test_info(make):
    dev, _ = make(node=1)
    assert plug(dev, 0) == RESP_ACK
    assert dev.info() == {
        "id": "vmem0",
        "memaddr": ADDR,
        "requested-size": 32 * MiB,
        "size": BS,
        "max-size": 64 * MiB,
        "block-size": BS,
        "node": 1,
        "memdev": "/objects/vmem0-memdev",
    }
    named, _ = make(name="v1", memdev="mem1")
    assert named.info()["memdev"] == "/objects/mem1"


# -- migration ---------------------------------------------------------------------------------
def test_save_load_roundtrip_discards_unplugged(make):
    src, _ = make(name="src")
    for b, n in ((0, 2), (5, 1), (9, 4)):
        assert plug(src, b, n) == RESP_ACK
    state = src.save_state()
    assert state["bitmap"] is not src.bitmap and state["bitmap"] == src.bitmap
    assert {k: v for k, v in state.items() if k != "bitmap"} == {
        "addr": ADDR,
        "region_size": 64 * MiB,
        "block_size": BS,
        "node": 0,
        "usable_region_size": 64 * MiB,
        "size": 7 * BS,
        "requested_size": 32 * MiB,
    }
    dst, dmr = make(name="dst", requested=0, incoming=True)
    fill(dmr, 0, 64 * MiB)  # pretend precopy populated everything
    lst = Recorder()
    dst.register_listener(lst, dmr.whole())
    dst.load_state(state)
    assert dst.bitmap == src.bitmap and dst.size == 7 * BS
    assert dst.requested_size == 32 * MiB and dst.usable_region_size == 64 * MiB
    assert lst.events == [
        ("populate", 0, 2 * BS),
        ("populate", 5 * BS, BS),
        ("populate", 9 * BS, 4 * BS),
    ]
    blk = dmr.block
    assert blk.allocated_bytes() == 7 * BS
    assert list(blk.data_extents(0, 64 * MiB)) == [
        (0, 2 * BS),
        (5 * BS, 6 * BS),
        (9 * BS, 13 * BS),
    ]


def test_load_postcopy_keeps_host_memory(make):
    src, _ = make(name="src")
    assert plug(src, 1) == RESP_ACK
    dst, dmr = make(name="dst", incoming=True)
    fill(dmr, 0, 8 * MiB)
    dst.load_state(src.save_state(), postcopy=True)
    assert dst.size == BS and dmr.block.allocated_bytes() == 8 * MiB
    dst2, dmr2 = make(name="dst2", incoming=True)
    fill(dmr2, 0, 8 * MiB)
    dst2.load_state(src.save_state(), ram_ignored=True)
    assert dmr2.block.allocated_bytes() == 8 * MiB


def test_load_wire_bitmap(make):
    src, _ = make(name="src")
    assert plug(src, 3, 4) == RESP_ACK
    state = src.save_state()
    state["bitmap"] = state["bitmap"].to_be_words()
    dst, _ = make(name="dst", incoming=True)
    dst.load_state(state)
    assert list(dst.bitmap.indices()) == [3, 4, 5, 6]


@pytest.mark.parametrize(
    "key, value, msg",
    [
        ("addr", ADDR + GiB, "Property 'memaddr' changed from 0x140000000 to 0x100000000"),
        ("region_size", 128 * MiB, "Property 'memdev' size changed from 0x8000000 to 0x4000000"),
        ("block_size", 4 * MiB, "Property 'block-size' changed from 0x400000 to 0x200000"),
        ("node", 2, "Property 'node' changed from 2 to 0"),
    ],
)
def test_load_sanity_checks(make, key, value, msg):
    src, _ = make(name="src")
    dst, dmr = make(name="dst", incoming=True)
    fill(dmr, 0, 4 * MiB)
    state = src.save_state()
    state[key] = value
    with pytest.raises(VirtioMemError) as ei:
        dst.load_state(state)
    assert str(ei.value) == msg
    assert dmr.block.allocated_bytes() == 4 * MiB  # nothing touched


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.__setitem__("bitmap", Bitmap(31)),
        lambda s: s.__setitem__("bitmap", b"\0" * 16),
        lambda s: s.__setitem__("bitmap", (1 << 40).to_bytes(8, "big")),  # bit beyond 32
        lambda s: s.__setitem__("size", 3 * BS),
        lambda s: s.__setitem__("requested_size", MiB),
        lambda s: s.__setitem__("usable_region_size", 128 * MiB),
    ],
)
def test_load_rejects_inconsistent_state(make, mutate):
    src, _ = make(name="src")
    assert plug(src, 0) == RESP_ACK
    dst, _ = make(name="dst", incoming=True)
    state = src.save_state()
    mutate(state)
    with pytest.raises(VirtioMemError):
        dst.load_state(state)
    assert dst.size == 0


def test_load_listener_refusal_fails(make):
    src, _ = make(name="src")
    assert plug(src, 0) == RESP_ACK
    dst, dmr = make(name="dst", incoming=True)
    dst.register_listener(Recorder(refuse=-errno.ENOMEM), dmr.whole())
    with pytest.raises(VirtioMemError, match="refused"):
        dst.load_state(src.save_state())


# -- big sparse regions and concurrency ------------------------------------------------------
def test_one_tib_region():
    blk = RAMBlock("big", TiB)
    try:
        mr = MemoryRegion("big", blk, addr=TiB)
        dev = VirtioMem("big", mr, TiB, BS)
        nb = dev.bitmap.nbits
        assert nb == 524288
        last = nb - 3
        assert plug(dev, last, 2) == RESP_ACK
        assert plug(dev, 7) == RESP_ACK
        fill(mr, last * BS, 2 * BS)
        assert blk.allocated_bytes() == 2 * BS
        offs, sizes = dev.populated_runs(mr.whole())
        assert offs == [7 * BS, last * BS] and sizes == [BS, 2 * BS]
        offs, sizes = dev.discarded_runs(mr.whole())
        assert offs == [0, 8 * BS, (nb - 1) * BS]
        assert sum(sizes) == TiB - 3 * BS
        assert dev.is_populated(Section(mr, last * BS + 5, BS))
        assert not dev.is_populated(Section(mr, last * BS, 3 * BS))
        assert unplug(dev, last, 2) == RESP_ACK
        assert blk.allocated_bytes() == 0
    finally:
        blk.close()


def test_concurrent_requests_and_walks(make):
    dev, mr = make(requested=64 * MiB)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guest(base: int) -> None:
        try:
            for _ in range(200):
                for b in range(base, 32, 4):
                    plug(dev, b)
                for b in range(base, 32, 4):
                    unplug(dev, b)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                dev.replay_populated(mr.whole(), lambda s: 0)
                state = dev.save_state()  # one consistent snapshot
                assert state["size"] == state["bitmap"].count() * BS
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=guest, args=(i,)) for i in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert not errors
    assert dev.size == 0 and dev.bitmap.count() == 0
