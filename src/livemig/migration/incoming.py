"""The migration destination: load a stream into a VM waiting in ``inmigrate``.

Every field of the incoming stream is validated (header, configuration, section types
and ids, footers, RAM records, device state) and the first problem fails the migration
with a message that names it and the stream offset. A failed load leaves the destination
VM in ``inmigrate``, not running a half-loaded guest. On a socket, the result travels
back to the source on the return path (SHUT 0 or 1), so a source never completes a
migration that the destination did not accept.

:class:`IncomingMigration` owns the listener, the main channel, the section loop and the
:class:`~livemig.migration.core.job.MigrationJob`; RAM records go to the
:class:`~livemig.migration.ram.load.RamLoader`, device sections to the components that
registered them, and modes plug in: multifd accepts its channels around the main one and
feeds the loader; postcopy registers its commands (:attr:`IncomingMigration.commands`)
and a page placer, and continues the load after the guest runs.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.devices.state import LoadContext, StateSection
from livemig.migration.channels import Listener, Liveness, MigrationURI, open_file_for_read
from livemig.migration.core import status
from livemig.migration.core.deadline import Deadline
from livemig.migration.core.job import JobView, MigrationJob, describe
from livemig.migration.core.params import (
    KNOWN_CAPABILITIES,
    STREAM_CAPABILITIES,
    Capabilities,
    Parameters,
)
from livemig.migration.core.vm import MigratableVM
from livemig.migration.ram.load import RamLoader
from livemig.migration.ram.prefault import Prefaulter
from livemig.migration.ram.state import TARGET_PAGE_BITS
from livemig.migration.stream import return_path as rp
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    RAM_IDSTR,
    RAM_VERSION,
    MigCommand,
    RPMessage,
    SectionType,
)
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError
from livemig.migration.transport.tls import TLSServer
from livemig.migration.transport.tls_errors import TLSError

log = logging.getLogger(__name__)

READ_BUFFER = 4 << 20
SETUP_DEADLINE = 10.0
"""Seconds from the source's connection to the end of its configuration section."""
VALIDATED_CAPABILITIES = STREAM_CAPABILITIES
"""Capabilities that change the stream format: source and destination must agree."""

CommandFn = Callable[[savevm.Command, QEMUFileReader, int], None]


