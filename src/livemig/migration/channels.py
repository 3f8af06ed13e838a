"""Migration transports addressed by QEMU-style URIs: ``tcp:HOST:PORT``, ``unix:PATH``,
``file:PATH``.

A channel is a socket (bidirectional: the return path travels back on it) or a file
(one-way: no return path). Sockets get large kernel buffers because the data path sends
megabytes per call.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

SOCK_BUF = 4 << 20


class URIError(ValueError):
    pass


@dataclass(frozen=True)
class MigrationURI:
    scheme: str  # tcp | unix | file
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def has_return_path(self) -> bool:
        return self.scheme in ("tcp", "unix")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def parse_uri(uri: str) -> MigrationURI:
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise URIError(f"invalid migration URI {uri!r}: expected tcp:HOST:PORT, unix:PATH or file:PATH")
    if scheme == "tcp":
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise URIError(f"invalid tcp migration URI {uri!r}: expected tcp:HOST:PORT")
        return MigrationURI("tcp", host=host, port=int(port))
    if scheme in ("unix", "file"):
        return MigrationURI(scheme, path=rest)
    raise URIError(f"unsupported migration URI scheme {scheme!r} in {uri!r} (tcp, unix or file)")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(uri: MigrationURI, timeout: float = 10.0, tls: Any = None) -> socket.socket:
    """Open the outgoing side of a socket channel.

    With ``tls`` (a :class:`livemig.migration.transport.tls.TLSClient`) the connection is
    returned as a :class:`~livemig.migration.transport.tls_channel.TLSChannel` after a
    verified handshake: every channel of a migration (main, extra, reconnect) goes through
    here with the same one.
    """
    if uri.scheme == "tcp":
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    elif uri.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(uri.path)
        except OSError:
            sock.close()
            raise
    else:
        raise URIError(f"{uri} is not a socket URI")
    sock.settimeout(None)
    _tune(sock)
    return sock if tls is None else tls.wrap(sock)


class Listener:
    """The incoming side: bound at once (so the port is known), accepts one connection."""

    def __init__(self, uri: MigrationURI, tls: Any = None):
        self.uri = uri
        self.tls = tls  # transport.tls.TLSServer: accept() hands out TLS channels
        if uri.scheme == "tcp":
            infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            bound_port = self.sock.getsockname()[1]
            self.uri = MigrationURI("tcp", host=uri.host, port=bound_port)
        elif uri.scheme == "unix":
            _remove_stale_socket(uri.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(uri.path)
        else:
            raise URIError(f"{uri} is not a socket URI")
        _tune(self.sock)
        self.sock.listen(16)

    def accept(self, timeout: float | None = None) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(None)
        _tune(conn)
        return conn if self.tls is None else self.tls.wrap(conn)

    def close(self) -> None:
        self.sock.close()
        if self.uri.scheme == "unix":
            try:
                os.unlink(self.uri.path)
            except FileNotFoundError:
                pass


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise URIError(f"{path} exists and is not a socket of ours; refusing to replace it")
    os.unlink(path)


def open_file_for_write(path: str, overwrite: bool = False) -> int:
    """Create a ``file:`` target (mode 0600) without following a symlink at the final
    component. An existing file is an error unless ``overwrite`` (the ``x-file-overwrite``
    parameter), and even then only a regular file is truncated: never a symlink, a FIFO
    or a device."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if not overwrite:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, "file exists (set x-file-overwrite to replace it)", path
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, not followed", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file, not overwritten", path)
        if overwrite:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_for_read(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
