"""cpr-transfer, new process: take the memory over, load the device state, say when the
guest runs.

The new process is started with the old one's machine options plus two ``-incoming``
options, the main channel and ``{"channel-type": "cpr", ...}`` (QEMU 10). Before it builds
its machine it listens on the cpr channel and reads the CPR state (:class:`CprReceiver`):
the memfd of every RAM block, which its blocks then map instead of allocating memory
(``MachineConfig.ram_fds``). Once its main channel listens it closes the cpr channel —
that tells the old process to connect.

The incoming migration is an ordinary one whose RAM is *ignored* (QEMU's word): the block
list must match, no page record may arrive (``block X should not be migrated !``), and
no component discards or populates guest memory while loading (``LoadContext.
ram_ignored``). After SHUT 0 the main channel stays open (:class:`GuestRunningNotice`):
right before the vCPUs first run here, ``X_CPR_GUEST_RUNNING`` goes to the old process,
which then gives the guest up for good; if this process dies first, the channel's end
tells the old process to resume the guest.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

from livemig.migration.channels import Listener, MigrationURI
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities
from livemig.migration.core.vm import MigratableVM
from livemig.migration.cpr.channels import CprError, check_cpr_channel, check_main_channel
from livemig.migration.cpr.state import CprState, receive_state
from livemig.migration.incoming import IncomingMigration
from livemig.migration.stream import return_path as rp
from livemig.migration.stream.format import RPMessage
from livemig.migration.transport.tls import TLSServer


class CprReceiver:
    """The new process's cpr channel: listen, receive the state, close to say "listening"."""

    def __init__(self, uri: MigrationURI):
        self.uri = check_cpr_channel(uri)
        self.listener: Listener | None = Listener(self.uri)
        self.conn: socket.socket | None = None
        self.state: CprState | None = None
        self.peer_pid = 0
        self.names: list[str] = []

    def receive(self, timeout: float | None = None) -> CprState:
        """Wait for the old process (``migrate`` with a cpr channel) and read its state."""
        assert self.listener is not None
        self.conn = self.listener.accept(timeout)
        creds = self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.peer_pid = struct.unpack("3i", creds)[0]
        self.state = receive_state(self.conn)
        self.names = [e.name for e in self.state.fds]
        return self.state

    def take_ram_fds(self) -> dict[str, int]:
        """The memfds by RAM block name; the caller owns them now."""
        assert self.state is not None
        out = {}
        for e in self.state.fds:
            if e.id == 0 and e.fd >= 0:
                out[e.name] = e.fd
                e.fd = -1
        return out

    def close(self) -> None:
        """Close the channel: the old process connects the main channel now (QEMU's HUP)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.state is not None:
            self.state.close_all()  # descriptors nobody took

    @property
    def closed(self) -> bool:
        return self.conn is None and self.listener is None


def check_destination(vm: MigratableVM, uri: MigrationURI, cpr: CprReceiver) -> None:
    check_main_channel(uri)
    if cpr.state is None:
        raise CprError("cpr-transfer: the cpr state has not arrived")
    for mr in vm.memory.regions:
        block = mr.block
        if block.idstr not in cpr.names or not block.shared:
            raise CprError(f"cpr-transfer: RAM block {block.idstr} was not handed over by the old process")


def cpr_incoming(
    vm: MigratableVM,
    uri: MigrationURI,
    caps: Capabilities,
    cpr: CprReceiver,
    emit: status.EventFn = status.no_events,
    autostart: bool = True,
    tls: TLSServer | None = None,
) -> IncomingMigration:
    """The incoming side of a cpr-transfer (not started); its listener is bound."""
    check_destination(vm, uri, cpr)
    notice = GuestRunningNotice(vm)
    inc = IncomingMigration(vm, uri, caps, emit, autostart, tls, on_loaded=notice.loaded)
    inc.loader.ignored = frozenset(b.idstr for b in vm.memory.blocks)
    inc.load_ctx.ram_ignored = True
    return inc


class GuestRunningNotice:
    """Keeps the main channel after the load; tells the old process when the guest runs."""

    def __init__(self, vm: MigratableVM):
        self.vm = vm
        self.sock: Any = None
        self.sent = False
        self._lock = threading.Lock()

    def loaded(self, inc: IncomingMigration) -> None:
        self.sock = inc.release_main_channel()
        self.vm.runstate_listeners.append(self._runstate)

    def _runstate(self, old: str, new: str) -> None:
        """On the way to "running" (before the vCPUs resume): tell the old process. On
        "shutdown" before that: just close, so the old process takes the guest back."""
        if new not in ("running", "shutdown"):
            return
        with self._lock:
            sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if new == "running":
                sock.sendall(rp.message(RPMessage.X_CPR_GUEST_RUNNING))
                self.sent = True
        except OSError:
            pass  # the old process is gone: nobody to tell
        finally:
            sock.close()
            try:
                self.vm.runstate_listeners.remove(self._runstate)
            except ValueError:
                pass
