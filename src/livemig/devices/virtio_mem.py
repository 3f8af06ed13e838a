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
import mmap
import os
import platform
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.memory.bitmap import Bitmap
from livemig.memory.discard_manager import (
    RamDiscardListener,
    RamDiscardManager,
    ReplayFn,
    Section,
)
from livemig.memory.region import MemoryRegion

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20

MIN_BLOCK_SIZE = 1 * MiB
"""``VIRTIO_MEM_MIN_BLOCK_SIZE``: the smallest block a user may ask for."""

DEFAULT_USABLE_EXTENT = 2 * 128 * MiB
"""How far the usable region reaches beyond the requested size on x86/s390x."""

THP_SYSFS_DIR = "/sys/kernel/mm/transparent_hugepage"
HOST_PAGE_SIZE = mmap.PAGESIZE
U64_MASK = (1 << 64) - 1

# -- virtio ABI constants (include/uapi/linux/virtio_mem.h) ----------------------------------
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2

REQ_PLUG = 0
REQ_UNPLUG = 1
REQ_UNPLUG_ALL = 2
REQ_STATE = 3

RESP_ACK = 0
RESP_NACK = 1
RESP_BUSY = 2
RESP_ERROR = 3

STATE_PLUGGED = 0
STATE_UNPLUGGED = 1
STATE_MIXED = 2

QUEUE_SIZE = 128
"""virtio-mem has one virtqueue of 128 entries."""

# struct virtio_mem_req: le16 type; le16 padding[3]; union { le64 addr; le16 nb_blocks;
# le16 padding[3] } -> 24 bytes. UNPLUG_ALL uses no payload but is still 24 bytes long.
_REQ = struct.Struct("<H6xQH6x")
REQ_SIZE = _REQ.size
# struct virtio_mem_resp: le16 type; le16 padding[3]; union { le16 state } -> 10 bytes.
_RESP = struct.Struct("<H6xH")
RESP_SIZE = _RESP.size
# struct virtio_mem_config: le64 block_size; le16 node_id; u8 padding[6]; le64 addr;
# le64 region_size; le64 usable_region_size; le64 plugged_size; le64 requested_size.
_CONFIG = struct.Struct("<QH6xQQQQQ")
CONFIG_SIZE = _CONFIG.size

assert REQ_SIZE == 24 and RESP_SIZE == 10 and CONFIG_SIZE == 56

ConfigChangeFn = Callable[["VirtioMem"], None]
SizeChangeFn = Callable[["VirtioMem", int], None]


class VirtioMemError(ValueError):
    """Bad configuration or incoming state (QEMU reports these as realize/load errors)."""


class VirtioMemDeviceError(RuntimeError):
    """The guest violated the protocol; the device is broken until reset (virtio_error)."""


# -- request/response encoding (for the guest driver and tests) -----------------------------
def encode_request(req_type: int, addr: int = 0, nb_blocks: int = 0) -> bytes:
    """Raw little-endian ``struct virtio_mem_req``."""
    return _REQ.pack(req_type, addr, nb_blocks)


