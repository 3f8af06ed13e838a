"""The KVM accelerator: guest RAM in KVM memslots, vCPUs, and KVM's dirty log.

``ioctls`` mirrors the kernel ABI; ``vm`` has :class:`~livemig.accel.kvm.vm.KvmVm`,
:class:`~livemig.accel.kvm.vm.KvmVcpu` and :class:`~livemig.accel.kvm.vm.KvmDirtyLog`;
``runner`` runs a vCPU on a thread that can be paused; ``guest_program`` is a small x86
guest that dirties a host-chosen set of pages, for tests and benchmarks.
"""

import os


def kvm_available(device: str = "/dev/kvm") -> str | None:
    """None if ``device`` can be opened read-write, else the reason it cannot."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    os.close(fd)
    return None
