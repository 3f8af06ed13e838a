"""cpr-transfer: a running VM moves to a new ``livemig vm`` process on this host.

The old process is a machine in this test process; the new one is a real ``livemig vm``
process started the QEMU 10 way (two ``--incoming`` options, one of ``channel-type``
``cpr``), so the memfds really cross a unix socket into another process. What is checked
is what the issue asks: the guest's memory is the very same (same memfd inodes, same
allocated bytes, no memory allocated in the new process), nothing but device state goes on
the main channel, the guest runs on in the new process, and the old process takes the
guest back when the new one dies before running it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from waiting import waiter

from livemig.accel.kvm import kvm_available
from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.migration.channels import MigrationURI
from livemig.migration.cpr.channels import uri_to_address
from livemig.migration.cpr.incoming import CprReceiver

MiB, GiB = 1 << 20, 1 << 30
REGION = 8 * GiB


wait_for = waiter(60.0, step=0.02)


def source(accel: str, plugged: int, region: int = REGION, working_set: int = 0, backend: str = "memfd") -> Machine:
    """A running VM; with a ``working_set`` the guest writes only that much (no prefill:
    the rest of plugged memory stays a hole), else it writes all it has once."""
    vcpus = 1 if accel == "kvm" else 2
    m = Machine(
        MachineConfig(
            memory=64 * MiB,
            accel=accel,
            virtio_mem=VirtioMemConfig(size=region, block_size=2 * MiB, backend=backend),
            workload=WorkloadConfig(vcpus=vcpus, dirty_rate=16 * MiB if accel == "soft" else -1,
                                    content="mixed", working_set=working_set, prefill=not working_set),
        )
    )  # fmt: skip
    m.start()
    if plugged:
        assert m.vmem is not None and m.driver is not None
        m.vmem.set_requested_size(plugged)
        wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(), 120, "plug")
    return m


def channels(main: Path, cpr: Path) -> list[dict]:
    return [
        {"channel-type": "main", "addr": uri_to_address(MigrationURI("unix", path=str(main)))},
        {"channel-type": "cpr", "addr": uri_to_address(MigrationURI("unix", path=str(cpr)))},
    ]


class NewProcess:
    """``livemig vm`` started as a cpr-transfer destination (paused until ``cont``)."""

    def __init__(self, tmp: Path, accel: str, region: int):
        self.main, self.cpr, self.qmp_path = tmp / "main.sock", tmp / "cpr.sock", tmp / "new.qmp"
        vcpus = "1" if accel == "kvm" else "2"
        cpr_opt = json.dumps({"channel-type": "cpr", "addr": uri_to_address(MigrationURI("unix", path=str(self.cpr)))})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "vm", "--accel", accel, "--memory", "64M",
             "--virtio-mem", f"id=vm0,size={region},block-size=2M", "--vcpus", vcpus,
             "--dirty-rate", "16M" if accel == "soft" else "max", "--content", "mixed", "-S",
             "--qmp", f"unix:{self.qmp_path}", "--incoming", f"unix:{self.main}", "--incoming", cpr_opt],
        )  # fmt: skip
        self.qmp: QEMUMonitorProtocol | None = None
        wait_for(lambda: self.cpr.exists() or self.proc.poll() is not None, 30, "the cpr channel")
        assert self.proc.poll() is None, "livemig vm exited"

    def connect(self) -> QEMUMonitorProtocol:
        wait_for(lambda: self.qmp_path.exists() or self.proc.poll() is not None, 60, "the new process's QMP")
        assert self.proc.poll() is None, "livemig vm exited"
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect(negotiate=True)
        return self.qmp

    def memfds(self) -> dict[str, list[os.stat_result]]:
        """Every memfd of the process, by block name."""
        out: dict[str, list[os.stat_result]] = {}
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:livemig:"):
                name = target.removeprefix("/memfd:livemig:").split(" ")[0]
                out.setdefault(name, []).append(os.stat(f"/proc/{self.proc.pid}/fd/{fd}"))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.qmp is not None:
                    self.qmp.cmd("quit")
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001 - a test failed: make sure it goes
                self.proc.kill()
                self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()


@pytest.fixture
def new_process(tmp_path: Path) -> Iterator[list[NewProcess]]:
    made: list[NewProcess] = []
    yield made
    for p in made:
        p.close()


def transfer(src: Machine, cs: VMController, new: NewProcess) -> tuple[dict, QEMUMonitorProtocol]:
    cs.migrate_set_parameters(mode="cpr-transfer")
    cs.migrate(channels=channels(new.main, new.cpr))
    qmp = new.connect()
    assert cs.outgoing is not None and cs.outgoing.wait(60)
    info = cs.query_migrate()
    assert info["status"] == "completed", info
    wait_for(lambda: qmp.cmd("query-migrate").get("status") == "completed", 30, "the new process's load")
    return info, qmp


def block_stats(m: Machine) -> dict[str, os.stat_result]:
    return {b.idstr: os.fstat(b.fd) for b in m.memory.blocks}


CASES = [("soft", 1 * GiB, REGION), ("soft", 6 * GiB, REGION)]
if kvm_available() is None:
    # the KVM guest program runs without paging: its memory must lie below 4 GiB, so the
    # largest virtio-mem region it can have here is under 4 GiB (tests/test_kvm_migration);
    # kvm_pvm refuses 32-bit paging (#GP on CR0.PG: benchmarks/probe_kvm_paging.py), so
    # no KVM guest here reaches 6 GiB of plugged memory
    CASES += [("kvm", 1 * GiB, 2 * GiB)]


@pytest.mark.parametrize(("accel", "plugged", "region"), CASES, ids=lambda v: str(v >> 30) + "G" if isinstance(v, int) else v)
def test_cpr_transfer_hands_the_memory_over(accel: str, plugged: int, region: int, tmp_path: Path, new_process) -> None:  # noqa: ANN001
    # 1 GiB plugged: the guest wrote all of it; 6 GiB: plugged but only 256 MiB touched
    # (untouched plugged memory is a hole, and must stay one)
    ws = 0 if plugged <= GiB else 256 * MiB
    src = source(accel, plugged, region, working_set=ws)
    try:
        cs = VMController(src)
        before = {k: v.st_blocks for k, v in block_stats(src).items()}
        new = NewProcess(tmp_path, accel, region)
        new_process.append(new)
        if ws:
            wait_for(lambda: src.vmem_mr.block.allocated_bytes() >= 16 * MiB, 30, "guest writes")
        info, qmp = transfer(src, cs, new)
        assert src.runstate == "postmigrate"
        assert qmp.cmd("query-status")["status"] == "paused"

        # the same memory: the new process maps the old one's memfds (same inodes) and
        # holds no other guest memory; not one block was allocated or given back
        mine = block_stats(src)
        theirs = new.memfds()
        assert set(theirs) == set(mine)
        for name, st in mine.items():
            # (Python's mmap keeps a dup of the descriptor it maps: one memfd, two fds)
            assert {(s.st_dev, s.st_ino) for s in theirs[name]} == {(st.st_dev, st.st_ino)}, name
            assert theirs[name][0].st_blocks == st.st_blocks, name
            if not ws:  # a guest that only rewrites what it has: not one block came or went
                assert st.st_blocks == before[name], name
        alloc = {b["id"]: b for b in qmp.cmd("x-query-ram-allocation")}
        assert alloc["vm0-memdev"]["allocated-discarded"] == 0
        assert alloc["vm0-memdev"]["allocated"] == src.vmem_mr.block.allocated_bytes()
        assert src.checksum() == qmp.cmd("x-query-guest-checksum")["checksum"]

        # the main channel: framing and device state only, whatever the memory size
        ram = info["ram"]
        assert ram["transferred"] < 1 * MiB, ram
        assert ram["normal"] == 0 and ram["duplicate"] == 0 and ram["pages-read"] == 0
        assert ram["cpr-transfer-bytes"] == 64 * MiB + region
        assert info["downtime"] < 2000, info  # the benchmark measures it; here: no copy
        dst = qmp.cmd("query-migrate")["ram"]
        assert dst["normal"] == 0 and dst["unplugged-pages-received"] == 0

        # the old process refuses to run the guest now, the new one runs it on
        with pytest.raises(QMPError, match="handed over"):
            cs.cont()
        written = qmp.cmd("x-query-guest")["pages-written"]
        qmp.cmd("cont")
        wait_for(lambda: qmp.cmd("x-query-guest")["pages-written"] > written, 60, "the guest writing in the new process")
        handover = cs.outgoing.mode.handover
        assert handover is not None
        assert handover.done.wait(10) and handover.state == "handed-over"
        with pytest.raises(QMPError, match="runs in the new process"):
            cs.cont()
        assert src.runstate == "postmigrate"
    finally:
        for p in new_process:
            p.close()
        src.close()


def test_old_process_resumes_when_the_new_one_dies_before_running(tmp_path: Path, new_process) -> None:  # noqa: ANN001
    src = source("soft", 512 * MiB)
    try:
        cs = VMController(src)
        new = NewProcess(tmp_path, "soft", REGION)
        new_process.append(new)
        transfer(src, cs, new)
        assert src.runstate == "postmigrate"
        src_alloc = src.vmem_mr.block.allocated_bytes()
        new.proc.send_signal(signal.SIGKILL)  # before anyone said cont
        new.proc.wait(10)
        wait_for(lambda: src.runstate == "running", 10, "the old process resuming the guest")
        assert cs.outgoing.mode.handover.state == "resumed"
        written = src.workload.pages_written
        wait_for(lambda: src.workload.pages_written > written, 30, "the guest writing in the old process")
        # its memory is whole: nothing punched out when the new process went away
        assert src.vmem_mr.block.allocated_bytes() == src_alloc
        assert src.accel.discarded_writes == 0
        cs.stop()
        cs.cont()  # allowed again
        assert src.runstate == "running"
    finally:
        src.close()


def test_old_process_keeps_a_paused_guest_paused(tmp_path: Path) -> None:
    """In process: a guest paused before the transfer stays paused when the new process
    ends before running it (QEMU's rule for a failed migration)."""
    src = source("soft", 128 * MiB)
    try:
        cs = VMController(src)
        cs.stop()
        rec = CprReceiver(MigrationURI("unix", path=str(tmp_path / "cpr.sock")))
        import threading

        t = threading.Thread(target=rec.receive)
        t.start()
        cs.migrate_set_parameters(mode="cpr-transfer")
        cs.migrate(channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        t.join(10)
        dst = Machine(MachineConfig(memory=64 * MiB, virtio_mem=VirtioMemConfig(size=REGION, block_size=2 * MiB),
                                    incoming=True, workload=WorkloadConfig(vcpus=2), ram_fds=rec.take_ram_fds()))  # fmt: skip
        cd = VMController(dst, autostart=False, cpr=rec)
        cd.migrate_incoming(f"unix:{tmp_path / 'main.sock'}")
        assert cs.outgoing.wait(30) and cd.incoming.wait(30)
        assert cd.query_migrate()["status"] == "completed"
        assert all(b.shared for b in dst.memory.blocks)
        assert cd.incoming.loader.ignored == {"pc.ram", "vm0-memdev"}  # a page record would fail
        dst.close()  # ends without running the guest: unmaps, punches nothing
        handover = cs.outgoing.mode.handover
        assert handover.done.wait(10) and handover.state == "resumed"
        assert src.runstate == "paused"
        assert src.vmem_mr.block.allocated_bytes() > 0
    finally:
        src.close()


def test_refusals(tmp_path: Path) -> None:
    src = source("soft", 0, region=1 * GiB, backend="anon")
    try:
        cs = VMController(src)
        with pytest.raises(QMPError, match="does not accept value 'cpr-magic'"):
            cs.migrate_set_parameters(mode="cpr-magic")
        with pytest.raises(QMPError, match="'cpr-reboot' is not supported"):
            cs.migrate_set_parameters(mode="cpr-reboot")
        main, cpr = tmp_path / "m.sock", tmp_path / "c.sock"
        with pytest.raises(QMPError, match="needs the migration mode cpr-transfer"):
            cs.migrate(channels=channels(main, cpr))
        cs.migrate_set_parameters(mode="cpr-transfer")
        with pytest.raises(QMPError, match="vm0-memdev is not compatible with CPR.*anonymous"):
            cs.migrate(channels=channels(main, cpr))
        with pytest.raises(QMPError, match="missing 'cpr' migration channel"):
            cs.migrate(uri=f"unix:{main}")
        remote = [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                                     "host": "192.0.2.1", "port": "4444"}},
                  channels(main, cpr)[1]]  # fmt: skip
        with pytest.raises(QMPError, match="not on this host"):
            cs.migrate(channels=remote)
        with pytest.raises(QMPError, match="needs a socket as its main channel"):
            cs.migrate(channels=[{"channel-type": "main", "addr": {"transport": "file", "filename": str(main)}},
                                 channels(main, cpr)[1]])  # fmt: skip
        with pytest.raises(QMPError, match="must be unix"):
            cs.migrate(channels=[channels(main, cpr)[0],
                                 {"channel-type": "cpr", "addr": {"transport": "socket", "type": "inet",
                                                                  "host": "127.0.0.1", "port": "1"}}])  # fmt: skip
        with pytest.raises(QMPError, match="more than one main entry"):
            cs.migrate(channels=[channels(main, cpr)[0]] * 2)
        with pytest.raises(QMPError, match="need either 'uri' or 'channels'"):
            cs.migrate()
        cs.migrate_set_capabilities([{"capability": "multifd", "state": True}])
        with pytest.raises(QMPError, match="may not be used with multifd"):
            cs.migrate(channels=channels(main, cpr))
        assert src.runstate == "running"
    finally:
        src.close()