class IncomingMigration(JobView):
    def __init__(
        self,
        vm: MigratableVM,
        uri: MigrationURI,
        caps: Capabilities,
        emit: status.EventFn = status.no_events,
        autostart: bool = True,
        tls: TLSServer | None = None,
        channels: Callable[[IncomingMigration], Any] | None = None,
        postcopy: Callable[[IncomingMigration, Listener], Any] | None = None,
        on_loaded: Callable[[IncomingMigration], None] | None = None,
        params: Parameters | None = None,
    ):
        if vm.runstate != "inmigrate":
            raise RuntimeError("the VM is not waiting for an incoming migration")
        self.vm = vm
        self.uri = uri
        self.caps = caps
        self.emit = emit
        self.autostart = autostart
        # this VM's parameters (the destination's own x-tcp-user-timeout, as QEMU's
        # destination uses its own parameters), read when a socket is made
        self.params = params if params is not None else Parameters()
        self.job = MigrationJob(
            "incoming migration", emit, events=lambda: bool(caps["events"]), cancelled_status=status.FAILED
        )
        # with TLS, cancel() also ends a handshake in progress (transport.tls)
        self.tls = tls.with_abort(self.job.cancel_requested) if tls is not None else None
        self.loader = RamLoader(vm.memory.blocks)
        self.sections: dict[str, StateSection] = {s.idstr: s for s in vm.state}
        self.load_ctx = LoadContext()  # what loading components are told (postcopy)
        self.commands: dict[int, CommandFn] = {}  # mode commands (postcopy registers its own)
        self.listener: Listener | None = None
        self.sock: Any = None  # the main channel (a socket or TLS channel)
        self.fd = -1
        self.rp_lock = threading.Lock()  # one writer of the return path at a time
        self.rp_open = False
        self.source_is_livemig = False  # from the configuration: X_FAILURE is understood
        self.multifd: Any = None  # multifd.MultifdReceiver while the multifd capability is on
        self.postcopy: Any = None  # postcopy.PostcopyIncoming with postcopy-ram
        # the modes, chosen by migration.modes: multifd accepts the main connection among
        # its channels; postcopy starts when the source connects with postcopy-ram on
        self._accept_channels = channels
        self._start_postcopy = postcopy
        # called once the load succeeded and the source was told, before the guest starts
        # (cpr-transfer keeps the main channel to tell the source when the guest runs)
        self._on_loaded = on_loaded
        if uri.scheme in ("tcp", "unix"):
            # bind now: a busy port is the caller's error; with tls, accept() hands out
            # TLS channels (the same for every connection of this migration)
            self.listener = self.listen(uri)
            self.uri = self.listener.uri

    # -- public ----------------------------------------------------------------------------
    def start(self) -> None:
        self.job.on_cleanup("listener", self.close_listener)
        self.job.start(self._body, self._recover, "migration-dst", self._explain_and_tell)

    def cancel(self) -> None:
        self.job.cancel_requested.set()
        if self.multifd is not None:
            self.multifd.abort()
        for s in (self.sock, self.listener.sock if self.listener else None):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def listen(self, uri: MigrationURI) -> Listener:
        """A listener of this migration (the first one, and postcopy's for a recovery):
        bound now; what it accepts gets TLS if set and the liveness of
        ``x-tcp-user-timeout`` as it is now."""
        return Listener(uri, tls=self.tls, liveness=Liveness(int(self.params.x_tcp_user_timeout)))

    def take_listener(self) -> Listener:
        """Hand the listener over (multifd accepts the channels and the main connection)."""
        listener, self.listener = self.listener, None
        assert listener is not None
        return listener

    def wake_main(self) -> None:
        """Make a read blocked on the main channel return (a channel failed, a deadline)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def release_main_channel(self) -> Any:
        """Hand the main socket over for good: the clean-up no longer closes it."""
        sock, self.sock = self.sock, None
        return sock

    def close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- the thread ------------------------------------------------------------------------
    def _body(self) -> None:
        if self.listener is not None:
            self.sock = self._accept_main()
            self.job.on_cleanup("main channel", self._close_main)
            reader = QEMUFileReader(self.sock, READ_BUFFER)
        else:
            self.fd = open_file_for_read(self.uri.path)
            self.job.on_cleanup("stream file", self._close_file)
            reader = QEMUFileReader(os.fdopen(self.fd, "rb", buffering=0, closefd=False), READ_BUFFER)
        self.job.restart_clock()  # total-time counts from the source's connection
        self.job.move(status.ACTIVE, status.SETUP)
        prefault = Prefaulter(self.vm.memory.regions)
        self.loader.prefault = prefault
        self.job.on_cleanup("prefault threads", prefault.stop)
        if self.postcopy is None:
            self.load_stream(reader)
        elif self.postcopy.load(reader):  # ended in postcopy: the guest runs already
            return
        if self.multifd is not None:  # channels stopped and joined before the guest runs
            self.multifd.finish()
        prefault.stop()
        prefault.release_unused(self.loader.maybe_data)
        self.audit_unplugged()
        self.send_shut(0)
        if self._on_loaded is not None:
            self._on_loaded(self)
        self.vm.start_incoming_guest()
        if self.autostart:
            self.vm.cont()
        else:
            self.vm.set_runstate("paused")

    def _recover(self, final: str) -> None:
        self.send_shut(1)

    def _explain_and_tell(self, e: BaseException) -> str:
        """``error-desc``, also told to a livemig source before SHUT 1 (it shows it)."""
        desc = self._explain(e)
        if self.rp_open and self.source_is_livemig:
            try:
                self.send_rp(rp.failure(desc))
            except (OSError, StreamError):
                pass
        return desc

    def _explain(self, e: BaseException) -> str:
        if self.multifd is not None and self.multifd.error:
            return str(self.multifd.error)  # the cause, not the main stream's symptom
        if isinstance(e, OSError) and e.errno == errno.ETIMEDOUT:
            return describe(e)  # a silent link or source, after x-tcp-user-timeout
        return str(e) if isinstance(e, (StreamError, TLSError)) else f"{type(e).__name__}: {e}"

    def _accept_main(self) -> Any:
        """The main connection. multifd accepts it among its channels; postcopy takes the
        listener over (its channel connects later)."""
        if self._accept_channels is not None:
            sock = self._accept_channels(self)
            if sock is not None:
                return sock
        assert self.listener is not None
        sock = self.listener.accept()
        if self._start_postcopy is not None:
            pc = self._start_postcopy(self, self.listener)
            if pc is not None:
                self.postcopy, self.listener = pc, None
                return sock
        self.close_listener()
        return sock

    def _close_main(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def _close_file(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def audit_unplugged(self) -> None:
        """Count the pages of unplugged memory that got a record or a channel run: the
        load's own evidence that the source sent nothing there (must be 0)."""
        n = 0
        for mr in self.vm.memory.regions:
            if mr.rdm is None:
                continue
            offs, sizes = mr.rdm.discarded_runs(mr.whole())
            starts = np.asarray(offs, np.int64) >> TARGET_PAGE_BITS
            n += self.loader.received_in(mr.block, starts, np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS)
        self.load_ctx.report("unplugged-pages-received", n)

    def send_rp(self, data: bytes) -> None:
        """One return-path message (raises if the path is closed)."""
        sock = self.sock
        if sock is None:
            raise StreamError(0, "return path is closed")
        with self.rp_lock:
            sock.sendall(data)

    def send_shut(self, value: int) -> None:
        if not self.rp_open or self.sock is None:
            return
        try:
            self.send_rp(struct.pack(">HHI", RPMessage.SHUT, 4, value))
        except (OSError, StreamError):
            pass

    # -- the stream ------------------------------------------------------------------------
    def load_stream(self, r: QEMUFileReader) -> None:
        if self.sock is not None:
            # a peer that connects and then sends nothing (or a byte now and then) must not
            # hold the destination: the header and configuration come within a deadline
            with Deadline(SETUP_DEADLINE, self.wake_main, "the source's stream header") as d:
                try:
                    self._read_start(r)
                except (OSError, StreamError) as e:
                    if d.expired:
                        raise StreamError(r.tell(), d.message()) from e
                    raise
        else:
            self._read_start(r)
        self._load_sections(r)

    def _read_start(self, r: QEMUFileReader) -> None:
        """The header and the configuration section, which must come first."""
        savevm.read_header(r)
        head = r.peek(1)
        if not head:
            raise StreamError(r.tell(), "truncated stream: wanted 1 bytes, got 0 (configuration)")
        if head[0] != SectionType.CONFIGURATION:
            raise StreamError(r.tell(), "Configuration section missing")
        hdr = savevm.read_section_header(r)
        self._check_configuration(r, hdr.offset)

    def _load_sections(self, r: QEMUFileReader) -> None:
        ids: dict[int, str] = {}
        seen_config = True
        saw_ram = False
        loaded: set[str] = set()
        while True:
            self.job.check_cancel()
            hdr = savevm.read_section_header(r)
            kind = hdr.type
            if kind == SectionType.EOF:
                break
            if kind == SectionType.CONFIGURATION:
                if seen_config:
                    raise StreamError(hdr.offset, "second configuration section")
                self._check_configuration(r, hdr.offset)
                seen_config = True
                continue
            if kind == SectionType.COMMAND:
                self._command(r, hdr.offset)
                continue
            if kind in (SectionType.START, SectionType.FULL):
                if hdr.section_id in ids:
                    raise StreamError(hdr.offset, f"section id {hdr.section_id} used twice")
                ids[hdr.section_id] = hdr.idstr
                if hdr.idstr == RAM_IDSTR:
                    if saw_ram:
                        raise StreamError(hdr.offset, "RAM section sent twice")
                    if kind != SectionType.START or hdr.instance_id != 0:
                        raise StreamError(hdr.offset, "RAM section must be START, instance 0")
                    if hdr.version_id != RAM_VERSION:
                        raise StreamError(
                            hdr.offset, f"unsupported RAM section version {hdr.version_id} (want 4)"
                        )
                    self.loader.load_setup(r)
                    saw_ram = True
                else:
                    self._load_device(r, hdr, kind, loaded)
                savevm.check_footer(r, hdr.section_id)
                continue
            if kind in (SectionType.PART, SectionType.END):
                name = ids.get(hdr.section_id)
                if name is None:
                    raise StreamError(hdr.offset, f"unknown section id {hdr.section_id}")
                if name != RAM_IDSTR:
                    raise StreamError(hdr.offset, f"section '{name}' is not iterative")
                self.load_ram_section(r, hdr.section_id)
                continue
            raise StreamError(hdr.offset, f"unexpected section type 0x{int(kind):02x}")
        if not saw_ram:
            raise StreamError(r.tell(), "stream ended without a RAM section")
        missing = [s for s in self.sections if s not in loaded]
        if missing:
            raise StreamError(r.tell(), f"stream ended without device state for {', '.join(missing)}")
        self.read_trailer(r)

    def load_ram_section(self, r: QEMUFileReader, section_id: int) -> None:
        """The RAM records of one PART or END section, and its footer."""
        self.loader.start_section()
        self.loader.load(r)
        savevm.check_footer(r, section_id)

    def read_trailer(self, r: QEMUFileReader) -> None:
        """The VMDESCRIPTION trailer is optional and carries nothing to load, but it is
        read (and checked) so the source is not left with unread bytes on a closing
        socket."""
        rest = r.fill(1)
        if len(rest):
            if rest[0] != SectionType.VMDESCRIPTION:
                raise StreamError(r.tell(), f"unexpected byte 0x{rest[0]:02x} after EOF")
            savevm.read_section_header(r)
            savevm.read_vmdesc(r)
            # a file must end here; a socket is closed by the source once we answer
            if self.sock is None and not r.at_eof():
                raise StreamError(r.tell(), "unexpected data after VMDESCRIPTION")

    def _load_device(self, r: QEMUFileReader, hdr: Any, kind: int, loaded: set[str]) -> None:
        sec = self.sections.get(hdr.idstr)
        if sec is None or hdr.instance_id != sec.instance_id:
            raise StreamError(
                hdr.offset, f"Unknown savevm section or instance '{hdr.idstr}' {hdr.instance_id}"
            )
        if kind != SectionType.FULL:
            raise StreamError(hdr.offset, f"device section '{hdr.idstr}' must be FULL")
        if hdr.version_id > sec.version or hdr.version_id < 1:
            raise StreamError(
                hdr.offset,
                f"savevm: unsupported version {hdr.version_id} for '{hdr.idstr}' v{sec.version}",
            )
        if hdr.idstr in loaded:
            raise StreamError(hdr.offset, f"device section '{hdr.idstr}' sent twice")
        sec.load(r, hdr.version_id, self.load_ctx)
        loaded.add(hdr.idstr)

    def _check_configuration(self, r: QEMUFileReader, at: int) -> None:
        cfg = savevm.read_configuration(r)
        name = cfg["machine"]
        self.source_is_livemig = name.startswith("livemig-")
        ours = self.vm.machine_type
        if name != ours:
            raise StreamError(at, f"Machine type received is '{name}' and local is '{ours}'")
        bits = cfg.get("target_page_bits")
        if bits is not None and bits != 12:
            raise StreamError(at, f"target page bits {bits} differ from ours (12)")
        for cap in cfg["capabilities"]:
            if cap not in KNOWN_CAPABILITIES:
                raise StreamError(at, f"Received unknown capability {cap}")
            if cap in VALIDATED_CAPABILITIES and not self.caps[cap]:
                raise StreamError(at, f"Capability {cap} is off, but received capability is on")
        for cap in VALIDATED_CAPABILITIES:
            if self.caps[cap] and cap not in cfg["capabilities"]:
                raise StreamError(at, f"Capability {cap} is on, but received capability is off")

    def _command(self, r: QEMUFileReader, at: int) -> None:
        command = savevm.read_command(r)
        cmd, payload = command.cmd, command.payload
        if cmd == MigCommand.OPEN_RETURN_PATH:
            if self.sock is None:
                raise StreamError(at, "return path requested on a one-way channel")
            self.rp_open = True
        elif cmd == MigCommand.PING:
            if not self.rp_open or self.sock is None:
                (value,) = struct.unpack(">I", payload)
                raise StreamError(at, f"CMD_PING (0x{value:x}) received with no return path")
            self.send_rp(struct.pack(">HH", RPMessage.PONG, len(payload)) + payload)
        elif cmd in self.commands:
            self.commands[cmd](command, r, at)
        else:
            why = ""
            if cmd in POSTCOPY_COMMAND_NAMES:
                why = f": {cmd.name} while postcopy-ram is off here"
                if cmd == MigCommand.POSTCOPY_ADVISE and len(payload) == 16:
                    why = ": RAM postcopy is disabled but have 16 byte advise"
            raise StreamError(at, f"unsupported migration command {int(cmd)}{why}")

    # -- query-migrate ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.job.status}
        if self.job.status not in (status.NONE, status.SETUP):
            out.update(self.job.times())
            ld = self.loader
            out["ram"] = {
                "transferred": ld.bytes_loaded,
                "normal": ld.pages_loaded,
                "duplicate": ld.zero_records,
                "normal-bytes": ld.bytes_loaded,
                "page-size": 4096,
                **self.load_ctx.figures,  # audits of the load (unplugged-*)
            }
            if self.postcopy is not None and self.postcopy.state:
                out["ram"].update(self.postcopy.info())
        if self.job.error_desc:
            out["error-desc"] = self.job.error_desc
        return out


POSTCOPY_COMMAND_NAMES = frozenset(
    {
        MigCommand.POSTCOPY_ADVISE,
        MigCommand.POSTCOPY_LISTEN,
        MigCommand.POSTCOPY_RUN,
        MigCommand.POSTCOPY_RAM_DISCARD,
        MigCommand.PACKAGED,
        MigCommand.POSTCOPY_RESUME,
        MigCommand.RECV_BITMAP,
    }
)
