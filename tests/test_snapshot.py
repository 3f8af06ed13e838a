"""Background snapshots (``background-snapshot``) with real userfaultfd write protection.

The snapshot writer is a separate process, forked from the helper launcher, not from the VM process. Protected memory is written by the soft
guest's vCPUs, by plain Python threads through ``accel.write``, by a thread storing with
numpy while it holds the GIL (the case in which a fault handler that needed this
interpreter would deadlock), and by a KVM guest inside ``KVM_RUN``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for

from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.inspect import check_discard, inspect_stream
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.memory import userfaultfd as uf
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import Section
from livemig.migration.core.params import (
    BACKGROUND_SNAPSHOT_INCOMPATIBLE,
    MigrationConfigError,
    check_background_snapshot,
)
from livemig.migration.snapshot import snapshot
from livemig.migration.snapshot.snapshot import BackgroundSnapshot

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096

pytestmark = pytest.mark.skipif(
    not uf.supported_features() & uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    reason="no userfaultfd write protection here",
)


def machine(incoming: bool, backend: str = "memfd", dirty_rate: int = -1, prefill: bool = True,
            vcpus: int = 2) -> Machine:
    return Machine(
        MachineConfig(
            memory=32 * MiB,
            ram_backend=backend,
            virtio_mem=VirtioMemConfig(size=1 * GiB, backend=backend),
            accel="soft",
            incoming=incoming,
            workload=WorkloadConfig(vcpus=vcpus, dirty_rate=dirty_rate, content="mixed", prefill=prefill),
        )
    )


def boot(m: Machine, plugged: int, then: int | None = None) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(plugged)
    wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(), what="plug")
    if then is not None:  # unplug part again: those blocks were written and given back
        m.vmem.set_requested_size(then)
        wait_for(lambda: m.driver.plugged_size == then, what="unplug")


def allocation(ctl: VMController) -> tuple[int, int]:
    """(bytes allocated in all RAM blocks, of which in unplugged virtio-mem ranges)."""
    blocks = ctl.x_query_ram_allocation()
    return sum(b["allocated"] for b in blocks), sum(b.get("allocated-discarded", 0) for b in blocks)


def discarded_mask(m: Machine) -> np.ndarray:
    assert m.vmem is not None and m.vmem_mr is not None
    mask = Bitmap(m.vmem_mr.block.max_length // PAGE)
    offs, sizes = m.vmem.discarded_runs(Section(m.vmem_mr, 0, m.vmem_mr.size))
    for o, s in zip(offs, sizes, strict=True):
        mask.set_range(o // PAGE, s // PAGE)
    return mask.words


class StartState:
    """What the guest looked like inside the snapshot's stop (a ``stopped_hooks`` hook)."""

    def __init__(self) -> None:
        self.checksum: str | None = None
        self.pages_written = 0
        self.runstate = ""

    def __call__(self, mode: BackgroundSnapshot) -> None:
        m = mode.vm
        assert isinstance(m, Machine)
        self.checksum = m.checksum()
        self.pages_written = m.workload.pages_written
        self.runstate = m.runstate


@pytest.fixture
def start_state(monkeypatch: pytest.MonkeyPatch) -> StartState:
    st = StartState()
    monkeypatch.setattr(BackgroundSnapshot, "stopped_hooks", (st,))
    return st


def snap(ctl: VMController) -> BackgroundSnapshot:
    """The running snapshot's mode: the writer, its statistics, the write tracking."""
    assert ctl.outgoing is not None and isinstance(ctl.outgoing.mode, BackgroundSnapshot)
    return ctl.outgoing.mode


def snapshot_caps(ctl: VMController) -> None:
    ctl.migrate_set_capabilities([{"capability": "background-snapshot", "state": True}])


