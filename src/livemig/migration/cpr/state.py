"""The CPR state on the wire: named file descriptors passed with ``SCM_RIGHTS``.

The layout is QEMU's (``migration/cpr.c``): ``be32 0x51435052`` ("QCPR"), ``be32 1``, then
the ``CprState`` vmstate, a QLIST of ``cpr fd`` entries — for each entry ``u8 1``, ``be32
namelen`` (with the NUL), the name and its NUL, ``be32 id`` and the descriptor: one byte
``' '`` sent with the descriptor attached (QEMU's ``qemu_file_put_fd``); ``u8 0`` ends the
list. livemig names each RAM block's memfd by the block's ``idstr`` with id 0, as QEMU
does (``cpr_save_fd(rb->idstr, 0, fd)``).

The sender shuts its side down for writing when done; the receiver reads until the end.
Descriptors arrive with ``MSG_CMSG_CLOEXEC``; every descriptor received is closed again
if the state turns out to be damaged.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field

CPR_MAGIC = 0x51435052
CPR_VERSION = 1
MAX_STATE = 1 << 20  # bytes: a state names a few descriptors
MAX_FDS = 256
_FD_BYTE = b" "
_BE32 = struct.Struct(">I")


class CprStateError(ValueError):
    """A damaged or unexpected CPR state; the message names the problem."""


@dataclass
class CprFd:
    name: str
    id: int
    fd: int


@dataclass
class CprState:
    """What the old process handed over: descriptors by (name, id)."""

    fds: list[CprFd] = field(default_factory=list)

    def find(self, name: str, id: int = 0) -> int:
        """The descriptor saved as ``(name, id)``, or -1 (QEMU's ``cpr_find_fd``)."""
        for e in self.fds:
            if e.name == name and e.id == id:
                return e.fd
        return -1

    def close_all(self) -> None:
        for e in self.fds:
            if e.fd >= 0:
                try:
                    os.close(e.fd)
                except OSError:
                    pass
                e.fd = -1


# -- sending ------------------------------------------------------------------------------------


def send_state(sock: socket.socket, entries: list[CprFd]) -> int:
    """Write the state on ``sock`` (a connected AF_UNIX stream socket); returns its bytes.

    Each descriptor goes with its own one-byte message, after everything before it, so
    the receiver can tell which entry it belongs to.
    """
    pending = bytearray(_BE32.pack(CPR_MAGIC) + _BE32.pack(CPR_VERSION))
    total = 0
    for e in entries:
        name = e.name.encode() + b"\0"
        pending += b"\x01" + _BE32.pack(len(name)) + name + _BE32.pack(e.id & 0xFFFFFFFF)
        sock.sendall(pending)
        total += len(pending)
        pending = bytearray()
        sock.sendmsg([_FD_BYTE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [e.fd]))])
        total += 1
    pending += b"\x00"
    sock.sendall(pending)
    return total + len(pending)


# -- receiving ----------------------------------------------------------------------------------


def _read_all(sock: socket.socket) -> tuple[bytes, dict[int, int]]:
    """Everything up to the sender's shutdown, and descriptors by the offset of the byte
    they came with (the last byte of the read that brought them: Linux ends a read of a
    unix stream socket right after a message that carries descriptors)."""
    data = bytearray()
    fds: dict[int, int] = {}
    anc = socket.CMSG_SPACE(4 * 8)
    try:
        while True:
            chunk, ancdata, flags, _ = sock.recvmsg(64 << 10, anc, socket.MSG_CMSG_CLOEXEC)
            got = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    got += list(arr)
            if got:
                if not chunk or len(got) > 1 or len(fds) >= MAX_FDS:
                    for fd in got:
                        os.close(fd)
                    raise CprStateError("cpr state: descriptors that do not come one per entry")
                fds[len(data) + len(chunk) - 1] = got[0]
            if flags & socket.MSG_CTRUNC:
                raise CprStateError("cpr state: descriptors were cut off (MSG_CTRUNC)")
            if not chunk:
                return bytes(data), fds
            data += chunk
            if len(data) > MAX_STATE:
                raise CprStateError(f"cpr state: more than {MAX_STATE} bytes")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise


def receive_state(sock: socket.socket) -> CprState:
    """Read a whole CPR state from ``sock`` (until the sender shuts down)."""
    data, fds = _read_all(sock)
    state = CprState()
    used: set[int] = set()
    try:
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > len(data):
                raise CprStateError(f"cpr state: truncated at offset {pos} ({what})")
            pos += n
            return data[pos - n : pos]

        magic = _BE32.unpack(take(4, "magic"))[0]
        if magic != CPR_MAGIC:
            raise CprStateError(f"Not a migration stream (bad magic {magic:x})")
        version = _BE32.unpack(take(4, "version"))[0]
        if version != CPR_VERSION:
            raise CprStateError(f"Unsupported migration stream version {version}")
        while True:
            marker = take(1, "list marker")[0]
            if marker == 0:
                break
            if marker != 1:
                raise CprStateError(f"cpr state: bad list marker 0x{marker:02x} at offset {pos - 1}")
            namelen = _BE32.unpack(take(4, "name length"))[0]
            if not 1 <= namelen <= 256:
                raise CprStateError(f"cpr state: name length {namelen} at offset {pos - 4}")
            raw = take(namelen, "name")
            if raw[-1:] != b"\0" or b"\0" in raw[:-1]:
                raise CprStateError(f"cpr state: name at offset {pos - namelen} is not one C string")
            name = raw[:-1].decode(errors="replace")
            ident = struct.unpack(">i", take(4, "id"))[0]
            at = pos
            if take(1, "descriptor") != _FD_BYTE or at not in fds:
                raise CprStateError(f"cpr state: the descriptor of '{name}' did not arrive")
            used.add(at)
            if state.find(name, ident) >= 0:
                raise CprStateError(f"cpr state: '{name}' {ident} sent twice")
            state.fds.append(CprFd(name, ident, fds[at]))
        if pos != len(data):
            raise CprStateError(f"cpr state: {len(data) - pos} bytes after the end of the list")
        if len(used) != len(fds):
            raise CprStateError("cpr state: descriptors that belong to no entry")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return state
