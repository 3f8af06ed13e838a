"""Postcopy on the destination after a failure: pause, recovery, the rest of the stream.

After POSTCOPY_RUN the guest runs here, so a failure of the main connection, the postcopy
channel, the return path or the fault handler pauses (``postcopy-paused``): the sockets
are closed, the guest keeps running (a thread touching a missing page waits; the handler
keeps its requests and sends them again later). Then:

    migrate-recover URI       listen; postcopy-recover-setup when the source connects
                              (the main connection, then the postcopy channel)
    postcopy-recover          RECV_BITMAP(block): the received map as a bitmap on the
                              return path; POSTCOPY_RESUME: postcopy-active, RESUME_ACK,
                              the new postcopy channel to the handler
    the rest of the stream    PART/END RAM sections and EOF, no header (``load_rest``)

:class:`DestinationRecovery` also owns what a pause must close: the postcopy channel (this
process's end; the handler has its own descriptor), and it notices the losses the handler
reports, shutting the main connection down so that the loader's read returns.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livemig.migration.channels import Listener, MigrationURI
from livemig.migration.core import status
from livemig.migration.postcopy.handler_control import HandlerControl
from livemig.migration.postcopy.received import ReceivedMap
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import MigCommand, RPMessage, SectionType
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

if TYPE_CHECKING:
    from livemig.migration.incoming import IncomingMigration

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 10.0
PAUSABLE = (status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER_SETUP, status.POSTCOPY_RECOVER)


def shut(sock: Any) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DestinationRecovery:
    """Pause and recovery of the destination, and the postcopy channel's end here."""

    def __init__(self, inc: IncomingMigration, handler: HandlerControl, received: Callable[[], ReceivedMap],
                 running: Callable[[], bool]):
        self.inc = inc
        self.handler = handler
        self.received = received  # the received map (it exists from ADVISE on)
        self.running = running  # the guest runs here: a loss pauses
        self.preempt = bool(inc.caps["postcopy-preempt"])
        self.chan: Any = None  # the postcopy channel, until the next pause
        self.recoveries = 0
        self.forwarded = 0  # page requests sent on the main return path (no postcopy channel)
        self.eos = threading.Event()  # the source's last urgent page arrived
        self.lost_why: str | None = None
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._listener: Listener | None = None
        self._recover_requested = threading.Event()
        self._ram_section_id: int | None = None

    # -- the postcopy channel ----------------------------------------------------------
    def accept_channel(self, listener: Listener | None) -> None:
        """postcopy-preempt: the source's second connection is the postcopy channel."""
        if not self.preempt:
            return
        if listener is None:
            raise StreamError(0, "postcopy-preempt: no listener for the postcopy channel")
        if listener.tls is not None:
            raise StreamError(0, "postcopy-preempt over TLS is not supported")
        try:
            self.chan = listener.accept(timeout=ACCEPT_TIMEOUT)
        except OSError as e:
            raise StreamError(0, f"postcopy channel was not connected: {e}") from e

    def give_channel(self) -> None:
        """The handler reads and writes the postcopy channel from now on (or, without it,
        hands its requests to :meth:`forward_requests`)."""
        self.handler.give_channel(self.chan)

    def channel_eos(self) -> None:
        self.eos.set()

    def channel_lost(self, why: str) -> None:
        """A channel failed (handler, return path, migrate-pause): the loader's read
        returns, and the load pauses."""
        if not self.running():
            return
        self.lost_why = why
        self._lost.set()
        shut(self.inc.sock)
        shut(self.chan)

    def forward_requests(self, pages: list[list[Any]]) -> None:
        """Without a postcopy channel: the handler's requests go on the main return path."""
        if self.inc.status != status.POSTCOPY_ACTIVE:
            return  # sent again by the handler after a recovery
        msgs, last = [], None
        for idstr, page in pages:
            msgs.append(rp.req_pages(page << TARGET_PAGE_BITS, TARGET_PAGE_SIZE, None if idstr == last else idstr))
            last = idstr
        try:
            self.inc.send_rp(b"".join(msgs))
            self.forwarded += len(msgs)
        except (OSError, StreamError) as e:
            self.channel_lost(f"return path: {e.strerror if isinstance(e, OSError) else e}")

    def wait_channel_end(self) -> BaseException | None:
        """After EOF on the main stream: wait for the postcopy channel's EOS (None), or
        return why it was lost."""
        if not self.preempt:
            return None
        while not self.eos.wait(0.05):
            if self._lost.is_set():
                return StreamError(0, self.lost_why or "postcopy channel lost")
        return None

    # -- pause -------------------------------------------------------------------------
    def pause(self, why: str) -> None:
        """Close this connection's sockets and wait in ``postcopy-paused``."""
        inc = self.inc
        log.info("postcopy paused: %s", why)
        if not inc.job.move(status.POSTCOPY_PAUSED, PAUSABLE):
            inc.job.check_cancel()
        inc.job.note_error(why)
        self.handler.pause()
        with inc.rp_lock:  # no return-path message is half written on the old socket
            old, inc.sock = inc.sock, None
        for s in (old, self.chan):
            shut(s)
            if s is not None:
                s.close()
        self.chan = None
        self.eos.clear()
        self._lost.clear()
        self.lost_why = None

    def request_pause(self) -> None:
        """QMP ``migrate-pause`` on the destination."""
        if self.inc.status not in (status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER):
            raise RuntimeError("migrate-pause is only allowed in postcopy-active or postcopy-recover")
        self.channel_lost("paused by migrate-pause")

    # -- recovery ----------------------------------------------------------------------
    def recover(self, uri: MigrationURI) -> MigrationURI:
        """QMP ``migrate-recover``: listen for the source's reconnection (the bound URI)."""
        with self._lock:
            if self.inc.status != status.POSTCOPY_PAUSED:
                raise RuntimeError("Migrate recover can only be run when postcopy is paused.")
            if self._recover_requested.is_set():
                raise RuntimeError("Migrate recovery is triggered already")
            self._listener = Listener(uri, tls=self.inc.tls)
            self._recover_requested.set()
            return self._listener.uri

    def wait_for_source(self) -> QEMUFileReader:
        """The loader thread, paused: accept the source's new connections."""
        inc = self.inc
        while not self._recover_requested.wait(0.2):
            inc.job.check_cancel()
        with self._lock:
            self._recover_requested.clear()
            listener, self._listener = self._listener, None
        assert listener is not None
        if not inc.job.move(status.POSTCOPY_RECOVER_SETUP, status.POSTCOPY_PAUSED):
            inc.job.check_cancel()
        try:
            sock = listener.accept()
            with inc.rp_lock:
                inc.sock = sock
            self.accept_channel(listener)
        finally:
            listener.close()
        self.recoveries += 1
        if not inc.job.move(status.POSTCOPY_RECOVER, status.POSTCOPY_RECOVER_SETUP):
            inc.job.check_cancel()
        return QEMUFileReader(sock, 1 << 20)

    def load_rest(self, r: QEMUFileReader) -> None:
        """The main stream after a reconnection: RECV_BITMAP and RESUME, RAM, EOF."""
        inc = self.inc
        resumed = False
        while True:
            hdr = savevm.read_section_header(r)
            kind = hdr.type
            if kind == SectionType.EOF:
                if not resumed:
                    raise StreamError(hdr.offset, "EOF before POSTCOPY_RESUME")
                inc.read_trailer(r)
                return
            if kind == SectionType.COMMAND:
                resumed = self._command(savevm.read_command(r), hdr.offset) or resumed
                continue
            if kind in (SectionType.PART, SectionType.END):
                if not resumed:
                    raise StreamError(hdr.offset, "RAM before POSTCOPY_RESUME")
                if self._ram_section_id is None:
                    self._ram_section_id = hdr.section_id
                if hdr.section_id != self._ram_section_id:
                    raise StreamError(hdr.offset, f"unknown section id {hdr.section_id}")
                inc.load_ram_section(r, hdr.section_id)
                continue
            raise StreamError(hdr.offset, f"unexpected section type 0x{int(kind):02x} in postcopy")

    def _command(self, command: savevm.Command, at: int) -> bool:
        """One command of the recovery handshake; True for POSTCOPY_RESUME."""
        inc = self.inc
        if command.cmd == MigCommand.RECV_BITMAP:
            self._send_recv_bitmap(command.payload, at)
        elif command.cmd == MigCommand.POSTCOPY_RESUME:
            if inc.status != status.POSTCOPY_RECOVER:
                raise StreamError(at, "POSTCOPY_RESUME outside postcopy-recover")
            self._resume()
            return True
        elif command.cmd == MigCommand.PING:
            inc.send_rp(rp.message(RPMessage.PONG, command.payload))
        else:
            raise StreamError(at, f"{command.cmd.name} not expected after a reconnection")
        return False

    def _send_recv_bitmap(self, payload: bytes, at: int) -> None:
        if self.inc.status != status.POSTCOPY_RECOVER:
            raise StreamError(at, "RECV_BITMAP is only valid in postcopy-recover")
        n = payload[0] if payload else -1
        if len(payload) != 1 + n:
            raise StreamError(at, "CMD_RECV_BITMAP: bad block name length")
        name = payload[1:].decode(errors="replace")
        block = self.inc.loader.blocks.get(name)
        if block is None:
            raise StreamError(at, f"CMD_RECV_BITMAP: unknown block \"{name}\"")
        self.inc.send_rp(rp.recv_bitmap(name, self.received().le_bitmap(block)))

    def _resume(self) -> None:
        """postcopy-active, RESUME_ACK, and the new channel to the handler, which sends
        its pending requests again."""
        inc = self.inc
        if not inc.job.move(status.POSTCOPY_ACTIVE, status.POSTCOPY_RECOVER):
            inc.job.check_cancel()
        inc.job.note_error(None)
        inc.send_rp(rp.resume_ack())
        self.give_channel()

    def close(self) -> None:
        """This process's end of the postcopy channel and a recovery listener (idempotent)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        chan, self.chan = self.chan, None
        if chan is not None:
            shut(chan)
            chan.close()
