"""TLS for migration channels: QEMU's ``tls-creds``, ``tls-hostname`` and ``tls-authz``.

A migration with ``tls-creds`` set runs every socket channel through TLS 1.3 with mutual
authentication:

* ``tls-creds`` is a directory in QEMU's x509 layout: ``ca-cert.pem`` (the CA both ends
  trust), ``server-cert.pem``/``server-key.pem`` (presented by the destination),
  ``client-cert.pem``/``client-key.pem`` (presented by the source), and optionally
  ``ca-crl.pem`` (revoked certificates);
* the source checks the destination's certificate against ``ca-cert.pem`` and against
  ``tls-hostname`` (default: the host of a ``tcp:`` URI; required for ``unix:``);
* the destination requires a client certificate signed by ``ca-cert.pem`` and, if
  ``tls-authz`` lists names, one of the certificate's names (its CN or a DNS
  subjectAltName) must be listed.

A refusal is a :class:`~livemig.migration.transport.tls_errors.TLSError` whose ``check``
says which check failed (see ``tls_errors.CHECKS``) and whose message says it in words.

The record layer, :class:`~livemig.migration.transport.tls_channel.TLSChannel`, is in
``tls_channel``; the errors and their wording in ``tls_errors``. This module makes the
contexts from the credentials and runs the handshake.

Hooks for other channels (see ``docs/security.md``): :class:`TLSClient` and
:class:`TLSServer` are built once per migration from the parameters, and
``channels.connect(uri, tls=client)`` / ``channels.Listener(uri, tls=server)`` wrap every
connection they make or accept. :func:`wrap_client` / :func:`wrap_server` do the same for
a single socket straight from the parameters.

Deadline and cancel. :data:`HANDSHAKE_TIMEOUT` (10 s) bounds the *whole* handshake, every
read and write of it together, so a peer that drips one byte at a time is cut off like a
silent one (check ``timeout``). A handshake in progress can be ended from another thread:

* give the client or server an abort event once per migration —
  ``TLSClient.from_params(...).with_abort(mig_cancel_event)`` — and every handshake it
  runs, on any channel, ends within :data:`ABORT_POLL` of the event being set with a
  :class:`TLSError` of check ``cancelled``; one that starts after it was set ends at once;
* or pass ``abort=event`` to one ``wrap()`` call;
* a caller holding the raw socket may also ``shutdown()`` it: the handshake returns at
  once, as ``cancelled`` if the abort event is set and as a closed connection otherwise.
  Never ``close()`` a socket another thread is handshaking on.

The migration's own cancel event is the natural abort: ``migrate_cancel`` sets it.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from livemig.migration.transport.tls_channel import TLSChannel, peer_names
from livemig.migration.transport.tls_errors import TLSConfigError, TLSError, explain, peer_role

if TYPE_CHECKING:
    from livemig.migration.channels import MigrationURI

log = logging.getLogger(__name__)

__all__ = [
    "CREDS_FILES",
    "ABORT_POLL",
    "HANDSHAKE_TIMEOUT",
    "TLSClient",
    "TLSServer",
    "parse_authz",
    "wrap_client",
    "wrap_server",
]

CREDS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
CRL_FILE = "ca-crl.pem"
HANDSHAKE_TIMEOUT = 10.0  # s for the whole handshake (read at each wrap: tests lower it)
ABORT_POLL = 0.05  # s between looks at the abort event while a handshake waits on its peer


def parse_authz(text: str) -> frozenset[str]:
    """``tls-authz``: client certificate names, comma-separated; empty means any name."""
    return frozenset(n.strip() for n in text.split(",") if n.strip())


# -- contexts ---------------------------------------------------------------------------------


def _creds_file(creds: str, name: str, role: str) -> str:
    path = os.path.join(creds, name)
    if not os.path.isfile(path):
        raise TLSConfigError(f"tls-creds {creds}: {name} is missing (the {role} needs it)")
    return path


def _check_key_file(path: str) -> None:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("TLS private key %s is readable by group or others (mode %o)",
                    path, stat.S_IMODE(st.st_mode))


def _base_context(protocol: int, creds: str, cert: str, key: str, role: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca = _creds_file(creds, "ca-cert.pem", role)
    cert_path, key_path = _creds_file(creds, cert, role), _creds_file(creds, key, role)
    _check_key_file(key_path)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TLSConfigError(f"tls-creds {creds}: cannot load ca-cert.pem: {e.reason or e}") from e
    crl = os.path.join(creds, CRL_FILE)
    if os.path.isfile(crl):
        try:
            ctx.load_verify_locations(cafile=crl)
        except ssl.SSLError as e:
            raise TLSConfigError(f"tls-creds {creds}: cannot load {CRL_FILE}: {e.reason or e}") from e
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"tls-creds {creds}: cannot load {cert} with {key}: {e.reason or e}"
        ) from e
    return ctx


def _check_creds_dir(creds: str) -> None:
    if not os.path.isdir(creds):
        raise TLSConfigError(f"tls-creds {creds} is not a directory")


@dataclass(frozen=True)
class TLSClient:
    """The source's side: built once per migration; :meth:`wrap` each connected socket."""

    context: ssl.SSLContext
    hostname: str
    creds: str = ""
    abort: threading.Event | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: Any, uri: MigrationURI) -> TLSClient | None:
        """None when ``tls-creds`` is empty; :class:`TLSConfigError` when TLS cannot work."""
        creds = getattr(params, "tls_creds", "") or ""
        if not creds:
            return None
        if uri.scheme not in ("tcp", "unix"):
            raise TLSConfigError(
                f"tls-creds is set, but {uri.scheme}: is not a network channel and would not "
                f"be encrypted; clear tls-creds to migrate to {uri}"
            )
        hostname = getattr(params, "tls_hostname", "") or (uri.host if uri.scheme == "tcp" else "")
        if not hostname:
            raise TLSConfigError("TLS over a unix: socket needs tls-hostname (the destination's name)")
        return cls.from_creds(creds, hostname)

    @classmethod
    def from_creds(cls, creds: str, hostname: str) -> TLSClient:
        _check_creds_dir(creds)
        ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, creds, "client-cert.pem", "client-key.pem",
                            "source")
        ctx.check_hostname = True
        return cls(ctx, hostname, creds)

    def with_abort(self, abort: threading.Event) -> TLSClient:
        """The same client, whose handshakes end with check ``cancelled`` once ``abort`` is set."""
        return replace(self, abort=abort)

    def wrap(self, sock: socket.socket, timeout: float | None = None,
             abort: threading.Event | None = None) -> TLSChannel:
        """Handshake as the client on a connected socket; the socket is closed on failure.

        ``timeout`` bounds the whole handshake (default :data:`HANDSHAKE_TIMEOUT`);
        ``abort`` (default: the one given to :meth:`with_abort`) cuts it short when set.
        """
        try:
            abort = self.abort if abort is None else abort
            hs = _Handshake(sock, server=False, timeout=timeout, abort=abort)
            obj, inc, out = _new_object(self.context, server=False, hostname=self.hostname)
            hs.run(obj, inc, out, self.hostname)
            hs.finish()
            return TLSChannel(sock, obj, inc, out, server=False)
        except BaseException:
            sock.close()
            raise


