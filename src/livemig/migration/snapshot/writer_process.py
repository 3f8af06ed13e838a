"""The snapshot writer as the VM process sees it: started, set up, told to go, waited for.

**Forked from the helper launcher, not from the VM process** (issue 17). The VM process has
many threads (vCPUs, QMP, the migration thread, the workload); ``fork()`` copies only the
calling thread, so any lock another thread held at that moment stays held in the child
for ever, and the child also inherits every descriptor of the VM process.
:class:`WriterProcess` asks this process's helper launcher
(:mod:`livemig.migration.core.helpers`), a single-threaded fork server with the writer's
modules loaded, for a child that runs :func:`~livemig.migration.snapshot.writer.helper_main`
with the control socket as its only descriptor; what it needs comes in the set-up message
(:mod:`~livemig.migration.snapshot.setup_message`). A fork of the launcher takes
milliseconds where an interpreter and numpy took 0.2-0.8 s.

The writer dies with the VM process: the launcher kills its helpers when the VM process
ends, and each helper dies with the launcher (module docstring of ``core.helpers``).

**TLS.** A TLS session (keys, sequence numbers) lives in this process's OpenSSL objects
and cannot be handed to another process. When the main channel is not a plain socket,
:class:`StreamRelay` gives the writer one end of a socketpair and a thread here carries
the plaintext into the TLS channel. The relay thread needs this process's GIL; a vCPU
stuck in a write fault with the GIL held stalls it only until the writer's fault thread
(which needs nothing of this process) has saved the page.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.migration.core.helpers import launcher
from livemig.migration.core.job import Cancelled
from livemig.migration.core.threads import join_for_good
from livemig.migration.snapshot import setup_message as msg
from livemig.migration.snapshot.tracking import SnapshotError
from livemig.migration.snapshot.writer import helper_main

START_TIMEOUT = 60.0  # seconds for the writer to start (a launcher still starting, a loaded host)
TICK = 0.05  # seconds between checks for cancel while waiting for the writer


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"signal {-returncode}"
    return f"exit status {returncode}"


class WriterProcess:
    """One snapshot writer process (module docstring)."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.spawned_at = time.monotonic()
        try:
            self.proc = launcher().spawn(helper_main, [child.fileno()], "snapshot-writer", START_TIMEOUT)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctrl = parent
        self.start_seconds: float | None = None  # the writer's own start (see _read_ctrl)
        self.outcome: str | None = None  # "done", or the writer's error

    @property
    def pid(self) -> int:
        return self.proc.pid

    def set_up(self, setup: dict[str, Any], fds: list[int]) -> None:
        msg.send_msg(self.ctrl, {"op": "setup", **setup}, fds)

    def wait_ready(self, cancel: threading.Event) -> None:
        """Until the writer's fault thread waits on the userfaultfd."""
        deadline = self.spawned_at + START_TIMEOUT
        while self.start_seconds is None:
            if cancel.is_set():
                raise Cancelled()
            if time.monotonic() > deadline:
                raise SnapshotError(f"snapshot writer did not start within {START_TIMEOUT:.0f} s")
            if self._poll() and self.start_seconds is None:
                raise SnapshotError(self._death())

    def go(self, device_state: bytes) -> None:
        """Protection is on: the device-state buffer, and the writer walks guest RAM."""
        fd = msg.bytes_memfd("livemig-snapshot-devices", device_state)
        try:
            msg.send_msg(self.ctrl, {"op": "go", "device_state": len(device_state)}, [fd])
        except OSError:
            pass  # the writer is gone; wait() says why
        finally:
            os.close(fd)

    def wait(self, cancel: threading.Event, tick: Callable[[], None]) -> None:
        """Until the writer has exited; raise unless it completed the stream.
        ``tick()`` runs every :data:`TICK` (the caller's live settings)."""
        while not self._poll():
            if cancel.is_set():
                self.kill()
                raise Cancelled()
            tick()
        if self.outcome != "done" or self.proc.returncode != 0:
            raise SnapshotError(self._death())

    def _poll(self) -> bool:
        """Read control messages for up to :data:`TICK`; True once the writer has exited."""
        if self.proc.returncode is not None:
            return True
        p = select.poll()
        p.register(self.proc.pidfd, select.POLLIN)
        if self.ctrl.fileno() >= 0:
            p.register(self.ctrl, select.POLLIN)
        for fd, _ev in p.poll(TICK * 1000):
            if fd == self.ctrl.fileno():
                self._read_ctrl()
        if self.proc.poll() is None:
            return False
        while self.ctrl.fileno() >= 0 and self._read_ctrl():
            pass  # what it said before exiting
        return True

    def _read_ctrl(self) -> bool:
        try:
            m, fds = msg.recv_msg(self.ctrl)
        except OSError:
            m, fds = None, []
        for fd in fds:
            os.close(fd)
        if m is None:
            self.ctrl.close()
            return False
        op = m.get("op")
        if op == "ready":
            # the spawn (a fork of the launcher; its whole start if the launcher was not
            # running yet), plus the set-up, without the time the set-up message waited
            # for this process (populating guest memory meanwhile)
            started, setup, ready = m["started_at"], m["setup_at"], m["ready_at"]
            self.start_seconds = (started - self.spawned_at) + (ready - setup)
        elif op == "done":
            self.outcome = "done"
        elif op == "error":
            self.outcome = str(m.get("why") or "snapshot writer failed")
        return True

    def _death(self) -> str:
        if self.outcome not in (None, "done"):
            return str(self.outcome)
        code = self.proc.poll()
        return f"snapshot writer died ({exit_reason(code) if code is not None else 'no answer'})"

    def kill(self) -> None:
        """SIGKILL and wait until it is gone: its userfaultfd goes, every protected range
        is released."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.proc.close()
        self.ctrl.close()


class StreamRelay:
    """The writer's stream into a channel that cannot be handed over (TLS): the writer
    writes plaintext into a socketpair, a thread here sends it on (module docstring)."""

    def __init__(self, channel: Any):
        self.channel = channel
        self._here, self._there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-relay", daemon=True)
        self._thread.start()

    def writer_end(self) -> int:
        """The descriptor to give the writer; :meth:`handed_over` once it has its own."""
        return self._there.fileno()

    def handed_over(self) -> None:
        self._there.close()  # the writer's copy is the last: its exit ends the relay

    def _run(self) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while n := self._here.recv_into(buf):
                self.channel.sendall(view[:n])
        except OSError as e:
            self.error = e
        finally:
            self._here.close()  # the writer's next write fails: it reports, then exits

    def finish(self, timeout: float) -> None:
        """After the writer: wait until everything it wrote went out."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise SnapshotError("snapshot stream relay did not finish")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the relay for good: still running here means the snapshot failed, so both
        of its ends are shut down (a send blocked on a stalled destination returns)."""
        if self._thread.is_alive():
            for end in (self._here, self.channel):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        join_for_good(self._thread)
        self._there.close()
