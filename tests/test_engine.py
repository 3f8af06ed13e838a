"""Regression tests of the rebuilt migration engine (issue 13): one owner of a migration's
state, one RAM pipeline.

1. A failed migration cannot let the guest unplug memory during the next one: the final
   status is published after clean-up, and each migration holds the RamDiscardManager
   with its own hold.
2. No multifd channel thread reads guest memory once unplugging is allowed again.
3. A block whose ``max_length`` exceeds its ``used_length`` migrates; nothing beyond the
   used length is sent, even if the guest wrote there.
4. Section ids follow registration order from 1 (``ram`` first), never 0, and an
   analyze-migration.py-style walk still reads a whole stream.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_precopy import MiB, boot, machine, unplugged_allocation, wait_for
from test_stream_format import _walk_like_analyze_migration

from livemig.control.vm_controller import VMController
from livemig.devices.virtio_mem import VirtioMem
from livemig.memory.dirty_log import BitmapDirtyLog
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import GuestMemoryMap, MemoryRegion
from livemig.migration.ram.codec import write_block_list
from livemig.migration.ram.load import RamLoader
from livemig.migration.ram.sender import StreamSink, send_pass
from livemig.migration.ram.state import RamState
from livemig.migration.stream.format import SectionType
from livemig.migration.stream.qemu_file import bytes_reader, bytes_writer

PAGE = 4096


def test_a_failed_migration_never_releases_the_next_ones_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail a migration and at once start another; during the second, the guest asks to
    unplug: the device answers BUSY until the second ends, and nothing unplugged is read."""
    real_release = VirtioMem.release_hold

    def slow_release(self: VirtioMem, hold: Any) -> None:
        time.sleep(0.5)  # a slow clean-up: the window in which a new migrate could start
        real_release(self, hold)

    monkeypatch.setattr(VirtioMem, "release_hold", slow_release)
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 128 * MiB)
        assert src.vmem is not None and src.driver is not None
        cs.migrate(f"unix:{tmp_path / 'nobody-listens.sock'}")
        wait_for(lambda: cs.query_migrate()["status"] == "failed", what="first migration failed")
        # the final status comes after clean-up: nothing of the first migration is left
        assert src.vmem.holders() == []
        cs.params.set({"max-bandwidth": 48 * MiB})
        cd.migrate_incoming(f"unix:{tmp_path / 'second.sock'}")
        cs.migrate(f"unix:{tmp_path / 'second.sock'}")  # accepted at once
        wait_for(lambda: cs.outgoing.status == "active", what="second migration active")
        busy_before = src.driver.busy_replies
        src.vmem.set_requested_size(64 * MiB)  # the guest driver tries to unplug now
        wait_for(lambda: src.driver.busy_replies > busy_before + 2, what="BUSY replies")
        while not cs.outgoing.done.is_set():
            assert src.vmem.size == 128 * MiB, "memory unplugged during the second migration"
            assert cs.outgoing.done.is_set() or src.vmem.holders() == [
                f"migration to unix:{tmp_path / 'second.sock'}"
            ]
            time.sleep(0.05)
        assert cs.outgoing.status == "completed", cs.query_migrate()
        assert cd.incoming.wait(30) and cd.incoming.status == "completed"
        assert unplugged_allocation(cs) == 0  # nothing unplugged was read (memfd holes)
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


