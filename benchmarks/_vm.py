"""Helpers shared by the benchmarks: start livemig VM processes and wait for them."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livemig.control.qmp_client import QMPClient

MiB, GiB = 1 << 20, 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VmProcess:
    """A ``livemig vm`` child process and a QMP client connected to it."""

    def __init__(self, name: str, args: list[str], workdir: Path | None = None):
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="livemig-bench-"))
        sock = self.dir / f"{name}.qmp"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livemig", "vm", "--name", name, "--qmp", f"unix:{sock}", *args],
            stdout=subprocess.DEVNULL,
        )
        self.qmp = QMPClient(str(sock), timeout=600, retry_for=30)

    def __call__(self, cmd: str, **kw: object) -> object:
        return self.qmp.execute(cmd, **kw)

    def plug(self, size: int, timeout: float = 600) -> None:
        self("qom-set", path="vm0", property="requested-size", value=size)
        deadline = time.monotonic() + timeout
        while True:
            d = self("query-memory-devices")[0]["data"]  # type: ignore[index]
            g = self("x-query-guest")
            if d["size"] == size and g["fill-done"]:  # type: ignore[index]
                return
            if time.monotonic() > deadline:
                raise TimeoutError("guest did not plug")
            time.sleep(0.1)

    def wait_migration(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):  # type: ignore[union-attr]
                return info  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise TimeoutError("migration did not finish")
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self("quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
