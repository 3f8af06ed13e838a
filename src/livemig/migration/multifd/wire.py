"""multifd's wire format and the small socket helpers both ends share.

A channel starts with a handshake (magic ``LMFD``, version, channel id, channel count,
a 16-byte session id); then packets: ``be32 kind, be32 round, be32 data runs, be32 zero
runs, be64 data pages``, a u8 block-name length and the name, ``(be64 offset, be64
length)`` per run (data runs first), then the data runs' pages back to back. A SYNC
packet ends a round. docs/multifd.md describes it in full.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

MAGIC = 0x4C4D4644  # "LMFD"
VERSION = 1
MAX_CHANNELS = 255
HANDSHAKE = struct.Struct(">IIHH16s")  # magic, version, channel id, channel count, session
PACKET = struct.Struct(">IIIIQ")  # kind, round, normal runs, zero runs, normal pages
KIND_PAGES = 1
KIND_SYNC = 2
MAX_PACKET_PAGES = 1 << 16  # 256 MiB of page data in one packet
MAX_PACKET_RUNS = 1 << 16
JOB_PAGES = 4096  # pages handed to a channel at once (16 MiB): Python work per byte stays small
QUEUE_DEPTH = 2  # jobs waiting per channel
DIRECT_RUNS = 64  # up to this many data runs per packet go to sendmsg/recv_into directly
STAGING_PAGES = JOB_PAGES + 2048  # a job ends with the batch that reached JOB_PAGES
POPULATE_CHUNK = 2 << 20
POPULATE_THREADS = 2

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
CHANNEL_WAIT_TIMEOUT = 30.0  # destination: the channels must all be there by then
IOV_MAX = 1024

SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
EXT_ERR = struct.Struct("=IBBBBII")


class MultifdError(ConnectionError):
    """A channel failed; the message names the channel."""


def sendmsg_all(sock: socket.socket, views: list[Any], flags: int = 0) -> int:
    """Send every view completely, IOV_MAX at a time; returns the number of sendmsg calls."""
    calls = 0
    views = [v for v in views if len(v)]
    while views:
        n = sock.sendmsg(views[:IOV_MAX], [], flags)
        calls += 1
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return calls


def shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
