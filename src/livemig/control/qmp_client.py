"""A small synchronous QMP client for livemig's own command-line tools.

The CLI must not depend on test-only packages, and what it needs is little: connect,
negotiate, execute, and collect events that arrive in between.

Connecting fails at once, with a message that names the address, when nothing can answer
(no socket file, nothing listening, no permission): a user who typed a wrong path should
not wait. A caller that starts the VM itself and must wait for it passes ``retry_for``.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any

from livemig.control.qmp_address import QMPAddress, QMPAddressError, parse_address

__all__ = ["QMPAddressError", "QMPClient", "QMPClientError", "QMPConnectError"]


class QMPClientError(Exception):
    """The VM answered a command with an error."""

    def __init__(self, cls: str, desc: str):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMPConnectError(ConnectionError):
    """No QMP conversation with the VM: it cannot be reached, or went away. The message
    names the address."""


_RETRYABLE = (errno.ENOENT, errno.ECONNREFUSED)


def _connect_error(addr: QMPAddress, e: OSError) -> QMPConnectError:
    where = f"QMP socket {addr.path}" if addr.kind == "unix" else f"QMP at {addr}"
    if e.errno == errno.ENOENT:
        return QMPConnectError(f"no QMP socket at {addr.path} (is the VM running?)")
    if e.errno == errno.ECONNREFUSED:
        if addr.kind == "unix":
            return QMPConnectError(f"nothing listens on {where} (a stale socket file?)")
        return QMPConnectError(f"connection refused by {where} (is the VM running?)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return QMPConnectError(f"no permission to connect to {where}")
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return QMPConnectError(f"timed out connecting to {where}")
    return QMPConnectError(f"cannot connect to {where}: {e.strerror or e}")


class QMPClient:
    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        retry_for: float = 0.0,
    ):
        """Connect to ``address`` (``unix:PATH``, ``tcp:HOST:PORT`` or a path) and
        negotiate. ``QMPAddressError`` for an address that cannot be understood,
        ``QMPConnectError`` when the VM cannot be reached; with ``retry_for`` a missing
        socket or a refused connection are retried for that many seconds first."""
        self.address = parse_address(address)
        self.path = self.address.path
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                self.sock = self._connect(connect_timeout)
                break
            except OSError as e:
                if e.errno in _RETRYABLE and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise _connect_error(self.address, e) from None
        try:
            self.sock.settimeout(timeout)
            self.greeting = self._read()
            if "QMP" not in self.greeting:
                err = self.greeting.get("error", {})
                raise QMPConnectError(
                    f"QMP at {self.address} refused the connection: {err.get('desc', self.greeting)}"
                )
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _connect(self, timeout: float) -> socket.socket:
        addr = self.address
        if addr.kind == "tcp":
            return socket.create_connection((addr.host, addr.port), timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QMPConnectError(f"no answer from QMP at {self.address}") from None
            except OSError as e:
                raise QMPConnectError(f"QMP connection to {self.address} failed: {e.strerror or e}") from None
            if not chunk:
                raise QMPConnectError(f"QMP connection to {self.address} closed (the VM quit?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPConnectError(f"{self.address} does not speak QMP: {line[:60]!r}") from None
        if not isinstance(msg, dict):
            raise QMPConnectError(f"{self.address} does not speak QMP: {line[:60]!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPConnectError(f"QMP connection to {self.address} failed: {e.strerror or e}") from None
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
