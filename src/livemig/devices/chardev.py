"""Where a serial port's bytes go and come from: QEMU's ``-serial`` backends.

``--serial`` takes QEMU's spellings:

=============================  ==========================================================
``file:PATH``                  output to PATH (created or truncated, as QEMU does); no input
``stdio``                      output to this process's stdout, input from its stdin (a
                               terminal is put in no-echo, character-at-a-time mode; Ctrl-C
                               still reaches the process)
``unix:PATH,server[,wait=off]``  a listening unix socket, one client at a time: output to
                               the client (dropped while none is connected, and what a
                               client does not read in time: a stalled reader must not
                               stall the guest, whose vCPU thread writes), input from it.
                               ``wait=on`` (the default, as QEMU's) holds the guest until a
                               client connects; ``nowait`` is ``wait=off``
``null``                       a port whose output goes nowhere
``none``                       no serial port at all (its ports read 0xff)
=============================  ==========================================================

A backend writes each byte as the guest hands it over (no buffering in this process), so
what the guest wrote before a migration is out before the source stops, and the
destination's backend only ever sees what the guest writes there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Receiver = Callable[[bytes], None]
SEND_TIMEOUT = 0.2
"""Seconds a unix-socket client may take to make room for output before it is dropped."""
USAGE = "file:PATH, stdio, unix:PATH,server[,wait=off], null or none"


class ChardevError(ValueError):
    """A backend specification or a backend that cannot be opened; one line, names it."""


@dataclass(frozen=True)
class ChardevSpec:
    kind: str  # file, stdio, unix, null
    path: str = ""
    wait: bool = False
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.kind


def parse_chardev(text: str, option: str = "--serial") -> ChardevSpec | None:
    """A ``--serial`` value; None for ``none`` (no device). ChardevError names the problem."""
    if text == "none":
        return None
    if text in ("null", "stdio"):
        return ChardevSpec(text, text=text)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("file", "unix"):
        raise ChardevError(f"{option} {text}: unknown backend (use {USAGE})")
    path, *opts = rest.split(",")
    if not path:
        raise ChardevError(f"{option} {text}: the path is empty")
    if kind == "file":
        if opts:
            raise ChardevError(f"{option} {text}: file: takes no options")
        return ChardevSpec("file", path, text=text)
    server, wait = False, True
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "server" and value in ("", "on"):
            server = True
        elif key == "nowait" and not value:
            wait = False
        elif key == "wait" and value in ("on", "off"):
            wait = value == "on"
        else:
            raise ChardevError(f"{option} {text}: unknown option {opt!r} (server, wait=on|off)")
    if not server:
        raise ChardevError(
            f"{option} {text}: livemig only listens on unix sockets: add ,server"
        )
    return ChardevSpec("unix", path, wait=wait, text=text)


class Backend:
    """Null backend, and the interface of the others."""

    def __init__(self, spec: ChardevSpec):
        self.spec = spec
        self.receiver: Receiver | None = None
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def set_receiver(self, receiver: Receiver | None) -> None:
        """Who gets bytes from the outside (the serial port's receive side)."""
        self.receiver = receiver

    def _deliver(self, data: bytes) -> None:
        r = self.receiver
        if r is not None and data:
            r(data)

    def wait_connected(self, stop: threading.Event) -> bool:
        """True once the backend may start (unix server with ``wait=on``: a client is there)."""
        return True

    def close(self) -> None:
        pass


class FileBackend(Backend):
    def __init__(self, spec: ChardevSpec):
        super().__init__(spec)
        try:
            self.fd = os.open(spec.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ChardevError(f"--serial {spec}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.fd >= 0:
            os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioBackend(Backend):
    """stdout and stdin; a terminal on stdin loses echo and line editing while we run."""

    def __init__(self, spec: ChardevSpec):
        super().__init__(spec)
        self._saved_tty: list | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), data)

    def set_receiver(self, receiver: Receiver | None) -> None:
        super().set_receiver(receiver)
        if receiver is not None and self._thread is None:
            self._raw_tty()
            self._thread = threading.Thread(target=self._read, name="serial-stdin", daemon=True)
            self._thread.start()

    def _raw_tty(self) -> None:
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return
        import termios

        attrs = termios.tcgetattr(fd)
        self._saved_tty = [list(a) if isinstance(a, list) else a for a in attrs]
        attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)  # keep ISIG
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _read(self) -> None:
        fd = sys.stdin.fileno()
        while not self._stop.is_set():
            try:
                data = os.read(fd, 256)
            except OSError:
                return
            if not data:
                return
            self._deliver(data)

    def close(self) -> None:
        self._stop.set()
        if self._saved_tty is not None:
            import termios

            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._saved_tty)
            self._saved_tty = None


class UnixServerBackend(Backend):
    """A listening unix socket; one client at a time, the next one once it leaves."""

    def __init__(self, spec: ChardevSpec):
        super().__init__(spec)
        self.path = spec.path
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closed = False
        self._warned = False
        self.dropped = 0
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ChardevError(f"--serial {spec}: {self.path} exists and is not a socket")
            os.unlink(self.path)  # a stale socket of an earlier run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            self._sock.listen(1)
        except OSError as e:
            self._sock.close()
            raise ChardevError(f"--serial {spec}: {e.strerror}") from None
        self._thread = threading.Thread(target=self._serve, name="serial-unix", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.settimeout(SEND_TIMEOUT)
            with self._lock:
                self._client = conn
            self._connected.set()
            try:
                while True:
                    try:
                        data = conn.recv(4096)
                    except TimeoutError:
                        continue  # the send timeout applies to receiving too: keep reading
                    if not data:
                        break
                    self._deliver(data)
            except OSError:
                pass
            with self._lock:
                if self._client is conn:
                    self._client = None
            conn.close()

    def write(self, data: bytes) -> None:
        super().write(data)
        with self._lock:
            conn = self._client
            if conn is None:
                return  # nobody listening: dropped, as QEMU does
            try:
                conn.sendall(data)
            except TimeoutError:
                self.dropped += len(data)  # the client is not reading: drop, do not stall
                if not self._warned:
                    log.warning("serial %s: the client is not reading; output is dropped", self.spec)
                    self._warned = True
            except OSError:
                self._client = None

    def wait_connected(self, stop: threading.Event) -> bool:
        if not self.spec.wait:
            return True
        print(f"livemig: waiting for a connection on serial {self.spec}", file=sys.stderr)
        while not self._connected.wait(0.2):
            if stop.is_set():
                return False
        return True

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(OSError):
                    self._client.shutdown(socket.SHUT_RDWR)
                self._client.close()
                self._client = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def open_backend(spec: ChardevSpec) -> Backend:
    """Open what ``spec`` names; ChardevError (a ValueError) if it cannot be."""
    if spec.kind == "file":
        return FileBackend(spec)
    if spec.kind == "stdio":
        return StdioBackend(spec)
    if spec.kind == "unix":
        return UnixServerBackend(spec)
    return Backend(spec)
