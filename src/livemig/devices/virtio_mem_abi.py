"""virtio-mem's guest-visible ABI and its fixed rules: request, response and config layouts
(``include/uapi/linux/virtio_mem.h``), feature bits, and the default block size.

Kept apart from the device model (:mod:`livemig.devices.virtio_mem`) because the guest
driver and tests speak this ABI too, and none of it depends on device state.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct

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
REQ_STRUCT = struct.Struct("<H6xQH6x")
REQ_SIZE = REQ_STRUCT.size
# struct virtio_mem_resp: le16 type; le16 padding[3]; union { le16 state } -> 10 bytes.
RESP_STRUCT = struct.Struct("<H6xH")
RESP_SIZE = RESP_STRUCT.size
# struct virtio_mem_config: le64 block_size; le16 node_id; u8 padding[6]; le64 addr;
# le64 region_size; le64 usable_region_size; le64 plugged_size; le64 requested_size.
CONFIG_STRUCT = struct.Struct("<QH6xQQQQQ")
CONFIG_SIZE = CONFIG_STRUCT.size

assert REQ_SIZE == 24 and RESP_SIZE == 10 and CONFIG_SIZE == 56



class VirtioMemError(ValueError):
    """Bad configuration or incoming state (QEMU reports these as realize/load errors)."""


class VirtioMemDeviceError(RuntimeError):
    """The guest violated the protocol; the device is broken until reset (virtio_error)."""


# -- request/response encoding (for the guest driver and tests) -----------------------------
def encode_request(req_type: int, addr: int = 0, nb_blocks: int = 0) -> bytes:
    """Raw little-endian ``struct virtio_mem_req``."""
    return REQ_STRUCT.pack(req_type, addr, nb_blocks)


def decode_request(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(type, addr, nb_blocks) of a raw request; raises ``struct.error`` if short."""
    return REQ_STRUCT.unpack_from(data)


def encode_response(resp_type: int, state: int = 0) -> bytes:
    """Raw little-endian ``struct virtio_mem_resp``."""
    return RESP_STRUCT.pack(resp_type, state)


def decode_response(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(type, state) of a raw response; ``state`` only means something for STATE ACKs."""
    return RESP_STRUCT.unpack_from(data)


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


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
