"""QMP commands of a livemig VM: what ``livemig vm`` serves on its ``--qmp`` socket.

Commands and events follow QEMU's names and shapes, so QEMU tooling drives a livemig VM
unchanged. livemig-specific commands carry QEMU's ``x-`` prefix for experimental
interfaces: ``x-query-guest-checksum`` and ``x-query-ram-allocation`` exist so that a test
or the demo can check the mission's promises from outside the process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from livemig.control.convergence_commands import ConvergenceCommands
from livemig.control.machine_commands import MachineCommands
from livemig.control.postcopy_commands import PostcopyCommands
from livemig.control.qmp_server import QMPError, QMPServer
from livemig.devices.virtio_mem import VirtioMemError
from livemig.machine import Machine
from livemig.memory.discard_manager import Section
from livemig.migration.channels import URIError, check_stream_path, parse_uri
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities, MigrationConfigError, Parameters
from livemig.migration.cpr.channels import parse_channels
from livemig.migration.cpr.incoming import CprReceiver
from livemig.migration.helper_modules import prestart_helpers
from livemig.migration.incoming import IncomingMigration
from livemig.migration.modes import incoming_migration, outgoing_migration
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.snapshot.tracking import write_tracking_problem
from livemig.migration.transport.tls import TLSClient, TLSServer
from livemig.migration.transport.tls_errors import TLSConfigError

log = logging.getLogger(__name__)


class VMController(PostcopyCommands, MachineCommands, ConvergenceCommands):
    """Owns one machine and its migrations; registers the QMP commands."""

    def __init__(
        self,
        machine: Machine,
        qmp: QMPServer | None = None,
        autostart: bool = True,
        cpr: CprReceiver | None = None,
    ):
        self.machine = machine
        self.cpr = cpr  # a cpr-transfer destination: the old process's memory arrived here
        self.qmp = qmp
        self.autostart = autostart
        self.caps = Capabilities()
        self.caps.write_tracking = lambda: write_tracking_problem(machine.blocks)
        self.params = Parameters()
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.quit_requested = threading.Event()
        self._lock = threading.Lock()
        machine.runstate_listeners.append(self._runstate_changed)
        if machine.vmem is not None:
            machine.vmem.on_size_change.append(self._size_changed)
        self.attach_machine_events()
        if qmp is not None:
            self._register(qmp)
        prestart_helpers()  # the helper launcher's interpreter starts now, not in a migration

    # -- events ---------------------------------------------------------------------------------
    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self.qmp is not None:
            self.qmp.emit(event, data)

    def _runstate_changed(self, old: str, new: str) -> None:
        if new == "running":
            self.emit("RESUME")
        elif old == "running":
            self.emit("STOP")

    def _size_changed(self, vmem: Any, size: int) -> None:
        self.emit(
            "MEMORY_DEVICE_SIZE_CHANGE",
            {"id": vmem.id, "size": size, "qom-path": f"/machine/peripheral/{vmem.id}"},
        )

    # -- registration ------------------------------------------------------------------------------
    def _register(self, qmp: QMPServer) -> None:
        for name, fn in {
            "query-status": self.query_status,
            "stop": self.stop,
            "cont": self.cont,
            "quit": self.quit,
            "qom-get": self.qom_get,
            "qom-set": self.qom_set,
            "query-memory-devices": self.query_memory_devices,
            "migrate": self.migrate,
            "migrate-incoming": self.migrate_incoming,
            "migrate_cancel": self.migrate_cancel,
            "query-migrate": self.query_migrate,
            "migrate-set-capabilities": self.migrate_set_capabilities,
            "query-migrate-capabilities": self.query_migrate_capabilities,
            "migrate-set-parameters": self.migrate_set_parameters,
            "query-migrate-parameters": self.query_migrate_parameters,
            "x-query-guest-checksum": self.x_query_guest_checksum,
            "x-query-ram-allocation": self.x_query_ram_allocation,
            "x-query-guest": self.x_query_guest,
            "x-load-memory": self.x_load_memory,
        }.items():
            qmp.register(name, fn)
        self.register_postcopy(qmp)
        self.register_machine_commands(qmp)
        self.register_convergence(qmp)

    # -- run state ------------------------------------------------------------------------------------
    def query_status(self) -> dict[str, Any]:
        return {"running": self.machine.running, "singlestep": False, "status": self.machine.runstate}

    def stop(self) -> None:
        if self.machine.runstate == "running":
            self.machine.stop("paused")

    def cont(self) -> None:
        st = self.machine.runstate
        if st == "inmigrate":
            if self.incoming is not None and self.incoming.status == status.COMPLETED:
                pass
            else:
                raise QMPError("Migration is not finalized yet")
        if st == "running":
            return
        if self.outgoing is not None and self.outgoing.is_running():
            raise QMPError("Cannot continue while a migration is running")
        why = self.outgoing.cont_refused() if self.outgoing is not None else None
        if why:
            raise QMPError(why)
        self.machine.cont()

    def quit(self) -> None:
        self.host_quit("host-qmp-quit")

    def system_reset(self) -> None:
        why = self.outgoing.cont_refused() if self.outgoing is not None else None
        if why:  # cpr-transfer: the memory is the new process's now; a reset would write it
            raise QMPError(why)
        super().system_reset()

    # -- QOM --------------------------------------------------------------------------------------------
    def _vmem_for(self, path: str) -> Any:
        vmem = self.machine.vmem
        if vmem is None or path not in (vmem.id, f"/machine/peripheral/{vmem.id}"):
            raise QMPError(f"Device '{path}' not found", "DeviceNotFound")
        return vmem

    _QOM_PROPS = ("requested-size", "size", "block-size", "memaddr", "node", "max-size", "memdev")

    def qom_get(self, path: str, property: str) -> Any:
        vmem = self._vmem_for(path)
        info = vmem.info()
        if property not in self._QOM_PROPS:
            raise QMPError(f"Property '{property}' not found")
        if property == "max-size":
            return info["max-size"]
        return info[property]

    def qom_set(self, path: str, property: str, value: Any) -> None:
        vmem = self._vmem_for(path)
        if property in ("size", "block-size", "memaddr", "node", "max-size", "memdev"):
            raise QMPError(f"Property '{property}' is read-only" if property != "block-size"
                           else "'block-size' property cannot be changed after realize")
        if property != "requested-size":
            raise QMPError(f"Property '{property}' not found")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise QMPError("Parameter 'value' expects a size")
        try:
            vmem.set_requested_size(value)
        except VirtioMemError as e:
            raise QMPError(str(e)) from e

    def query_memory_devices(self) -> list[dict[str, Any]]:
        vmem = self.machine.vmem
        return [] if vmem is None else [{"type": "virtio-mem", "data": vmem.info()}]

    # -- migration ---------------------------------------------------------------------------------------
    def migrate(self, uri: str | None = None, resume: bool = False, detach: bool = True,
                blk: bool = False, inc: bool = False, channels: list | None = None) -> None:
        if (uri is None) == (channels is None):
            raise QMPError("need either 'uri' or 'channels' argument")
        cpr = None
        if channels is not None:
            try:
                chans = parse_channels(channels)
            except URIError as e:
                raise QMPError(str(e)) from e
            uri, cpr = str(chans["main"]), chans.get("cpr")
        assert uri is not None
        if resume:
            return self.migrate_resume(uri)
        if blk or inc:
            raise QMPError("Block migration is not supported")
        with self._lock:
            if self.outgoing is not None and self.outgoing.is_running():
                raise QMPError("There's a migration process in progress")
            if self.incoming is not None and self.incoming.job.running:
                # postcopy or an instant restore: pages still missing read as holes
                raise QMPError("The incoming migration is still running: not all memory is here yet")
            if self.machine.runstate in ("inmigrate", "shutdown"):
                raise QMPError(f"Cannot migrate a VM in state '{self.machine.runstate}'")
            self.check_not_blocked()
            try:
                target = parse_uri(uri)
            except URIError as e:
                raise QMPError(str(e)) from e
            self._check_tls_source(target)
            self.check_postcopy_start(target)
            try:
                self.outgoing = outgoing_migration(self.machine, target, self.caps, self.params, self.emit, cpr=cpr)
            except ValueError as e:
                raise QMPError(str(e)) from e
            self.outgoing.start()

    def _check_tls_source(self, target: Any) -> None:
        """Refuse TLS settings that cannot work now, not later in the migration thread."""
        try:
            client = TLSClient.from_params(self.params, target)
        except TLSConfigError as e:
            raise QMPError(str(e)) from e
        if client is not None and self.caps.enabled.get("zero-copy-send"):
            raise QMPError("Zero copy only available for non-compressed non-TLS multifd migration")

    def migrate_incoming(self, uri: str | None = None, channels: list | None = None) -> None:
        if (uri is None) == (channels is None):
            raise QMPError("need either 'uri' or 'channels' argument")
        if channels is not None:
            if len(channels) != 1:
                raise QMPError("Channel list has more than one entries"
                               " (a 'cpr' channel is given on the command line only)")
            try:
                uri = str(parse_channels(channels)["main"])
            except URIError as e:
                raise QMPError(str(e)) from e
        assert uri is not None
        with self._lock:
            if self.machine.runstate != "inmigrate":
                raise QMPError("'-incoming' was not specified on the command line")
            if self.incoming is not None and self.incoming.status not in (status.FAILED,):
                raise QMPError("The incoming migration has already been started")
            try:
                target = parse_uri(uri)
                tls = TLSServer.from_params(self.params, target)
                if target.scheme == "file":  # a FIFO, /proc...: refused now, re-armable
                    try:
                        check_stream_path(target.path, must_exist=True)
                    except OSError as e:
                        raise URIError(f"file:{e.filename}: {e.strerror}") from e
                self.incoming = incoming_migration(
                    self.machine, target, self.caps, self.emit, autostart=self.autostart, tls=tls,
                    params=self.params, cpr=self.cpr,
                )
            except (URIError, OSError, TLSConfigError, ValueError) as e:
                raise QMPError(f"Failed to start incoming migration: {e}") from e
            self.incoming.start()
            if self.cpr is not None:
                self.cpr.close()  # listening now: the old process connects (QEMU's HUP)

    def migrate_cancel(self) -> None:
        """Cancel the outgoing migration; on a destination, the incoming one (whatever its
        peer does: idle, dripping, gone), which then accepts a new ``migrate-incoming``."""
        self.check_cancel_allowed()
        if self.outgoing is not None and self.outgoing.is_running():
            self.outgoing.cancel()
            return
        inc = self.incoming
        if inc is not None and inc.job.running:
            if inc.status in status.POSTCOPY:
                raise QMPError("Postcopy migration cannot be cancelled (use migrate-pause and recover)")
            inc.cancel()
            inc.wait(30)

    def query_migrate(self) -> dict[str, Any]:
        if self.outgoing is not None:
            return self.with_blocked_reasons(self.outgoing.info())
        if self.incoming is not None:
            return self.with_blocked_reasons(self.incoming.info())
        return self.with_blocked_reasons({})

    def _config_change_allowed(self) -> None:
        if self.outgoing is not None and self.outgoing.is_running():
            raise QMPError("There's a migration process in progress")

    def migrate_set_capabilities(self, capabilities: list) -> None:
        self._config_change_allowed()
        try:
            self.caps.set(capabilities)
        except MigrationConfigError as e:
            raise QMPError(str(e)) from e

    def query_migrate_capabilities(self) -> list[dict[str, Any]]:
        return self.caps.query()

    def migrate_set_parameters(
        self,
        max_bandwidth: int | None = None,
        downtime_limit: int | None = None,
        x_clear_bitmap_shift: int | None = None,
        multifd_channels: int | None = None,
        tls_creds: str | None = None,
        tls_hostname: str | None = None,
        tls_authz: str | None = None,
        x_file_overwrite: bool | None = None,
        max_postcopy_bandwidth: int | None = None,
        throttle_trigger_threshold: int | None = None,
        cpu_throttle_initial: int | None = None,
        cpu_throttle_increment: int | None = None,
        cpu_throttle_tailslow: bool | None = None,
        max_cpu_throttle: int | None = None,
        x_vcpu_dirty_limit_period: int | None = None,
        vcpu_dirty_limit: int | None = None,
        avail_switchover_bandwidth: int | None = None,
        mode: str | None = None,
        direct_io: bool | None = None,
        x_tcp_user_timeout: int | None = None,
    ) -> None:
        given = {
            "max-bandwidth": max_bandwidth,
            "downtime-limit": downtime_limit,
            "x-clear-bitmap-shift": x_clear_bitmap_shift,
            "multifd-channels": multifd_channels,
            "tls-creds": tls_creds,
            "tls-hostname": tls_hostname,
            "tls-authz": tls_authz,
            "x-file-overwrite": x_file_overwrite,
            "max-postcopy-bandwidth": max_postcopy_bandwidth,
            "throttle-trigger-threshold": throttle_trigger_threshold,
            "cpu-throttle-initial": cpu_throttle_initial,
            "cpu-throttle-increment": cpu_throttle_increment,
            "cpu-throttle-tailslow": cpu_throttle_tailslow,
            "max-cpu-throttle": max_cpu_throttle,
            "x-vcpu-dirty-limit-period": x_vcpu_dirty_limit_period,
            "vcpu-dirty-limit": vcpu_dirty_limit,
            "avail-switchover-bandwidth": avail_switchover_bandwidth,
            "mode": mode,
            "direct-io": direct_io,
            "x-tcp-user-timeout": x_tcp_user_timeout,
        }
        try:
            self.params.set({k: v for k, v in given.items() if v is not None})
        except MigrationConfigError as e:
            raise QMPError(str(e)) from e

    def query_migrate_parameters(self) -> dict[str, Any]:
        return self.params.query()

    # -- livemig extensions ------------------------------------------------------------------------------
    def x_query_guest_checksum(self) -> dict[str, Any]:
        """Checksum of guest memory with the vCPUs held still for the moment it takes."""
        m = self.machine
        was_running = m.runstate == "running"
        if was_running:
            m.accel.pause()
        try:
            return {"checksum": m.checksum()}
        finally:
            if was_running:
                m.accel.resume()

    def x_query_ram_allocation(self) -> list[dict[str, Any]]:
        """Host memory behind each RAM block, and behind its discarded ranges."""
        out = []
        for mr in self.machine.memory.regions:
            block = mr.block
            entry: dict[str, Any] = {
                "id": block.idstr,
                "size": block.used_length,
                "allocated": block.allocated_bytes(0, block.used_length),
            }
            if mr.rdm is not None:
                offs, sizes = mr.rdm.discarded_runs(Section(mr, 0, mr.size))
                entry["allocated-discarded"] = sum(
                    block.allocated_bytes(int(o), int(s)) for o, s in zip(offs, sizes, strict=True)
                )
                entry["discarded"] = int(sum(int(s) for s in sizes))
            out.append(entry)
        return out

    def x_load_memory(self, id: str, path: str, offset: int = 0, size: int | None = None) -> dict[str, Any]:
        """Copy a file's data into RAM block ``id`` (benchmarks: same bytes as a QEMU VM)."""
        from livemig.memory.file_content import load_from_file

        mr = next((r for r in self.machine.memory.regions if r.block.idstr == id), None)
        if mr is None:
            raise QMPError(f"RAM block '{id}' not found")
        try:
            return load_from_file(mr, path, offset, size)
        except (OSError, ValueError) as e:
            raise QMPError(str(e)) from e

    def x_query_guest(self) -> dict[str, Any]:
        m = self.machine
        wl = m.workload
        return {
            "pages-written": wl.pages_written,
            "fill-done": wl.fill_done.is_set(),
            "discarded-writes": m.accel.discarded_writes,
            "driver-plugged": m.driver.plugged_size if m.driver else 0,
            "driver-settled": bool(m.driver and m.driver.settled),
        }
