"""The benchmarks still measure what they say, in their smallest configuration.

Benchmarks run by hand (``./run bench NAME``), so nothing else notices when a change
elsewhere breaks one. That happened: after the CLI began reading a bare number as MiB (as
QEMU does), ``bench_matrix`` passed its dirty rates in bytes and its guests dirtied at
1.25 GB/s instead of 32 MiB/s — every figure still printed, all of them wrong. These
runs check the scripts end to end on small sizes and check that a figure that depends on
the set-up (the guest's progress against its configured rate) is plausible, not their
speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def bench(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.mark.timeout(180)
def test_bench_matrix_guest_writes_at_its_configured_rate(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    proc = bench("bench_matrix", "--rates", "32M", "--bandwidths", "192M", "--modes", "precopy",
                 "--timeout", "10", "--json", str(out), "--figures", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["dirty_rate"] == 32 * MiB and run["status"] == "completed", run
    # the guest's own work against what 32 MiB/s for that long would be: about 1 when the
    # guest got its rate (less when starved); 39 with the rate read as MiB/s
    assert 0.2 < run["guest_progress"] <= 1.3, run
    assert (tmp_path / "matrix.png").stat().st_size > 0


def test_bench_multifd_sides_runs_and_prints_json() -> None:
    proc = bench("bench_multifd_sides", "--random", "32M", "--zero", "32M", "--repeats", "1",
                 "--channels", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    src = out["source_1ch"]["median"]
    assert src["bytes_sent"] >= 32 * MiB and src["seconds"] > 0, out


def test_a_bad_benchmark_option_is_one_line() -> None:
    proc = bench("bench_kvm_dirty_log", "--reps", "1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--reps 1: at least 2 (clears alternate between the two ways)")


def test_probe_kvm_paging_sees_a_guest_succeed_and_reports_each_mode() -> None:
    from livemig.accel.kvm import kvm_available

    if (why := kvm_available()) is not None:
        pytest.skip(f"needs /dev/kvm: {why}")
    proc = bench("probe_kvm_paging", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    # the control (no paging, memory at 3 GiB) must work, or the probe could not tell
    # a paging guest that succeeds from one that fails
    control = out["control_flat_at_3g"]
    assert control["exit"] == "IO" and control["marker_written"], out
    for mode in ("guest_pae_paging", "guest_pse36_paging"):
        run = out[mode]
        assert run["marker_written"] == (run["exit"] == "IO"), out  # a guest that stopped wrote nothing
    assert isinstance(out["set_sregs_paging"]["kept_pg"], bool), out