@pytest.mark.parametrize("backend", ["memfd", "anon"])
def test_snapshot_under_heavy_writes_restores_the_start(backend: str, tmp_path: Path,
                                                        start_state: StartState) -> None:
    src, dst = machine(False, backend), machine(True, backend, dirty_rate=16 * MiB)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 192 * MiB, then=128 * MiB)
        _, unplugged0 = allocation(cs)
        assert unplugged0 == 0
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 256 * MiB})  # about 0.7 s: the guest writes meanwhile
        path = tmp_path / "snap.stream"
        cs.migrate(f"file:{path}")
        samples = []
        while not cs.outgoing.done.is_set():
            samples.append(allocation(cs)[1])  # unplugged memory, polled during the snapshot
            time.sleep(0.02)
        info = cs.query_migrate()
        assert info["status"] == "completed", info
        assert src.runstate == "running" and start_state.runstate == "paused"
        ram = info["ram"]
        # the guest kept writing hard, and the pages it overwrote were saved first
        assert src.workload.pages_written - start_state.pages_written > 2000
        assert ram["write-faults"] > 10 and ram["write-fault-pages"] > 500
        assert info["downtime"] < 5000
        # unplugged memory: never populated, protected or sent
        assert max(samples, default=0) == 0 and allocation(cs)[1] == 0
        assert ram["write-protected-bytes"] == 128 * MiB + 32 * MiB
        assert ram["discarded-skipped-bytes"] == 1 * GiB - 128 * MiB
        assert ram["normal"] + ram["duplicate"] == (128 + 32) * MiB // PAGE  # each page once
        report = inspect_stream(path)
        assert check_discard(report) == []
        assert report.ram_blocks["vm0-memdev"].records == 128 * MiB // PAGE
        end_checksum = src.checksum()
        # restore into a new VM: memory as at the start, not as at the end
        cd.migrate_incoming(f"file:{path}")
        assert cd.incoming.wait(60) and cd.incoming.status == "completed", cd.query_migrate()
        restored = dst.checksum()
        assert restored == start_state.checksum
        assert restored != end_checksum
        received = cd.incoming.loader.received["vm0-memdev"].words
        assert not np.any(received & discarded_mask(dst))
        assert allocation(cd)[1] == 0
        assert dst.workload.pages_written == start_state.pages_written
        cd.cont()  # the restored guest runs on
        wait_for(lambda: dst.workload.pages_written > start_state.pages_written, what="restored guest")
        assert src.accel.discarded_writes == 0 and dst.accel.discarded_writes == 0
    finally:
        src.close()
        dst.close()


def test_holes_of_plugged_memfd_memory_stay_holes(tmp_path: Path, start_state: StartState) -> None:
    """Nothing is populated to write-protect a hole, and a write into a hole is still caught."""
    src, dst = machine(False, dirty_rate=0, prefill=False), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 256 * MiB)
        base = src.vmem_mr.addr
        src.accel.write(base, b"\x01" * 2 * PAGE)  # two data pages; the rest of plugged memory: holes
        before, _ = allocation(cs)
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 1 * MiB})  # 73728 ZERO records: about 0.6 s
        path = tmp_path / "holes.stream"
        cs.migrate(f"file:{path}")
        assert snap(cs).protected.wait(10)
        # a plain Python thread writes (GIL held) into a protected hole and a protected data page
        hole_gpa = base + 200 * MiB
        src.accel.write(hole_gpa, b"\x77" * PAGE)
        src.accel.write(base + PAGE, b"\x55" * PAGE)
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        ram = cs.query_migrate()["ram"]
        assert ram["pages-read"] <= 4  # the two data pages, and the two that faulted
        assert ram["write-fault-pages"] >= 16  # the faulting hole and the holes beside it
        assert ram["hole-pages-skipped"] >= (256 + 32) * MiB // PAGE - 4
        assert allocation(cs)[0] == before + PAGE  # only the guest's own write filled a hole
        assert snap(cs).tracking.populated_bytes == 2 * PAGE  # data extents only
        cd.migrate_incoming(f"file:{path}")
        assert cd.incoming.wait(60) and cd.incoming.status == "completed"
        assert dst.checksum() == start_state.checksum
        assert allocation(cd)[0] == 2 * PAGE  # the hole arrived as a ZERO record: still a hole
        assert dst.accel.read(hole_gpa, PAGE) == bytes(PAGE)  # zero, as at the start
        assert dst.accel.read(base + PAGE, PAGE) == b"\x01" * PAGE
        assert src.accel.read(hole_gpa, PAGE) == b"\x77" * PAGE
    finally:
        src.close()
        dst.close()