@dataclass(frozen=True)
class TLSServer:
    """The destination's side: built once per migration; :meth:`wrap` each accepted socket."""

    context: ssl.SSLContext
    authz: frozenset[str] = field(default_factory=frozenset)
    creds: str = ""
    abort: threading.Event | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: Any, uri: MigrationURI | None = None) -> TLSServer | None:
        creds = getattr(params, "tls_creds", "") or ""
        if not creds:
            return None
        if uri is not None and uri.scheme not in ("tcp", "unix"):
            raise TLSConfigError(
                f"tls-creds is set, but {uri.scheme}: is not a network channel and cannot be "
                f"authenticated; clear tls-creds to load {uri}"
            )
        return cls.from_creds(creds, parse_authz(getattr(params, "tls_authz", "") or ""))

    @classmethod
    def from_creds(cls, creds: str, authz: frozenset[str] = frozenset()) -> TLSServer:
        _check_creds_dir(creds)
        ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, creds, "server-cert.pem", "server-key.pem",
                            "destination")
        # One ticket, held back until tls-authz accepted the client: its arrival tells the
        # source that it was accepted (TLSChannel checks for it at end of data). Never used
        # to resume.
        ctx.num_tickets = 1
        return cls(ctx, authz, creds)

    def with_abort(self, abort: threading.Event) -> TLSServer:
        """The same server, whose handshakes end with check ``cancelled`` once ``abort`` is set."""
        return replace(self, abort=abort)

    def wrap(self, sock: socket.socket, timeout: float | None = None,
             abort: threading.Event | None = None) -> TLSChannel:
        """Handshake as the server on an accepted socket; the socket is closed on failure.

        ``timeout`` and ``abort`` as for :meth:`TLSClient.wrap`; the deadline covers the
        session ticket sent after ``tls-authz`` accepted the source too.
        """
        try:
            abort = self.abort if abort is None else abort
            hs = _Handshake(sock, server=True, timeout=timeout, abort=abort)
            obj, inc, out = _new_object(self.context, server=True, hostname=None)
            held = hs.run(obj, inc, out, None)
            names = peer_names(obj.getpeercert() or {})
            if self.authz and not names & self.authz:
                # Just close: the ticket is never sent, and nothing can follow it (records
                # are numbered), so the source learns it was not accepted from that.
                raise TLSError(
                    "authz",
                    "TLS: refused the source: its client certificate names "
                    f"({', '.join(sorted(names)) or 'none'}) are not in tls-authz "
                    f"({', '.join(sorted(self.authz))})",
                )
            if held:
                hs.send(held)
            hs.finish()
            return TLSChannel(sock, obj, inc, out, server=True)
        except BaseException:
            sock.close()
            raise