def test_no_multifd_channel_thread_reads_memory_once_unplug_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel a multifd migration mid-transfer: when its hold on the discard manager goes,
    every channel thread (which reads guest RAM) has already stopped."""
    alive_at_release: list[list[str]] = []
    real_release = VirtioMem.release_hold

    def watching_release(self: VirtioMem, hold: Any) -> None:
        alive_at_release.append([t.name for t in threading.enumerate() if t.name.startswith("multifd-send")])
        real_release(self, hold)

    monkeypatch.setattr(VirtioMem, "release_hold", watching_release)
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        for c in (cs, cd):
            c.migrate_set_capabilities([{"capability": "multifd", "state": True}])
        cs.params.set({"max-bandwidth": 64 * MiB})
        uri = f"unix:{tmp_path / 'mfd.sock'}"
        cd.migrate_incoming(uri)
        cs.migrate(uri)
        wait_for(lambda: cs.query_migrate().get("ram", {}).get("multifd-bytes", 0) > 16 * MiB,
                 what="pages on the channels")
        assert any(t.name.startswith("multifd-send") for t in threading.enumerate())
        cs.migrate_cancel()
        assert cs.outgoing.wait(30) and cs.outgoing.status == "cancelled"
        assert alive_at_release == [[]], alive_at_release
        assert src.runstate == "running"
    finally:
        src.close()
        dst.close()


def test_block_with_spare_length_migrates_only_its_used_length() -> None:
    """A RAM block of used_length < max_length that the guest wrote beyond used_length:
    the pages past used_length are not the block's; they are not synced or sent, and the
    destination (which refuses them) loads the stream."""
    used, spare = 4 * MiB, 8 * MiB

    def region() -> tuple[GuestMemoryMap, RAMBlock]:
        gm = GuestMemoryMap()
        block = RAMBlock("spare", used, max_length=spare)
        gm.add(MemoryRegion("spare", block, 0))
        return gm, block

    gm, block = region()
    log = BitmapDirtyLog(gm.blocks)
    ram = RamState(gm.regions, log)
    ram.init_bitmaps()
    pages = block.pages_array(0, spare)
    rng = np.random.default_rng(3)
    inside = np.arange(0, used // PAGE, 7)
    beyond = np.arange(used // PAGE, spare // PAGE, 5)
    for idx in (inside, beyond):  # the guest writes both, and the log sees both
        pages[idx] = rng.integers(1, 256, (len(idx), PAGE), dtype=np.uint8)
        log.mark(block, idx)
    w = bytes_writer()
    write_block_list(w, [block])
    sink = StreamSink(w, ram.stats)
    # the first pass, then the pass after a sync that saw both writes: only the pages
    # inside used_length come back, those beyond it are masked off
    for new in (len(inside), 0):
        sink.start_section()
        assert send_pass(ram, sink, w)
        sink.end_section()
        assert ram.sync() == new
        assert ram.remaining_bytes == new * PAGE

    dst_gm, dst_block = region()
    loader = RamLoader(dst_gm.blocks)
    r = bytes_reader(w.getvalue())
    loader.load_setup(r)
    for _ in range(2):
        loader.start_section()
        loader.load(r)  # raised "offset beyond used length" before the fix
    sent = np.flatnonzero(np.unpackbits(loader.received["spare"].words.view(np.uint8), bitorder="little"))
    assert sent.max() < used // PAGE and len(sent) == used // PAGE
    dst_pages = dst_block.pages_array(0, spare)
    assert np.array_equal(dst_pages[: used // PAGE], pages[: used // PAGE])
    assert not dst_pages[used // PAGE :].any()


def test_sections_are_numbered_from_one_in_registration_order(tmp_path: Path) -> None:
    """No section of a livemig stream has id 0 (QEMU's loader would resolve PART/END of id 0
    to another handler); ``ram`` registers first, then the machine's sections in the order
    their owners registered them; an analyze-migration.py-style walk reads the file."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        path = tmp_path / "numbered.stream"
        cs.migrate(f"file:{path}")
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        ids: list[tuple[int, int, str]] = []
        seen = _walk_like_analyze_migration(path.read_bytes(), ids)
        assert ids and all(sid != 0 for _, sid, _ in ids), ids
        named = [(sid, name) for t, sid, name in ids if t in (SectionType.START, SectionType.FULL)]
        expected = ["ram"] + [s.idstr for s in src.state if s.early] + [s.idstr for s in src.state if not s.early]
        assert [name for _, name in named] == expected
        order = {s.idstr: i for i, s in enumerate(src.state, start=2)}
        assert dict((name, sid) for sid, name in named) == {"ram": 1, **order}
        assert {sid for t, sid, _ in ids if t in (SectionType.PART, SectionType.END)} == {1}
        assert [name for name, _ in seen][1:] == expected[1:]  # every device walked by its vmdesc
        cd.migrate_incoming(f"file:{path}")
        assert cd.incoming.wait(60) and cd.incoming.status == "completed", cd.query_migrate()
        assert src.checksum() == dst.checksum()
    finally:
        src.close()
        dst.close()