def test_snapshot_over_a_socket_to_a_destination_in_this_process(tmp_path: Path,
                                                                 start_state: StartState) -> None:
    """The receiver needs this process's GIL, which a faulting vCPU holds: no deadlock."""
    src, dst = machine(False), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 128 * MiB)
        snapshot_caps(cs)
        uri = f"unix:{tmp_path / 'snap.sock'}"
        cd.migrate_incoming(uri)
        cs.migrate(uri)
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        assert cd.incoming.wait(60) and cd.incoming.status == "completed", cd.query_migrate()
        assert cs.query_migrate()["ram"]["write-faults"] > 0
        assert dst.checksum() == start_state.checksum
    finally:
        src.close()
        dst.close()


def test_cancel_and_writer_death_release_the_guest(tmp_path: Path) -> None:
    src = machine(False)
    try:
        cs = VMController(src)
        boot(src, 128 * MiB)
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 16 * MiB})
        for n, how in enumerate(("cancel", "kill")):
            cs.migrate(f"file:{tmp_path / f'{how}.stream'}")
            wait_for(lambda: snap(cs).stats["transferred"] > 2 * MiB, what="writing")
            pid = snap(cs).writer_pid
            if how == "cancel":
                cs.migrate_cancel()
            else:
                os.kill(pid, signal.SIGKILL)  # the writer dies: the kernel releases everything
            assert cs.outgoing.wait(10)
            info = cs.query_migrate()
            assert info["status"] == ("cancelled" if how == "cancel" else "failed"), info
            if how == "kill":
                assert "snapshot writer died (signal 9)" in info["error-desc"]
            # gone and reaped (by the helper launcher, its parent), not a zombie
            assert not os.path.exists(f"/proc/{pid}"), pid
            # every page is writable again: the guest writes on, and so does this thread
            goal = src.workload.pages_written + 5000
            wait_for(lambda g=goal: src.workload.pages_written > g, what=f"writes after {how}")
            src.accel.write(src.vmem_mr.addr + n * PAGE, b"\x42" * PAGE)
            assert src.runstate == "running"
        cs.params.set({"max-bandwidth": 0})
        cs.migrate(f"file:{tmp_path / 'after.stream'}")
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed"
    finally:
        src.close()


