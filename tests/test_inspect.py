"""``livemig inspect``: streams written by livemig and by QEMU, and damaged ones.

The livemig streams come from real precopy migrations to ``file:`` in this process; the
QEMU stream from Debian's ``qemu-system-x86_64`` (7.2) migrating a guest with a virtio-mem
device to ``exec:cat > FILE``. Every number the inspector reports is compared with what the
*source* said it sent (``query-migrate``), not with anything the inspector computed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import waiter

from livemig.cli.inspect import main
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.inspect import StreamReport, check_discard, inspect_stream
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.migration.stream.format import RamFlag

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096
BLOCK = 2 * MiB
REGION = 2 * GiB
OFFSET_MSG = re.compile(r"offset 0x[0-9a-f]+: \S")


wait_for = waiter(30.0, step=0.02)


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run_main(*args, "--json")
    assert "Traceback" not in out + err
    return code, json.loads(out)


@dataclass
class Source:
    """A stream file and what its source reported about it."""

    path: Path
    ram: dict[str, Any]  # query-migrate "ram" of the source
    blocks: dict[str, int]  # RAM block name -> used length
    plugged: np.ndarray  # indices of plugged virtio-mem blocks
    nbits: int
    vmem_addr: int


def make_machine(plugged: int, dirty_rate: int, prefill: bool) -> tuple[Machine, VMController]:
    m = Machine(
        MachineConfig(
            memory=64 * MiB,
            virtio_mem=VirtioMemConfig(size=REGION, block_size=BLOCK),
            workload=WorkloadConfig(
                vcpus=1, dirty_rate=dirty_rate, content="mixed", prefill=prefill
            ),
        )
    )
    ctl = VMController(m)
    m.start()
    assert m.vmem is not None
    m.vmem.set_requested_size(plugged)
    wait_for(
        lambda: (
            m.driver is not None
            and m.driver.plugged_size == plugged
            and m.workload.fill_done.is_set()
        ),
        what="plug and fill",
    )
    return m, ctl


def finish(m: Machine, ctl: VMController, path: Path) -> Source:
    assert ctl.outgoing.wait(120), "migration did not finish"
    info = ctl.query_migrate()
    assert info["status"] == "completed", info
    assert m.vmem is not None and m.vmem_mr is not None
    return Source(
        path,
        info["ram"],
        {b.idstr: b.used_length for b in m.blocks},
        m.vmem.bitmap.indices(),
        m.vmem.bitmap.nbits,
        m.vmem_mr.addr,
    )


@pytest.fixture(scope="module")
def livemig_stream(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A live precopy (the guest keeps writing, so several passes) of 64 MiB RAM plus a
    2 GiB virtio-mem region with 128 MiB plugged."""
    path = tmp_path_factory.mktemp("lm") / "live.stream"
    m, ctl = make_machine(128 * MiB, dirty_rate=16 * MiB, prefill=True)
    try:
        ctl.migrate(f"file:{path}")
        return finish(m, ctl, path)
    finally:
        m.close()


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A small stream for damage tests: never-written memory goes as ZERO records, plus a
    long run of data pages (numpy path), alternating zero/data pages (short-run path) and
    a few data pages in plugged virtio-mem memory."""
    path = tmp_path_factory.mktemp("small") / "small.stream"
    m, ctl = make_machine(32 * MiB, dirty_rate=0, prefill=False)
    try:
        assert m.vmem_mr is not None
        m.accel.write(1 * MiB, bytes(range(256)) * (64 * PAGE // 256))  # 64 data pages
        for i in range(0, 40, 2):
            m.accel.write(8 * MiB + i * PAGE, b"\x11" * PAGE)  # alternating
        for i in (0, 1, 2, 100, 3000):
            m.accel.write(m.vmem_mr.addr + i * PAGE, b"\x22" * PAGE)
        ctl.migrate(f"file:{path}")
        return finish(m, ctl, path)
    finally:
        m.close()


def check_against_source(report: StreamReport, src: Source) -> None:
    assert report.complete and report.stopped is None, report.stopped
    assert {n: b.length for n, b in report.ram_blocks.items()} == src.blocks
    assert report.ram_total == src.ram["total"]
    assert report.zero_pages == src.ram["duplicate"]
    assert report.normal_pages == src.ram["normal"]
    assert report.zero_pages + report.normal_pages > 0
    (dev,) = report.devices
    assert dev.id == "vm0" and dev.ram_block == "vm0-memdev"
    assert dev.bitmap is not None
    assert dev.total_blocks == src.nbits == REGION // BLOCK
    assert dev.plugged_blocks == len(src.plugged)
    assert np.array_equal(dev.bitmap.indices(), src.plugged)
    assert (dev.addr, dev.region_size, dev.block_size) == (src.vmem_addr, REGION, BLOCK)


# =============================================================================================
# (1) streams written by livemig
# =============================================================================================


def test_livemig_stream_counts_match_the_source(livemig_stream: Source) -> None:
    report = inspect_stream(livemig_stream.path)
    check_against_source(report, livemig_stream)
    assert report.vmdesc_offset is not None and report.eof_offset == report.vmdesc_offset - 1
    assert (report.configuration or {}).get("machine") == "livemig-soft"
    kinds = [(s.type, s.idstr) for s in report.sections]
    assert kinds[0] == ("START", "ram")
    assert kinds[1] == ("FULL", "vm0/virtio-mem-device-early")  # before any page
    assert ("END", "ram") in kinds and kinds[-1] == ("FULL", "livemig-guest")
    assert sum(1 for k in kinds if k == ("PART", "ram")) >= 2
    # the guest kept writing: some pages were sent again in a later pass
    distinct = sum(b.touched.count() for b in report.ram_blocks.values())
    assert report.zero_pages + report.normal_pages > distinct
    # per-section counts add up to the per-block counts
    assert sum(s.zero for s in report.sections) == report.zero_pages
    assert sum(s.normal for s in report.sections) == report.normal_pages
    # device sections were decoded from the VMDESCRIPTION
    guest = next(s for s in report.sections if s.idstr == "livemig-guest")
    assert guest.fields is not None and guest.fields["vcpus"] == 1
    # plugged memory all migrated, unplugged memory never
    vblock = report.ram_blocks["vm0-memdev"]
    assert vblock.touched.count() == len(livemig_stream.plugged) * BLOCK // PAGE
    assert report.ram_blocks["pc.ram"].touched.count() == 64 * MiB // PAGE


def test_check_discard_passes_on_a_livemig_stream(livemig_stream: Source) -> None:
    assert check_discard(inspect_stream(livemig_stream.path)) == []
    code, doc = run_json(str(livemig_stream.path), "--check-discard")
    assert code == 0, doc
    assert doc["check_discard"]["ok"] and doc["check_discard"]["violations_total"] == 0
    (dev,) = doc["virtio_mem"]
    assert dev["plugged_blocks"] == len(livemig_stream.plugged) == 64
    assert doc["ram"]["zero"] == livemig_stream.ram["duplicate"]
    assert doc["ram"]["normal"] == livemig_stream.ram["normal"]
    code, out, err = run_main(str(livemig_stream.path), "--check-discard")
    assert code == 0 and err == ""
    assert "discard check: passed" in out and "64/1024 blocks plugged" in out
    assert "vm0-memdev" in out and "virtio-mem-device-early" in out


def test_write_to_unplugged_memory_during_migration_is_reported(tmp_path: Path) -> None:
    """Reference 3.4: a guest that writes unplugged memory after the migration started
    gets that page migrated, and the check must point at exactly that record."""
    path = tmp_path / "late.stream"
    m, ctl = make_machine(64 * MiB, dirty_rate=0, prefill=True)
    try:
        ctl.migrate_set_parameters(max_bandwidth=64 * MiB)  # slow enough to write meanwhile
        ctl.migrate(f"file:{path}")
        wait_for(lambda: ctl.outgoing.status == "active", what="active")
        assert m.vmem_mr is not None
        gpa = m.vmem_mr.addr + 1 * GiB + 5 * PAGE
        m.accel.write(gpa, b"\xab" * PAGE)
        src = finish(m, ctl, path)
    finally:
        m.close()
    report = inspect_stream(path)
    assert report.zero_pages == src.ram["duplicate"] and report.normal_pages == src.ram["normal"]
    violations = check_discard(report)
    assert violations.total == len(violations) == 1 and violations.pages == 1
    (v,) = violations
    assert (v.kind, v.device, v.ram_block) == ("PAGE", "vm0", "vm0-memdev")
    assert v.gpa == gpa and v.block_offset == 1 * GiB + 5 * PAGE
    assert v.vmem_block == (1 * GiB) // BLOCK
    with open(path, "rb") as f:  # the offset points at that record's header
        f.seek(v.stream_offset)
        hdr = struct.unpack(">Q", f.read(8))[0]
    assert hdr & ~(PAGE - 1) == v.block_offset and hdr & RamFlag.PAGE
    code, doc = run_json(str(path), "--check-discard")
    assert code == 1 and not doc["check_discard"]["ok"]
    assert doc["check_discard"]["violations"][0]["stream_offset"] == v.stream_offset
    code, out, _ = run_main(str(path), "--check-discard")
    assert code == 1 and "FAILED" in out and f"0x{gpa:x}" in out
    assert main([str(path)], stdout=io.StringIO()) == 0  # plain inspection still succeeds


def _naming_records(data: bytes, block: str) -> list[int]:
    """Offsets of the page records that name ``block`` (not its MEM_SIZE list entry)."""
    name = bytes([len(block)]) + block.encode()
    out, pos = [], data.find(name, 8)
    while pos >= 0:
        hdr = struct.unpack_from(">Q", data, pos - 8)[0]
        if hdr & (RamFlag.ZERO | RamFlag.PAGE) and not hdr & RamFlag.CONTINUE:
            out.append(pos - 8)
        pos = data.find(name, pos + 1)
    return out


def _record_offsets(data: bytes, block: str, value: int) -> list[int]:
    """Offsets of the be64 ``value`` among the records of ``block``'s first run (from the
    first record naming it to the next record naming another block)."""
    start = _naming_records(data, block)[0]
    others = [o for b in ("pc.ram", "vm0-memdev") if b != block for o in _naming_records(data, b)]
    end = min([o for o in others if o > start], default=len(data))
    needle = struct.pack(">Q", value)
    out, pos = [], data.find(needle, start, end)
    while pos >= 0:
        out.append(pos)
        pos = data.find(needle, pos + 1, end)
    return out


@pytest.mark.parametrize("kind", ["PAGE", "ZERO"])
def test_crafted_record_in_unplugged_memory_is_reported(
    small_stream: Source, tmp_path: Path, kind: str
) -> None:
    """Move one record of the virtio-mem block into an unplugged block by rewriting its
    offset: the check must name that record's offset and kind, and exit 1."""
    data = bytearray(small_stream.path.read_bytes())
    if kind == "PAGE":
        flags = RamFlag.PAGE | RamFlag.CONTINUE
        old = 100 * PAGE  # a data page written by the fixture
    else:
        flags = RamFlag.ZERO | RamFlag.CONTINUE
        old = 200 * PAGE  # never written: a hole, sent as ZERO
    (at,) = _record_offsets(bytes(data), "vm0-memdev", old | flags)
    new = 1536 * MiB + 7 * PAGE  # block 768, unplugged
    assert 768 not in small_stream.plugged
    struct.pack_into(">Q", data, at, new | flags)
    path = tmp_path / "crafted.stream"
    path.write_bytes(bytes(data))
    violations = check_discard(inspect_stream(path))
    assert [(v.stream_offset, v.kind, v.block_offset, v.vmem_block) for v in violations] == [
        (at, kind, new, 768)
    ]
    code, doc = run_json(str(path), "--check-discard")
    assert code == 1 and doc["check_discard"]["violations_total"] == 1


