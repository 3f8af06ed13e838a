"""Return-path messages (destination to source), QEMU's ``MIG_RP_MSG_*`` wire format.

Every message is ``be16 type, be16 len, payload`` (reference 5.1):

* ``SHUT`` (1): ``be32`` 0 = loaded, 1 = failed;
* ``PONG`` (2): the ``be32`` of the PING it answers;
* ``REQ_PAGES_ID`` (3): ``be64 start, be32 len, u8 idlen, idstr`` — a page request that
  names its RAM block; ``REQ_PAGES`` (4): ``be64 start, be32 len`` for the block named
  last. Offsets and lengths are bytes within the block;
* ``RECV_BITMAP`` (5): ``u8 idlen, idstr``, then *outside the message framing*
  ``be64 size``, ``size`` bytes of the block's received bitmap in little-endian order
  (bit *i* is bit ``i % 8`` of byte ``i // 8``), ``size`` being the bit count rounded up
  to whole bytes and then to a multiple of 8, and the end mark ``be64
  0x0123456789abcdef``;
* ``RESUME_ACK`` (6): ``be32 1``.

Standard library only: the postcopy fault-handler process encodes page requests with it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from livemig.migration.stream.format import (
    MIGRATION_RESUME_ACK_VALUE,
    RAMBLOCK_RECV_BITMAP_ENDING,
    RPMessage,
)

HEADER = struct.Struct(">HH")
_REQ = struct.Struct(">QI")
MAX_PAYLOAD = 0xFFFF


class ReturnPathError(ValueError):
    """A malformed return-path message; the text is what the source reports."""


def message(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"return-path payload of {len(payload)} bytes")
    return HEADER.pack(kind, len(payload)) + payload


def shut(failed: bool) -> bytes:
    return message(RPMessage.SHUT, struct.pack(">I", 1 if failed else 0))


def read_message(r: Any) -> tuple[int, bytes]:
    """``(type, payload)`` of the next message from reader ``r`` (``get_be16``/``read_exact``).

    The reader's errors (end of stream, a reset) propagate: the caller decides what a
    lost return path means at that moment.
    """
    kind = r.get_be16()
    return kind, bytes(r.read_exact(r.get_be16()))


def read_messages(r: Any) -> Iterator[tuple[int, bytes]]:
    """Every message from ``r``, PONGs left out: the source sends PINGs only to learn that
    the path works."""
    while True:
        kind, payload = read_message(r)
        if kind != RPMessage.PONG:
            yield kind, payload


def parse_shut(payload: bytes) -> int:
    """SHUT's value: 0 when the destination loaded everything, else failed."""
    if len(payload) < 4:
        raise ReturnPathError(f"SHUT with a {len(payload)}-byte payload")
    return struct.unpack_from(">I", payload)[0]


def resume_ack() -> bytes:
    return message(RPMessage.RESUME_ACK, struct.pack(">I", MIGRATION_RESUME_ACK_VALUE))


def req_pages(start: int, length: int, idstr: str | None) -> bytes:
    """REQ_PAGES_ID when ``idstr`` is given (block changed), else REQ_PAGES."""
    if idstr is None:
        return message(RPMessage.REQ_PAGES, _REQ.pack(start, length))
    name = idstr.encode()
    return message(RPMessage.REQ_PAGES_ID, _REQ.pack(start, length) + bytes([len(name)]) + name)


def parse_req_pages(kind: int, payload: bytes) -> tuple[int, int, str | None]:
    """``(start, len, idstr or None)`` of a REQ_PAGES(_ID) payload; ReturnPathError if bad."""
    if kind == RPMessage.REQ_PAGES:
        if len(payload) != _REQ.size:
            raise ReturnPathError(f"MIG_RP_MSG_REQ_PAGES: bad length {len(payload)}")
        start, length = _REQ.unpack(payload)
        return start, length, None
    if len(payload) < _REQ.size + 2:
        raise ReturnPathError(f"MIG_RP_MSG_REQ_PAGES_ID: bad length {len(payload)}")
    start, length = _REQ.unpack_from(payload)
    n = payload[_REQ.size]
    name = payload[_REQ.size + 1 :]
    if len(name) != n:
        raise ReturnPathError(f"MIG_RP_MSG_REQ_PAGES_ID: name length {n} != {len(name)}")
    return start, length, name.decode(errors="replace")


def recv_bitmap_size(nbits: int) -> int:
    """Bytes of a received bitmap on the wire: bits rounded up to bytes, then to 8."""
    return (((nbits + 7) // 8) + 7) // 8 * 8


def recv_bitmap(idstr: str, le_bitmap: bytes) -> bytes:
    """The RECV_BITMAP message followed by size, bitmap and end mark."""
    name = idstr.encode()
    return (
        message(RPMessage.RECV_BITMAP, bytes([len(name)]) + name)
        + struct.pack(">Q", len(le_bitmap))
        + le_bitmap
        + struct.pack(">Q", RAMBLOCK_RECV_BITMAP_ENDING)
    )


def parse_recv_bitmap_name(payload: bytes) -> str:
    if not payload or payload[0] != len(payload) - 1:
        raise ReturnPathError("MIG_RP_MSG_RECV_BITMAP: bad block name")
    return payload[1:].decode(errors="replace")