def writer_descriptors(pid: int) -> list[str]:
    """What each open descriptor of process ``pid`` refers to."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def test_the_writer_is_forked_from_the_launcher_not_from_the_vm(tmp_path: Path) -> None:
    """issue 17: a fork of the multi-threaded VM process keeps every lock another thread
    held at that moment, and every descriptor of the VM process. The writer is a fork of
    the helper launcher (a fresh interpreter with one thread): its parent is the launcher,
    and it holds only what the set-up gave it — not the other VM's memory in this
    process, not this process's sockets — and no mapping of guest RAM."""
    from livemig.migration.core.helpers import launcher

    src, other = machine(False), machine(True, dirty_rate=0)
    try:
        cs = VMController(src)
        boot(src, 128 * MiB)
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 32 * MiB})  # about 5 s: long enough to look
        cs.migrate(f"file:{tmp_path / 'fresh.stream'}")
        assert snap(cs).protected.wait(30)
        pid = snap(cs).writer_pid
        assert pid != os.getpid() and threading.active_count() > 1  # this process has threads
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "snapshot-writer"
        with open(f"/proc/{pid}/status") as f:
            assert f"PPid:\t{launcher().pid}" in f.read().splitlines()
        with open(f"/proc/{launcher().pid}/cmdline", "rb") as f:
            assert b"livemig.migration.core.helpers" in f.read().split(b"\0")
        with open(f"/proc/{launcher().pid}/status") as f:
            assert "Threads:\t1" in f.read().splitlines()
        fds = writer_descriptors(pid)
        memfds = sorted(t for t in fds if t.startswith("/memfd:livemig:"))
        # the source's fd-backed blocks (for SEEK_DATA), never the other VM's
        assert memfds == sorted(f"/memfd:livemig:{b.idstr} (deleted)" for b in src.blocks), fds
        assert sum(t == "anon_inode:[userfaultfd]" for t in fds) == 1, fds
        assert sum(t.startswith("socket:") for t in fds) == 1, fds  # its control socket only
        assert str(tmp_path / "fresh.stream") in fds  # the stream
        assert len(fds) <= 12, fds  # std streams, control, stream, uffd, memfds, a wake pipe
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        assert "memfd:livemig:" not in maps  # guest RAM is read with process_vm_readv only
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        assert cs.query_migrate()["ram"]["x-writer-start-ms"] > 0
    finally:
        src.close()
        other.close()


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (whichever of its threads started them)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_writer_dies_with_its_vm_process(tmp_path: Path) -> None:
    """A ``livemig vm`` process killed mid-snapshot: its writer (a child of the helper
    launcher, not of the VM process) goes too, and so does the launcher — a writer left
    behind would keep the VM's userfaultfd and a file open for nobody."""
    from livemig.control.qmp_client import QMPClient

    sock = tmp_path / "vm.qmp"
    vm = subprocess.Popen([sys.executable, "-m", "livemig", "vm", "--qmp", f"unix:{sock}", "--accel", "soft",
                           "--memory", "32M", "--vcpus", "1", "--dirty-rate", "0",
                           "--virtio-mem", "id=vm0,size=1G,requested-size=64M"], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(sock.exists, 20, "QMP socket")
        with QMPClient(f"unix:{sock}") as q:
            wait_for(lambda: q.execute("query-memory-devices")[0]["data"]["size"] == 64 * MiB, 30, "plug")
            q.execute("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
            q.execute("migrate-set-parameters", **{"max-bandwidth": 1 * MiB})  # a minute at least
            q.execute("migrate", uri=f"file:{tmp_path / 'killed.stream'}")
            launchers: list[int] = []  # named once its interpreter runs
            wait_for(lambda: launchers.extend(c for c in children(vm.pid) if comm(c) == "livemig-helpers")
                     or launchers, 30, "the helper launcher")  # fmt: skip
            writers: list[int] = []
            wait_for(lambda: writers.extend(c for c in children(launchers[0]) if comm(c) == "snapshot-writer")
                     or writers, 30, "the writer")  # fmt: skip
            assert "snapshot-writer" not in [comm(c) for c in children(vm.pid)]
            vm.kill()
            vm.wait()
        wait_for(lambda: dead(writers[0]), 10, "the writer to die with the VM process")
        wait_for(lambda: dead(launchers[0]), 10, "the launcher to die with the VM process")
    finally:
        vm.kill()
        vm.wait()


def test_max_bandwidth_changed_during_the_snapshot_reaches_the_writer(tmp_path: Path) -> None:
    """The writer is another process: a new max-bandwidth reaches it through the shared
    statistics page (a copy of the parameters taken at its start would not change)."""
    src = machine(False, dirty_rate=0)
    try:
        cs = VMController(src)
        boot(src, 128 * MiB)
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 1 * MiB})  # 160 MiB of RAM: minutes at this rate
        cs.migrate(f"file:{tmp_path / 'rate.stream'}")
        wait_for(lambda: snap(cs).stats["transferred"] > 0 and snap(cs).protected.is_set(), what="writing")
        time.sleep(0.5)
        assert cs.query_migrate()["status"] == "active"
        t = time.monotonic()
        cs.params.set({"max-bandwidth": 0})
        assert cs.outgoing.wait(30) and cs.outgoing.status == "completed", cs.query_migrate()
        assert time.monotonic() - t < 20
    finally:
        src.close()


def test_snapshot_over_tls_goes_through_the_relay(tmp_path: Path, start_state: StartState) -> None:
    """A TLS session cannot move to the writer process: the writer writes plaintext to a
    socketpair, a thread of the VM process encrypts it onto the channel."""
    tls_certs = pytest.importorskip("livemig.migration.transport.tls_certs")
    creds = str(tls_certs.write_creds(tmp_path / "creds", tls_certs.make_ca("snapshot test CA")))
    src, dst = machine(False), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 64 * MiB)
        snapshot_caps(cs)
        cs.migrate_set_parameters(tls_creds=creds)
        cd.migrate_set_parameters(tls_creds=creds, tls_authz="livemig-source")
        cd.migrate_incoming("tcp:127.0.0.1:0")
        assert cd.incoming is not None
        cs.migrate(str(cd.incoming.uri))
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        assert snap(cs).relay is not None
        assert not [t for t in threading.enumerate() if t.name == "snapshot-relay"]
        assert cd.incoming.wait(60) and cd.incoming.status == "completed", cd.query_migrate()
        assert cs.query_migrate()["ram"]["write-faults"] > 0
        assert dst.checksum() == start_state.checksum
    finally:
        src.close()
        dst.close()


