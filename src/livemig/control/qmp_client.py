"""A small synchronous QMP client for livemig's own command-line tools.

The CLI must not depend on test-only packages, and what it needs is little: connect,
negotiate, execute, and collect events that arrive in between.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QMPClientError(Exception):
    def __init__(self, cls: str, desc: str):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMPClient:
    def __init__(self, path: str, timeout: float = 30.0, connect_timeout: float = 10.0):
        if path.startswith("unix:"):
            path = path[5:]
        self.path = path
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._buf = b""
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPClientError(reply["error"]["class"], reply["error"]["desc"])
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