def decode_request(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(type, addr, nb_blocks) of a raw request; raises ``struct.error`` if short."""
    return _REQ.unpack_from(data)


def encode_response(resp_type: int, state: int = 0) -> bytes:
    """Raw little-endian ``struct virtio_mem_resp``."""
    return _RESP.pack(resp_type, state)


def decode_response(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(type, state) of a raw response; ``state`` only means something for STATE ACKs."""
    return _RESP.unpack_from(data)


# -- default block size ---------------------------------------------------------------------
def _thp_fallback(host_page_size: int) -> int:
    """THP size by architecture, for hosts whose sysfs value cannot be read."""
    machine = platform.machine()
    if machine in ("x86_64", "ppc64", "ppc64le"):
        return 2 * MiB
    if machine in ("aarch64", "arm64"):
        return {4 * KiB: 2 * MiB, 16 * KiB: 32 * MiB, 64 * KiB: 512 * MiB}.get(
            host_page_size, 2 * MiB
        )
    return MIN_BLOCK_SIZE  # s390x and anything unknown


def thp_size(sysfs_dir: str = THP_SYSFS_DIR, host_page_size: int = HOST_PAGE_SIZE) -> int:
    """The host's THP (PMD) size, which is what a block should be to keep huge pages whole.

    Without THP support at all there is nothing to keep whole, so the minimum block size is
    enough; an unreadable or nonsensical value falls back to the architecture's usual size.
    """
    if not os.path.isdir(sysfs_dir):
        return MIN_BLOCK_SIZE
    try:
        with open(os.path.join(sysfs_dir, "hpage_pmd_size")) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        value = 0
    if value <= 0 or value & (value - 1):
        return _thp_fallback(host_page_size)
    return value


def default_block_size(
    backend_page_size: int,
    host_page_size: int = HOST_PAGE_SIZE,
    sysfs_dir: str = THP_SYSFS_DIR,
) -> int:
    """Default block size: THP size for host-page backends, else >= 1 MiB huge pages.

    Backends with the host page size are THP candidates, so unplugging less than a THP
    would split huge pages; hugetlb-style backends only need at least one of their pages.
    """
    if backend_page_size == host_page_size:
        return max(backend_page_size, thp_size(sysfs_dir, host_page_size))
    return max(backend_page_size, MIN_BLOCK_SIZE)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class VirtioMem(RamDiscardManager):
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
        self._busy_check: Callable[[], bool] | None = None
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
            if not _is_pow2(block_size):
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

    def set_busy_check(self, fn: Callable[[], bool] | None) -> None:
        """Install the migration layer's "is a migration running" test (None: never busy).

        Plug state must not change while migration has a snapshot of it (reference 7.2),
        so plug, unplug and unplug-all answer BUSY while ``fn()`` is true.
        """
        self._busy_check = fn

    def is_busy(self) -> bool:
        fn = self._busy_check
        return bool(fn()) if fn is not None else False

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
            req_type, gpa, nb_blocks = _REQ.unpack_from(req)
            if req_type == REQ_PLUG:
                return _RESP.pack(self._state_change_request(gpa, nb_blocks, True), 0)
            if req_type == REQ_UNPLUG:
                return _RESP.pack(self._state_change_request(gpa, nb_blocks, False), 0)
            if req_type == REQ_UNPLUG_ALL:
                return _RESP.pack(RESP_BUSY if self._unplug_all() else RESP_ACK, 0)
            if req_type == REQ_STATE:
                return _RESP.pack(*self._state_request(gpa, nb_blocks))
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
            return _CONFIG.pack(
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

    # -- migration ------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """Device state for the stream: sanity fields, sizes and a copy of the bitmap."""
        with self._lock:
            return {
                "addr": self.addr,
                "region_size": self.region_size,
                "block_size": self.block_size,
                "node": self.node,
                "usable_region_size": self.usable_region_size,
                "size": self.size,
                "requested_size": self.requested_size,
                "bitmap": self.bitmap.copy(),
            }

    def check_sanity(self, state: dict[str, Any]) -> None:
        """Raise VirtioMemError naming the first geometry property that differs.

        The guest saw these values and they cannot change under it; they are checked before
        anything else of an incoming state is trusted (the bitmap's length depends on them).
        """
        addr = int(state["addr"])
        if addr != self.addr:
            raise VirtioMemError(
                f"Property 'memaddr' changed from 0x{addr:x} to 0x{self.addr:x}"
            )
        region_size = int(state["region_size"])
        if region_size != self.region_size:
            raise VirtioMemError(
                f"Property 'memdev' size changed from 0x{region_size:x} to "
                f"0x{self.region_size:x}"
            )
        block_size = int(state["block_size"])
        if block_size != self.block_size:
            raise VirtioMemError(
                f"Property 'block-size' changed from 0x{block_size:x} to 0x{self.block_size:x}"
            )
        node = int(state["node"])
        if node != self.node:
            raise VirtioMemError(f"Property 'node' changed from {node} to {self.node}")

    def load_state(
        self, state: dict[str, Any], *, postcopy: bool = False, ram_ignored: bool = False
    ) -> None:
        """Take over the source's state (reference 2.5 and 7.5).

        The sanity fields must match because the guest saw them and they cannot change.
        Plugged ranges are replayed to listeners (they map them). Outside postcopy, every
        unplugged run is discarded on the host so that nothing populated on the
        destination in unplugged ranges survives; in postcopy the pages are not here yet
        and faults on unplugged ranges are answered locally. ``ram_ignored`` is RAM that
        is shared with the source and not migrated (x-ignore-shared): it is not touched.
        ``bitmap`` may be a ``Bitmap`` or the wire format (big-endian u64 words).
        """
        with self._lock:
            self.check_sanity(state)
            nbits = self.bitmap.nbits
            raw = state["bitmap"]
            if isinstance(raw, Bitmap):
                if raw.nbits != nbits:
                    raise VirtioMemError(
                        f"virtio-mem bitmap has {raw.nbits} bits, expected {nbits}"
                    )
                bitmap = raw.copy()
            else:
                data = bytes(raw)
                if len(data) != self.bitmap.words.size * 8:
                    raise VirtioMemError(
                        f"virtio-mem bitmap has {len(data)} bytes, expected "
                        f"{self.bitmap.words.size * 8}"
                    )
                try:
                    bitmap = Bitmap.from_be_words(nbits, data)
                except ValueError as e:
                    raise VirtioMemError(f"virtio-mem bitmap: {e}") from e
            size = int(state["size"])
            requested = int(state["requested_size"])
            usable = int(state["usable_region_size"])
            bs = self.block_size
            if size != bitmap.count() * bs:
                raise VirtioMemError(
                    f"virtio-mem plugged size 0x{size:x} does not match the bitmap "
                    f"(0x{bitmap.count() * bs:x})"
                )
            for name, value in (("requested-size", requested), ("usable size", usable)):
                if value < 0 or value % bs or value > self.region_size:
                    raise VirtioMemError(f"virtio-mem {name} 0x{value:x} is invalid")

            self.bitmap = bitmap
            self.size = size
            self.requested_size = requested
            self.usable_region_size = usable

            block = self.mr.block
            if self.prealloc and not ram_ignored:
                # fail now rather than at a guest access when memory runs out
                for off, length in zip(*self.populated_runs(self.mr.whole()), strict=True):
                    try:
                        block.populate(off, length, write=True)
                    except OSError as e:
                        raise VirtioMemError(f"virtio-mem preallocation failed: {e}") from e
                if postcopy:
                    block.discard_range(0, block.used_length)
            for lst in self._listeners:
                assert lst.section is not None
                ret = self._replay(lst.section, True, lst.notify_populate)
                if ret:
                    raise VirtioMemError(
                        f"virtio-mem: a listener refused plugged memory while loading ({ret})"
                    )
            if ram_ignored or postcopy:
                return
            for off, length in zip(*self.discarded_runs(self.mr.whole()), strict=True):
                try:
                    block.discard_range(off, length)
                except (OSError, ValueError) as e:
                    raise VirtioMemError(f"virtio-mem: discarding unplugged memory: {e}") from e

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
