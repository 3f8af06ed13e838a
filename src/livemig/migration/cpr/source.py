"""cpr-transfer, old process: hand the memory over, send device state, watch the handover.

The order is QEMU's (``qmp_migrate`` with ``mode=cpr-transfer``):

1. connect the ``cpr`` channel (a unix socket the new process listens on), send the CPR
   state — the memfd of every RAM block, by block name — and shut the channel down for
   writing (:mod:`.state`);
2. wait until the new process closes the channel: it has mapped the memory, built its
   machine and listens on the main channel now (QEMU's HUP);
3. connect the main channel and start the stream; stop the guest; send the RAM set-up
   (the block list only: no page is sent, the memory is the same), an empty RAM END,
   the device state (virtio-mem's plug bitmap, the vCPUs, the guest); wait for SHUT 0.

Nothing of guest memory is read or written on this side: no dirty log, no page walk; the
guest is paused only while the device state travels.

**The handover.** After SHUT 0 the new process owns the guest, but it may still fail
before it runs it (killed, crashed, told to quit). This process keeps the main channel and
its RamDiscardManager holds (no plug or unplug may touch memory it shares) and waits: the
new process sends ``X_CPR_GUEST_RUNNING`` right before its vCPUs first run. If the channel
ends without that message, the new process is gone and never ran the guest, so the guest
runs on here — resumed if it was running (:class:`Handover`). Until then, and for good
once the new process runs the guest, ``cont`` is refused here.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from typing import Any

from livemig.memory.discard_manager import StateHold
from livemig.migration.channels import MigrationURI
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities, Parameters
from livemig.migration.core.vm import MigratableVM
from livemig.migration.cpr.channels import CprError, check_cpr_channel, check_main_channel
from livemig.migration.cpr.state import CprFd, send_state
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.stream import return_path as rp
from livemig.migration.stream.format import RPMessage
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
INCOMPATIBLE = ("postcopy-ram", "background-snapshot", "multifd", "mapped-ram", "x-colo")

PENDING = "pending"
HANDED_OVER = "handed-over"
RESUMED = "resumed"


def check_source(vm: MigratableVM, uri: MigrationURI, cpr: MigrationURI | None, caps: Capabilities) -> MigrationURI:
    """Refuse what cannot work, before anything starts (the QMP command's error)."""
    cpr = check_cpr_channel(cpr)
    check_main_channel(uri)
    for name in INCOMPATIBLE:
        if caps.enabled.get(name):
            raise CprError(f"cpr-transfer mode may not be used with {name}")
    for mr in vm.memory.regions:
        if mr.block.fd < 0:
            raise CprError(
                f"Memory region {mr.block.idstr} is not compatible with CPR: its backend is "
                "anonymous memory, which cannot be handed to another process (use backend=memfd)"
            )
    return cpr


def cpr_outgoing(
    vm: MigratableVM,
    uri: MigrationURI,
    cpr: MigrationURI | None,
    caps: Capabilities,
    params: Parameters,
    emit: status.EventFn = status.no_events,
) -> OutgoingMigration:
    """A cpr-transfer migration (not started) to the new process at ``uri`` / ``cpr``."""
    cpr_uri = check_source(vm, uri, cpr, caps)
    return OutgoingMigration(
        vm, uri, caps, params, emit,
        mode=lambda out: CprTransferSource(out, cpr_uri),
        prepare=CprTransferSource.prepare_of,
    )  # fmt: skip


class CprTransferSource:
    """The source mode of a cpr-transfer (module docstring)."""

    start_log = False  # the guest's memory is not copied: nothing to track
    return_path = True

    def __init__(self, out: OutgoingMigration, cpr_uri: MigrationURI):
        self.out = out
        self.cpr_uri = cpr_uri
        self.conn: socket.socket | None = None
        self.peer_pid = 0
        self.cpr_bytes = 0
        self.handed_bytes = 0
        self.handover: Handover | None = None

    # -- 1, 2: the cpr channel ----------------------------------------------------------------------
    @staticmethod
    def prepare_of(out: OutgoingMigration) -> None:
        mode = out.mode
        assert isinstance(mode, CprTransferSource)
        mode.hand_over_memory()

    def hand_over_memory(self) -> None:
        out = self.out
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = sock
        out.job.on_cleanup("cpr channel", self._close_cpr)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.cpr_uri.path)
        except OSError as e:
            raise CprError(f"cpr channel {self.cpr_uri}: cannot connect: {e.strerror or e}") from e
        sock.settimeout(None)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.peer_pid = struct.unpack("3i", creds)[0]
        entries = []
        for mr in out.vm.memory.regions:
            block = mr.block
            block.shared = True  # from now on another process may map it: never punch it out
            entries.append(CprFd(block.idstr, 0, block.fd))
            self.handed_bytes += block.max_length
        self.cpr_bytes = send_state(sock, entries)
        sock.shutdown(socket.SHUT_WR)
        self._wait_hup(sock)

    def _wait_hup(self, sock: socket.socket) -> None:
        """Until the new process closes the channel (it listens on the main one then)."""
        while True:
            self.out.job.check_cancel()
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = sock.recv(64)
            except OSError:
                return  # reset: the main channel's connect will tell whether it listens
            if not data:
                return
            raise CprError(f"cpr channel {self.cpr_uri}: unexpected data from the new process")

    def _close_cpr(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- 3: the main stream ---------------------------------------------------------------------
    def commands(self, w: QEMUFileWriter) -> None:
        pass

    def run(self) -> None:
        out = self.out
        out.switch_over(send_ram=False)  # the memory went over as descriptors already
        rpr = out.rp
        reader = rpr.reader if rpr is not None else None
        sock = out.release_main_channel()  # the handover watches it from now on
        holds = [mr.rdm.hold_state("cpr-transfer handover") for mr in out.vm.memory.regions if mr.rdm]
        was_running, before = out.guest.was_running, out.guest.state_before
        out.completed()
        self.handover = Handover(out.vm, was_running, before, sock, reader, holds)
        self.handover.start()

    def recover(self, final: str) -> None:
        pass

    def info(self, ram: dict[str, Any]) -> None:
        ram["remaining"] = 0  # the memory went over whole, as descriptors
        ram["cpr-transfer-bytes"] = self.handed_bytes
        ram["cpr-channel-bytes"] = self.cpr_bytes
        if self.handover is not None:
            ram["cpr-handover"] = self.handover.state

    def cont_refused(self) -> str | None:
        h = self.handover
        if h is None or h.state == RESUMED:
            return None
        if h.state == PENDING:
            return ("The guest was handed over to the new process (cpr-transfer); it resumes "
                    "here by itself if that process ends before running it")
        return "The guest runs in the new process (cpr-transfer): it cannot run here too"


class Handover:
    """The old process's watch after a cpr-transfer completed (module docstring)."""

    def __init__(
        self,
        vm: MigratableVM,
        was_running: bool,
        state_before: str,
        sock: Any,
        reader: QEMUFileReader | None,
        holds: list[StateHold],
    ):
        self.vm = vm
        self.was_running = was_running
        self.state_before = state_before
        self.sock = sock
        self.reader = reader if reader is not None else QEMUFileReader(sock, 4096)
        self.holds = holds
        self.state = PENDING
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpr-handover", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                kind, _ = rp.read_message(self.reader)
                if kind == RPMessage.X_CPR_GUEST_RUNNING:
                    self.state = HANDED_OVER
                    log.info("cpr-transfer: the new process runs the guest")
                    return
        except (StreamError, OSError, ValueError):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.state == PENDING:
                self._resume()
            self.done.set()

    def _resume(self) -> None:
        """The new process ended before it ran the guest: it runs on here."""
        self.state = RESUMED
        for h in self.holds:
            h.release()
        if self.was_running:
            log.warning("cpr-transfer: the new process ended before running the guest; resuming it here")
            self.vm.cont()
        else:
            self.vm.set_runstate(self.state_before if self.state_before != "running" else "paused")
