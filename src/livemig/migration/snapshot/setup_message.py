"""What the VM process tells the snapshot writer, and how: the control socket's messages.

The writer is forked from the helper launcher (:mod:`livemig.migration.core.helpers`),
not from the VM process, so it holds nothing of the VM process but the one control
socket (an ``AF_UNIX`` ``SOCK_SEQPACKET`` socketpair end: one message per ``send``, no
framing needed).
Everything else comes in messages, JSON with descriptors attached (``SCM_RIGHTS``):

VM process -> writer

``setup`` (right after the start; the guest is running)
    ``vm_pid`` (for ``process_vm_readv``), ``ram_id`` (the RAM section's id),
    ``stream_offset`` (bytes the VM process already wrote: header, configuration, RAM
    set-up, early devices), ``clear_bitmap_shift``, and ``blocks``: per RAM block its
    name, host address in the VM process, used and max length, page size, and whether it
    is fd-backed. Descriptors, in this order: the userfaultfd (created by the VM process,
    so it acts on the VM's memory; nothing registered yet), the statistics page
    (:class:`~livemig.migration.snapshot.shared_stats.SharedStats`), a memfd holding the
    migration bitmaps as the VM process built them (every block's words back to back,
    discarded ranges cleared), the stream (a file, or a socket), then one memfd per
    fd-backed block (for ``SEEK_DATA``/``SEEK_HOLE``: holes are never read; it is never
    mapped).

    A snapshot into a mapped-ram file adds ``mapped_ram``: ``blocks`` (each block's
    place in the file, :meth:`~livemig.migration.mapped_ram.layout.FileLayouts.describe`,
    its header already written by the VM process), ``path`` (for messages) and
    ``direct`` (``direct-io``); and after the memfds, one descriptor of the file per
    channel thread (opened by the VM process, with ``O_DIRECT`` under ``direct-io``).
``go`` (the guest is stopped and write protection is on)
    ``device_state``: the length of the buffer taken at the stop (END ram, device
    sections, EOF, VMDESCRIPTION), in a memfd attached to the message — any size fits.

writer -> VM process

``ready``
    set up, the fault thread is waiting on the userfaultfd: protection may start.
``done`` / ``error`` (``why``)
    the stream is complete / what went wrong; the writer exits after either.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
from typing import Any

import numpy as np

from livemig.memory.ram_block import BlockLayout
from livemig.migration.ram.state import RamState

CTRL_MAX = 1 << 20  # bytes of one JSON message
FDS_MAX = 250  # descriptors of one message (the kernel's SCM_MAX_FD is 253)
FD_UFFD, FD_STATS, FD_BITMAPS, FD_STREAM, FD_FIRST_BLOCK = range(5)


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and its descriptors; None at the end (the peer is gone)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, CTRL_MAX, FDS_MAX)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def bytes_memfd(name: str, data: bytes | memoryview | np.ndarray) -> int:
    """A memfd holding ``data`` (close-on-exec: it travels by SCM_RIGHTS, never by inheritance)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int, length: int) -> bytes:
    """The first ``length`` bytes of ``fd``, which is closed."""
    try:
        return os.pread(fd, length, 0) if length else b""
    finally:
        os.close(fd)


# -- the set-up ---------------------------------------------------------------------------------


def describe_blocks(ram: RamState) -> tuple[list[dict[str, Any]], list[int]]:
    """The ``blocks`` of the set-up message and the memfds of the fd-backed ones."""
    blocks, fds = [], []
    for b in ram.blocks:
        block = b.block
        blocks.append({
            "idstr": block.idstr,
            "host": block.host,
            "used_length": block.used_length,
            "max_length": block.max_length,
            "page_size": block.page_size,
            "fd_backed": block.fd >= 0,
        })
        if block.fd >= 0:
            fds.append(block.fd)
    return blocks, fds


def split_fds(setup: dict[str, Any], fds: list[int]) -> tuple[list[int], list[int]]:
    """The set-up's descriptors after the fixed ones: (block memfds, file channels)."""
    n = sum(1 for d in setup["blocks"] if d["fd_backed"])
    rest = fds[FD_FIRST_BLOCK:]
    return rest[:n], rest[n:]


def layouts(blocks: list[dict[str, Any]], block_fds: list[int]) -> list[BlockLayout]:
    """The writer's view of the VM's blocks: layouts with the memfds, no mapping."""
    fds = iter(block_fds)
    return [
        BlockLayout(d["idstr"], d["used_length"], d["max_length"], d["page_size"],
                    fd=next(fds) if d["fd_backed"] else -1, host=d["host"])
        for d in blocks
    ]


def bitmaps_memfd(ram: RamState) -> int:
    """Every block's migration bitmap words, back to back, in a memfd."""
    with ram.lock:
        words = np.concatenate([b.bmap.words for b in ram.blocks]) if ram.blocks else np.zeros(0, np.uint64)
    return bytes_memfd("livemig-snapshot-bitmaps", words)


def load_bitmaps(ram: RamState, fd: int) -> None:
    """Fill ``ram``'s bitmaps from :func:`bitmaps_memfd`'s memfd (closed) and count them."""
    total = sum(len(b.bmap.words) for b in ram.blocks)
    try:
        if total:
            with mmap.mmap(fd, total * 8, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                words = np.frombuffer(m, np.uint64, count=total)
                pos = 0
                for b in ram.blocks:
                    n = len(b.bmap.words)
                    b.bmap.words[:] = words[pos : pos + n]
                    pos += n
                del words  # the mapping closes only without views
    finally:
        os.close(fd)
    ram.recount()