def test_nobody_listening_on_the_cpr_channel_fails_and_the_guest_runs_on(tmp_path: Path) -> None:
    src = source("soft", 64 * MiB)
    try:
        cs = VMController(src)
        cs.migrate_set_parameters(mode="cpr-transfer")
        cs.migrate(channels=channels(tmp_path / "m.sock", tmp_path / "nobody.sock"))
        assert cs.outgoing.wait(30)
        info = cs.query_migrate()
        assert info["status"] == "failed" and "cpr channel" in info["error-desc"], info
        assert src.runstate == "running"
    finally:
        src.close()


def test_a_page_for_handed_over_memory_is_refused() -> None:
    """The new process's loader takes no page for memory it was handed (QEMU: ignored
    blocks), so a source that sent one would be caught, not obeyed."""
    import numpy as np

    from livemig.memory.ram_block import RAMBlock
    from livemig.migration.ram.codec import RecordEncoder
    from livemig.migration.ram.load import RamLoader
    from livemig.migration.ram.state import RamStats
    from livemig.migration.stream.qemu_file import BytesWriter, StreamError, bytes_reader

    block = RAMBlock("pc.ram", 2 * MiB)
    try:
        w = BytesWriter()
        enc = RecordEncoder(RamStats())
        enc.put_pages(w, block, np.array([3]), np.full((1, 4096), 7, np.uint8))
        enc.put_eos(w)
        loader = RamLoader([block])
        loader.ignored = frozenset({"pc.ram"})
        with pytest.raises(StreamError, match="block pc.ram should not be migrated !"):
            loader.load(bytes_reader(w.getvalue()))
        assert not block.pages_array(0, 2 * MiB)[3].any()
    finally:
        block.close()