def test_small_stream_is_consistent(small_stream: Source) -> None:
    report = inspect_stream(small_stream.path)
    check_against_source(report, small_stream)
    assert report.normal_pages == 64 + 20 + 5
    assert report.ram_blocks["vm0-memdev"].normal == 5


# =============================================================================================
# (2) a stream written by QEMU
# =============================================================================================

QEMU = shutil.which("qemu-system-x86_64")


def _qemu_ramblocks(text: str) -> dict[str, int]:
    """``info ramblock``: Block Name, PSize (2 words), Offset, Used, Total."""
    out = {}
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) >= 6:
            out[words[0]] = int(words[4], 16)
    return out


@pytest.fixture(scope="module")
def qemu_stream(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any], dict[str, int]]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    from qemu.qmp.legacy import QEMUMonitorProtocol

    d = tmp_path_factory.mktemp("qemu")
    sock, path = d / "qmp.sock", d / "qemu.stream"
    cmd = [
        QEMU, "-machine", "pc", "-accel", "tcg", "-m", "128M,maxmem=2G,slots=1",
        "-nodefaults", "-display", "none", "-S",
        "-object", "memory-backend-memfd,id=mem0,size=1G",
        "-device", "virtio-mem-pci,id=vm0,memdev=mem0,block-size=2M,requested-size=0",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    qmp = None
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 20, "QEMU's QMP socket")
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect()
        blocks = _qemu_ramblocks(
            qmp.cmd("human-monitor-command", **{"command-line": "info ramblock"})
        )
        qmp.cmd("migrate", uri=f"exec:cat > {path}")  # QEMU 7.2 has no file: URI
        info: dict[str, Any] = {}

        def done() -> bool:
            info.update(qmp.cmd("query-migrate"))
            return info.get("status") in ("completed", "failed")

        wait_for(done, 20, "QEMU's migration")
        assert info["status"] == "completed", info
        return path, info["ram"], blocks
    finally:
        if qmp is not None:
            qmp.close()
        proc.terminate()
        proc.wait(10)


