"""The source's reader of the return path (destination to source), in its own thread.

One :class:`ReturnPathReader` per connection: when postcopy recovery reconnects, a new
reader reads the new socket, and the old one's verdict can no longer be mistaken for the
new one's. ``SHUT`` carries the destination's verdict (0: loaded); every other message
goes to the ``handle`` callback of the mode that expects it (postcopy page requests,
received bitmaps, resume acknowledgements); a message nobody handles ends the reader
with an error, as a message QEMU does not expect would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from livemig.migration.core.job import describe
from livemig.migration.core.threads import join_for_good
from livemig.migration.stream import return_path as rp
from livemig.migration.stream.format import RPMessage
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

Handler = Callable[[int, bytes, QEMUFileReader], bool]
"""``handle(kind, payload, reader)``: True if the message was for it."""


class ReturnPathReader:
    def __init__(
        self,
        sock: Any,
        handle: Handler | None = None,
        on_lost: Callable[[str], None] | None = None,
        quiet: Callable[[], bool] = lambda: False,
    ):
        self.sock = sock
        self.handle = handle
        self.on_lost = on_lost  # called once if the path is lost before a verdict
        self.quiet = quiet  # a loss that is expected (cancel) is not an error
        self.result: int | None = None  # SHUT's value
        self.reason: str | None = None  # why the destination failed (X_FAILURE), if it said
        self.error: str | None = None
        self.reader: QEMUFileReader | None = None  # what read the path (with what it buffered)
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-rp", daemon=True)

    def start(self) -> ReturnPathReader:
        self._thread.start()
        return self

    def join(self) -> None:
        """Wait for the reader to end (the caller shut its socket down first)."""
        join_for_good(self._thread)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failed(self) -> bool:
        """The destination said its load failed."""
        return self.result not in (None, 0)

    def _run(self) -> None:
        r = self.reader = QEMUFileReader(self.sock, 64 << 10)
        try:
            for kind, payload in rp.read_messages(r):
                if kind == RPMessage.SHUT:
                    self.result = rp.parse_shut(payload)
                    return
                if kind == RPMessage.X_FAILURE:
                    self.reason = rp.parse_failure(payload)
                    continue
                if self.handle is not None and self.handle(kind, payload, r):
                    continue
                self.error = f"unexpected return-path message {kind}"
                return
        except (StreamError, OSError, ValueError) as e:
            if self.result is None and not self.quiet():
                self.error = f"return path lost: {describe(e)}"
        finally:
            self.done.set()
            if self.result is None and self.error is not None and self.on_lost is not None:
                self.on_lost(self.error)
