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

With ``--boot-sector``/``--kernel`` (:class:`UserCode`) the KVM vCPU runs the user's code,
and :class:`~livemig.accel.kvm.user_guest.UserGuest` (its devices' exits) stands where the
guest agent would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from livemig.accel.kvm import kvm_available
from livemig.accel.soft import SoftAccel
from livemig.devices.ioport import IoBus
from livemig.guest.boot_image import BootImage
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
    user: UserCode | None = None,
) -> tuple[Any, Any]:
    """(accelerator, guest) for a machine whose memory map is complete.

    ``incoming``: the guest's state (program, registers) will come from a migration.
    ``user``: the user's code runs instead of livemig's guest (KVM only), with its devices.
    """
    if user is not None:
        return _create_user(accel, memory, workload, incoming, user)
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


@dataclass
class UserCode:
    """The user's guest: its boot image, the port bus its devices sit on, the machine."""

    boot: BootImage
    bus: IoBus
    system: Any  # accel.kvm.user_guest.GuestSystem (the machine)


def _create_user(
    accel: str, memory: GuestMemoryMap, workload: WorkloadConfig, incoming: bool, user: UserCode
) -> tuple[Any, Any]:
    if accel != "kvm":
        raise ValueError(f"--boot-sector and --kernel run on --accel kvm, not {accel}")
    if workload.vcpus != 1:
        raise ValueError(f"the user's guest runs on 1 vCPU, not {workload.vcpus} (--vcpus)")
    from livemig.accel.kvm.accel import KvmAccel
    from livemig.accel.kvm.user_guest import UserGuest

    kvm = KvmAccel(memory, incoming=incoming, boot=user.boot)
    guest = UserGuest(kvm.vcpu, user.bus, user.system)
    kvm.exit_handler = guest.handle
    return kvm, guest
