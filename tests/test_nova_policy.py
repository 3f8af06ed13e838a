"""A Nova-style migration policy, driven only over QMP, finishes a guest plain precopy cannot.

OpenStack Nova's libvirt driver (``nova/virt/libvirt/migration.py``) monitors a live
migration and (1) raises the downtime limit in steps — ``live_migration_downtime`` spread
over ``live_migration_downtime_steps`` with ``live_migration_downtime_delay`` between
them — and (2) at ``live_migration_completion_timeout`` forces completion with
``migrate-start-postcopy`` when postcopy is permitted. Here the same policy, scaled from
minutes to seconds, drives two ``livemig vm`` processes through QEMU's own QMP client:
a guest dirtying 128 MiB/s over 64 MiB behind a 32 MiB/s link never fits even the last
downtime step, so precopy is still running at the deadline; postcopy then finishes it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.memory.userfaultfd import write_tracking_problem

MiB = 1 << 20

pytestmark = pytest.mark.skipif(write_tracking_problem([]) is not None, reason="no userfaultfd")

DOWNTIME_MS = 100  # live_migration_downtime (Nova: 500 ms)
STEPS = 4  # live_migration_downtime_steps (Nova: 10)
STEP_DELAY_S = 0.75  # live_migration_downtime_delay per GiB (Nova: 75 s), for this guest
COMPLETION_TIMEOUT_S = 6.0  # live_migration_completion_timeout (Nova: 800 s per GiB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def downtime_steps() -> list[tuple[float, int]]:
    """Nova's ``downtime_steps``: (seconds after the start, downtime-limit ms)."""
    base = DOWNTIME_MS / STEPS
    offset = (DOWNTIME_MS - base) / STEPS
    return [(STEP_DELAY_S * i, int(base + offset * i)) for i in range(STEPS + 1)]


VM_ARGS = ["--accel", "soft", "--memory", "32M", "--virtio-mem",
           "id=vm0,size=256M,requested-size=0,block-size=2M",
           "--vcpus", "2", "--dirty-rate", "128M", "--content", "random"]


class Vm:
    def __init__(self, name: str, tmp: Path, *extra: str):
        sock = tmp / f"{name}.qmp"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "vm", "--name", name, "--qmp", f"unix:{sock}",
             *VM_ARGS, *extra])
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"{name}: no QMP socket"
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.qmp.connect(negotiate=True)

    def __call__(self, cmd: str, **args: object) -> object:
        return self.qmp.cmd(cmd, **args) if args else self.qmp.cmd(cmd)

    def close(self) -> None:
        try:
            self("quit")
            self.qmp.close()
        finally:
            if self.proc.wait(timeout=30) is None:
                self.proc.kill()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[tuple[Vm, Vm]]:
    src = Vm("nova-src", tmp_path)
    dst = None
    try:
        dst = Vm("nova-dst", tmp_path, "--incoming", "defer")
        yield src, dst
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_nova_policy_finishes_what_precopy_cannot(vms) -> None:  # noqa: ANN001
    src, dst = vms
    src("qom-set", path="vm0", property="requested-size", value=32 * MiB)
    deadline = time.monotonic() + 60
    while not (src("query-memory-devices")[0]["data"]["size"] == 32 * MiB  # type: ignore[index]
               and src("x-query-guest")["fill-done"]):  # type: ignore[index]
        assert time.monotonic() < deadline, "guest did not plug"
        time.sleep(0.1)
    caps = [{"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]
    for vm in (src, dst):
        vm("migrate-set-capabilities", capabilities=caps)
    steps = downtime_steps()
    src("migrate-set-parameters", **{"max-bandwidth": 32 * MiB, "downtime-limit": steps[0][1]})
    uri = f"tcp:127.0.0.1:{free_port()}"
    dst("migrate-incoming", uri=uri)
    src("migrate", uri=uri)

    # the monitor loop: Nova polls query-migrate (libvirt's job info) and acts on time
    t0 = time.monotonic()
    applied: list[int] = []
    forced = False
    while True:
        info = src("query-migrate")
        st = info["status"]  # type: ignore[index]
        if st in ("completed", "failed", "cancelled"):
            break
        elapsed = time.monotonic() - t0
        while steps and elapsed >= steps[0][0]:
            _, ms = steps.pop(0)
            src("migrate-set-parameters", **{"downtime-limit": ms})
            applied.append(ms)
        if not forced and elapsed >= COMPLETION_TIMEOUT_S and st == "active":
            # precopy did not make it with every downtime step applied: force completion
            assert not steps and info["ram"]["dirty-sync-count"] >= 3, info  # type: ignore[index]
            src("migrate-start-postcopy")
            forced = True
        assert elapsed < 90, f"the policy did not finish the migration: {info}"
        time.sleep(0.1)
    assert st == "completed", info
    assert forced, "precopy converged on its own: the guest is not hard enough for this test"
    assert applied == [25, 43, 62, 81, 100]
    assert src("query-migrate-parameters")["downtime-limit"] == DOWNTIME_MS  # type: ignore[index]
    assert src("query-status")["status"] == "postmigrate"  # type: ignore[index]
    deadline = time.monotonic() + 30
    while dst("query-migrate")["status"] != "completed":  # type: ignore[index]
        assert time.monotonic() < deadline, dst("query-migrate")
        time.sleep(0.1)
    assert dst("query-status")["status"] == "running"  # type: ignore[index]
    # the guest carries on at the destination, and the source never grew its memory
    w = dst("x-query-guest")["pages-written"]  # type: ignore[index]
    time.sleep(0.5)
    assert dst("x-query-guest")["pages-written"] > w  # type: ignore[index]
    for vm in (src, dst):
        alloc = vm("x-query-ram-allocation")
        assert all(b.get("allocated-discarded", 0) == 0 for b in alloc)  # type: ignore[union-attr]
