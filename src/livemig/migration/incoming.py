"""The migration destination: load a stream into a machine waiting in ``inmigrate``.

Every field of the incoming stream is validated (header, configuration, section types
and ids, footers, RAM records, device state) and the first problem fails the migration
with a message that names it and the stream offset. A failed load leaves the destination
VM in ``inmigrate``, not running a half-loaded guest. On a socket, the result travels
back to the source on the return path (SHUT 0 or 1), so a source never completes a
migration that the destination did not accept.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from livemig.devices.state import LoadContext, StateSection
from livemig.machine import Machine
from livemig.migration.channels import Listener, MigrationURI, open_file_for_read
from livemig.migration.core import status
from livemig.migration.core.params import KNOWN_CAPABILITIES, Capabilities
from livemig.migration.postcopy.destination import POSTCOPY_COMMANDS, incoming_command
from livemig.migration.ram.load import RamLoader
from livemig.migration.ram.prefault import Prefaulter
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    RAM_IDSTR,
    RAM_VERSION,
    MigCommand,
    RPMessage,
    SectionType,
)
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError
from livemig.migration.tls import TLSError, TLSServer

log = logging.getLogger(__name__)

READ_BUFFER = 4 << 20
VALIDATED_CAPABILITIES = ("x-ignore-shared", "mapped-ram")
"""Capabilities that change the stream format: source and destination must agree."""


class IncomingMigration:
    def __init__(
        self,
        machine: Machine,
        uri: MigrationURI,
        caps: Capabilities,
        emit: status.EventFn = status.no_events,
        autostart: bool = True,
        tls: TLSServer | None = None,
    ):
        if machine.runstate != "inmigrate":
            raise RuntimeError("the VM is not waiting for an incoming migration")
        self.machine = machine
        self.uri = uri
        self.caps = caps
        self._emit = emit
        self.autostart = autostart
        self.status = status.NONE
        self.error_desc: str | None = None
        self.loader = RamLoader(machine.blocks)
        self.sections: dict[str, StateSection] = {s.idstr: s for s in machine.state}
        self.load_ctx = LoadContext()  # what loading components are told (postcopy)
        self._listener: Listener | None = None
        self._sock: socket.socket | None = None
        self._rp_lock = threading.Lock()
        self._rp_open = False
        self.start_time = 0.0
        self.end_time: float | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.tls = tls
        self.multifd: Any = None  # multifd.MultifdReceiver while the multifd capability is on
        self.postcopy: Any = None  # postcopy.PostcopyIncoming with postcopy-ram (see postcopy.py)
        if uri.scheme in ("tcp", "unix"):
            # bind now: a busy port is the caller's error; with tls, accept() hands out
            # TLS channels (the same for every connection of this migration)
            self._listener = Listener(uri, tls=tls)
            self.uri = self._listener.uri

    def start(self) -> None:
        self._set_status(status.SETUP)
        self._thread = threading.Thread(target=self._main, name="migration-dst", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()
        if self.multifd is not None:
            self.multifd.abort()
        for s in (self._sock, self._listener.sock if self._listener else None):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _set_status(self, new: str) -> None:
        if self.status != new:
            self.status = new
            if self.caps["events"]:
                self._emit("MIGRATION", {"status": new})

    # -- thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        fd = -1
        try:
            if self._listener is not None:
                self._sock = self._accept_main()
                reader = QEMUFileReader(self._sock, READ_BUFFER)
            else:
                fd = open_file_for_read(self.uri.path)
                reader = QEMUFileReader(os.fdopen(fd, "rb", buffering=0, closefd=False), READ_BUFFER)
            self.start_time = time.monotonic()
            self._set_status(status.ACTIVE)
            self.loader.prefault = Prefaulter(self.machine.memory.regions)
            if self.postcopy is None:
                self._load(reader)
            elif self.postcopy.load(reader):  # ended in postcopy: the guest runs already
                return
            if self.multifd is not None:  # channels stopped and joined before the guest runs
                self.multifd.finish()
            self.loader.prefault.stop()
            self.loader.prefault.release_unused(self.loader.maybe_data)
            self._send_shut(0)
            self.machine.start_incoming_guest()
            if self.autostart:
                self.machine.cont()
            else:
                self.machine.set_runstate("paused")
            self._set_status(status.COMPLETED)
        except Exception as e:
            desc = str(e) if isinstance(e, (StreamError, TLSError)) else f"{type(e).__name__}: {e}"
            if self.multifd is not None and self.multifd.error and not self._cancel.is_set():
                desc = self.multifd.error  # the cause, not the main stream's symptom
            if self._cancel.is_set():
                desc = "incoming migration cancelled"
            log.info("incoming migration failed: %s", desc)
            self.error_desc = desc
            self._send_shut(1)
            self._set_status(status.FAILED)
        finally:
            self.end_time = time.monotonic()
            if self.multifd is not None:
                self.multifd.close()
            if self.loader.prefault is not None:
                self.loader.prefault.stop()
            if self._listener is not None:
                self._listener.close()
            if self._sock is not None:
                self._sock.close()
            if fd >= 0:
                os.close(fd)
            self.done.set()

    def _accept_main(self) -> socket.socket:
        """The main connection; with multifd, channels are accepted around it (multifd.py)."""
        assert self._listener is not None
        if self.caps["multifd"]:
            from livemig.migration.multifd.channels import MultifdReceiver

            return MultifdReceiver.attach(self)
        sock = self._listener.accept()
        if self.caps["postcopy-ram"]:  # capabilities as set when the source connects
            from livemig.migration.postcopy.destination import PostcopyIncoming

            self.postcopy = PostcopyIncoming(self)
            self.postcopy.listener, self._listener = self._listener, None  # postcopy channel
            return sock
        self._listener.close()
        self._listener = None
        return sock

    def _send_shut(self, value: int) -> None:
        if not self._rp_open or self._sock is None:
            return
        try:
            self._sock.sendall(struct.pack(">HHI", RPMessage.SHUT, 4, value))
        except OSError:
            pass

    # -- the stream ------------------------------------------------------------------------------
    def _load(self, r: QEMUFileReader) -> None:
        savevm.read_header(r)
        head = r.peek(1)
        if not head:
            raise StreamError(r.tell(), "truncated stream: wanted 1 bytes, got 0 (configuration)")
        if head[0] != SectionType.CONFIGURATION:
            raise StreamError(r.tell(), "Configuration section missing")
        ids: dict[int, str] = {}
        seen_config = False
        saw_ram = False
        loaded: set[str] = set()
        while True:
            if self._cancel.is_set():
                raise StreamError(r.tell(), "cancelled")
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
                    sec = self.sections.get(hdr.idstr)
                    if sec is None or hdr.instance_id != sec.instance_id:
                        raise StreamError(
                            hdr.offset,
                            f"Unknown savevm section or instance '{hdr.idstr}' {hdr.instance_id}",
                        )
                    if kind != SectionType.FULL:
                        raise StreamError(hdr.offset, f"device section '{hdr.idstr}' must be FULL")
                    if hdr.version_id > sec.version or hdr.version_id < 1:
                        raise StreamError(
                            hdr.offset,
                            f"savevm: unsupported version {hdr.version_id} for '{hdr.idstr}' "
                            f"v{sec.version}",
                        )
                    if hdr.idstr in loaded:
                        raise StreamError(hdr.offset, f"device section '{hdr.idstr}' sent twice")
                    sec.load(r, hdr.version_id, self.load_ctx)
                    loaded.add(hdr.idstr)
                savevm.check_footer(r, hdr.section_id)
                continue
            if kind in (SectionType.PART, SectionType.END):
                name = ids.get(hdr.section_id)
                if name is None:
                    raise StreamError(hdr.offset, f"unknown section id {hdr.section_id}")
                if name != RAM_IDSTR:
                    raise StreamError(hdr.offset, f"section '{name}' is not iterative")
                self.loader.start_section()
                self.loader.load(r)
                savevm.check_footer(r, hdr.section_id)
                continue
            raise StreamError(hdr.offset, f"unexpected section type 0x{int(kind):02x}")
        if not saw_ram:
            raise StreamError(r.tell(), "stream ended without a RAM section")
        missing = [s for s in self.sections if s not in loaded]
        if missing:
            raise StreamError(r.tell(), f"stream ended without device state for {', '.join(missing)}")
        # The VMDESCRIPTION trailer is optional and carries nothing to load, but it is read
        # (and checked) so the source is not left with unread bytes on a closing socket.
        rest = r.fill(1)
        if len(rest):
            if rest[0] != SectionType.VMDESCRIPTION:
                raise StreamError(r.tell(), f"unexpected byte 0x{rest[0]:02x} after EOF")
            savevm.read_section_header(r)
            savevm.read_vmdesc(r)
            # a file must end here; a socket is closed by the source once we answer
            if self._sock is None and not r.at_eof():
                raise StreamError(r.tell(), "unexpected data after VMDESCRIPTION")

    def _check_configuration(self, r: QEMUFileReader, at: int) -> None:
        cfg = savevm.read_configuration(r)
        name = cfg["machine"]
        ours = f"livemig-{self.machine.config.accel}"
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

    def _command(self, r: QEMUFileReader, at: int) -> None:
        command = savevm.read_command(r)
        cmd, payload = command.cmd, command.payload
        if cmd == MigCommand.OPEN_RETURN_PATH:
            if self._sock is None:
                raise StreamError(at, "return path requested on a one-way channel")
            self._rp_open = True
        elif cmd == MigCommand.PING:
            if not self._rp_open or self._sock is None:
                (value,) = struct.unpack(">I", payload)
                raise StreamError(at, f"CMD_PING (0x{value:x}) received with no return path")
            self._sock.sendall(struct.pack(">HH", RPMessage.PONG, len(payload)) + payload)
        elif cmd in POSTCOPY_COMMANDS:
            incoming_command(self, command, r, at)
        else:
            raise StreamError(at, f"unsupported migration command {int(cmd)}")

    # -- query-migrate ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.start_time:
            end = self.end_time or time.monotonic()
            out["total-time"] = int((end - self.start_time) * 1000)
            out["ram"] = {
                "transferred": self.loader.bytes_loaded,
                "normal": self.loader.pages_loaded,
                "duplicate": self.loader.zero_records,
                "normal-bytes": self.loader.bytes_loaded,
                "page-size": 4096,
            }
            if self.postcopy is not None and self.postcopy.state:
                out["ram"].update(self.postcopy.info())
        if self.error_desc:
            out["error-desc"] = self.error_desc
        return out