def test_qemu_stream_matches_qemu(qemu_stream: tuple[Path, dict[str, Any], dict[str, int]]) -> None:
    path, ram, blocks = qemu_stream
    report = inspect_stream(path)
    assert report.complete and report.stopped is None, report.stopped
    assert {n: b.length for n, b in report.ram_blocks.items()} == blocks
    assert report.ram_total == ram["total"] == sum(blocks.values())
    assert report.zero_pages + report.normal_pages == ram["duplicate"] + ram["normal"]
    assert report.normal_pages == ram["normal"]
    assert (report.configuration or {}).get("machine", "").startswith("pc-i440fx-")
    # every device section was decoded with the VMDESCRIPTION, the stream read to its end
    devs = [s for s in report.sections if s.type == "FULL"]
    assert len(devs) == len((report.vmdesc or {})["devices"]) and all(s.fields for s in devs)
    # QEMU 7.2 has no early section: the bitmap was found inside the VirtIO device state
    (dev,) = report.devices
    assert dev.sections == [f"{dev.id}/virtio-mem"] and "located by layout" in dev.source
    assert dev.ram_block is not None and dev.ram_block.endswith("/mem0")
    assert (dev.region_size, dev.block_size, dev.plugged_blocks, dev.total_blocks) == (
        GiB, BLOCK, 0, 512,
    )  # fmt: skip
    assert dev.size == 0 and dev.requested_size == 0
    assert report.ram_blocks[dev.ram_block].records == 0  # unplugged memory was never sent
    code, doc = run_json(str(path), "--check-discard")
    assert code == 0 and doc["check_discard"]["ok"] and doc["virtio_mem"][0]["plugged_blocks"] == 0
    code, out, err = run_main(str(path))
    assert code == 0 and err == "" and "located by layout" in out


