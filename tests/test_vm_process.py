"""``livemig vm`` as a real process, driven by the ``qemu.qmp`` client like a QEMU would be."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

MiB, GiB = 1 << 20, 1 << 30


def memfd_allocated(pid: int, name: str) -> int:
    """Bytes allocated in the VM's memfd, read from outside the process (st_blocks)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:livemig:{name}"):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    raise AssertionError(f"memfd {name} not found in process {pid}")


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, QEMUMonitorProtocol]]:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "vm", "--accel", "soft", "--memory", "128M", "--qmp", f"unix:{sock}",
         "--virtio-mem", "id=vm0,size=8G,requested-size=0,block-size=2M",
         "--vcpus", "2", "--dirty-rate", "16M", "--content", "random"],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, "livemig vm exited"
        assert time.monotonic() < deadline, "QMP socket did not appear"
        time.sleep(0.05)
    qmp = QEMUMonitorProtocol(str(sock))
    qmp.connect(negotiate=True)
    try:
        yield proc, qmp
    finally:
        try:
            qmp.cmd("quit")
            qmp.close()
        finally:
            assert proc.wait(timeout=20) == 0


def wait_size(qmp: QEMUMonitorProtocol, size: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = qmp.cmd("query-memory-devices")[0]["data"]
        guest = qmp.cmd("x-query-guest")
        if data["size"] == size and guest["fill-done"] and guest["driver-settled"]:
            return data
        assert time.monotonic() < deadline, f"plugged size stuck at {data['size']}"
        time.sleep(0.1)


def size_change_events(qmp: QEMUMonitorProtocol, until_size: int, timeout: float = 3) -> list[dict]:
    """MEMORY_DEVICE_SIZE_CHANGE events until one reports ``until_size``: the last of a
    burst arrives up to a second late (QEMU's rate limit)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1]["data"]["size"] != until_size:
        assert time.monotonic() < deadline, [e["data"]["size"] for e in events]
        events += [e for e in qmp.get_events(wait=False) if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
        time.sleep(0.05)
    return events


def test_plug_and_unplug_through_qmp(vm) -> None:  # noqa: ANN001
    proc, qmp = vm
    assert qmp.cmd("query-status") == {"running": True, "singlestep": False, "status": "running"}
    info = qmp.cmd("query-memory-devices")
    assert info[0]["type"] == "virtio-mem"
    d = info[0]["data"]
    assert (d["id"], d["size"], d["max-size"], d["block-size"]) == ("vm0", 0, 8 * GiB, 2 * MiB)
    assert d["memaddr"] == 4 * GiB and d["memdev"] == "/objects/vm0-memdev"
    assert memfd_allocated(proc.pid, "vm0-memdev") == 0

    started = time.monotonic()
    qmp.cmd("qom-set", path="vm0", property="requested-size", value=2 * GiB)
    assert qmp.cmd("qom-get", path="/machine/peripheral/vm0", property="requested-size") == 2 * GiB
    data = wait_size(qmp, 2 * GiB)
    assert data["requested-size"] == 2 * GiB
    assert memfd_allocated(proc.pid, "vm0-memdev") == 2 * GiB  # the guest wrote what it plugged
    events = size_change_events(qmp, until_size=2 * GiB)
    # one per second at most, as QEMU throttles it, and the last one has the final size
    assert len(events) <= time.monotonic() - started + 1, [e["data"]["size"] for e in events]
    assert events and events[-1]["data"]["size"] == 2 * GiB
    assert events[-1]["data"]["id"] == "vm0"
    assert {"seconds", "microseconds"} <= set(events[-1]["timestamp"])

    qmp.cmd("qom-set", path="vm0", property="requested-size", value=512 * MiB)
    wait_size(qmp, 512 * MiB)
    # the host memory of the unplugged blocks was given back
    assert memfd_allocated(proc.pid, "vm0-memdev") == 512 * MiB
    alloc = {b["id"]: b for b in qmp.cmd("x-query-ram-allocation")}
    assert alloc["vm0-memdev"]["allocated-discarded"] == 0
    assert qmp.cmd("x-query-guest")["discarded-writes"] == 0  # never wrote an unplugged block


def test_bad_commands_get_errors_and_the_vm_lives(vm) -> None:  # noqa: ANN001
    _, qmp = vm
    cases = [
        ("qom-set", {"path": "vm0", "property": "requested-size", "value": 3 * MiB}, "multiple"),
        ("qom-set", {"path": "vm0", "property": "requested-size", "value": 16 * GiB}, "exceed"),
        ("qom-set", {"path": "vm0", "property": "block-size", "value": 4 * MiB}, "block-size"),
        ("qom-get", {"path": "nosuch", "property": "size"}, "not found"),
        ("migrate", {"uri": "gopher:x"}, "scheme"),
        ("migrate-set-parameters", {"downtime-limit": -1}, "downtime-limit"),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "xyz", "state": True}]}, "xyz"),
    ]
    for cmd, args, words in cases:
        resp = qmp.cmd_raw(cmd, args)
        assert "error" in resp, (cmd, resp)
        assert resp["error"]["class"] in ("GenericError", "DeviceNotFound")
        assert words in resp["error"]["desc"], (cmd, resp)
    assert qmp.cmd("query-status")["running"] is True
