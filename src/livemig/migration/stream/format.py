"""Wire constants of QEMU's migration stream (format version 3).

Every number here is fixed by the stream format, so a livemig stream can be read by QEMU's
``scripts/analyze-migration.py`` and livemig can read what QEMU writes. The values come
from the project's reference description (``qemu-ram-discard.md`` section 4); the names
drop QEMU's ``QEMU_VM_`` / ``MIG_CMD_`` / ``RAM_SAVE_FLAG_`` prefixes because the enum
class already says which family a value belongs to.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# -- file header ----------------------------------------------------------------------------
FILE_MAGIC = 0x5145564D
"""``"QEVM"`` read as a big-endian u32: the first four bytes of every stream."""

FILE_VERSION = 3
"""The only stream version anyone has written since QEMU 0.13."""

FILE_VERSION_COMPAT = 2
"""The pre-0.13 format. QEMU refuses it and so do we; it gets its own error message."""


class SectionType(IntEnum):
    """The u8 that starts every top-level record of the stream."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05  # only inside a vmstate payload, never at top level
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


SECTIONS_WITH_ID = frozenset(
    {SectionType.START, SectionType.PART, SectionType.END, SectionType.FULL}
)
"""Section types whose header carries ``be32 section_id``."""

SECTIONS_WITH_IDSTR = frozenset({SectionType.START, SectionType.FULL})
"""Section types whose header also carries ``idstr, instance_id, version_id``."""


class MigCommand(IntEnum):
    """``QEMU_VM_COMMAND`` numbers (QEMU's ``enum qemu_vm_cmd``)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class RPMessage(IntEnum):
    """Return-path message numbers (destination to source), QEMU's ``MIG_RP_MSG_*``."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7
    X_FAILURE = 0x4C00
    """livemig's extension: the reason of a failed load (UTF-8), sent just before SHUT 1,
    and only to a livemig source (its machine type starts with ``livemig-``), so that the
    source can say *why* the destination refused the stream."""
    X_CPR_GUEST_RUNNING = 0x4C01
    """livemig's extension for cpr-transfer: the new process is about to run the guest
    (empty payload), sent after SHUT 0 when it does. An old process that sees the main
    channel end without it resumes the guest (docs/local-update.md)."""


MIGRATION_RESUME_ACK_VALUE = 1
"""The be32 payload of ``RPMessage.RESUME_ACK``."""

RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789ABCDEF
"""The be64 end mark after a received-bitmap on the return path."""

# -- the RAM section ------------------------------------------------------------------------
RAM_IDSTR = "ram"
RAM_VERSION = 4
"""``ram_load`` accepts only version 4 of the ``"ram"`` section."""


class RamFlag(IntFlag):
    """Flags carried in the low bits of a page-aligned be64 offset in RAM records."""

    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080  # RDMA only
    MULTIFD_FLUSH = 0x200


RAM_FLAG_OBSOLETE_FULL = 0x001
"""Historic ``RAM_SAVE_FLAG_FULL`` (unused since 2009); a reader should reject it."""

RAM_FLAG_REMOVED_COMPRESS_PAGE = 0x100
"""``RAM_SAVE_FLAG_COMPRESS_PAGE``, removed in QEMU 9.1; a reader should reject it."""

RAM_MIN_PAGE_BITS = 10
"""Flags go up to 0x200, so a target page must be at least 1 KiB for them to fit."""

ENCODING_FLAG_XBZRLE = 0x01
"""The u8 after an XBZRLE page header."""

DEFAULT_TARGET_PAGE_BITS = 12
DEFAULT_TARGET_PAGE_SIZE = 1 << DEFAULT_TARGET_PAGE_BITS
