"""QEMU's migration channel syntax, and where a cpr-transfer may go.

``migrate`` and ``migrate-incoming`` take either a ``uri`` or a ``channels`` list of
``{"channel-type": "main"|"cpr", "addr": MigrationAddress}``; a MigrationAddress is
``{"transport": "socket", "type": "inet", "host": H, "port": "P"}``, ``{"transport":
"socket", "type": "unix", "path": P}`` or ``{"transport": "file", "filename": F}``. A new
process takes ``-incoming URI`` or ``-incoming '{"channel-type": "cpr", "addr": ...}'``
(the JSON form), once per channel (QEMU 10, docs/devel/migration/CPR.rst).

A cpr-transfer hands memory to a process on this host: the cpr channel must be a unix
socket (descriptors travel only there) and the main channel a socket on this host.
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

from livemig.migration.channels import MigrationURI, URIError, parse_uri

CHANNEL_TYPES = ("main", "cpr")


class CprError(ValueError):
    """A cpr-transfer that cannot work here; the message says why (one line)."""


def address_to_uri(addr: Any) -> MigrationURI:
    """A QEMU MigrationAddress as a :class:`MigrationURI`."""
    if not isinstance(addr, dict):
        raise URIError("Invalid parameter type for 'addr', expected: object")
    transport = addr.get("transport")
    if transport == "socket":
        kind = addr.get("type")
        if kind == "inet":
            host, port = addr.get("host"), addr.get("port")
            if not isinstance(host, str) or not isinstance(port, (str, int)) or not str(port).isdigit():
                raise URIError("socket address of type 'inet' needs 'host' and a numeric 'port'")
            if not 0 <= int(port) <= 65535:
                raise URIError(f"port {port} out of range")
            return MigrationURI("tcp", host=host, port=int(port))
        if kind == "unix":
            path = addr.get("path")
            if not isinstance(path, str) or not path:
                raise URIError("socket address of type 'unix' needs 'path'")
            return MigrationURI("unix", path=path)
        raise URIError(f"socket address type '{kind}' is not supported by livemig (inet or unix)")
    if transport == "file":
        name = addr.get("filename")
        if not isinstance(name, str) or not name:
            raise URIError("file address needs 'filename'")
        if addr.get("offset", 0) != 0:
            raise URIError("file address: an 'offset' is not supported by livemig")
        return MigrationURI("file", path=name)
    raise URIError(f"migration transport '{transport}' is not supported by livemig (socket or file)")


def uri_to_address(uri: MigrationURI) -> dict[str, Any]:
    """The MigrationAddress of ``uri`` (for clients that build ``channels`` lists)."""
    if uri.scheme == "tcp":
        return {"transport": "socket", "type": "inet", "host": uri.host, "port": str(uri.port)}
    if uri.scheme == "unix":
        return {"transport": "socket", "type": "unix", "path": uri.path}
    return {"transport": "file", "filename": uri.path}


def parse_channels(channels: Any) -> dict[str, MigrationURI]:
    """``{"main": uri[, "cpr": uri]}`` from a ``channels`` list (QEMU's errors)."""
    if not isinstance(channels, list) or not channels:
        raise URIError("Invalid parameter type for 'channels', expected: non-empty array")
    out: dict[str, MigrationURI] = {}
    for ch in channels:
        if not isinstance(ch, dict) or "channel-type" not in ch or "addr" not in ch:
            raise URIError("a migration channel needs 'channel-type' and 'addr'")
        kind = ch["channel-type"]
        if kind not in CHANNEL_TYPES:
            raise URIError(f"Parameter 'channel-type' does not accept value '{kind}'")
        if kind in out:
            raise URIError(f"Channel list has more than one {kind} entry")
        out[kind] = address_to_uri(ch["addr"])
    if "main" not in out:
        raise URIError("Channel list has no main entry")
    return out


def parse_incoming_option(text: str) -> tuple[str, MigrationURI | None]:
    """One ``-incoming`` value: ``("main", uri)``, ``("main", None)`` for ``defer``, or
    ``(channel type, uri)`` for the JSON form."""
    text = text.strip()
    if text == "defer":
        return "main", None
    if not text.startswith("{"):
        return "main", parse_uri(text)
    try:
        ch = json.loads(text)
    except json.JSONDecodeError as e:
        raise URIError(f"-incoming: not a migration channel (JSON): {e.msg}") from None
    kind = ch.get("channel-type", "main") if isinstance(ch, dict) else None
    if kind not in CHANNEL_TYPES:
        raise URIError(f"-incoming: 'channel-type' must be main or cpr, not {kind!r}")
    return kind, address_to_uri(ch.get("addr"))


def check_cpr_channel(uri: MigrationURI | None) -> MigrationURI:
    if uri is None:
        raise CprError("missing 'cpr' migration channel")
    if uri.scheme != "unix":
        raise CprError("bad cpr channel address; must be unix")
    return uri


def check_main_channel(uri: MigrationURI) -> None:
    """The main channel of a cpr-transfer: a socket to a process on this host."""
    if uri.scheme == "file":
        raise CprError("cpr-transfer needs a socket as its main channel, not file: (both processes run at once)")
    if uri.scheme == "tcp":
        if uri.port == 0:
            raise CprError("cpr-transfer: the main channel's tcp port cannot be 0")
        if not is_local_host(uri.host):
            raise CprError(
                f"cpr-transfer: {uri} is not on this host; the new process must run on the same host"
            )


def is_local_host(host: str) -> bool:
    """True if every address ``host`` resolves to belongs to this host (can be bound)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        s = socket.socket(family, kind, proto)
        try:
            s.bind((addr[0], 0) if family == socket.AF_INET else (addr[0], 0, 0, addr[3]))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
        finally:
            s.close()
    return bool(infos)
