"""Which accelerator a machine gets, and what that choice decides about the machine.

Kept out of ``machine.py`` so the machine stays accelerator-neutral: it asks this module
for the accelerator's name (``auto`` resolved), for where device memory goes, and for the
accelerator plus the guest that runs on it. The KVM modules are imported only when KVM is
chosen.

* ``soft``: :class:`~livemig.accel.soft.SoftAccel` with the software
  :class:`~livemig.guest.workload.Workload`; device memory from 4 GiB, like a PC.
* ``kvm``: :class:`~livemig.accel.kvm.accel.KvmAccel` with the
  :class:`~livemig.accel.kvm.agent.KvmGuestAgent`; device memory right after base RAM,
  below 4 GiB, because the guest runs without paging.
* ``auto``: ``kvm`` if ``/dev/kvm`` can be opened, else ``soft``.
"""

from __future__ import annotations

from typing import Any

from livemig.accel.kvm import kvm_available
from livemig.accel.soft import SoftAccel
from livemig.guest.usable_memory import UsableMemory
from livemig.guest.workload import Workload, WorkloadConfig
from livemig.memory.ram_block import PAGE_SIZE
from livemig.memory.region import FOUR_GIB, GuestMemoryMap

ACCELS = ("soft", "kvm", "auto")


def resolve(name: str) -> str:
    """The accelerator ``name`` stands for: ``soft`` or ``kvm``. ValueError if unusable."""
    if name not in ACCELS:
        raise ValueError(f"unknown accelerator {name!r} (expected soft, kvm or auto)")
    if name == "soft":
        return name
    why = kvm_available()
    if name == "auto":
        return "kvm" if why is None else "soft"
    if why is not None:
        raise ValueError(f"accelerator 'kvm' is not available: {why}")
    return name


def device_memory_addr(
    accel: str, ram_size: int, region_size: int, block_size: int | None = None
) -> int:
    """Default guest-physical address of the virtio-mem region for ``accel``."""
    if accel != "kvm":
        return FOUR_GIB
    from livemig.accel.kvm.accel import device_memory_addr as kvm_addr
    from livemig.devices.virtio_mem import default_block_size

    return kvm_addr(ram_size, region_size, block_size or default_block_size(PAGE_SIZE))


def create(
    accel: str,
    memory: GuestMemoryMap,
    usable: UsableMemory,
    workload: WorkloadConfig,
    incoming: bool = False,
) -> tuple[Any, Any]:
    """(accelerator, guest) for a machine whose memory map is complete.

    ``incoming``: the guest's state (program, registers) will come from a migration.
    """
    if accel == "kvm":
        from livemig.accel.kvm.accel import KvmAccel
        from livemig.accel.kvm.agent import KvmGuestAgent

        if workload.vcpus != 1:
            raise ValueError(f"--accel kvm runs the guest program on 1 vCPU, not {workload.vcpus}")
        kvm = KvmAccel(memory, incoming=incoming)
        try:
            return kvm, KvmGuestAgent(kvm, usable, workload)
        except BaseException:
            kvm.shutdown()
            raise
    if accel != "soft":
        raise ValueError(f"unknown accelerator {accel!r}")
    soft = SoftAccel(memory)
    return soft, Workload(soft, usable, workload)
