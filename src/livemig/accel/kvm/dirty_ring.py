"""What the host's KVM offers of the dirty ring, and why livemig keeps KVM's dirty bitmap.

KVM reports dirtied pages either in a per-memslot bitmap (``KVM_GET_DIRTY_LOG``, with
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: what livemig uses) or in a per-vCPU *dirty ring*
(``KVM_CAP_DIRTY_LOG_RING``/``_ACQ_REL``: entries a vCPU appends as it dirties pages,
which QEMU's dirty-limit reads to know each vCPU's rate). The two exclude each other on
x86: once a VM has a ring, ``KVM_GET_DIRTY_LOG`` fails, unless the kernel offers
``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` (arm64 only so far).

``kvm_pvm`` (the KVM of this project's machines) offers a ring of up to 1 MiB per vCPU
(65536 entries), with acquire/release ordering, and no bitmap beside it. Its ring loses
entries when a vCPU fills it within one ``KVM_RUN`` — the soft-full exit comes too late,
the kernel warns, and the pages of the lost entries are never reported (platform notes,
2c). A migration that misses a dirty page corrupts the guest, so livemig keeps the
bitmap for KVM guests; the price is that it cannot tell which vCPU dirtied a page, and
dirty-limit measures the rate per pass instead (``migration.throttle``,
docs/convergence.md). :func:`probe` reports what a host offers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from livemig.accel.kvm import ioctls as k

KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225


@dataclass(frozen=True)
class DirtyRingOffer:
    ring_bytes: int  # largest ring per vCPU (KVM_CAP_DIRTY_LOG_RING), 0 = none
    acq_rel_bytes: int  # the same with acquire/release ordering (_ACQ_REL)
    with_bitmap: bool  # a ring can run beside the bitmap (_WITH_BITMAP)
    manual_protect: int  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags (the bitmap livemig uses)

    @property
    def ring_entries(self) -> int:
        return max(self.ring_bytes, self.acq_rel_bytes) // 16  # struct kvm_dirty_gfn

    @property
    def ring_beside_bitmap(self) -> bool:
        """Whether per-vCPU ring counts could be had without giving up the bitmap."""
        return bool(self.with_bitmap and (self.ring_bytes or self.acq_rel_bytes))


def probe(device: str = "/dev/kvm") -> DirtyRingOffer:
    """Ask the host's KVM (``KVM_CHECK_EXTENSION`` on the system fd)."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        return DirtyRingOffer(
            ring_bytes=k.check_extension(fd, KVM_CAP_DIRTY_LOG_RING),
            acq_rel_bytes=k.check_extension(fd, KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
            with_bitmap=bool(k.check_extension(fd, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)),
            manual_protect=k.check_extension(fd, k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        )
    finally:
        os.close(fd)
