"""The fault-handler process, seen from the destination's VM process.

Why a process (docs/postcopy.md): a thread that faults on a missing page while holding
the GIL would stop a handler *thread* of the same process; the process has its own GIL.
:class:`HandlerControl` starts it at POSTCOPY_ADVISE, forked by the helper launcher
(:mod:`livemig.migration.core.helpers`: a few milliseconds, never a fork of this
multi-threaded process, only its control socket inherited), sets it up at LISTEN (the
userfaultfd, the received map, the plugged runs), hands it the postcopy channel at RUN
and after each recovery, and reads its reports on the control socket in a thread of its
own:

* ``eos``: the postcopy channel's EOS arrived (the source sent its last urgent page);
* ``lost``: the postcopy channel failed — postcopy pauses;
* ``req``: page requests for the main return path (without a postcopy channel);
* ``stats``: the answer to a statistics request (also its last words when stopped);
* ``error``: the handler failed (it exits next).

If the control socket closes while nobody stopped the handler, the process died: the owner
is told (:meth:`HandlerEvents.handler_exited`) and may :meth:`restart` it.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Protocol

from livemig.migration.core.helpers import Helper, launcher
from livemig.migration.core.threads import join_for_good
from livemig.migration.postcopy.handler import helper_main, recv_ctrl, send_ctrl

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
STATS_TIMEOUT = 2.0  # for the final statistics after "stop"


class HandlerEvents(Protocol):
    """What the owner of the handler is told (from the control thread)."""

    def channel_eos(self) -> None: ...
    def channel_lost(self, why: str) -> None: ...
    def forward_requests(self, pages: list[list[Any]]) -> None: ...
    def handler_exited(self) -> None: ...


class HandlerControl:
    """One fault-handler process at a time, and its control socket (module docstring)."""

    def __init__(self, events: HandlerEvents):
        self.events = events
        self.proc: Helper | None = None
        self.ctrl: socket.socket | None = None
        self.restarts = 0
        self._setup: tuple[dict[str, Any], list[int]] | None = None
        self._send_lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self._stats_evt = threading.Event()
        self._ready = threading.Event()
        self._stopping = False
        self._reader: threading.Thread | None = None
        self.stop_timeouts = 0  # stops that waited in vain for the final statistics

    @property
    def last_stats(self) -> dict[str, Any]:
        """The statistics the handler reported last (its final ones once stopped)."""
        return self._stats

    # -- start ---------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process; it waits for :meth:`setup`."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = launcher().spawn(helper_main, [child.fileno()], "postcopy-faults")
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctrl = parent

    def setup(self, setup: dict[str, Any], fds: list[int]) -> None:
        """Hand over the userfaultfd and the received map (``fds``) and the blocks; wait
        until the handler is ready. Kept for a :meth:`restart`."""
        self._setup = (setup, fds)
        assert self.ctrl is not None
        self._ready.clear()
        send_ctrl(self.ctrl, setup, fds)
        self._reader = threading.Thread(
            target=self._read, args=(self.ctrl,), name="postcopy-ctrl", daemon=True
        )
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT):
            raise OSError("postcopy fault handler did not start")

    def restart(self) -> None:
        """The process died: start another with the same set-up (the control thread of
        the dead one calls this)."""
        old, old_proc = self.ctrl, self.proc
        if old_proc is not None:
            old_proc.close()
        try:
            self.spawn()
            assert self._setup is not None
            self.setup(*self._setup)
        finally:
            if old is not None:
                old.close()
        self.restarts += 1

    # -- talk ----------------------------------------------------------------------------
    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """A control message; an unreachable handler is logged (its death is noticed by
        the control thread)."""
        if self.ctrl is None:
            return
        with self._send_lock:
            try:
                send_ctrl(self.ctrl, msg, fds)
            except OSError as e:
                log.warning("postcopy handler unreachable: %s", e)

    def give_channel(self, sock: Any) -> None:
        """The postcopy channel (None: requests go on the main return path). The handler
        gets its own descriptor; ours stays open for shutdown()."""
        if sock is not None:
            self.send({"op": "channel"}, [sock.fileno()])
        else:
            self.send({"op": "channel"})

    def set_vcpus(self, tids: list[int]) -> None:
        """The vCPU threads' kernel ids: blocktime is counted per vCPU."""
        if tids:
            self.send({"op": "vcpus", "tids": tids})

    def pause(self) -> None:
        """Drop the postcopy channel; pending requests are kept and sent again later."""
        self.send({"op": "pause"})

    def stats(self, timeout: float = 1.0) -> dict[str, Any]:
        """Fresh statistics from a running handler (else the last ones)."""
        if self.proc is None or self.proc.poll() is not None:
            return self._stats
        self._stats_evt.clear()
        self.send({"op": "stats"})
        self._stats_evt.wait(timeout)
        return self._stats

    def _read(self, ctrl: socket.socket) -> None:
        while True:
            try:
                msg, _fds = recv_ctrl(ctrl)
            except OSError:
                msg = None
            if msg is None:
                self._stats_evt.set()
                if not self._stopping and ctrl is self.ctrl:
                    self.events.handler_exited()
                return
            op = msg.get("op")
            if op == "ready":
                self._ready.set()
            elif op == "stats":
                self._stats = msg
                self._stats_evt.set()
            elif op == "eos":
                self.events.channel_eos()
            elif op == "lost":
                self.events.channel_lost(msg.get("why", "postcopy channel lost"))
            elif op == "req":
                self.events.forward_requests(msg["pages"])
            elif op == "error":
                log.error("postcopy fault handler: %s", msg.get("why"))

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the handler; it settles what it can and reports its final statistics."""
        self._stopping = True
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._reader is None:
                # spawned at POSTCOPY_ADVISE, never set up (the migration ended in
                # precopy): it waits for its set-up, and any other message ends it. There
                # are no statistics to wait for, and nobody would read them — waiting
                # here once kept the source's guest stopped for the whole timeout.
                self.send({"op": "stop"})
            else:
                self._stats_evt.clear()
                self.send({"op": "stop"})
                if not self._stats_evt.wait(STATS_TIMEOUT):
                    self.stop_timeouts += 1
                    log.warning("postcopy fault handler: no final statistics within %.0f s", STATS_TIMEOUT)
        proc.close(STOP_TIMEOUT)  # killed if it has not exited by then
        self.proc = None

    def close(self) -> None:
        """Stop the process and close the control socket (idempotent)."""
        self.stop()
        ctrl, self.ctrl = self.ctrl, None
        if ctrl is not None:
            try:
                ctrl.shutdown(socket.SHUT_RDWR)  # the control thread's read returns
            except OSError:
                pass
            join_for_good(self._reader)
            ctrl.close()
