"""One migration, one owner of its state: :class:`MigrationJob`.

Every migration — outgoing, incoming, a background snapshot — runs in one thread that a
job starts, and the job alone changes the migration's status:

* an intermediate status changes with :meth:`MigrationJob.move`, a compare-and-set from
  the current status that is refused if the transition is not in QEMU's life cycle
  (``status.TRANSITIONS``) or if the caller expected another status (two actors — the
  migration thread and a cancel from QMP — cannot both win);
* the order of a run is fixed: the body (set-up, iteration, completion, whatever the
  mode does), then on failure or cancel the *recovery* (keep the guest alive: resume it,
  stop the dirty log), then every *clean-up* registered along the way, last registered
  first, and only then the final status (``completed``, ``failed``, ``cancelled``) is
  published and :attr:`MigrationJob.done` set. So when a client sees a final status,
  every thread that read guest memory has stopped, every channel is closed and every
  RamDiscardManager hold is released; a new migration may start only then
  (:attr:`MigrationJob.finished`).

What each clean-up does is up to the code that created the resource (it registers the
clean-up when it creates the thing), so a mode brings its own clean-up without knowing
the order of the others.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.migration.core import status

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a migration thread once ``migrate_cancel`` was requested."""


class IllegalTransition(RuntimeError):
    """A status change that QEMU's life cycle does not allow (a bug, not a user error)."""


SILENT_PEER = "Connection timed out: the link or the peer went silent (x-tcp-user-timeout)"
"""What a TCP migration socket's ETIMEDOUT means: nothing came back within the user
timeout (sent data unacknowledged, or keepalive probes unanswered; channels.Liveness)."""


def describe(e: BaseException) -> str:
    """The text of a failure for ``error-desc``: the OS error's words, else the message."""
    if isinstance(e, OSError) and e.errno == errno.ETIMEDOUT:
        return SILENT_PEER
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


class MigrationJob:
    """Status, cancel and the run order of one migration (module docstring)."""

    def __init__(
        self,
        name: str,
        emit: status.EventFn = status.no_events,
        events: Callable[[], bool] = lambda: True,
        cancelled_status: str = status.CANCELLED,
    ):
        self.name = name
        self._emit = emit
        self._events = events
        self._cancelled_status = cancelled_status
        self._lock = threading.Lock()
        self._status = status.NONE
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._thread: threading.Thread | None = None
        self.cancel_requested = threading.Event()
        self.done = threading.Event()
        self.error_desc: str | None = None
        self.start_time = 0.0
        self.end_time: float | None = None

    # -- status ----------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    def move(self, new: str, expected: str | tuple[str, ...] | None = None) -> bool:
        """Change the status to ``new`` if it is ``expected`` (any, if None) now.

        Returns False when the current status is not the expected one (someone else
        changed it: a cancel). A transition outside the life cycle raises.
        """
        with self._lock:
            cur = self._status
            if expected is not None and cur not in ((expected,) if isinstance(expected, str) else expected):
                return False
            if cur == new:
                return True
            if new not in status.TRANSITIONS.get(cur, frozenset()):
                if cur == status.CANCELLING:
                    return False  # cancel won: the mode notices at its next check
                raise IllegalTransition(f"{self.name}: migration status {cur} -> {new}")
            self._status = new
        self._event(new)
        return True

    def note_error(self, desc: str | None) -> None:
        """``error-desc`` while the migration goes on: why postcopy is paused (QEMU shows
        it until a recovery clears it). The final status brings its own."""
        with self._lock:
            if self.done.is_set():
                return
            self.error_desc = desc

    def _event(self, new: str) -> None:
        if self._events():
            self._emit("MIGRATION", {"status": new})

    # -- cancel ----------------------------------------------------------------------------
    def request_cancel(self) -> bool:
        """``migrate_cancel``: True if the migration was running (it ends as cancelled)."""
        if self.finished or self._status == status.NONE:
            return False
        self.cancel_requested.set()
        self.move(status.CANCELLING)
        return True

    def check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled()

    # -- life cycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Started and not finished: a body or its clean-up is still at work."""
        return self._thread is not None and not self.done.is_set()

    @property
    def thread_alive(self) -> bool:
        """The migration thread itself still exists (it ends right after ``done``)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def on_cleanup(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the migration ends, whatever the outcome (last in, first out)."""
        with self._lock:
            self._cleanups.append((what, fn))

    def start(
        self,
        body: Callable[[], None],
        recover: Callable[[str], None],
        thread_name: str,
        explain: Callable[[BaseException], str] = describe,
    ) -> None:
        """Run ``body`` in a new thread; ``recover(final)`` runs first if it fails;
        ``explain(e)`` turns the failure into ``error-desc``."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: started twice")
        self.start_time = time.monotonic()
        self.move(status.SETUP)
        self._thread = threading.Thread(
            target=self._main, args=(body, recover, explain), name=thread_name, daemon=True
        )
        self._thread.start()

    def _main(
        self,
        body: Callable[[], None],
        recover: Callable[[str], None],
        explain: Callable[[BaseException], str],
    ) -> None:
        final, desc = status.COMPLETED, None
        try:
            body()
        except Cancelled:
            final = self._cancelled_status
        except BaseException as e:  # noqa: BLE001 - every failure ends here: keep the guest alive
            if self.cancel_requested.is_set():
                final = self._cancelled_status
            else:
                final, desc = status.FAILED, explain(e)
        if final == self._cancelled_status and final == status.FAILED and desc is None:
            desc = f"{self.name} cancelled"
        if final != status.COMPLETED:
            if desc:  # QEMU prints the reason on stderr too
                log.warning("%s %s: %s", self.name, final, desc)
            try:
                recover(final)
            except Exception:  # noqa: BLE001 - recovery must not stop the clean-up
                log.exception("%s: recovery after %s failed", self.name, final)
        self._run_cleanups()
        self.end_time = time.monotonic()
        self.error_desc = desc
        with self._lock:
            self._status = final
        self._event(final)
        self.done.set()

    def _run_cleanups(self) -> None:
        while True:
            with self._lock:
                if not self._cleanups:
                    return
                what, fn = self._cleanups.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - the others must run still
                log.exception("%s: clean-up of %s failed", self.name, what)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def restart_clock(self) -> None:
        """Count ``total-time`` from now (a destination: from the source's connection)."""
        self.start_time = time.monotonic()

    def times(self) -> dict[str, Any]:
        """``total-time`` in ms (so far, while running)."""
        if not self.start_time:
            return {}
        end = self.end_time or time.monotonic()
        return {"total-time": int((end - self.start_time) * 1000)}


class JobView:
    """What an orchestrator shows of its job (``status``, ``error-desc``, ``done``,
    ``wait``): the job stays the one owner; this is the read-only face QMP commands use."""

    job: MigrationJob

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def error_desc(self) -> str | None:
        return self.job.error_desc

    @property
    def done(self) -> threading.Event:
        return self.job.done

    def wait(self, timeout: float | None = None) -> bool:
        return self.job.wait(timeout)
