"""The controls management layers steer a migration with (libvirt, Nova, KubeVirt):
pause-before-switchover and migrate-continue, downtime-limit raised during a migration,
expected-downtime, calc-dirty-rate / query-dirty-rate, blocked-reasons.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from waiting import waiter

from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.migration.dirtyrate import BLOCKER

wait_for = waiter(30.0, step=0.02)

MiB, GiB = 1 << 20, 1 << 30


def machine(incoming: bool = False, rate: int = 16 * MiB, region: int = 256 * MiB) -> Machine:
    return Machine(MachineConfig(
        memory=32 * MiB, incoming=incoming, virtio_mem=VirtioMemConfig(size=region),
        workload=WorkloadConfig(vcpus=2, dirty_rate=rate, content="random")))


def boot(m: Machine, plugged: int = 32 * MiB) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(plugged)
    wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(),
             60, "plug and fill")


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Machine, Machine, VMController, VMController]]:
    rate = getattr(request, "param", 16 * MiB)
    src, dst = machine(rate=rate), machine(incoming=True, rate=rate)
    try:
        yield src, dst, VMController(src), VMController(dst, autostart=False)
    finally:
        src.close()
        dst.close()


def recorder(ctl: VMController) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    ctl.emit = lambda name, data=None: events.append((name, data or {}))  # type: ignore[method-assign]
    return events


def test_pause_before_switchover_waits_for_migrate_continue(pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src)
    events = recorder(cs)
    caps = [{"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True}]
    cs.migrate_set_capabilities(caps)
    with pytest.raises(QMPError, match="^Migration not in expected state: none$"):
        cs.migrate_continue("pre-switchover")
    for attempt in ("cancel", "continue"):
        cd.migrate_incoming("tcp:127.0.0.1:0")
        cs.migrate(str(cd.incoming.uri))
        wait_for(lambda: cs.query_migrate()["status"] == "pre-switchover", what="pre-switchover")
        written = src.workload.pages_written
        time.sleep(1.0)  # it stays there, guest stopped, nothing more sent
        info = cs.query_migrate()
        assert info["status"] == "pre-switchover" and src.runstate == "finish-migrate", info
        assert src.workload.pages_written == written
        sent = info["ram"]["transferred"]
        time.sleep(0.2)
        assert cs.query_migrate()["ram"]["transferred"] == sent
        with pytest.raises(QMPError, match="^Migration not in expected state: pre-switchover$"):
            cs.migrate_continue("active")
        if attempt == "cancel":
            cs.migrate_cancel()
            assert cs.outgoing.wait(30) and cs.outgoing.status == "cancelled"
            assert src.runstate == "running"  # the guest runs on where it was
            assert cd.incoming.wait(30)
            continue
        cs.migrate_continue("pre-switchover")
        assert cs.outgoing.wait(30)
        assert cs.query_migrate()["status"] == "completed", cs.query_migrate()
    assert cd.incoming.wait(30) and cd.query_migrate()["status"] == "completed"
    assert src.checksum() == dst.checksum()
    statuses = [d["status"] for name, d in events if name == "MIGRATION"]
    assert statuses[-4:] == ["active", "pre-switchover", "device", "completed"], statuses
    assert "cancelling" in statuses


@pytest.mark.parametrize("pair", [96 * MiB], indirect=True)
def test_downtime_limit_raised_during_a_migration_takes_effect_at_the_next_pass(pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src)
    cs.migrate_set_parameters(max_bandwidth=32 * MiB, downtime_limit=50)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))
    wait_for(lambda: cs.query_migrate()["ram"]["dirty-sync-count"] >= 3, 60, "three passes")
    info = cs.query_migrate()
    assert info["status"] == "active", info
    assert info["expected-downtime"] > 50, info  # what it would take now: more than allowed
    raised_at = info["ram"]["dirty-sync-count"]
    cs.migrate_set_parameters(downtime_limit=20_000)
    assert cs.outgoing.wait(30)
    info = cs.query_migrate()
    assert info["status"] == "completed", info
    # the pass running when it was raised may end with the old limit; the next one uses it
    assert info["ram"]["dirty-sync-count"] <= raised_at + 2, (raised_at, info["ram"])
    assert cd.incoming.wait(30)
    assert src.checksum() == dst.checksum()


@pytest.mark.parametrize("pair", [64 * MiB], indirect=True)
def test_expected_downtime_tracks_the_real_downtime(pair) -> None:  # noqa: ANN001
    """Reported from the first pass on (not 0), kept current, and when the migration
    converges it is what the switchover then really takes."""
    src, dst, cs, cd = pair
    boot(src, 160 * MiB)
    cs.migrate_set_parameters(max_bandwidth=0, downtime_limit=100)  # the switchover's own speed
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))
    samples: list[tuple[int, int]] = []  # (expected-downtime, bytes remaining)
    while not cs.outgoing.wait(0.02):
        info = cs.query_migrate()
        if info["status"] == "active":
            samples.append((info["expected-downtime"], info["ram"]["remaining"]))
    info = cs.query_migrate()
    assert info["status"] == "completed", info
    assert samples and samples[0][0] > 0, samples  # from the start on, not 0 until a pass ends
    # 0 ms only when what is left takes under a millisecond (the last pass's few pages):
    # 16 MiB take longer than that at any bandwidth this machine has
    assert all(ms > 0 for ms, left in samples if left >= 16 * MiB), samples
    assert len({ms for ms, _ in samples}) > 1, samples  # it moves while the migration runs
    at_switchover = cs.outgoing.estimate.expected_downtime  # the estimate it switched on
    assert at_switchover <= 100
    real = info["downtime"]
    # the estimate covers the RAM still dirty; the real downtime adds stopping the vCPUs,
    # the device state and the destination's reply: a few ms here
    assert at_switchover / 4 <= real <= 2 * at_switchover + 60, (real, at_switchover)
    assert cd.incoming.wait(30)


# -- calc-dirty-rate / query-dirty-rate ------------------------------------------------------------
RATE = 32 * MiB


@pytest.fixture
def dirtying() -> Iterator[tuple[Machine, VMController]]:
    """A guest writing 32 MiB/s of random pages over 512 MiB (so a second rewrites few)."""
    m = Machine(MachineConfig(
        memory=32 * MiB, virtio_mem=VirtioMemConfig(size=1 * GiB),
        workload=WorkloadConfig(vcpus=2, dirty_rate=RATE, content="random")))
    try:
        boot(m, 480 * MiB)
        yield m, VMController(m)
    finally:
        m.close()


def measure(ctl: VMController, **args: Any) -> dict[str, Any]:
    ctl.calc_dirty_rate(**args)
    assert ctl.query_dirty_rate()["status"] == "measuring"
    wait_for(lambda: ctl.query_dirty_rate()["status"] == "measured", 30, "measured")
    return ctl.query_dirty_rate()


@pytest.mark.parametrize("mode", ["page-sampling", "dirty-bitmap"])
def test_calc_dirty_rate_is_within_20_percent_of_the_guest_rate(dirtying, mode: str) -> None:  # noqa: ANN001
    m, ctl = dirtying
    assert ctl.query_dirty_rate() == {"status": "unstarted", "start-time": 0, "calc-time": 0,
                                      "calc-time-unit": "second", "sample-pages": 0,
                                      "mode": "page-sampling"}
    unplugged_before = sum(b.get("allocated-discarded", 0) for b in ctl.x_query_ram_allocation())
    args: dict[str, Any] = {"calc_time": 1, "mode": mode}
    if mode == "page-sampling":
        args["sample_pages"] = 16384
    p0, t0 = m.workload.pages_written, time.monotonic()
    r = measure(ctl, **args)
    actual = (m.workload.pages_written - p0) * 4096 / (time.monotonic() - t0) / MiB
    expected = RATE // MiB
    assert abs(r["dirty-rate"] - expected) <= 0.2 * expected, (r, f"guest wrote {actual:.1f} MiB/s")
    assert r["mode"] == mode and r["calc-time"] == 1 and r["calc-time-unit"] == "second"
    assert r["sample-pages"] == (16384 if mode == "page-sampling" else 0)
    assert abs(r["start-time"] - time.time()) < 60
    ms = ctl.query_dirty_rate(calc_time_unit="millisecond")
    assert 1000 <= ms["calc-time"] < 1500 and ms["calc-time-unit"] == "millisecond"
    # the measurement read no memory the guest gave back
    after = sum(b.get("allocated-discarded", 0) for b in ctl.x_query_ram_allocation())
    assert after == unplugged_before == 0


def test_calc_dirty_rate_errors_and_the_dirty_bitmap_blocker(dirtying, tmp_path) -> None:  # noqa: ANN001
    m, ctl = dirtying
    for args, error in [
        ({"calc_time": 0}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc_time": 61}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc_time": 20, "calc_time_unit": "millisecond"}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc_time": 1, "sample_pages": 100}, "sample-pages is out of range[128, 16384]."),
        ({"calc_time": 1, "sample_pages": 512, "mode": "dirty-bitmap"},
         "sample-pages is used only in page-sampling mode"),
        ({"calc_time": 1, "mode": "dirty-ring"}, "mode dirty-ring is not enabled, use other method instead."),
        ({"calc_time": 1, "mode": "dirty-log"}, "Parameter 'mode' does not accept value 'dirty-log'"),
    ]:
        with pytest.raises(QMPError) as e:
            ctl.calc_dirty_rate(**args)
        assert str(e.value) == error
    assert ctl.query_migrate() == {}
    # while dirty-bitmap measures, the dirty log is taken: migrate is blocked, and says why
    ctl.calc_dirty_rate(calc_time=500, calc_time_unit="millisecond", mode="dirty-bitmap")
    with pytest.raises(QMPError, match="^the dirty rate is already being measured.$"):
        ctl.calc_dirty_rate(calc_time=1)
    assert ctl.query_migrate() == {"blocked-reasons": [BLOCKER]}
    with pytest.raises(QMPError) as e:
        ctl.migrate(f"file:{tmp_path / 'blocked'}")
    assert str(e.value) == BLOCKER
    wait_for(lambda: ctl.query_dirty_rate()["status"] == "measured", 10, "measured")
    assert "blocked-reasons" not in ctl.query_migrate()
    # and while a migration uses the log, dirty-bitmap is refused; page-sampling is not
    ctl.migrate_set_parameters(max_bandwidth=16 * MiB)
    ctl.migrate(f"file:{tmp_path / 'stream'}")
    with pytest.raises(QMPError, match="^mode dirty-bitmap is not enabled, use other method instead.$"):
        ctl.calc_dirty_rate(calc_time=1, mode="dirty-bitmap")
    r = measure(ctl, calc_time=100, calc_time_unit="millisecond")
    assert r["dirty-rate"] >= 0 and r["mode"] == "page-sampling"
    ctl.migrate_cancel()
    assert ctl.outgoing.wait(30) and ctl.outgoing.status == "cancelled"
    assert m.runstate == "running"


@pytest.mark.parametrize("pair", [64 * MiB], indirect=True)
def test_pause_before_switchover_holds_the_switch_to_postcopy(pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    boot(src)
    cs.migrate_set_capabilities([{"capability": "postcopy-ram", "state": True},
                                 {"capability": "pause-before-switchover", "state": True}])
    cd.migrate_set_capabilities([{"capability": "postcopy-ram", "state": True}])
    cs.migrate_set_parameters(max_bandwidth=16 * MiB)
    cd.migrate_incoming("tcp:127.0.0.1:0")
    cs.migrate(str(cd.incoming.uri))
    wait_for(lambda: cs.query_migrate()["status"] == "active", what="active")
    cs.migrate_start_postcopy()
    wait_for(lambda: cs.query_migrate()["status"] == "pre-switchover", what="pre-switchover")
    time.sleep(0.5)
    assert cs.query_migrate()["status"] == "pre-switchover" and src.runstate == "finish-migrate"
    assert cd.query_migrate()["status"] not in ("postcopy-active", "completed")
    cs.migrate_continue("pre-switchover")
    assert cs.outgoing.wait(60) and cs.query_migrate()["status"] == "completed", cs.query_migrate()
    assert cd.incoming.wait(30) and cd.query_migrate()["status"] == "completed"
