"""The virtio-mem device model (reference section 2), independent of any virtio transport.

virtio-mem gives a guest a large device memory region of which only some *blocks* are
plugged. The guest asks for blocks to be plugged or unplugged; unplugged blocks have no
defined content and their host memory is given back. This device is the region's
RamDiscardManager: migration, snapshots and DMA mappers ask it which parts of the region
are populated instead of touching the memory, because touching discarded memory would
allocate it again.

Everything here works on whole runs of blocks (``Bitmap.runs()``), never per block in
Python: a 1 TiB region of 2 MiB blocks has 524288 blocks, and the migration code walks the
discarded runs of every such region at setup.

Threading: guest-driver threads send requests while migration and QMP threads read the
state, so one re-entrant lock covers every state change and every walk. Listener and
notifier callbacks run with the lock held (as QEMU runs them under the BQL); they may call
back into the device from the same thread but must not wait for another thread that does.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.devices.virtio_mem_abi import (
    CONFIG_STRUCT,
    DEFAULT_USABLE_EXTENT,
    HOST_PAGE_SIZE,
    MIN_BLOCK_SIZE,
    REQ_PLUG,
    REQ_SIZE,
    REQ_STATE,
    REQ_STRUCT,
    REQ_UNPLUG,
    REQ_UNPLUG_ALL,
    RESP_ACK,
    RESP_BUSY,
    RESP_ERROR,
    RESP_NACK,
    RESP_SIZE,
    RESP_STRUCT,
    STATE_MIXED,
    STATE_PLUGGED,
    STATE_UNPLUGGED,
    U64_MASK,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VirtioMemDeviceError,
    VirtioMemError,
    default_block_size,
    is_pow2,
)
from livemig.devices.virtio_mem_state import VirtioMemState
from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import (
    RamDiscardListener,
    RamDiscardManager,
    ReplayFn,
    Section,
)
from livemig.memory.region import MemoryRegion

log = logging.getLogger(__name__)


ConfigChangeFn = Callable[["VirtioMem"], None]
SizeChangeFn = Callable[["VirtioMem", int], None]


class VirtioMem(VirtioMemState, RamDiscardManager):
    """One virtio-mem device managing the memory region ``mr``.

    Construction is QEMU's realize: all checks happen here and the device is ready to
    serve requests afterwards. ``incoming=True`` is a device created on a migration
    destination; it skips the whole-block discard because the incoming state decides
    what is plugged (reference 2.5).
    """

    def __init__(
        self,
        id: str,
        mr: MemoryRegion,
        requested_size: int = 0,
        block_size: int | None = None,
        node: int = 0,
        usable_extent: int = DEFAULT_USABLE_EXTENT,
        *,
        memdev: str | None = None,
        incoming: bool = False,
        prealloc: bool = False,
        unplugged_inaccessible: str = "auto",
        acpi_pxm: bool = False,
        persistent_suspend: bool = False,
    ):
        super().__init__()
        self.id = id
        self.mr = mr
        self.memdev = memdev if memdev is not None else f"{id}-memdev"
        self.node = node
        self.usable_extent = usable_extent
        self.prealloc = prealloc
        self.acpi_pxm = acpi_pxm
        self.persistent_suspend = persistent_suspend
        self.on_config_change: list[ConfigChangeFn] = []
        self.on_size_change: list[SizeChangeFn] = []
        self.broken = False
        self.broken_reason: str | None = None
        self._lock = threading.RLock()
        self._listeners: list[RamDiscardListener] = []

        block = mr.block
        page_size = block.page_size
        if block_size is None:
            block_size = default_block_size(page_size)
        else:
            if block_size < MIN_BLOCK_SIZE:
                raise VirtioMemError(
                    f"'block-size' property has to be at least 0x{MIN_BLOCK_SIZE:x}"
                )
            if not is_pow2(block_size):
                raise VirtioMemError("'block-size' property has to be a power of two")
        if block_size < page_size:
            raise VirtioMemError(
                f"'block-size' property has to be at least the page size (0x{page_size:x})"
            )
        region_size = mr.size
        if requested_size < 0 or requested_size % block_size:
            raise VirtioMemError(
                f"'requested-size' property has to be multiples of 'block-size' (0x{block_size:x})"
            )
        if mr.addr % block_size:
            raise VirtioMemError(
                f"'memaddr' property has to be multiples of 'block-size' (0x{block_size:x})"
            )
        if region_size % block_size:
            raise VirtioMemError(
                f"'memdev' property memory size has to be multiples of 'block-size' "
                f"(0x{block_size:x})"
            )
        if requested_size > region_size:
            raise VirtioMemError(
                f"'requested-size' cannot exceed the memory backend size (0x{region_size:x})"
            )
        if unplugged_inaccessible not in ("on", "off", "auto"):
            raise VirtioMemError("'unplugged-inaccessible' must be one of on, off, auto")
        shared_zeropage = block.backend == "anon" and page_size == HOST_PAGE_SIZE
        if unplugged_inaccessible == "auto":
            self.unplugged_inaccessible = not shared_zeropage
        else:
            self.unplugged_inaccessible = unplugged_inaccessible == "on"
            if not self.unplugged_inaccessible and not shared_zeropage:
                log.warning(
                    "%s: 'unplugged-inaccessible=off' with a memory backend without a "
                    "shared zeropage: reads of unplugged memory by the guest can consume "
                    "host memory",
                    id,
                )
        if mr.mapped:
            raise VirtioMemError(f"'memdev' region {mr.name} is already mapped")

        self.block_size = block_size
        self.addr = mr.addr
        self.region_size = region_size
        self.requested_size = requested_size
        self.size = 0
        self.usable_region_size = 0
        self.bitmap = Bitmap(region_size // block_size)

        if mr.set_ram_discard_manager(self) == -errno.EBUSY:
            raise VirtioMemError("Failed to set RamDiscardManager")
        if not incoming:
            # Whatever the backend held before is not plugged memory: give it back.
            try:
                block.discard_range(0, block.used_length)
            except (OSError, ValueError) as e:
                mr.set_ram_discard_manager(None)
                raise VirtioMemError(f"Unexpected error discarding RAM: {e}") from e
        self._resize_usable_region(requested_size, can_shrink=True)

    # -- small helpers ------------------------------------------------------------------------
    @property
    def features(self) -> int:
        """Device feature bits offered to the driver."""
        f = 0
        if self.acpi_pxm:
            f |= 1 << VIRTIO_MEM_F_ACPI_PXM
        if self.unplugged_inaccessible:
            f |= 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        if self.persistent_suspend:
            f |= 1 << VIRTIO_MEM_F_PERSISTENT_SUSPEND
        return f

    def validate_features(self, guest_features: int) -> int:
        """0, or -EFAULT if the guest would read unplugged memory we made inaccessible."""
        bit = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        if self.features & bit and not guest_features & bit:
            return -errno.EFAULT
        return 0

    def is_busy(self) -> bool:
        """QEMU's ``virtio_mem_is_busy``: plug state must not change while a migration has
        a view of it (reference 7.2), so plug, unplug and unplug-all answer BUSY while any
        migration holds this manager's state (:meth:`hold_state`)."""
        return self.state_held()

    def _resize_usable_region(self, requested: int, can_shrink: bool) -> None:
        """Let the guest plug up to ``usable_extent`` beyond what is requested, block-aligned.

        Only realize and unplug-all may shrink: at other times blocks beyond the new size
        could still be plugged.
        """
        bs = self.block_size
        newsize = min(self.region_size, requested + self.usable_extent)
        newsize = (newsize + bs - 1) // bs * bs
        if requested == 0:
            newsize = 0
        if newsize < self.usable_region_size and not can_shrink:
            return
        self.usable_region_size = newsize

    def _valid_range(self, gpa: int, size: int) -> bool:
        """The guest-physical range lies on block boundaries inside the usable region."""
        if gpa % self.block_size:
            return False
        if gpa + size > U64_MASK or size == 0:
            return False
        end = self.addr + self.usable_region_size
        if gpa < self.addr or gpa >= end:
            return False
        return gpa + size <= end

    def _check_section(self, section: Section) -> None:
        if section.mr is not self.mr:
            raise ValueError(f"section of region {section.mr.name} given to {self.id}")

    def _notify_size_change(self) -> None:
        for fn in list(self.on_size_change):
            fn(self, self.size)

    def _notify_config_change(self) -> None:
        for fn in list(self.on_config_change):
            fn(self)

    # -- runs -----------------------------------------------------------------------------------
    def run_arrays(self, section: Section, populated: bool) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, sizes) in bytes, int64 arrays, of plugged or unplugged runs in ``section``.

        Runs are maximal over the bitmap and clipped to the section; the parts of the region
        beyond the usable region are unplugged. This is the one walk everything else uses.
        """
        self._check_section(section)
        empty = np.zeros(0, np.int64)
        bs = self.block_size
        nbits = self.bitmap.nbits
        first = section.offset // bs
        last = min(-(-section.end // bs), nbits)
        if section.size <= 0 or first >= last:
            return empty, empty
        with self._lock:
            starts, lengths = self.bitmap.runs(populated, first, last - first)
        if not len(starts):
            return empty, empty
        offs = starts * bs
        ends = offs + lengths * bs
        # runs lie inside [first, last) blocks, so only the outer two can stick out
        if offs[0] < section.offset:
            offs[0] = section.offset
        if ends[-1] > section.end:
            ends[-1] = section.end
        return offs, ends - offs

    def _replay(self, section: Section, populated: bool, fn: ReplayFn) -> int:
        with self._lock:
            offs, sizes = self.run_arrays(section, populated)
            mr = self.mr
            for off, size in zip(offs.tolist(), sizes.tolist(), strict=True):
                ret = fn(Section(mr, off, size))
                if ret:
                    return ret
            return 0

    # -- RamDiscardManager ------------------------------------------------------------------
    def get_min_granularity(self, mr: MemoryRegion) -> int:
        if mr is not self.mr:
            raise ValueError(f"region {mr.name} is not managed by {self.id}")
        return self.block_size

    def is_populated(self, section: Section) -> bool:
        """True iff every block touched by ``section`` is plugged.

        The section is widened to whole blocks; anything outside the usable region (or an
        empty, block-aligned section) is "not populated", exactly like QEMU.
        """
        self._check_section(section)
        bs = self.block_size
        start = (self.addr + section.offset) // bs * bs
        end = -(-(self.addr + section.offset + section.size) // bs) * bs
        with self._lock:
            if not self._valid_range(start, end - start):
                return False
            first = (start - self.addr) // bs
            return self.bitmap.all_set(first, (end - start) // bs)

    def replay_populated(self, section: Section, fn: ReplayFn) -> int:
        return self._replay(section, True, fn)

    def replay_discarded(self, section: Section, fn: ReplayFn) -> int:
        return self._replay(section, False, fn)

    def populated_runs(self, section: Section) -> tuple[list[int], list[int]]:
        offs, sizes = self.run_arrays(section, True)
        return offs.tolist(), sizes.tolist()

    def discarded_runs(self, section: Section) -> tuple[list[int], list[int]]:
        offs, sizes = self.run_arrays(section, False)
        return offs.tolist(), sizes.tolist()

    def register_listener(self, listener: RamDiscardListener, section: Section) -> None:
        """Register and tell the listener about everything already plugged.

        A listener refusing a populate here is only logged, as in QEMU: the listener is
        registered regardless and finds out about later changes.
        """
        self._check_section(section)
        with self._lock:
            if any(lst is listener for lst in self._listeners):
                raise ValueError("listener is already registered")
            listener.section = Section(section.mr, section.offset, section.size)
            self._listeners.insert(0, listener)
            ret = self._replay(listener.section, True, listener.notify_populate)
            if ret:
                log.error("%s: replaying plugged ranges failed: %s", self.id, ret)

    def unregister_listener(self, listener: RamDiscardListener) -> None:
        with self._lock:
            idx = next((i for i, lst in enumerate(self._listeners) if lst is listener), None)
            if idx is None or listener.section is None:
                raise ValueError("listener is not registered")
            if self.size:
                if listener.double_discard_supported:
                    listener.notify_discard(listener.section)
                else:
                    self._replay(listener.section, True, _discard_cb(listener))
            listener.section = None
            del self._listeners[idx]

    @property
    def listeners(self) -> list[RamDiscardListener]:
        """Registered listeners, most recently registered first (notification order)."""
        with self._lock:
            return list(self._listeners)

    # -- listener notification --------------------------------------------------------------
    def _notify_unplug(self, offset: int, size: int) -> None:
        for lst in self._listeners:
            assert lst.section is not None
            tmp = lst.section.intersect(offset, size)
            if tmp is not None:
                lst.notify_discard(tmp)

    def _notify_plug(self, offset: int, size: int) -> int:
        notified: list[tuple[RamDiscardListener, Section]] = []
        ret = 0
        for lst in self._listeners:
            assert lst.section is not None
            tmp = lst.section.intersect(offset, size)
            if tmp is None:
                continue
            ret = lst.notify_populate(tmp)
            if ret:
                break
            notified.append((lst, tmp))
        if ret:
            for lst, tmp in notified:
                lst.notify_discard(tmp)
        return ret

    def _notify_unplug_all(self) -> None:
        for lst in self._listeners:
            assert lst.section is not None
            if lst.double_discard_supported:
                lst.notify_discard(lst.section)
            else:
                self._replay(lst.section, True, _discard_cb(lst))

    # -- state changes ----------------------------------------------------------------------
    def _set_block_state(self, gpa: int, size: int, plug: bool) -> int:
        """Change the blocks on the host and tell listeners; 0 or -EBUSY."""
        if self.is_busy():
            return -errno.EBUSY
        block = self.mr.block
        offset = gpa - self.addr
        first, count = offset // self.block_size, size // self.block_size
        if not plug:
            try:
                block.discard_range(offset, size)
            except (OSError, ValueError) as e:
                log.error("%s: discarding unplugged memory failed: %s", self.id, e)
                return -errno.EBUSY
            self._notify_unplug(offset, size)
            self.bitmap.clear_range(first, count)
            return 0
        ret = 0
        if self.prealloc:
            try:
                block.populate(offset, size, write=True)
            except OSError as e:
                log.warning("%s: preallocation of plugged memory failed: %s", self.id, e)
                ret = -errno.ENOMEM
        if not ret:
            ret = self._notify_plug(offset, size)
        if ret:
            try:
                block.discard_range(offset, size)
            except (OSError, ValueError) as e:
                log.error("%s: discarding memory after a failed plug: %s", self.id, e)
            return -errno.EBUSY
        self.bitmap.set_range(first, count)
        return 0

    def _state_change_request(self, gpa: int, nb_blocks: int, plug: bool) -> int:
        size = (nb_blocks * self.block_size) & U64_MASK
        if not self._valid_range(gpa, size):
            return RESP_ERROR
        if plug and self.size + size > self.requested_size:
            return RESP_NACK
        first, count = (gpa - self.addr) // self.block_size, nb_blocks
        # every block must currently be in the opposite state
        if self.bitmap.count(first, count) != (0 if plug else count):
            return RESP_ERROR
        if self._set_block_state(gpa, size, plug):
            return RESP_BUSY
        self.size += size if plug else -size
        self._notify_size_change()
        return RESP_ACK

    def _unplug_all(self) -> int:
        """Unplug everything and shrink the usable region; 0 or -EBUSY."""
        if self.size:
            if self.is_busy():
                return -errno.EBUSY
            block = self.mr.block
            try:
                block.discard_range(0, block.used_length)
            except (OSError, ValueError) as e:
                log.error("%s: discarding all memory failed: %s", self.id, e)
                return -errno.EBUSY
            self._notify_unplug_all()
            self.bitmap.clear_all()
            self.size = 0
            self._notify_size_change()
        self._resize_usable_region(self.requested_size, can_shrink=True)
        return 0

    def _state_request(self, gpa: int, nb_blocks: int) -> tuple[int, int]:
        size = (nb_blocks * self.block_size) & U64_MASK
        if not self._valid_range(gpa, size):
            return RESP_ERROR, 0
        n = self.bitmap.count((gpa - self.addr) // self.block_size, nb_blocks)
        if n == nb_blocks:
            return RESP_ACK, STATE_PLUGGED
        if n == 0:
            return RESP_ACK, STATE_UNPLUGGED
        return RESP_ACK, STATE_MIXED

    def _device_error(self, msg: str) -> VirtioMemDeviceError:
        self.broken = True
        self.broken_reason = msg
        log.error("%s: %s", self.id, msg)
        return VirtioMemDeviceError(msg)

    def handle_request(
        self, req: bytes | bytearray | memoryview, resp_capacity: int | None = None
    ) -> bytes:
        """Serve one raw guest request and return the raw response.

        ``resp_capacity`` is the size of the driver's response buffer, if known; too small a
        buffer, too short a request or an unknown type break the device, as a protocol
        violation would in QEMU, and every later request fails until ``reset()``.
        """
        with self._lock:
            if self.broken:
                raise VirtioMemDeviceError(f"device is broken: {self.broken_reason}")
            if resp_capacity is not None and resp_capacity < RESP_SIZE:
                raise self._device_error(
                    f"virtio-mem protocol violation: invalid response size: {resp_capacity}"
                )
            if len(req) < REQ_SIZE:
                raise self._device_error(
                    f"virtio-mem protocol violation: invalid request size: {len(req)}"
                )
            req_type, gpa, nb_blocks = REQ_STRUCT.unpack_from(req)
            if req_type == REQ_PLUG:
                return RESP_STRUCT.pack(self._state_change_request(gpa, nb_blocks, True), 0)
            if req_type == REQ_UNPLUG:
                return RESP_STRUCT.pack(self._state_change_request(gpa, nb_blocks, False), 0)
            if req_type == REQ_UNPLUG_ALL:
                return RESP_STRUCT.pack(RESP_BUSY if self._unplug_all() else RESP_ACK, 0)
            if req_type == REQ_STATE:
                return RESP_STRUCT.pack(*self._state_request(gpa, nb_blocks))
            raise self._device_error(
                f"virtio-mem protocol violation: unknown request type: {req_type}"
            )

    def set_requested_size(self, requested_size: int) -> None:
        """The ``qom-set requested-size`` path: ask the guest to (un)plug towards a size."""
        with self._lock:
            if requested_size < 0 or requested_size % self.block_size:
                raise VirtioMemError(
                    f"'requested-size' property has to be multiples of 'block-size' "
                    f"(0x{self.block_size:x})"
                )
            if requested_size > self.region_size:
                raise VirtioMemError(
                    f"'requested-size' cannot exceed the memory backend size "
                    f"(0x{self.region_size:x})"
                )
            self.requested_size = requested_size
            self._resize_usable_region(requested_size, can_shrink=False)
            self._notify_config_change()

    def reset(self, wakeup: bool = False) -> bool:
        """Device/system reset: unplug everything (not on wakeup) and clear ``broken``.

        Returns False if unplug-all was refused (migration running); then the guest has to
        unplug-all itself after boot, as in QEMU.
        """
        with self._lock:
            self.broken = False
            self.broken_reason = None
            if wakeup:
                return True
            return self._unplug_all() == 0

    # -- config space and queries -------------------------------------------------------------
    def config_space(self) -> bytes:
        """The little-endian ``struct virtio_mem_config`` the driver reads."""
        with self._lock:
            return CONFIG_STRUCT.pack(
                self.block_size,
                self.node,
                self.addr,
                self.region_size,
                self.usable_region_size,
                self.size,
                self.requested_size,
            )

    def info(self) -> dict[str, Any]:
        """``VirtioMEMDeviceInfo`` as ``query-memory-devices`` reports it."""
        with self._lock:
            return {
                "id": self.id,
                "memaddr": self.addr,
                "requested-size": self.requested_size,
                "size": self.size,
                "max-size": self.region_size,
                "block-size": self.block_size,
                "node": self.node,
                "memdev": f"/objects/{self.memdev}",
            }

    def __repr__(self) -> str:
        return (
            f"VirtioMem({self.id!r}, addr=0x{self.addr:x}, region=0x{self.region_size:x}, "
            f"block=0x{self.block_size:x}, size=0x{self.size:x}, "
            f"requested=0x{self.requested_size:x})"
        )


def _discard_cb(listener: RamDiscardListener) -> ReplayFn:
    """Adapt ``notify_discard`` (returns nothing) to a replay callback (returns 0)."""

    def cb(section: Section) -> int:
        listener.notify_discard(section)
        return 0

    return cb
