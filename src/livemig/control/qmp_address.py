"""Where a QMP server listens and a client connects: QEMU's ``-qmp`` addresses.

``unix:PATH`` and ``tcp:HOST:PORT`` as QEMU spells them, with QEMU's chardev options
``server=on`` and ``wait=off`` accepted (a livemig VM always listens and never waits for a
client), so a ``-qmp`` argument copied from a QEMU command line works unchanged. A bare
path is a unix socket, as it always was for livemig.

The unix socket follows the rules of every socket livemig creates
(:func:`livemig.migration.channels.bind_unix_listener`): mode 0600 whatever the umask, a
live socket at the path is refused, only a stale one of ours is replaced, and the file
appears only once the socket listens. A TCP QMP socket has no access control at all (as
in QEMU): anyone who can reach the port controls the VM, so bind it to loopback.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from livemig.migration.channels import bind_unix_listener

__all__ = ["QMPAddress", "QMPAddressError", "QMPSocketError", "open_listener", "parse_address"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_EXPECTED = "expected unix:PATH or tcp:HOST:PORT"


class QMPAddressError(ValueError):
    """A QMP address that cannot be understood; the message names it."""


class QMPSocketError(OSError):
    """The socket cannot be used: in use, or something we must not remove is there.

    A subclass of ``OSError`` so that callers handle it together with bind failures.
    """


@dataclass(frozen=True)
class QMPAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"unix:{self.path}"


def _check_options(text: str, options: list[str]) -> None:
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "server" and value in ("", "on"):
            continue
        if (key == "wait" and value == "off") or (key == "nowait" and not value):
            continue
        if key == "server" and value == "off":
            raise QMPAddressError(
                f"invalid QMP address {text!r}: server=off (connecting out) is not supported"
            )
        if key == "wait" and value == "on":
            raise QMPAddressError(
                f"invalid QMP address {text!r}: wait=on is not supported (a livemig VM "
                "starts without waiting for a QMP client)"
            )
        raise QMPAddressError(f"invalid QMP address {text!r}: unknown option {opt!r}")


def parse_address(text: str) -> QMPAddress:
    """``unix:PATH``, ``tcp:HOST:PORT`` or a bare path, with optional ``,server=on,wait=off``."""
    if not isinstance(text, str) or not text.strip():
        raise QMPAddressError(f"invalid QMP address {text!r}: {_EXPECTED}")
    m = _SCHEME.match(text)
    scheme = m.group(1) if m and not text.startswith(("/", ".")) else ""
    if scheme and scheme not in ("unix", "tcp"):
        raise QMPAddressError(
            f"invalid QMP address {text!r}: unknown scheme {scheme!r} ({_EXPECTED})"
        )
    rest = text[len(scheme) + 1 :] if scheme else text
    main, *options = rest.split(",")
    _check_options(text, options)
    if scheme == "tcp":
        if main.startswith("["):
            host, sep, port = main[1:].partition("]:")
        else:
            host, sep, port = main.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise QMPAddressError(f"invalid QMP address {text!r}: expected tcp:HOST:PORT")
        return QMPAddress("tcp", host=host, port=int(port))
    if not main:
        raise QMPAddressError(f"invalid QMP address {text!r}: the socket path is empty")
    return QMPAddress("unix", path=main)


def open_listener(address: QMPAddress) -> tuple[socket.socket, int | None, QMPAddress]:
    """A non-blocking listening socket, the unix socket file's inode (None for TCP) and
    the address as bound (a TCP port 0 becomes the port the kernel chose)."""
    if address.kind == "unix":
        sock, ino = bind_unix_listener(address.path, 64, what="QMP socket", error=QMPSocketError)
        sock.setblocking(False)
        return sock, ino, address
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise QMPSocketError(f"cannot listen on QMP {address}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise QMPSocketError(f"cannot listen on QMP {address}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    return sock, None, QMPAddress("tcp", host=address.host, port=port)