# =============================================================================================
# (3) damaged files
# =============================================================================================


@dataclass
class Landmarks:
    """Offsets of interesting bytes in a stream, found from the inspector's own report
    and the format (reference 4)."""

    ram_start: int
    first_part: int
    device: int  # a FULL device section after the RAM section
    device_idstr: str
    footer: int  # the RAM START section's footer
    page_record: int  # a PAGE|CONTINUE record in a long run
    page_payload: int
    zero_record: int  # a ZERO|CONTINUE record
    eof: int
    vmdesc: int
    size: int


def landmarks(src: Source) -> Landmarks:
    report = inspect_stream(src.path)
    data = src.path.read_bytes()
    secs = report.sections
    start = next(s for s in secs if s.type == "START")
    part = next(s for s in secs if s.type == "PART")
    dev = next(s for s in secs if s.type == "FULL" and s.offset > part.offset)
    assert start.end is not None and report.vmdesc_offset is not None
    page = _record_offsets(data, "pc.ram", (1 * MiB + 10 * PAGE) | 0x28)[0]
    zero = _record_offsets(data, "pc.ram", (20 * MiB) | 0x22)[0]
    return Landmarks(
        start.offset, part.offset, dev.offset, dev.idstr, start.end - 5, page, page + 8 + 1000,
        zero, report.vmdesc_offset - 1, report.vmdesc_offset, len(data),
    )  # fmt: skip


def assert_damaged(path: Path, limit: int | None = None) -> str:
    code, out, err = run_main(str(path))
    assert code == 2, (code, out[-2000:], err)
    assert "Traceback" not in out + err and "internal error" not in err, err
    assert OFFSET_MSG.search(err), err
    offset = int(re.search(r"offset (0x[0-9a-f]+)", err).group(1), 16)  # type: ignore[union-attr]
    if limit is not None:
        assert offset <= limit, err
    return err


def test_truncated_files_report_offset_and_problem(small_stream: Source, tmp_path: Path) -> None:
    lm = landmarks(small_stream)
    data = small_stream.path.read_bytes()
    cuts = {
        0, 3, 6, 8, 12, 20, lm.ram_start + 3, lm.ram_start + 9, lm.ram_start + 30,
        lm.footer + 2, lm.first_part + 1, lm.first_part + 7, lm.page_record + 3,
        lm.page_payload, lm.page_payload + 2000, lm.zero_record + 4, lm.zero_record + 8,
        lm.zero_record + 9 * 500 + 5, lm.device + 10, lm.device + 40, lm.eof - 3,
        lm.vmdesc + 1, lm.vmdesc + 3, lm.vmdesc + 5, lm.vmdesc + 100,
        (lm.vmdesc + lm.size) // 2, lm.size - 1,
    }  # fmt: skip
    cuts |= {int(x) for x in np.linspace(100, lm.eof - 1, 40)}
    path = tmp_path / "cut.stream"
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        err = assert_damaged(path, limit=cut)
        assert "truncated" in err or "cut short" in err or "magic" in err, (cut, err)


