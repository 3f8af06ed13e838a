"""What a migration needs of a VM, and nothing more: :class:`MigratableVM`.

The migration layer never imports the machine, a device or an accelerator; it sees guest
memory (regions, each maybe with a RamDiscardManager), the dirty log, the state sections
the VM's components registered, and run control. ``livemig.machine.Machine`` is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from livemig.devices.state import StateRegistry
from livemig.memory.dirty_log import DirtyLog
from livemig.memory.region import GuestMemoryMap


class MigratableVM(Protocol):
    memory: GuestMemoryMap
    state: StateRegistry
    runstate: str
    # called with (old, new) on every run-state change, before vCPUs resume for "running"
    runstate_listeners: list[Callable[[str, str], None]]

    @property
    def dirty_log(self) -> DirtyLog: ...

    @property
    def machine_type(self) -> str:
        """The configuration section's machine name; both sides must agree."""
        ...

    @property
    def running(self) -> bool: ...

    def stop(self, new_state: str = "paused") -> None: ...

    def cont(self) -> None: ...

    def set_runstate(self, state: str) -> None: ...

    def start_incoming_guest(self) -> None:
        """After a load: the guest continues where the source stopped (not yet running)."""
        ...

    def vcpu_native_ids(self) -> list[int]:
        """Kernel thread ids of the vCPUs (postcopy's per-vCPU blocktime)."""
        ...

    @property
    def vcpu_count(self) -> int: ...

    def throttle_vcpus(self, shares: Sequence[float] | float) -> None:
        """Slow the guest down: every vCPU (``shares``) or vCPU ``i`` (``shares[i]``)
        sleeps that share of its time, 0 = full speed, until the next call (auto-converge
        and dirty-limit; the accelerator keeps the vCPU thread out of the guest)."""
        ...

    def vcpu_dirty_pages(self) -> list[int] | None:
        """Pages each vCPU has dirtied so far, where the accelerator can attribute writes
        to vCPUs (QEMU: KVM's dirty ring); None where it cannot (a bitmap log)."""
        ...
