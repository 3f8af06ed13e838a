"""Migration transports addressed by QEMU-style URIs: ``tcp:HOST:PORT``, ``unix:PATH``,
``file:PATH``.

A channel is a socket (bidirectional: the return path travels back on it) or a file
(one-way: no return path). Sockets get large kernel buffers because the data path sends
megabytes per call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

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
    """The incoming side: bound at once (so the port is known), accepts one connection.

    A ``unix:`` listener follows the same rules as the QMP socket (see
    :func:`bind_unix_listener`): owner-only whatever the umask, never replaces a live
    socket, and only ever removes the file it created.
    """

    def __init__(self, uri: MigrationURI, tls: Any = None):
        self.uri = uri
        self.tls = tls  # transport.tls.TLSServer: accept() hands out TLS channels
        self._socket_ino: int | None = None
        if uri.scheme == "tcp":
            infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            bound_port = self.sock.getsockname()[1]
            self.uri = MigrationURI("tcp", host=uri.host, port=bound_port)
            _tune(self.sock)
            self.sock.listen(16)
        elif uri.scheme == "unix":
            self.sock, self._socket_ino = bind_unix_listener(
                uri.path, 16, what="migration socket", tune=_tune
            )
        else:
            raise URIError(f"{uri} is not a socket URI")

    def accept(self, timeout: float | None = None) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(None)
        _tune(conn)
        return conn if self.tls is None else self.tls.wrap(conn)

    def close(self) -> None:
        self.sock.close()
        if self._socket_ino is not None:
            remove_own_socket(self.uri.path, self._socket_ino)
            self._socket_ino = None


# -- unix socket files ----------------------------------------------------------------------------


class SocketPathError(OSError):
    """A unix socket path cannot be used: a live socket listens there, or something we must
    not remove (a file, a symlink, another user's socket) is in the way."""


def claim_socket_path(
    path: str, what: str = "socket", error: type[OSError] = SocketPathError
) -> None:
    """Make ``path`` free for bind(), removing only our own *stale* socket.

    A process that crashed leaves its socket behind, and refusing to start over it would
    make restarts need manual cleanup. Anything else is left alone: a live socket belongs
    to a running process (another VM's QMP socket, say), and a regular file, a symlink or
    another user's socket may be a mistake or an attack (a symlink planted to make us
    delete or bind somewhere else). lstat() is used so that a symlink is never followed.
    Stale means that connect() is refused: nobody listens there any more.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise error(f"refusing to use {what} path {path}: it is a symbolic link")
    if not stat.S_ISSOCK(st.st_mode):
        raise error(f"refusing to use {what} path {path}: it exists and is not a socket")
    if st.st_uid != os.geteuid():
        raise error(f"refusing to use {what} path {path}: it is owned by uid {st.st_uid}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)  # a listener with a full backlog makes connect() wait
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale %s %s", what, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except (TimeoutError, BlockingIOError):
        pass
    finally:
        probe.close()
    raise error(f"{what} {path} is in use")


_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def bind_unix_listener(
    path: str,
    backlog: int,
    what: str = "socket",
    error: type[OSError] = SocketPathError,
    tune: Callable[[socket.socket], None] | None = None,
) -> tuple[socket.socket, int]:
    """Listen on a unix socket at ``path``; return the socket and the file's inode.

    * Owner-only whatever the umask: the umask is process-wide and other threads create
      files, so it is not touched. On Linux bind() gives the new file the mode of the
      socket inode, so fchmod() before bind() creates it 0600 directly; a chmod() follows
      only where that did not work.
    * The file appears at ``path`` only once the socket listens: it is bound under a
      temporary name in the same directory and hard-linked into place after listen(), so
      whoever waits for the file (a test, the demo, a management tool) never connects
      between bind() and listen() and gets ECONNREFUSED. link() also never replaces a
      file that appeared meanwhile.
    * An existing file is handled by :func:`claim_socket_path`: only a stale socket of
      ours is removed.
    """
    claim_socket_path(path, what, error)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base[:16]}.{secrets.token_hex(4)}")
    if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
        tmp = os.path.join(directory, f".{secrets.token_hex(3)}")
    direct = len(os.fsencode(tmp)) > _SUN_PATH_MAX  # no room for a temporary name
    bound_at = path if direct else tmp
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        with contextlib.suppress(OSError):
            os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(bound_at)
        except OSError as e:
            raise error(f"cannot create {what} {path}: {e.strerror or e}") from None
        bound = True
        st = os.lstat(bound_at)
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.chmod(bound_at, 0o600)
        if tune is not None:
            tune(sock)
        sock.listen(backlog)
        if not direct:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise error(f"{what} {path} is in use") from None
            finally:
                os.unlink(tmp)
    except BaseException:
        sock.close()
        if bound and direct:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock, st.st_ino


def remove_own_socket(path: str, ino: int) -> None:
    """Unlink the socket file at ``path`` only if it is still the one we created (same
    inode, ours): a later process may have taken the path over."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and st.st_ino == ino and st.st_uid == os.geteuid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- file: targets --------------------------------------------------------------------------------

# statfs f_type of filesystems whose "regular files" are not storage: writing a stream
# there saves nothing (or does something else entirely), reading one yields no stream.
PSEUDO_FILESYSTEMS: dict[int, str] = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x1CD1: "devpts",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs",
    0x19800202: "mqueue",
    0x0187: "autofs",
    0x50495045: "pipefs",
    0x534F434B: "sockfs",
    0x09041934: "anon_inodefs",
    0x07655821: "resctrl",
}