def test_truncation_right_after_eof_stops_with_a_clear_message(
    small_stream: Source, tmp_path: Path
) -> None:
    """Without the trailer, nothing tells a stream that never had one from a cut one: the
    walk stops at the first device section it cannot size (exit 3), with a message."""
    lm = landmarks(small_stream)
    path = tmp_path / "noeof.stream"
    path.write_bytes(small_stream.path.read_bytes()[: lm.eof + 1])
    code, out, err = run_main(str(path), "--check-discard")
    assert code == 3 and "Traceback" not in out + err
    assert "cannot be decoded without a VMDESCRIPTION" in err and OFFSET_MSG.search(err)


def _flip(data: bytes, offset: int, bit: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def test_bit_flips_in_headers_report_offset_and_problem(
    small_stream: Source, tmp_path: Path
) -> None:
    lm = landmarks(small_stream)
    data = small_stream.path.read_bytes()
    dev_id_len = len(lm.device_idstr)
    flips = {
        "magic": (0, 0, "magic"),
        "version": (7, 0, "version"),
        "configuration length": (9, 6, "exceeds"),
        "START type byte": (lm.ram_start, 2, "section type"),
        "RAM section id": (lm.ram_start + 4, 0, "footer"),
        "RAM idstr": (lm.ram_start + 6, 1, "damaged idstr"),
        "RAM version": (lm.ram_start + 1 + 4 + 1 + 3 + 4 + 3, 0, "version"),
        "MEM_SIZE flag": (lm.ram_start + 17 + 7, 2, "RAM"),
        "RAM footer marker": (lm.footer, 0, "footer"),
        "PART type byte": (lm.first_part, 4, "section type"),
        "PART section id": (lm.first_part + 1, 3, "never STARTed"),
        "PAGE flag of a record": (lm.page_record + 7, 3, "no type"),
        "ZERO+PAGE flags": (lm.zero_record + 7, 3, "several types"),
        "record offset beyond the block": (lm.page_record, 6, "beyond"),
        "ZERO fill byte": (lm.zero_record + 8, 0, "fill byte"),
        "device type byte": (lm.device, 1, "VMDESCRIPTION before the EOF"),
        "device idstr": (lm.device + 6 + dev_id_len // 2, 1, "not in the VMDESCRIPTION"),
        "device instance": (lm.device + 6 + dev_id_len + 3, 0, "not in the VMDESCRIPTION"),
        "device version": (lm.device + 6 + dev_id_len + 7, 1, "VMDESCRIPTION says"),
        "EOF byte": (lm.eof, 4, "unknown section type 0x10"),
        "VMDESCRIPTION marker": (lm.vmdesc, 0, "VMDESCRIPTION"),
        "VMDESCRIPTION length": (lm.vmdesc + 3, 0, "VMDESCRIPTION"),
        "VMDESCRIPTION JSON": (lm.vmdesc + 5, 2, "JSON"),
    }
    path = tmp_path / "flipped.stream"
    for what, (offset, bit, expect) in flips.items():
        path.write_bytes(_flip(data, offset, bit))
        err = assert_damaged(path)
        assert expect in err, (what, err)


def test_random_damage_never_traces_back(small_stream: Source, tmp_path: Path) -> None:
    """Random bit flips anywhere in the framing: exit 2 with an offset, or (a flip in page
    contents, say) a clean result; never a traceback or an internal error."""
    lm = landmarks(small_stream)
    data = small_stream.path.read_bytes()
    rng = np.random.default_rng(7)
    path = tmp_path / "random.stream"
    spots = list(range(0, lm.first_part + 64)) + list(range(lm.device, lm.size))
    for offset in rng.choice(spots, 150, replace=False):
        path.write_bytes(_flip(data, int(offset), int(rng.integers(8))))
        code, out, err = run_main(str(path), "--check-discard")
        assert "Traceback" not in out + err and "internal error" not in err, (offset, err)
        assert code in (0, 1, 2, 3), (offset, code)
        if code == 2:
            assert OFFSET_MSG.search(err), (offset, err)


def test_qemu_stream_damage(
    qemu_stream: tuple[Path, dict[str, Any], dict[str, int]], tmp_path: Path
) -> None:
    path, _, _ = qemu_stream
    data = path.read_bytes()
    report = inspect_stream(path)
    assert report.vmdesc_offset is not None
    bad = tmp_path / "qemu-cut.stream"
    for cut in (9, 200, 300_000, report.vmdesc_offset - 40, report.vmdesc_offset + 2000):
        bad.write_bytes(data[:cut])
        assert_damaged(bad, limit=cut)
    virtio = next(s for s in report.sections if s.idstr.endswith("/virtio-mem"))
    bad.write_bytes(_flip(data, virtio.offset + 8, 0))
    assert "not in the VMDESCRIPTION" in assert_damaged(bad)


def test_cli_subprocess_on_a_damaged_file(small_stream: Source, tmp_path: Path) -> None:
    lm = landmarks(small_stream)
    path = tmp_path / "sub.stream"
    path.write_bytes(small_stream.path.read_bytes()[: lm.page_payload])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "livemig", "inspect", str(path), "--check-discard"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert f"offset 0x{lm.page_record:x}: truncated stream" in proc.stderr, proc.stderr


def test_unreadable_file_and_usage(tmp_path: Path) -> None:
    code, out, err = run_main(str(tmp_path / "missing"))
    assert code == 2 and "cannot read" in err and "Traceback" not in err
    code, out, err = run_main(str(tmp_path))  # a directory
    assert code == 2 and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    err = assert_damaged(empty)
    assert "offset 0x0:" in err


# =============================================================================================
# the QEMU >= 8.0 layout, written by hand
# =============================================================================================


def _qemu8_like_stream(
    path: Path, mem_block: str, other_block: str, page: int = PAGE
) -> dict[str, int]:
    """A stream laid out like QEMU >= 8.0 with ``x-early-migration``: the early section
    described with the sanity struct as a ``tmp`` field (QEMU puts the nested fields in the
    field entry itself), the late VirtIO state as one opaque ``virtio`` field, and a
    generic device with an array, a bool and a subsection. Both RAM blocks are 1 GiB, so
    only names tell which one is the device's. With another ``page`` size, the
    configuration says so, as QEMU's does. Returns landmark offsets."""
    from livemig.migration.stream import savevm
    from livemig.migration.stream.format import MigCommand, SectionType
    from livemig.migration.stream.qemu_file import bytes_writer, open_writer

    dev = "0000:00:03.0"
    addr, region, nbits = 4 * GiB, 1 * GiB, 512
    sanity = struct.pack(">QQQI", addr, region, BLOCK, 0)
    marks: dict[str, int] = {}
    w = open_writer(path)
    savevm.write_header(w)
    savevm.write_configuration(w, "pc-i440fx-8.2", None if page == PAGE else page.bit_length() - 1)
    savevm.write_command(w, MigCommand.OPEN_RETURN_PATH)
    savevm.write_command(w, MigCommand.POSTCOPY_ADVISE, struct.pack(">QQ", page, page))
    savevm.start_section(w, SectionType.START, 2, "ram", 0, 4)
    w.put_be64((2 * GiB) | RamFlag.MEM_SIZE)
    for name in (other_block, mem_block):
        w.put_counted_string(name)
        w.put_be64(GiB)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    early = sanity + struct.pack(">Q", 2 * BLOCK) + struct.pack(">Q", 0b11) + bytes(7 * 8)
    savevm.start_section(w, SectionType.FULL, 40, f"{dev}/virtio-mem-device-early", 0, 1)
    w.put_bytes(early)
    savevm.write_footer(w, 40)
    savevm.write_command(w, MigCommand.PING, struct.pack(">I", 5))
    savevm.start_section(w, SectionType.PART, 2)
    w.put_be64(RamFlag.ZERO)
    w.put_counted_string(other_block)
    w.put_u8(0)
    w.put_be64(page | RamFlag.PAGE | RamFlag.CONTINUE)
    w.put_bytes(b"\x01" * page)
    w.put_be64(RamFlag.ZERO)
    w.put_counted_string(mem_block)
    w.put_u8(0)
    w.put_be64((BLOCK + page) | RamFlag.PAGE | RamFlag.CONTINUE)  # plugged block 1
    w.put_bytes(b"\x02" * page)
    marks["violation"] = w.tell()
    w.put_be64((2 * BLOCK + 3 * page) | RamFlag.ZERO | RamFlag.CONTINUE)  # unplugged block 2
    w.put_u8(0)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    savevm.write_command(w, MigCommand.SWITCHOVER_START)
    savevm.start_section(w, SectionType.END, 2)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    virtio = bytes(range(40)) + sanity + struct.pack(">QQ", 6 * BLOCK, 2 * BLOCK)
    virtio += b"\x05\x0cvirtio/dummy" + struct.pack(">I", 1) + bytes(30)
    savevm.start_section(w, SectionType.FULL, 41, f"{dev}/virtio-mem", 0, 1)
    w.put_bytes(virtio)
    savevm.write_footer(w, 41)
    generic = (
        struct.pack(">I?HHHI", 7, True, 1, 2, 3, 5)
        + b"\x05\x09dummy/sub"
        + struct.pack(">IB", 1, 9)
    )
    package = bytes_writer()  # postcopy's package: device state and POSTCOPY_RUN
    savevm.start_section(package, SectionType.FULL, 42, "dummy", 0, 3)
    package.put_bytes(generic)
    savevm.write_footer(package, 42)
    savevm.write_command(package, MigCommand.POSTCOPY_RUN)
    packaged = package.getvalue()
    savevm.write_command(w, MigCommand.PACKAGED, struct.pack(">I", len(packaged)))
    w.put_bytes(packaged)
    savevm.write_eof(w)
    u64 = {"type": "uint64", "size": 8}
    desc = {
        "page_size": page,
        "devices": [
            {
                "name": f"{dev}/virtio-mem-device-early",
                "instance_id": 0,
                "vmsd_name": "virtio-mem-device-early",
                "version": 1,
                "fields": [
                    {
                        "name": "tmp",
                        "type": "tmp",
                        "vmsd_name": "virtio-mem-device/sanity-checks",
                        "version": 1,
                        "fields": [
                            {"name": "addr", **u64},
                            {"name": "region_size", **u64},
                            {"name": "block_size", **u64},
                            {"name": "node", "type": "uint32", "size": 4},
                        ],
                        "size": 28,
                    },
                    {"name": "size", **u64},
                    {"name": "bitmap", "type": "bitmap", "size": 8 * (nbits // 64)},
                ],
            },
            {
                "name": f"{dev}/virtio-mem",
                "instance_id": 0,
                "vmsd_name": "virtio-mem",
                "version": 1,
                "fields": [{"name": "virtio", "type": "virtio", "size": len(virtio)}],
            },
            {
                "name": "dummy",
                "instance_id": 0,
                "vmsd_name": "dummy",
                "version": 3,
                "fields": [
                    {"name": "a", "type": "uint32", "size": 4},
                    {"name": "flag", "type": "bool", "size": 1},
                    {"name": "arr", "array_len": 3, "type": "uint16", "size": 2},
                    {"name": "lim", "type": "int32 le", "size": 4},
                ],
                "subsections": [
                    {
                        "vmsd_name": "dummy/sub",
                        "version": 1,
                        "fields": [{"name": "b", "type": "uint8", "size": 1}],
                    }
                ],
            },
        ],
    }
    w.put_u8(SectionType.VMDESCRIPTION)
    body = json.dumps(desc).encode()
    w.put_be32(len(body))
    w.put_bytes(body)
    w.close()
    return marks


def test_qemu8_layout_early_section_and_name_mapping(tmp_path: Path) -> None:
    path = tmp_path / "qemu8.stream"
    marks = _qemu8_like_stream(path, "0000:00:03.0/mem0", "pc.ram")
    report = inspect_stream(path)
    assert report.complete, report.stopped
    (dev,) = report.devices
    assert dev.sections == ["0000:00:03.0/virtio-mem-device-early", "0000:00:03.0/virtio-mem"]
    assert dev.ram_block == "0000:00:03.0/mem0" and "device path" in dev.mapping
    assert (dev.plugged_blocks, dev.total_blocks, dev.size) == (2, 512, 2 * BLOCK)
    assert (dev.usable_region_size, dev.requested_size) == (6 * BLOCK, 2 * BLOCK)  # late part
    assert dev.source == "virtio-mem-device-early section" and dev.warnings == []
    dummy = next(s for s in report.sections if s.idstr == "dummy")
    assert dummy.fields == {
        "a": 7, "flag": True, "arr": [1, 2, 3], "lim": 5, "dummy/sub": {"b": 9},
    }  # fmt: skip
    assert report.ram_blocks["0000:00:03.0/mem0"].records == 3
    assert [c.name for c in report.commands] == [
        "OPEN_RETURN_PATH", "POSTCOPY_ADVISE", "PING", "SWITCHOVER_START", "PACKAGED",
        "POSTCOPY_RUN",
    ]  # fmt: skip
    assert report.commands[2].detail == {"value": 5}
    assert all(b.page_size is None for b in report.ram_blocks.values())  # none were sent
    (v,) = check_discard(report)
    assert (v.stream_offset, v.kind, v.vmem_block) == (marks["violation"], "ZERO", 2)
    assert v.gpa == 4 * GiB + 2 * BLOCK + 3 * PAGE
    code, out, _ = run_main(str(path), "--check-discard")
    assert code == 1 and f"0x{marks['violation']:x}" in out


def test_ambiguous_ram_block_cannot_be_checked(tmp_path: Path) -> None:
    path = tmp_path / "ambiguous.stream"
    _qemu8_like_stream(path, "memA", "memB")
    report = inspect_stream(path)
    (dev,) = report.devices
    assert dev.ram_block is None and dev.mapping.startswith("ambiguous")
    code, out, err = run_main(str(path), "--check-discard")
    assert code == 3 and "could not check" in out and "ambiguous" in out
    assert run_main(str(path))[0] == 0  # plain inspection is complete


def test_target_page_size_from_the_configuration(tmp_path: Path) -> None:
    """QEMU sends the target page size in the configuration when it is not the
    architecture's minimum: records, their offsets and the pages a virtio-mem block
    covers are then counted in those pages."""
    page = 16 * 1024
    path = tmp_path / "pages16k.stream"
    marks = _qemu8_like_stream(path, "0000:00:03.0/mem0", "pc.ram", page=page)
    report = inspect_stream(path)
    assert report.complete, report.stopped
    assert report.page_size == page and report.configuration is not None
    assert report.ram_blocks["0000:00:03.0/mem0"].records == 3
    assert report.ram_blocks["pc.ram"].touched.count() == 2
    (v,) = check_discard(report)
    assert (v.stream_offset, v.kind, v.vmem_block) == (marks["violation"], "ZERO", 2)
    assert v.gpa == 4 * GiB + 2 * BLOCK + 3 * page and v.block_offset == 2 * BLOCK + 3 * page
    # no QEMU target has pages above 64 KiB: not damage, but not read either (exit 3)
    _qemu8_like_stream(path, "0000:00:03.0/mem0", "pc.ram", page=128 * 1024)
    report = inspect_stream(path)
    assert not report.complete and (report.stopped or "").startswith("target pages of 0x20000")
    assert run_main(str(path))[0] == 3


def test_xbzrle_and_compressed_records_are_counted(tmp_path: Path) -> None:
    """Records the destination's loader refuses (XBZRLE; COMPRESS_PAGE, removed in QEMU
    9.1) are counted per block and their payloads stepped over, not decoded."""
    from livemig.migration.stream import savevm
    from livemig.migration.stream.format import RAM_FLAG_REMOVED_COMPRESS_PAGE, SectionType
    from livemig.migration.stream.qemu_file import open_writer

    path = tmp_path / "encoded.stream"
    w = open_writer(path)
    savevm.write_header(w)
    savevm.write_configuration(w, "pc-i440fx-7.2")
    savevm.start_section(w, SectionType.START, 2, "ram", 0, 4)
    w.put_be64(MiB | RamFlag.MEM_SIZE)
    w.put_counted_string("pc.ram")
    w.put_be64(MiB)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    savevm.start_section(w, SectionType.PART, 2)
    w.put_be64(RamFlag.PAGE)
    w.put_counted_string("pc.ram")
    w.put_bytes(b"\x01" * PAGE)
    w.put_be64(PAGE | RamFlag.XBZRLE | RamFlag.CONTINUE)
    w.put_bytes(b"\x01" + struct.pack(">H", 3) + b"abc")
    w.put_be64(2 * PAGE | RAM_FLAG_REMOVED_COMPRESS_PAGE | RamFlag.CONTINUE)
    w.put_bytes(struct.pack(">I", 4) + b"zzzz")
    w.put_be64(3 * PAGE | RamFlag.ZERO | RamFlag.CONTINUE)
    w.put_u8(0)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    savevm.start_section(w, SectionType.END, 2)
    w.put_be64(RamFlag.EOS)
    savevm.write_footer(w, 2)
    savevm.write_eof(w)
    w.close()
    report = inspect_stream(path)
    assert report.complete, report.stopped
    b = report.ram_blocks["pc.ram"]
    assert (b.normal, b.xbzrle, b.compressed, b.zero, b.records) == (1, 1, 1, 1, 4)
    assert b.touched.count() == 4 and report.eos == 3
    code, doc = run_json(str(path))
    assert code == 0
    (blk,) = doc["ram"]["blocks"]
    assert (blk["xbzrle"], blk["compressed"], blk["pages_with_records"]) == (1, 1, 4)