def wrap_client(sock: socket.socket, params: Any, uri: MigrationURI) -> Any:
    """``sock`` wrapped per the parameters (the socket itself when TLS is off)."""
    client = TLSClient.from_params(params, uri)
    return sock if client is None else client.wrap(sock)


def wrap_server(sock: socket.socket, params: Any) -> Any:
    """``sock`` wrapped per the parameters (the socket itself when TLS is off)."""
    server = TLSServer.from_params(params)
    return sock if server is None else server.wrap(sock)


# -- handshake --------------------------------------------------------------------------------


def _new_object(
    ctx: ssl.SSLContext, *, server: bool, hostname: str | None
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=server, server_hostname=hostname)
    return obj, inc, out


class _Handshake:
    """One handshake's socket I/O: every read and write of it under one deadline, and a
    look at the abort event at least every :data:`ABORT_POLL` seconds while it waits.

    The socket is non-blocking meanwhile, so no single read or write can outlast the
    deadline; :meth:`finish` makes it blocking again for the channel.
    """

    def __init__(self, sock: socket.socket, *, server: bool, timeout: float | None,
                 abort: threading.Event | None):
        self.sock = sock
        self.server = server
        self.timeout = HANDSHAKE_TIMEOUT if timeout is None else timeout
        self.deadline = time.monotonic() + self.timeout
        self.abort = abort
        sock.setblocking(False)

    def run(self, obj: ssl.SSLObject, inc: ssl.MemoryBIO, out: ssl.MemoryBIO,
            hostname: str | None) -> bytes:
        """Handshake over the socket; return bytes held back (the server's ticket)."""
        first = True
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as e:
                if out.pending:  # the alert that tells the peer why
                    try:
                        self.send(out.read())
                    except OSError:
                        pass
                raise explain(e, server=self.server, hostname=hostname) from e
            if done and self.server:
                return out.read()
            if out.pending:
                self.send(out.read())
            if done:
                return b""
            data = self._recv()
            if first:
                _check_first_bytes(data, self.server)
                first = False
            inc.write(data)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(select.POLLOUT)
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError) as e:
                raise self._closed() from e

    def _recv(self) -> bytes:
        while True:
            self._wait(select.POLLIN)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError as e:
                raise self._closed() from e
            if not data:
                raise self._closed()
            return data

    def _wait(self, events: int) -> None:
        """Until the socket is ready for ``events``, within the deadline, unless aborted."""
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        while True:
            self._check_abort()
            left = self.deadline - time.monotonic()
            if left <= 0:
                peer = peer_role(self.server)
                raise TLSError("timeout", f"TLS: the {peer} did not complete the handshake "
                                          f"within {self.timeout:g} s")
            if self.abort is not None:
                left = min(left, ABORT_POLL)
            if poller.poll(math.ceil(left * 1000)):
                self._check_abort()  # a shutdown() that goes with an abort wakes us: say so
                return

    def _check_abort(self) -> None:
        if self.abort is not None and self.abort.is_set():
            raise TLSError("cancelled", f"TLS: the handshake with the {peer_role(self.server)} "
                                        "was cancelled")

    def _closed(self) -> TLSError:
        self._check_abort()
        return _closed_during_handshake(self.server)

    def finish(self) -> None:
        """The handshake is over: the channel's socket blocks (callers set their own timeouts)."""
        self.sock.settimeout(None)


def _closed_during_handshake(server: bool) -> TLSError:
    if server:
        return TLSError("handshake", "TLS: the source closed the connection during the handshake")
    return TLSError(
        "plaintext",
        "TLS: the destination closed the connection during the handshake: it does not speak "
        "TLS (is tls-creds set on the destination?)",
    )


def _check_first_bytes(data: bytes, server: bool) -> None:
    """A TLS peer's first record is a handshake record (0x16) or an alert (0x15), 3.x."""
    if data[0] in (0x15, 0x16) and (len(data) < 2 or data[1] == 3):
        return
    peer = peer_role(server)
    what = "a plaintext migration stream" if data[:4] == b"QEVM" else (
        f"data that is not TLS (first bytes {data[:4].hex()})"
    )
    raise TLSError("plaintext", f"TLS: refused the {peer}: it sent {what}, but tls-creds is set")
