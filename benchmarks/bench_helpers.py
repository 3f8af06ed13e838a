"""Start latency of a helper process (issue 17), printed as one JSON object.

From the call in the VM process until the helper has run its first line (it sends one
byte on its control socket), three ways, from a process that looks like a VM process
(threads running, numpy and the helpers' modules loaded, optionally guest RAM mapped):

* ``launcher``: a fork of the helper launcher (:mod:`livemig.migration.core.helpers`),
  the way every helper starts now; the launcher itself is started once, beforehand;
* ``popen-<helper>``: ``subprocess.Popen`` of a fresh interpreter that imports that
  helper's module (how the postcopy handler and the snapshot writer started before);
* ``fork``: ``os.fork()`` of this multi-threaded process (how the instant-restore
  handler started before; the hazard issue 17 removes, measured here only).

Also the launcher's own start (``Popen`` until a first helper runs, the urgent helpers'
modules preloaded), and the first snapshot writer's spawn, for which the launcher imports
the writer's modules (numpy) on demand, against the next one. The machine is shared and
noisy: compare within one run.

Usage: python benchmarks/bench_helpers.py [--runs 30] [--vm-ram 1G]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = str(HERE) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

import _helper_probe  # noqa: E402
import numpy  # noqa: E402, F401 - a VM process has it loaded

from livemig.cli import parse_size  # noqa: E402
from livemig.migration.core.helpers import HelperLauncher  # noqa: E402
from livemig.migration.helper_modules import ON_DEMAND, PRELOADED  # noqa: E402

MODULES = [*PRELOADED, *ON_DEMAND]
SRC = str(Path(sys.modules["livemig"].__file__ or "").resolve().parents[1])


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def timed(start: Callable[[int], Callable[[], None]]) -> float:
    """Milliseconds from ``start(fd)`` until the helper's byte on ``fd``'s peer; then the
    helper is waited for (not counted)."""
    here, there = pair()
    t0 = time.perf_counter()
    finish = start(there.fileno())
    there.close()
    here.recv(1)
    ms = (time.perf_counter() - t0) * 1000
    here.close()
    finish()
    return ms


def via_launcher(lau: HelperLauncher) -> Callable[[int], Callable[[], None]]:
    def start(fd: int) -> Callable[[], None]:
        h = lau.spawn(_helper_probe.ready, [fd], "bench-probe")
        return lambda: h.close(10)

    return start


def via_popen(module: str) -> Callable[[int], Callable[[], None]]:
    code = f"import socket, {module}; socket.socket(fileno={{fd}}).send(b'r')"

    def start(fd: int) -> Callable[[], None]:
        env = {**os.environ, "PYTHONPATH": SRC}
        p = subprocess.Popen([sys.executable, "-c", code.format(fd=fd)], pass_fds=[fd], env=env,
                             stdin=subprocess.DEVNULL)  # fmt: skip
        return lambda: p.wait()

    return start


def via_fork(fd: int) -> Callable[[], None]:
    pid = os.fork()
    if pid == 0:
        try:
            socket.socket(fileno=fd).send(b"r")
        finally:
            os._exit(0)
    return lambda: os.waitpid(pid, 0) and None


def spawn_writer(lau: HelperLauncher) -> float:
    """Milliseconds for the launcher to fork a real snapshot writer (which exits at once:
    its control socket ends before any set-up)."""
    from livemig.migration.snapshot import writer

    here, there = pair()
    t0 = time.perf_counter()
    h = lau.spawn(writer.helper_main, [there.fileno()], "bench-writer")
    ms = (time.perf_counter() - t0) * 1000
    there.close()
    here.close()
    h.close(10)
    return ms


def summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=10)
    return {"median_ms": round(statistics.median(ms), 2), "p10_ms": round(q[0], 2),
            "p90_ms": round(q[-1], 2), "runs": len(ms)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--vm-ram", type=parse_size, default=1 << 30,
                    help="guest RAM to map and touch in this process (a memfd, as a VM's)")  # fmt: skip
    args = ap.parse_args()
    for m in MODULES:
        __import__(m)
    ram = None
    if args.vm_ram:
        fd = os.memfd_create("bench-guest-ram")
        os.ftruncate(fd, args.vm_ram)
        ram = mmap.mmap(fd, args.vm_ram, flags=mmap.MAP_SHARED)
        for off in range(0, args.vm_ram, 4096):
            ram[off] = 1
    stop = threading.Event()
    for _ in range(4):  # a VM process's vCPU, QMP and migration threads
        threading.Thread(target=stop.wait, daemon=True).start()
    out: dict[str, object] = {"threads_here": threading.active_count(), "vm_ram": args.vm_ram}
    t0 = time.perf_counter()
    lau = HelperLauncher(PRELOADED)
    try:
        out["launcher_start_ms"] = round(timed(via_launcher(lau)), 1)  # its start, then a first spawn
        out["writer_first_spawn_ms"] = round(spawn_writer(lau), 1)  # its modules imported first
        out["writer_next_spawn_ms"] = round(spawn_writer(lau), 1)
        ways: dict[str, Callable[[int], Callable[[], None]]] = {"launcher": via_launcher(lau), "fork": via_fork}
        for m in MODULES:
            ways["popen-" + ".".join(m.split(".")[-2:])] = via_popen(m)
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.runs):  # interleaved: the machine's load hits every way alike
            for k, start in ways.items():
                times[k].append(timed(start))
        out.update({k: summary(v) for k, v in times.items()})
    finally:
        lau.close()
        stop.set()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    del ram
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