def test_incompatible_capabilities_are_rejected_with_qemus_messages(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    m = machine(False, dirty_rate=0)
    try:
        ctl = VMController(m)
        on = {"capability": "background-snapshot", "state": True}
        for other in ("return-path", "multifd", "zero-copy-send"):
            with pytest.raises(QMPError, match=f"^Background-snapshot is not compatible with {other}$"):
                ctl.migrate_set_capabilities([on, {"capability": other, "state": True}])
            assert not ctl.caps["background-snapshot"] and not ctl.caps[other]
        ctl.migrate_set_capabilities([{"capability": "return-path", "state": True}])
        with pytest.raises(QMPError, match="not compatible with return-path"):
            ctl.migrate_set_capabilities([on])  # checked against the whole new set
        ctl.migrate_set_capabilities([{"capability": "return-path", "state": False}, on])
        assert ctl.caps["background-snapshot"]
        with pytest.raises(QMPError, match="not compatible with multifd"):
            ctl.migrate_set_capabilities([{"capability": "multifd", "state": True}])
        # the whole list of reference 5.2, on QEMU's check
        for other in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
            with pytest.raises(MigrationConfigError, match=f"not compatible with {other}$"):
                check_background_snapshot({"background-snapshot": True, other: True}, lambda: None)
        ctl.migrate_set_capabilities([{"capability": "background-snapshot", "state": False}])
        # a kernel without write protection, and one that cannot protect memfd memory
        monkeypatch.setattr(uf, "supported_features", lambda: 0)
        with pytest.raises(QMPError, match="^Background-snapshot is not supported by host kernel$"):
            ctl.migrate_set_capabilities([on])
        monkeypatch.setattr(uf, "supported_features", lambda: uf.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        with pytest.raises(QMPError, match="^Background-snapshot is not compatible with guest memory configuration$"):
            ctl.migrate_set_capabilities([on])
        assert not ctl.caps["background-snapshot"]
        # and at migrate time (the kernel changed under a capability already on)
        monkeypatch.undo()
        ctl.migrate_set_capabilities([on])
        monkeypatch.setattr(uf, "supported_features", lambda: 0)
        ctl.migrate(f"file:{tmp_path / 'never.stream'}")
        assert ctl.outgoing.wait(10)
        info = ctl.query_migrate()
        assert info["status"] == "failed" and info["error-desc"] == snapshot.NOT_SUPPORTED
    finally:
        m.close()


@pytest.fixture
def vm_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    procs = []
    common = ["--accel", "soft", "--memory", "32M", "--vcpus", "1", "--dirty-rate", "0"]
    socks = []
    for name, extra in (("a", ["--virtio-mem", "id=vm0,size=1G,requested-size=64M"]),
                        ("b", ["--virtio-mem", "id=vm0,size=1G", "--incoming", "defer", "-S"])):
        sock = tmp_path / f"{name}.qmp"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "livemig", "vm", "--name", name, "--qmp", f"unix:{sock}",
             *common, *extra], stdout=subprocess.DEVNULL))
        socks.append(f"unix:{sock}")
    try:
        for sock in socks:
            wait_for(lambda s=sock: os.path.exists(s[5:]), 20, "QMP socket")
        yield socks[0], socks[1]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=20) == 0


