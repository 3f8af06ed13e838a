"""``livemig vm`` processes for tests that drive livemig from outside, as a user would."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from livemig.control.qmp_client import QMPClient

LIVEMIG = [sys.executable, "-m", "livemig"]
READY = re.compile(r"^livemig vm: ready, QMP (\S+?)(?:, incoming (\S+))?$")


class VmProcess:
    """``livemig vm`` with its stderr read on a thread; ready once it printed its line."""

    def __init__(self, tmp: Path, *extra: str, name: str = "vm", qmp: str | None = None,
                 umask: int = -1, memory: str = "64M") -> None:
        self.qmp_arg = qmp or f"unix:{tmp / f'{name}.qmp'}"
        self.proc = subprocess.Popen(
            [*LIVEMIG, "vm", "--accel", "soft", "--memory", memory, "--name", name,
             "--qmp", self.qmp_arg, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, umask=umask)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address, self.incoming = self._wait_ready()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_ready(self, timeout: float = 30) -> tuple[str, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = READY.match(line)
                if m:
                    return m.group(1), m.group(2)
            assert self.proc.poll() is None, f"the VM exited: {self.lines}"
            time.sleep(0.02)
        raise AssertionError(f"no ready line: {self.lines}")

    def client(self) -> QMPClient:
        return QMPClient(self.address)

    def wait_line(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}: {self.lines}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=20) == 0
        self._reader.join(5)
        assert not any("Traceback" in ln for ln in self.lines), self.lines
