"""Payloads of the postcopy commands of the main stream, both ends (reference 4.1).

* ``POSTCOPY_ADVISE``: ``be64`` page-size summary (the OR of every RAM block's page
  size), ``be64`` target page size; the destination refuses postcopy unless both match;
* ``POSTCOPY_RAM_DISCARD``: ``u8`` version 0, ``u8`` name length, the block's name,
  ``u8 0``, then ``(be64 start, be64 length)`` pairs in bytes, at most 12 per command
  (QEMU's ``MAX_DISCARDS_PER_COMMAND``);
* ``PACKAGED``: ``be32`` length of the package that follows in the stream.

The source encodes, the destination parses and checks with QEMU's messages; keeping both
here means one definition of each format.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream.qemu_file import StreamError

MAX_DISCARDS_PER_COMMAND = 12
MAX_PACKAGED_SIZE = 1 << 24  # QEMU's MAX_VM_CMD_PACKAGED_SIZE
_ADVISE = struct.Struct(">QQ")
_PACKAGED = struct.Struct(">I")


class PagedBlock(Protocol):
    idstr: str
    page_size: int


def pagesize_summary(blocks: list[PagedBlock]) -> int:
    """QEMU's ``ram_pagesize_summary``: the OR of every block's page size."""
    out = 0
    for b in blocks:
        out |= b.page_size
    return out


def advise(blocks: list[PagedBlock]) -> bytes:
    return _ADVISE.pack(pagesize_summary(blocks), TARGET_PAGE_SIZE)


def check_advise(payload: bytes, at: int, blocks: list[PagedBlock]) -> None:
    """The destination's checks of an ADVISE (QEMU's messages where it has them)."""
    if len(payload) != _ADVISE.size:
        raise StreamError(at, "RAM postcopy is enabled but have 0 byte advise")
    remote_summary, remote_tps = _ADVISE.unpack(payload)
    local = pagesize_summary(blocks)
    if remote_summary != local:
        raise StreamError(
            at, f"Postcopy needs matching RAM page sizes (s=0x{remote_summary:x} d=0x{local:x})"
        )
    if remote_tps != TARGET_PAGE_SIZE:
        raise StreamError(
            at, f"Postcopy needs matching target page sizes (s={remote_tps} d={TARGET_PAGE_SIZE})"
        )
    for b in blocks:
        if b.page_size != TARGET_PAGE_SIZE:
            raise StreamError(at, f"{b.idstr}: postcopy supports only 4 KiB pages")


def discards(idstr: str, starts: np.ndarray, lengths: np.ndarray) -> Iterator[bytes]:
    """DISCARD payloads for runs of pages (``starts``, ``lengths`` in pages)."""
    if not len(starts):
        return
    name = idstr.encode()
    head = bytes([0, len(name)]) + name + b"\0"
    pairs = np.empty((len(starts), 2), ">u8")
    pairs[:, 0] = np.asarray(starts, np.int64) << TARGET_PAGE_BITS
    pairs[:, 1] = np.asarray(lengths, np.int64) << TARGET_PAGE_BITS
    for i in range(0, len(pairs), MAX_DISCARDS_PER_COMMAND):
        yield head + pairs[i : i + MAX_DISCARDS_PER_COMMAND].tobytes()


def parse_discard(payload: bytes, at: int) -> tuple[str, np.ndarray]:
    """``(block name, (n, 2) int64 array of [start, length] in bytes)``; the ranges are
    checked against the block by the caller."""
    if len(payload) < 2 or payload[0] != 0:
        version = payload[0] if payload else None
        raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD invalid version ({version})")
    n = payload[1]
    if len(payload) < 3 + n or payload[2 + n] != 0:
        raise StreamError(at, "CMD_POSTCOPY_RAM_DISCARD missing nil")
    if (len(payload) - 3 - n) % 16:
        raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD invalid length ({len(payload)})")
    name = payload[2 : 2 + n].decode(errors="replace")
    pairs = np.frombuffer(payload, ">u8", offset=3 + n).astype(np.int64).reshape(-1, 2)
    return name, pairs


def packaged(length: int) -> bytes:
    return _PACKAGED.pack(length)


def parse_packaged(payload: bytes, at: int) -> int:
    (length,) = _PACKAGED.unpack(payload)
    if length > MAX_PACKAGED_SIZE:
        raise StreamError(at, f"Unreasonably large packaged state: {length}")
    return length