def test_cli_snapshot_and_restore(vm_pair: tuple[str, str], tmp_path: Path) -> None:
    from livemig.control.qmp_client import QMPClient

    a, b = vm_pair
    with QMPClient(a) as qa:
        wait_for(lambda: qa.execute("x-query-guest")["fill-done"]
                 and qa.execute("query-memory-devices")[0]["data"]["size"] == 64 * MiB, 30, "boot")
        before = qa.execute("x-query-guest-checksum")["checksum"]
    path = tmp_path / "cli.stream"
    run = [sys.executable, "-m", "livemig"]
    out = subprocess.run([*run, "snapshot", "--qmp", a, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.startswith("  "))
    assert rows["status"] == "completed" and rows["ram.write-protected-bytes"] == "96.00 MiB"
    with QMPClient(a) as qa:
        assert qa.execute("query-status")["status"] == "running"
        caps = {c["capability"]: c["state"] for c in qa.execute("query-migrate-capabilities")}
        assert caps["background-snapshot"] is False  # put back as it was
    out = subprocess.run([*run, "restore", "--qmp", b, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^query-migrate\n  status +completed$", out.stdout, re.M), out.stdout
    assert re.search(r"^query-status\n  status +paused$", out.stdout, re.M), out.stdout
    with QMPClient(b) as qb:
        assert qb.execute("x-query-guest-checksum")["checksum"] == before
        alloc = qb.execute("x-query-ram-allocation")
        assert sum(x.get("allocated-discarded", 0) for x in alloc) == 0
    out = subprocess.run([*run, "restore", "--qmp", a, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "--incoming defer" in out.stderr and "Traceback" not in out.stderr


def test_guest_thread_holding_the_gil_is_served_while_this_process_is_frozen(tmp_path: Path) -> None:
    """Even with every Python thread of the VM stuck behind a fault, the writer goes on."""
    src = machine(False, dirty_rate=0)
    try:
        cs = VMController(src)
        boot(src, 64 * MiB)
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 32 * MiB})
        cs.migrate(f"file:{tmp_path / 'gil.stream'}")
        assert snap(cs).protected.wait(10)
        pages = src.vmem_mr.block.pages_array(0, 64 * MiB)
        done = threading.Event()

        def hammer() -> None:  # numpy stores with the GIL held, over every plugged page
            for i in range(0, len(pages), 8):
                pages[i, 100] = 1
            done.set()

        t = threading.Thread(target=hammer)
        t.start()
        t.join(30)
        assert done.is_set()
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed"
        assert cs.query_migrate()["ram"]["write-faults"] > 0
    finally:
        src.close()


def test_snapshot_of_a_kvm_guest(tmp_path: Path, start_state: StartState) -> None:
    """The guest program writes inside KVM_RUN; its write faults reach the same writer."""
    from livemig.accel.kvm import guest_program as gp
    from livemig.accel.kvm import kvm_available

    if (why := kvm_available()) is not None:
        pytest.skip(f"KVM not usable here ({why})")

    def kvm_machine(incoming: bool) -> Machine:
        return Machine(MachineConfig(memory=64 * MiB, accel="kvm", incoming=incoming,
                                     virtio_mem=VirtioMemConfig(size=128 * MiB, block_size=2 * MiB),
                                     workload=WorkloadConfig(dirty_rate=-1)))

    src, dst = kvm_machine(False), kvm_machine(True)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        src.start()
        for size in (96 * MiB, 64 * MiB):
            src.vmem.set_requested_size(size)
            wait_for(lambda s=size: src.driver.plugged_size == s and src.workload.fill_done.is_set(),
                     what="resize")
        snapshot_caps(cs)
        cs.params.set({"max-bandwidth": 128 * MiB})
        path = tmp_path / "kvm.stream"
        cs.migrate(f"file:{path}")
        assert cs.outgoing.wait(60) and cs.outgoing.status == "completed", cs.query_migrate()
        ram = cs.query_migrate()["ram"]
        assert ram["write-faults"] > 0 and allocation(cs)[1] == 0
        assert check_discard(inspect_stream(path)) == []
        cd.migrate_incoming(f"file:{path}")
        assert cd.incoming.wait(60) and cd.incoming.status == "completed", cd.query_migrate()
        assert dst.checksum() == start_state.checksum != src.checksum()
        assert allocation(cd)[1] == 0

        # every page holds what the guest's write sequence says, up to the snapshot's pass
        def verified() -> int:
            hb = gp.read_heartbeat(dst.ram.block)
            check = gp.check_pages(dst.memory, dst.workload.table, hb,
                                   table_since=dst.workload.table_since)
            assert check.ok, check
            return hb

        hb = verified()
        cd.cont()
        wait_for(lambda: gp.read_heartbeat(dst.ram.block) >= hb + 2, what="restored KVM guest passes")
        dst.stop()
        verified()
    finally:
        src.close()
        dst.close()