_libc = ctypes.CDLL(None, use_errno=True)


def _statfs_type(call: Callable[[Any, Any], int], arg: Any) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if call(arg, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF  # f_type comes first


def filesystem_type(fd: int) -> int:
    """statfs ``f_type`` of the filesystem holding ``fd`` (Python has no fstatfs)."""
    return _statfs_type(_libc.fstatfs, fd)


def _pseudo_fs_of_path(path: str) -> str | None:
    try:
        return PSEUDO_FILESYSTEMS.get(_statfs_type(_libc.statfs, os.fsencode(path)))
    except OSError:
        return None


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _not_a_stream_file(mode: int, path: str) -> OSError:
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
    return OSError(errno.EINVAL, f"{kind}, not a regular file", path)


def _pseudo_fs_error(fs: str, path: str) -> OSError:
    return OSError(errno.EINVAL, f"on the {fs} pseudo-filesystem, not a stream file", path)


def check_stream_file(fd: int, path: str) -> None:
    """Refuse what cannot hold a migration stream: anything but a regular file (a FIFO
    blocks the open or the read, a device is not storage) and regular files of
    pseudo-filesystems (``/proc/self/comm`` takes a write and keeps 15 bytes)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_stream_file(st.st_mode, path)
    fs = PSEUDO_FILESYSTEMS.get(filesystem_type(fd))
    if fs is not None:
        raise _pseudo_fs_error(fs, path)


def check_stream_path(path: str, *, must_exist: bool, overwrite: bool = True) -> None:
    """The same rules, checked by name *before* any open(): opening a device can have side
    effects (``/dev/watchdog`` arms on open), and a clear error at ``migrate`` or
    ``migrate-incoming`` time beats a failure in the migration thread. A path that does
    not exist is judged by its directory (nothing can be created in ``/sys``). The open
    that follows checks the descriptor again."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
        fs = _pseudo_fs_of_path(os.path.dirname(os.path.abspath(path)))
        if fs is not None:
            raise _pseudo_fs_error(fs, path) from None
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link, not followed", path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_stream_file(st.st_mode, path)
    fs = _pseudo_fs_of_path(path)
    if fs is not None:
        raise _pseudo_fs_error(fs, path)
    if not must_exist and not overwrite:
        raise FileExistsError(errno.EEXIST, "file exists (set x-file-overwrite to replace it)", path)


def open_file_for_write(path: str, overwrite: bool = False) -> int:
    """Create a ``file:`` target (mode 0600) without following a symlink at the final
    component. An existing file is an error unless ``overwrite`` (the ``x-file-overwrite``
    parameter), and even then only a regular file on a real filesystem is truncated: never
    a symlink, a FIFO, a device or a file of ``/proc`` or ``/sys``. O_NONBLOCK keeps the
    open of a FIFO that appeared after the check from waiting for a reader."""
    check_stream_path(path, must_exist=False, overwrite=overwrite)
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
        if e.errno == errno.ENXIO:  # a FIFO without a reader
            raise OSError(errno.EINVAL, "a FIFO, not a regular file", path) from None
        raise
    try:
        check_stream_file(fd, path)
        if overwrite:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_for_read(path: str) -> int:
    """Open a ``file:`` source. O_NONBLOCK makes the open of a FIFO return at once (it
    would wait for a writer, and no cancel can interrupt an open()); the FIFO is then
    refused like every other file that is not a regular file on a real filesystem."""
    check_stream_path(path, must_exist=True)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        check_stream_file(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