MIGRATION_THREADS = ("migration-", "multifd-", "prefault")
SIDE_THREADS = {
    "source": ("migration-rp", "multifd-send"),
    "destination": ("multifd-recv", "multifd-accept", "multifd-populate", "prefault"),
}


def migration_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(MIGRATION_THREADS))


@pytest.mark.parametrize("multifd", [False, True], ids=["precopy", "multifd"])
def test_no_thread_outlives_its_migration(tmp_path: Path, multifd: bool) -> None:
    """A completed, a cancelled and a failed migration each leave no thread behind on
    either side: every helper thread is woken and joined, never abandoned — already when
    the final status is published (the MIGRATION event), and after."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    at_final: list[tuple[str, str, list[str]]] = []

    def watcher(side: str) -> Any:
        def emit(event: str, data: dict[str, Any] | None = None) -> None:
            if event == "MIGRATION" and data and data["status"] in ("completed", "failed", "cancelled"):
                alive = [t.name for t in threading.enumerate() if t.name.startswith(SIDE_THREADS[side])]
                at_final.append((side, data["status"], alive))
        return emit

    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        cs.emit, cd.emit = watcher("source"), watcher("destination")  # type: ignore[method-assign]
        boot(src, 128 * MiB)
        caps = [{"capability": "multifd", "state": multifd}, {"capability": "events", "state": True}]
        for c in (cs, cd):
            c.migrate_set_capabilities(caps)
        assert migration_threads() == []
        # cancelled midway
        cs.params.set({"max-bandwidth": 32 * MiB})
        cd.migrate_incoming(f"unix:{tmp_path / 'a.sock'}")
        cs.migrate(f"unix:{tmp_path / 'a.sock'}")
        wait_for(lambda: cs.query_migrate().get("ram", {}).get("transferred", 0) > 8 * MiB, what="transfer")
        cs.migrate_cancel()
        assert cs.outgoing.wait(30) and cd.incoming.wait(30)
        for job in (cs.outgoing.job, cd.incoming.job):
            job.join()
        assert cs.outgoing.status == "cancelled" and cd.incoming.status == "failed"
        assert migration_threads() == []
        # failed: nobody listens
        cs.migrate(f"unix:{tmp_path / 'nobody.sock'}")
        assert cs.outgoing.wait(30) and cs.outgoing.status == "failed"
        cs.outgoing.job.join()
        assert migration_threads() == []
        # completed
        cs.params.set({"max-bandwidth": 0})
        cd.migrate_incoming(f"unix:{tmp_path / 'b.sock'}")
        cs.migrate(f"unix:{tmp_path / 'b.sock'}")
        assert cs.outgoing.wait(60) and cd.incoming.wait(60)
        for job in (cs.outgoing.job, cd.incoming.job):
            job.join()
        assert cs.outgoing.status == "completed" and cd.incoming.status == "completed"
        assert migration_threads() == []
        assert sorted((side, st) for side, st, _ in at_final) == sorted([
            ("source", "cancelled"), ("destination", "failed"), ("source", "failed"),
            ("source", "completed"), ("destination", "completed"),
        ])
        assert all(alive == [] for _, _, alive in at_final), at_final
    finally:
        src.close()
        dst.close()
