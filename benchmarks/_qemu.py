"""Helpers for benchmarks that use Debian's QEMU as the yardstick (never a livemig dependency).

* :class:`QemuProcess` starts ``qemu-system-x86_64`` with a QMP socket and talks to it with
  livemig's own QMP client (QMP is QMP);
* :func:`proc_stats` reads what the kernel knows about any process (faults, RSS, CPU), so
  that QEMU and livemig are measured the same way from outside;
* :func:`warm_host_memory` touches and frees memory right before a destination starts,
  so that both engines find the host's memory in the same (warm) state;
* :func:`build_initramfs` makes a busybox initramfs that loads virtio-mem and onlines
  hot-plugged memory, for a QEMU TCG Linux guest.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.control.qmp_client import QMPClient

QEMU = "qemu-system-x86_64"
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK = os.sysconf("SC_CLK_TCK")


def qemu_version() -> str | None:
    exe = shutil.which(QEMU)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


class QemuProcess:
    """A QEMU child process with a QMP client; ``extra`` is the rest of its command line."""

    def __init__(self, name: str, workdir: Path, extra: list[str], log: Path | None = None):
        self.name = name
        sock = workdir / f"{name}.qmp"
        if sock.exists():
            sock.unlink()
        args = [QEMU, "-nodefaults", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off", *extra]
        self.log = log or workdir / f"{name}.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(args, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: QEMU exited: {self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no QMP socket")
            time.sleep(0.02)
        self.qmp = QMPClient(str(sock), timeout=600, retry_for=30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __call__(self, cmd: str, **kw: Any) -> Any:
        return self.qmp.execute(cmd, **kw)

    def wait_migration(self, timeout: float = 900, poll: float = 0.02,
                       timeline: list[tuple[float, int]] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while True:
            info = self("query-migrate")
            if timeline is not None and "ram" in info:
                timeline.append((round(time.monotonic() - t0, 3), int(info["ram"]["transferred"])))
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: migration did not finish")
            time.sleep(poll)

    def close(self) -> None:
        try:
            self("quit")
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


def proc_stats(pid: int) -> dict[str, int | float]:
    """Faults, CPU seconds and resident memory of a process, all threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out: dict[str, int | float] = {
        "minflt": int(fields[7]),
        "majflt": int(fields[9]),
        "utime_s": int(fields[11]) / CLK,
        "stime_s": int(fields[12]) / CLK,
    }
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0]) * 1024
    return out


def stats_delta(before: dict, after: dict) -> dict[str, int | float]:
    return {k: round(after[k] - before[k], 3) if isinstance(after[k], float) else after[k] - before[k]
            for k in after if k in before}


WARM_SCRIPT = r"""
import mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(23)  # MADV_POPULATE_WRITE
"""


def warm_host_memory(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory in a child process and free it; returns seconds.

    This machine is itself a VM whose host backs idle memory lazily: memory first touched
    after a pause costs 0.4-0.8 GB/s. Touching it right before a destination starts puts
    both engines' destinations on the same footing ("warm").
    """
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(nbytes)], check=True)
    return time.perf_counter() - t


# -- a Linux guest for QEMU TCG --------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /lib/modules/$m.ko; done
echo "LIVEMIG-BENCH: booted"
while true; do
  n=0
  for s in /sys/devices/system/memory/memory*/state; do
    if [ "$(cat $s)" = offline ]; then echo online > $s 2>/dev/null; fi
    [ "$(cat $s)" = online ] && n=$((n+1))
  done
  echo "LIVEMIG-BENCH: online $n"
  sleep 1
done
"""
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_mem")


def find_kernel() -> tuple[Path, Path] | None:
    """(vmlinuz, modules dir) of Debian's linux-image-amd64, if installed."""
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        ver = vmlinuz.name.removeprefix("vmlinuz-")
        mods = Path("/lib/modules") / ver
        if mods.is_dir():
            return vmlinuz, mods
    return None


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries, directories first."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
    return out.getvalue()


def build_initramfs(dest: Path, modules_dir: Path) -> Path:
    """Busybox (from ``busybox-static``) + the virtio-mem modules + an init that onlines
    hot-plugged memory blocks; written gzip-compressed to ``dest``."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FileNotFoundError("busybox not found: apt-get install busybox-static")
    bb = Path(busybox).read_bytes()
    if b"ld-linux" in bb[:16384]:  # has a program interpreter: dynamically linked
        raise RuntimeError(f"{busybox} is not static: apt-get install busybox-static")
    entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                                        "lib/modules")]
    entries.append(("bin/busybox", 0o100755, bb))
    for m in MODULES:
        found = list(modules_dir.rglob(f"{m}.ko*"))
        if not found:
            raise FileNotFoundError(f"kernel module {m} not found under {modules_dir}")
        data = found[0].read_bytes()
        if found[0].suffix == ".xz":
            import lzma

            data = lzma.decompress(data)
        elif found[0].suffix == ".zst":
            data = subprocess.run(["zstd", "-dc", str(found[0])], capture_output=True, check=True).stdout
        entries.append((f"lib/modules/{m}.ko", 0o100644, data))
    entries.append(("init", 0o100755, INIT.replace("MODULES", " ".join(MODULES)).encode()))
    dest.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    return dest


def wait_for_serial(log: Path, text: str, timeout: float) -> float:
    """Seconds until ``text`` appears in the serial log ``log``."""
    t = time.monotonic()
    while True:
        if log.exists() and text in log.read_text(errors="replace"):
            return time.monotonic() - t
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"'{text}' did not appear on the serial console within {timeout:.0f} s")
        time.sleep(0.2)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="livemig-vsqemu-"))
