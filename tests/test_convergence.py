"""auto-converge and dirty-limit: a guest that dirties faster than the link converges only
with a throttle, the throttle shows in query-migrate while it runs, and it ends with the
migration — completed, cancelled or failed — leaving the guest at full speed.

Both accelerators: the software guest (two vCPU threads writing random pages, throttled at
their checkpoints) and a KVM guest (the guest program, kept out of ``KVM_RUN``). Each
guest writes 128 MiB/s into about 64 MiB; the link is limited to 32 MiB/s and the
downtime to 100 ms, so without a throttle every pass ends with most of the memory dirty.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from waiting import waiter

from livemig.accel.kvm import kvm_available
from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig

wait_for = waiter(30.0, step=0.02)

MiB = 1 << 20
RATE = 128 * MiB
BANDWIDTH = 32 * MiB
PLUGGED = 32 * MiB
ACCELS = ["soft", pytest.param("kvm", marks=pytest.mark.skipif(
    kvm_available() is not None, reason=f"KVM not usable here ({kvm_available()})"))]


def machine(accel: str, incoming: bool = False) -> Machine:
    if accel == "kvm":
        return Machine(MachineConfig(
            memory=32 * MiB, accel="kvm", incoming=incoming,
            virtio_mem=VirtioMemConfig(size=128 * MiB, block_size=2 * MiB),
            workload=WorkloadConfig(dirty_rate=RATE, working_set=16 * MiB)))
    return Machine(MachineConfig(
        memory=32 * MiB, incoming=incoming, virtio_mem=VirtioMemConfig(size=256 * MiB),
        workload=WorkloadConfig(vcpus=2, dirty_rate=RATE, content="random")))


def boot(m: Machine) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(PLUGGED)
    wait_for(lambda: m.driver.plugged_size == PLUGGED and m.workload.fill_done.is_set(), what="plug")


def guest_speed(m: Machine, seconds: float = 1.0) -> float:
    """Bytes/s the guest writes now (its own progress counter)."""
    p0, t0 = m.workload.pages_written, time.monotonic()
    time.sleep(seconds)
    return (m.workload.pages_written - p0) * 4096 / (time.monotonic() - t0)


@pytest.fixture
def machines(request: pytest.FixtureRequest) -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(accel: str, incoming: bool = False) -> Machine:
        m = machine(accel, incoming)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def start(cs: VMController, cd: VMController, cap: str | None, **params: int) -> None:
    caps = [{"capability": c, "state": c == cap} for c in ("auto-converge", "dirty-limit")]
    for c in (cs, cd):
        c.migrate_set_capabilities(caps)
    cs.migrate_set_parameters(max_bandwidth=BANDWIDTH, downtime_limit=100, **params)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))


THROTTLES = {
    None: {},
    "auto-converge": {"cpu_throttle_initial": 50, "cpu_throttle_increment": 20},
    "dirty-limit": {"vcpu_dirty_limit": 4, "x_vcpu_dirty_limit_period": 500},
}


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("cap", [None, "auto-converge", "dirty-limit"])
def test_a_fast_guest_converges_only_with_a_throttle(machines, accel: str, cap: str | None) -> None:  # noqa: ANN001
    src, dst = machines(accel), machines(accel, incoming=True)
    cs, cd = VMController(src), VMController(dst, autostart=False)
    boot(src)
    normal = guest_speed(src) if cap is not None else 0.0  # on this machine, now
    start(cs, cd, cap, **THROTTLES[cap])
    out = cs.outgoing
    if cap is None:
        # bounded time: 6 s and several passes, never within the limit, no throttle anywhere
        t0 = time.monotonic()
        wait_for(lambda: cs.query_migrate()["ram"]["dirty-sync-count"] >= 4, 40, "four syncs")
        time.sleep(max(0.0, 6.0 - (time.monotonic() - t0)))
        info = cs.query_migrate()
        assert info["status"] == "active", info
        assert "cpu-throttle-percentage" not in info and not src.accel.throttle.active
        assert out.estimate.expected_downtime > 100, info
        cs.migrate_cancel()
        assert out.wait(30) and out.status == "cancelled"
        return
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 90
    while not out.wait(0.05):
        info = cs.query_migrate()
        for key in ("cpu-throttle-percentage", "dirty-limit-throttle-time-per-round",
                    "dirty-limit-ring-full-time"):
            if key in info:
                seen[key] = max(seen.get(key, 0), info[key])
        assert time.monotonic() < deadline, f"no convergence with {cap}: {info}"
    info = cs.query_migrate()
    assert info["status"] == "completed", info
    assert cd.incoming.wait(30) and cd.query_migrate()["status"] == "completed"
    assert src.checksum() == dst.checksum()
    if cap == "auto-converge":
        assert seen["cpu-throttle-percentage"] >= 50, seen
    else:
        assert seen["dirty-limit-throttle-time-per-round"] > 0, seen
        assert seen["dirty-limit-ring-full-time"] > 0, seen
    assert not any(k in info for k in seen), info  # reported only while throttling
    # full speed again: the source's vCPUs are unthrottled, both guests run at their rate
    assert not src.accel.throttle.active and not dst.accel.throttle.active
    cs.cont()
    cd.cont()
    for m in (src, dst):
        speed = guest_speed(m)
        assert speed > 0.7 * normal, (
            f"{'source' if m is src else 'destination'}: {speed / MiB:.0f} MiB/s after completion, "
            f"{normal / MiB:.0f} MiB/s before the migration")


@pytest.mark.parametrize("accel", ACCELS)
def test_throttle_is_reported_and_undone_by_cancel_and_failure(machines, accel: str) -> None:  # noqa: ANN001
    """auto-converge capped at 50%: the guest still outruns the link, so the migration
    keeps running throttled until it is cancelled, then until its destination fails."""
    src, dst = machines(accel), machines(accel, incoming=True)
    cs, cd = VMController(src), VMController(dst, autostart=False)
    boot(src)
    normal = guest_speed(src)
    for end in ("cancel", "failure"):
        start(cs, cd, "auto-converge", cpu_throttle_initial=50, max_cpu_throttle=50)
        out = cs.outgoing
        wait_for(lambda: cs.query_migrate().get("cpu-throttle-percentage") == 50, 40,
                 "auto-converge at 50%")
        throttled = guest_speed(src)
        assert throttled < 0.75 * normal, (throttled / MiB, normal / MiB)
        assert src.accel.throttle.active
        if end == "cancel":
            cs.migrate_cancel()
        else:
            cd.incoming.cancel()  # the destination goes away mid-stream
        assert out.wait(30), out.status
        assert out.status == ("cancelled" if end == "cancel" else "failed"), cs.query_migrate()
        assert "cpu-throttle-percentage" not in cs.query_migrate()
        assert not src.accel.throttle.active and src.runstate == "running"
        again = guest_speed(src)
        assert again > 0.8 * normal, f"after {end}: {again / MiB:.0f} of {normal / MiB:.0f} MiB/s"
        assert cd.incoming.wait(30)


# -- parameters and capabilities: QEMU's checks and words ------------------------------------------
BAD_PARAMETERS = [
    ({"cpu_throttle_initial": 0}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu_throttle_initial": 100}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu_throttle_increment": 0}, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ({"throttle_trigger_threshold": 101},
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ({"max_cpu_throttle": 100}, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"cpu_throttle_initial": 60, "max_cpu_throttle": 50},
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"x_vcpu_dirty_limit_period": 0}, "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ({"x_vcpu_dirty_limit_period": 1001}, "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ({"vcpu_dirty_limit": 0}, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
    ({"cpu_throttle_initial": 300}, "Parameter 'cpu-throttle-initial' expects uint8_t"),
    ({"cpu_throttle_increment": -1}, "Parameter 'cpu-throttle-increment' expects uint8_t"),
    ({"cpu_throttle_initial": "20"}, "Invalid parameter type for 'cpu-throttle-initial', expected: uint64"),
    ({"cpu_throttle_tailslow": 1}, "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
]


@pytest.mark.parametrize(("given", "error"), BAD_PARAMETERS)
def test_bad_throttle_parameters_get_qemus_errors(given: dict, error: str) -> None:
    m = Machine(MachineConfig(memory=16 * MiB, workload=WorkloadConfig(dirty_rate=0)))
    try:
        ctl = VMController(m)
        before = ctl.query_migrate_parameters()
        with pytest.raises(QMPError) as e:
            ctl.migrate_set_parameters(**given)
        assert str(e.value) == error
        assert ctl.query_migrate_parameters() == before  # a refused change changes nothing
    finally:
        m.close()


def test_throttle_parameters_defaults_and_capability_conflict() -> None:
    m = Machine(MachineConfig(memory=16 * MiB, workload=WorkloadConfig(dirty_rate=0)))
    try:
        ctl = VMController(m)
        p = ctl.query_migrate_parameters()
        assert {k: p[k] for k in ("throttle-trigger-threshold", "cpu-throttle-initial",
                                  "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle",
                                  "x-vcpu-dirty-limit-period", "vcpu-dirty-limit",
                                  "avail-switchover-bandwidth")} == {
            "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
            "cpu-throttle-tailslow": False, "max-cpu-throttle": 99, "x-vcpu-dirty-limit-period": 1000,
            "vcpu-dirty-limit": 1, "avail-switchover-bandwidth": 0}
        ctl.migrate_set_parameters(cpu_throttle_initial=30, max_cpu_throttle=30, cpu_throttle_tailslow=True)
        assert ctl.query_migrate_parameters()["max-cpu-throttle"] == 30
        with pytest.raises(QMPError, match="^dirty-limit conflicts with auto-converge either of then "
                                           "available currently$"):
            ctl.migrate_set_capabilities([{"capability": "auto-converge", "state": True},
                                          {"capability": "dirty-limit", "state": True}])
        ctl.migrate_set_capabilities([{"capability": "auto-converge", "state": True}])
        with pytest.raises(QMPError, match="^Background-snapshot is not compatible with auto-converge$"):
            ctl.migrate_set_capabilities([{"capability": "background-snapshot", "state": True}])
    finally:
        m.close()


# -- QEMU's arithmetic, without a guest -----------------------------------------------------------
class FakeVM:
    vcpu_count = 2

    def __init__(self) -> None:
        self.shares: list = []

    def throttle_vcpus(self, shares: object) -> None:
        self.shares.append(shares)

    def vcpu_dirty_pages(self) -> list[int] | None:
        return None


def test_dirty_limit_adjusts_as_qemus_dirtylimit() -> None:
    from livemig.migration.throttle import DirtyLimit

    dl = DirtyLimit(1, quota=1, period_ms=1000, counts=None)
    # far from the quota: linear, sleep_pct = (64 - 1) * 100 // 64 = 98 of a 16 MiB ring
    # filled in 250000 us at 64 MiB/s
    dl._adjust(0, 1, 64)
    assert dl.ring_full_time(64) == 250_000
    assert dl.throttle_us == [int(250_000 * 98 / 2)]
    assert dl.shares() == [pytest.approx(12_250_000 / (12_250_000 + 250_000))]
    # within 25 MB/s of the quota: left alone
    dl._adjust(0, 1, 20)
    assert dl.throttle_us == [12_250_000]
    # close (50% off, not over): a tenth of the ring-full time up or down
    dl._adjust(0, 30, 60)
    assert dl.throttle_us == [12_250_000 + 25_000]
    dl._adjust(0, 90, 60)
    assert dl.throttle_us == [12_250_000]
    # never above 99 ring-full times, never below 0; nothing dirtied: no sleep
    dl._adjust(0, 1, 64)
    dl._adjust(0, 1, 64)
    assert dl.throttle_us == [250_000 * 99]
    dl._adjust(0, 60, 0)
    assert dl.throttle_us == [0]


def test_auto_converge_steps_as_qemus_mig_throttle_guest_down() -> None:
    from livemig.migration.core.params import Capabilities, Parameters
    from livemig.migration.throttle import MigrationThrottle

    caps, params, vm = Capabilities(), Parameters(), FakeVM()
    caps.set([{"capability": "auto-converge", "state": True}])
    t = MigrationThrottle(vm, caps, params)  # type: ignore[arg-type]
    t._throttle_down(100, 50)
    assert t.percentage == 20 and vm.shares[-1] == 0.2  # cpu-throttle-initial
    t._throttle_down(100, 50)
    assert t.percentage == 30  # + cpu-throttle-increment
    params.set({"cpu-throttle-tailslow": True})
    t._throttle_down(100, 90)  # ideal: 70 * 0.9 = 63 of the CPU, so +7 (not +10)
    assert t.percentage == 37
    params.set({"max-cpu-throttle": 40})
    t._throttle_down(100, 10)
    assert t.percentage == 40  # capped
    t.stop()
    assert t.percentage == 0 and vm.shares[-1] == 0.0
