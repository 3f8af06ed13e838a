"""QMP commands about the machine and its vCPU, as a mixin of
:class:`~livemig.control.vm_controller.VMController`, with QEMU's names and arguments:

* ``pmemsave {val, size, filename}``: guest-physical memory to a file (unplugged virtio-mem
  blocks as zeros, never read; addresses without RAM as 0xff: ``memory.physdump``).
* ``memsave {val, size, filename, cpu-index}``: memory as vCPU ``cpu-index`` sees it at
  linear address ``val`` (through its page tables when paging is on, ``KVM_TRANSLATE``).
* ``query-cpus-fast``: the vCPU, its thread and topology.
* ``system_reset``: devices, vCPU and the loaded image (the user's guest), virtio-mem;
  emits ``RESET``.
* ``human-monitor-command {command-line}``: ``info registers`` (QEMU's dump, ``hmp``),
  ``info status``, ``info cpus``, ``system_reset``, ``stop``, ``cont``.

Events besides ``STOP``/``RESUME`` (run-state changes): ``RESET`` and ``SHUTDOWN`` raised
by the machine (a guest reset, the guest ending the VM through isa-debug-exit) and
``SHUTDOWN`` for ``quit`` and for SIGTERM/SIGINT, with QEMU's ``guest`` and ``reason``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from livemig.control.hmp import format_registers
from livemig.control.qmp_server import QMPError
from livemig.memory.physdump import dump_physical

HMP_COMMANDS = ("info registers", "info status", "info cpus", "system_reset", "stop", "cont")


class MachineCommands:
    machine: Any
    quit_requested: threading.Event
    emit: Callable[..., None]
    stop: Callable[[], None]
    cont: Callable[[], None]

    def register_machine_commands(self, qmp: Any) -> None:
        for name, fn in {
            "pmemsave": self.pmemsave,
            "memsave": self.memsave,
            "query-cpus-fast": self.query_cpus_fast,
            "system_reset": self.system_reset,
            "human-monitor-command": self.human_monitor_command,
        }.items():
            qmp.register(name, fn)

    def attach_machine_events(self) -> None:
        """RESET/SHUTDOWN from the machine reach QMP; the guest ending the VM ends the process."""
        self.machine.event_listeners.append(self.emit)
        self.machine.exit_listeners.append(lambda _status: self.quit_requested.set())

    def host_quit(self, reason: str) -> None:
        """``quit`` or a signal: SHUTDOWN (guest: false), then the process ends."""
        self.emit("SHUTDOWN", {"guest": False, "reason": reason})
        self.quit_requested.set()

    @property
    def exit_status(self) -> int:
        """The VM process's exit status: what the guest asked for, else 0."""
        status = self.machine.exit_status
        return 0 if status is None else status

    # -- memory -----------------------------------------------------------------------------
    @staticmethod
    def _check_range(val: int, size: int) -> None:
        if val < 0 or size < 0 or val + size > 1 << 52:
            raise QMPError(f"Invalid addr 0x{val:016x}/size {size} specified")

    @staticmethod
    def _open(filename: str) -> Any:
        try:
            return open(filename, "wb")
        except OSError as e:
            raise QMPError(f"Could not open '{filename}': {e.strerror}") from None

    def pmemsave(self, val: int, size: int, filename: str) -> None:
        self._check_range(val, size)
        with self._open(filename) as f:
            try:
                dump_physical(self.machine.memory, val, size, f)
            except OSError as e:
                raise QMPError(f"Error writing memory to '{filename}': {e.strerror}") from None

    def _kvm(self, cpu_index: int | None) -> Any:
        if cpu_index not in (None, 0):
            raise QMPError("Parameter 'cpu-index' expects a CPU number")
        accel = self.machine.accel
        if getattr(accel, "name", "") != "kvm":
            raise QMPError("No vCPU registers: the soft accelerator runs no real CPU (--accel kvm)")
        return accel

    def memsave(self, val: int, size: int, filename: str, cpu_index: int | None = None) -> None:
        accel = self._kvm(cpu_index)
        self._check_range(val, size)

        try:
            runs = self.machine.inspect_cpu(lambda: accel.translate_range(val, size))
        except ValueError:
            raise QMPError(f"Invalid addr 0x{val:016x}/size {size} specified") from None
        with self._open(filename) as f:
            for gpa, n in runs:
                dump_physical(self.machine.memory, gpa, n, f)

    # -- the vCPU ---------------------------------------------------------------------------
    def query_cpus_fast(self) -> list[dict[str, Any]]:
        accel = self.machine.accel
        tids = accel.vcpu_native_ids() if hasattr(accel, "vcpu_native_ids") else []
        n = max(len(tids), 1 if accel.name == "kvm" else self.machine.config.workload.vcpus)
        return [
            {
                "cpu-index": i,
                "qom-path": f"/machine/unattached/device[{i}]",
                "thread-id": tids[i] if i < len(tids) else os.getpid(),
                "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                "target": "x86_64",
            }
            for i in range(n)
        ]

    def system_reset(self) -> None:
        try:
            self.machine.reset("host-qmp-system-reset", guest=False)
        except RuntimeError as e:
            raise QMPError(str(e)) from None

    def registers(self, cpu_index: int | None = None) -> str:
        accel = self._kvm(cpu_index)
        return self.machine.inspect_cpu(lambda: format_registers(accel.save_cpu_state()))

    def human_monitor_command(self, command_line: str, cpu_index: int | None = None) -> str:
        words = command_line.split()
        cmd = " ".join(w for w in words if not w.startswith("-"))
        try:
            if cmd == "info registers":
                return self.registers(cpu_index)
            if cmd == "info status":
                st = self.machine.runstate
                return f"VM status: {'running' if st == 'running' else f'paused ({st})'}\r\n"
            if cmd == "info cpus":
                return "".join(
                    f"* CPU #{c['cpu-index']}: thread_id={c['thread-id']}\r\n" for c in self.query_cpus_fast()
                )
            if cmd == "system_reset":
                self.system_reset()
                return ""
            if cmd == "stop":
                self.stop()
                return ""
            if cmd == "cont":
                self.cont()
                return ""
        except QMPError as e:
            return f"Error: {e.desc}\r\n"
        if not words:
            return ""
        return f"unknown command: '{command_line.strip()}' (livemig knows: {', '.join(HMP_COMMANDS)})\r\n"
