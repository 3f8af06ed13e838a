"""A scenario matrix in the spirit of QEMU's ``tests/migration/guestperf``: how each way of
migrating copes with a guest that dirties memory, at each link speed.

Scenarios: guest dirty rate x bandwidth limit (``max-bandwidth``) x mode:

* ``precopy``: plain precopy;
* ``auto-converge``: precopy with QEMU's default throttle parameters;
* ``dirty-limit``: precopy with ``vcpu-dirty-limit`` (default 1 MB/s per vCPU);
* ``postcopy``: precopy until the first pass ends, then ``migrate-start-postcopy``
  (``postcopy_started`` false: precopy had converged already);
* ``multifd2``: precopy over ``multifd`` with 2 channels.

Every run starts a fresh source and destination ``livemig vm`` process (soft guest: two
vCPUs writing random pages over its memory at the given rate; 32 MiB of RAM and 96 MiB
of a 512 MiB virtio-mem region plugged), drives them over QMP, and gives up after
``--timeout`` seconds (cancelled: not converged). Reported per run: total time, downtime,
bytes on the wire, passes (dirty syncs), the highest throttle seen
(``cpu-throttle-percentage``, or dirty-limit's per-round sleep), the guest's own progress
during the migration (pages it wrote from the start to the end of the migration, on the
source and, after a postcopy switch, on the destination — its ``x-query-guest``
counter, which migrates with it) as a share of what it writes unthrottled, CPU seconds of
each process, converged or not; and a timeline every 100 ms (bytes sent, guest progress,
throttle). JSON on stdout (``--json`` also to a file); plots with matplotlib into
``--figures`` (default docs/figures): ``matrix_timeline.png`` (throughput and guest
progress over time, one line per mode, for each scenario) and ``matrix.png`` (the matrix:
time to converge and guest progress per mode and scenario).

Usage: ./run bench bench_matrix [--rates 32M,128M,256M] [--bandwidths 48M,192M]
           [--modes precopy,auto-converge,dirty-limit,postcopy,multifd2] [--timeout 20]
           [--json out.json] [--figures DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from _qemu import proc_stats, stats_delta  # noqa: E402
from _vm import MiB, VmProcess, free_port  # noqa: E402

from livemig.cli import parse_size  # noqa: E402
from livemig.cli.sizes import size_arg  # noqa: E402

MODES = ("precopy", "auto-converge", "dirty-limit", "postcopy", "multifd2")
PLUGGED = 96 * MiB
GUEST_BYTES = 32 * MiB + PLUGGED
FINAL = ("completed", "failed", "cancelled")


def vm_args(rate: int) -> list[str]:
    return ["--accel", "soft", "--memory", "32M", "--virtio-mem", "id=vm0,size=512M,requested-size=0",
            "--vcpus", "2", "--dirty-rate", size_arg(rate), "--content", "random"]


class Vm(VmProcess):
    @property
    def pid(self) -> int:
        return self.proc.pid

    def pages(self) -> int:
        return int(self("x-query-guest")["pages-written"])  # type: ignore[index]


def capabilities(mode: str) -> list[dict[str, Any]]:
    caps = {"auto-converge": "auto-converge", "dirty-limit": "dirty-limit", "postcopy": "postcopy-ram",
            "multifd2": "multifd"}
    return [{"capability": caps[mode], "state": True}] if mode in caps else []


def run(mode: str, rate: int, bandwidth: int, timeout: float, work: Path) -> dict[str, Any]:
    src = Vm("msrc", vm_args(rate), work)
    dst = None
    try:
        src.plug(PLUGGED)
        dst = Vm("mdst", [*vm_args(rate), "--incoming", "defer"], work)
        for v in (src, dst):
            v("migrate-set-capabilities", capabilities=capabilities(mode))
            if mode == "multifd2":
                v("migrate-set-parameters", **{"multifd-channels": 2})
        src("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst("migrate-incoming", uri=uri)
        s0, d0 = proc_stats(src.pid), proc_stats(dst.pid)
        p0 = src.pages()
        t0 = time.monotonic()
        src("migrate", uri=uri)
        timeline: list[dict[str, Any]] = []
        throttle = 0
        switched = cancelled = False
        postcopy_started: bool | None = None
        while True:
            info: dict[str, Any] = src("query-migrate")  # type: ignore[assignment]
            t = time.monotonic() - t0
            st = info.get("status")
            thr = info.get("cpu-throttle-percentage") or info.get("dirty-limit-throttle-time-per-round", 0)
            throttle = max(throttle, thr)
            done_pages = max(src.pages(), dst.pages()) - p0
            timeline.append({"t": round(t, 2), "sent": info.get("ram", {}).get("transferred", 0),
                             "guest_bytes": done_pages * 4096, "throttle": thr, "status": st})
            if st in FINAL:
                break
            if mode == "postcopy" and not switched and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                switched = True
                try:
                    src("migrate-start-postcopy")
                    postcopy_started = True
                except Exception:  # noqa: BLE001 - precopy got there first (converged)
                    postcopy_started = False
            if t > timeout and not cancelled and st not in ("postcopy-active", "postcopy-device"):
                src("migrate_cancel")
                cancelled = True
            if t > timeout + 120:
                raise TimeoutError(f"{mode}: migration did not end")
            time.sleep(0.1)
        end = time.monotonic() - t0
        s1 = proc_stats(src.pid)
        deadline = time.monotonic() + 60
        while dst("query-migrate").get("status") not in FINAL and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        d1 = proc_stats(dst.pid)
        work_bytes = timeline[-1]["guest_bytes"]
        ram = info.get("ram", {})
        sd, dd = stats_delta(s0, s1), stats_delta(d0, d1)
        return {
            "mode": mode, "dirty_rate": rate, "bandwidth": bandwidth, "status": st,
            "converged": st == "completed", "error": info.get("error-desc"),
            "postcopy_started": postcopy_started,
            "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "bytes": ram.get("transferred"), "passes": ram.get("dirty-sync-count"),
            "throttle_max": throttle,
            "throttle_unit": {"auto-converge": "%", "dirty-limit": "us per round"}.get(mode, ""),
            "guest_progress": round(work_bytes / (rate * end), 3) if end > 0 else None,
            "guest_bytes_during_migration": work_bytes,
            "src_cpu_s": round(sd["utime_s"] + sd["stime_s"], 2),
            "dst_cpu_s": round(dd["utime_s"] + dd["stime_s"], 2),
            "timeline": timeline,
        }
    finally:
        src.close()
        if dst is not None:
            dst.close()


# -- plots -------------------------------------------------------------------------------------
COLORS = {"precopy": "#444", "auto-converge": "#d62", "dirty-limit": "#29b", "postcopy": "#2a4",
          "multifd2": "#a3c"}


def smoothed_rate(tl: list[dict[str, Any]], window: float = 0.5) -> list[float]:
    """MiB/s sent over the last ``window`` seconds at each sample (the byte counter moves
    one section at a time, so point-to-point rates alias with the 100 ms polling)."""
    out, j = [], 0
    for p in tl:
        while tl[j]["t"] < p["t"] - window:
            j += 1
        a = tl[j] if tl[j]["t"] < p["t"] else tl[max(j - 1, 0)]
        out.append((p["sent"] - a["sent"]) / max(p["t"] - a["t"], 1e-3) / MiB)
    return out


def plot(out: dict[str, Any], figdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if "timeline" in r]
    cells = sorted({(r["dirty_rate"], r["bandwidth"]) for r in runs})
    if not cells:
        return []
    figdir.mkdir(parents=True, exist_ok=True)
    rates = sorted({c[0] for c in cells})
    bws = sorted({c[1] for c in cells})
    fig, axes = plt.subplots(2 * len(rates), len(bws), figsize=(5.0 * len(bws), 3.0 * len(rates)),
                             squeeze=False)
    for rate, bw in cells:
        row, col = 2 * rates.index(rate), bws.index(bw)
        top, bottom = axes[row][col], axes[row + 1][col]
        for r in (x for x in runs if (x["dirty_rate"], x["bandwidth"]) == (rate, bw)):
            tl = r["timeline"]
            ts = [p["t"] for p in tl]
            label = r["mode"] + ("" if r["converged"] else " (gave up)")
            top.plot(ts, smoothed_rate(tl), color=COLORS[r["mode"]], lw=1.2, label=label)
            bottom.plot(ts, [p["guest_bytes"] / MiB for p in tl], color=COLORS[r["mode"]], lw=1.2)
        top.set_title(f"guest dirties {rate // MiB} MiB/s, link {bw // MiB} MiB/s", fontsize=9)
        top.set_ylabel("sent, MiB/s", fontsize=8)
        bottom.set_ylabel("guest work, MiB", fontsize=8)
        bottom.set_xlabel("seconds since migrate", fontsize=8)
        top.legend(fontsize=6)
    fig.tight_layout()
    timeline = figdir / "matrix_timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)

    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(modes), 1)
    for i, m in enumerate(modes):
        xs, ts, gs, hatch = [], [], [], []
        for j, cell in enumerate(cells):
            r = next((x for x in runs if x["mode"] == m and (x["dirty_rate"], x["bandwidth"]) == cell), None)
            if r is None:
                continue
            xs.append(j + i * width)
            ts.append((r["total_time_ms"] or 0) / 1000)
            gs.append(r["guest_progress"] or 0)
            hatch.append(not r["converged"])
        bars = ax_t.bar(xs, ts, width, color=COLORS[m], label=m)
        for b, h in zip(bars, hatch, strict=True):
            if h:
                b.set_hatch("//")
                b.set_alpha(0.45)
        ax_g.bar(xs, gs, width, color=COLORS[m], label=m)
    labels = [f"{r // MiB}M dirty\n{b // MiB}M link" for r, b in cells]
    for ax in (ax_t, ax_g):
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(cells))], labels, fontsize=8)
    ax_t.set_ylabel("total time, s (hatched: did not converge)")
    ax_g.set_ylabel("guest progress during migration (1 = unthrottled)")
    ax_g.set_ylim(0, 1.15)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    matrix = figdir / "matrix.png"
    fig.savefig(matrix, dpi=110)
    plt.close(fig)
    return [str(timeline), str(matrix)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="32M,128M,256M")
    p.add_argument("--bandwidths", default="48M,192M")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--timeout", type=float, default=20.0, help="seconds before giving up on a run")
    p.add_argument("--json", type=Path)
    p.add_argument("--figures", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures")
    args = p.parse_args()
    rates = [parse_size(x) for x in args.rates.split(",")]
    bandwidths = [parse_size(x) for x in args.bandwidths.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        sys.exit(f"unknown modes: {', '.join(sorted(unknown))}")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"livemig-matrix-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    out: dict[str, Any] = {"guest_bytes": GUEST_BYTES, "timeout_s": args.timeout,
                           "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
                           "runs": []}
    for rate in rates:
        for bw in bandwidths:
            for mode in modes:
                try:
                    r = run(mode, rate, bw, args.timeout, work)
                except Exception as e:  # noqa: BLE001 - one broken scenario must not lose the others
                    r = {"mode": mode, "dirty_rate": rate, "bandwidth": bw, "status": "error",
                         "converged": False, "error": f"{type(e).__name__}: {e}"}
                out["runs"].append(r)
                print(f"{rate // MiB:4d}M dirty {bw // MiB:4d}M link {mode:14s} {r['status']:10s} "
                      f"{r.get('total_time_ms')} ms passes={r.get('passes')} throttle={r.get('throttle_max')} "
                      f"guest={r.get('guest_progress')}", file=sys.stderr)
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["figures"] = plot(out, args.figures)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    slim = json.loads(json.dumps(out))
    for r in slim["runs"]:
        r.pop("timeline", None)
    print(json.dumps(slim, indent=2))


if __name__ == "__main__":
    main()
