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

A refusal is a :class:`TLSError` whose ``check`` says which check failed (see
:data:`CHECKS`) and whose message says it in words.

Threads. One migration socket carries the stream one way and the return path the other,
read by its own thread while the migration thread writes. OpenSSL does not allow two
threads in one ``SSL`` object at once, so :class:`TLSChannel` drives the TLS session
through memory BIOs (:class:`ssl.SSLObject`) under a lock held only while encrypting or
decrypting; socket I/O happens outside it. One reader and one writer proceed in parallel,
and each encrypt/decrypt call handles 256 KiB (16 records), with one system call per
256 KiB of ciphertext.

Hooks for other channels (see ``docs/security.md``): :class:`TLSClient` and
:class:`TLSServer` are built once per migration from the parameters, and
``channels.connect(uri, tls=client)`` / ``channels.Listener(uri, tls=server)`` wrap every
connection they make or accept. :func:`wrap_client` / :func:`wrap_server` do the same for
a single socket straight from the parameters.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livemig.migration.channels import MigrationURI

log = logging.getLogger(__name__)

__all__ = [
    "CHECKS",
    "CREDS_FILES",
    "TLSChannel",
    "TLSClient",
    "TLSConfigError",
    "TLSError",
    "TLSServer",
    "parse_authz",
    "wrap_client",
    "wrap_server",
]

CREDS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
CRL_FILE = "ca-crl.pem"
HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 256 << 10  # plaintext encrypted per lock hold: 16 records, ciphertext stays in cache
_RECV = 256 << 10  # ciphertext bytes asked from the socket per system call
_GATHER = 64 << 10  # sendmsg copies buffers smaller than this into one run of records
_MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)

CHECKS = {
    "plaintext": "the peer does not speak TLS",
    "untrusted": "the peer's certificate is not signed by ca-cert.pem (or not valid)",
    "hostname": "the destination's certificate does not match tls-hostname",
    "authz": "the source's certificate names are not in tls-authz",
    "no-certificate": "the source presented no client certificate",
    "peer-refused": "the peer refused our certificate or the handshake",
    "handshake": "another TLS handshake failure",
    "timeout": "the handshake did not finish in time",
    "version": "the peer does not offer TLS 1.3",
    "protocol": "a TLS error after the handshake",
}

# X509_V_ERR_* codes (OpenSSL's x509_vfy.h)
_HOSTNAME_MISMATCH = (62, 64)  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH


class TLSConfigError(ValueError):
    """tls-creds/tls-hostname/tls-authz cannot work as set; the message is what QMP reports."""


class TLSError(OSError):
    """A TLS channel refused or broke; ``check`` is one of :data:`CHECKS`."""

    def __init__(self, check: str, message: str):
        super().__init__(errno.EPROTO, message)
        self.check = check
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (TLSError, (self.check, self.message))


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

    def wrap(self, sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT) -> TLSChannel:
        """Handshake as the client on a connected socket; the socket is closed on failure."""
        try:
            obj, inc, out = _new_object(self.context, server=False, hostname=self.hostname)
            _handshake(sock, obj, inc, out, server=False, hostname=self.hostname,
                       timeout=timeout)
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
        # source that it was accepted (see TLSChannel._end_of_data). Never used to resume.
        ctx.num_tickets = 1
        return cls(ctx, authz, creds)

    def wrap(self, sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT) -> TLSChannel:
        """Handshake as the server on an accepted socket; the socket is closed on failure."""
        try:
            obj, inc, out = _new_object(self.context, server=True, hostname=None)
            held = _handshake(sock, obj, inc, out, server=True, hostname=None, timeout=timeout)
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
                sock.sendall(held)
            return TLSChannel(sock, obj, inc, out, server=True)
        except BaseException:
            sock.close()
            raise


def peer_names(cert: dict[str, Any]) -> frozenset[str]:
    """The names of a certificate as ``getpeercert()`` decodes it: CN and DNS SANs."""
    names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    names |= {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
    return frozenset(names)


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


def _peer(server: bool) -> str:
    return "source" if server else "destination"


def _handshake(
    sock: socket.socket,
    obj: ssl.SSLObject,
    inc: ssl.MemoryBIO,
    out: ssl.MemoryBIO,
    *,
    server: bool,
    hostname: str | None,
    timeout: float,
) -> bytes:
    """Run the handshake over ``sock``; return bytes held back (the server's ticket)."""
    peer = _peer(server)
    first = True
    sock.settimeout(timeout)
    try:
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as e:
                if out.pending:  # the alert that tells the peer why
                    try:
                        sock.sendall(out.read())
                    except OSError:
                        pass
                raise explain(e, server=server, hostname=hostname) from e
            if done and server:
                return out.read()
            if out.pending:
                sock.sendall(out.read())
            if done:
                return b""
            data = sock.recv(65536)
            if not data:
                raise _closed_during_handshake(server)
            if first:
                _check_first_bytes(data, server)
                first = False
            inc.write(data)
    except TimeoutError as e:
        raise TLSError("timeout", f"TLS: the {peer} did not complete the handshake within "
                                  f"{timeout:g} s") from e
    except (ConnectionResetError, BrokenPipeError) as e:
        raise _closed_during_handshake(server) from e
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


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
    peer = _peer(server)
    what = "a plaintext migration stream" if data[:4] == b"QEVM" else (
        f"data that is not TLS (first bytes {data[:4].hex()})"
    )
    raise TLSError("plaintext", f"TLS: refused the {peer}: it sent {what}, but tls-creds is set")


_ALERT_HINTS = {
    "UNKNOWN_CA": "it does not trust our certificate (not signed by its ca-cert.pem)",
    "BAD_CERTIFICATE": "it rejected our certificate",
    "UNSUPPORTED_CERTIFICATE": "it rejected our certificate (unsupported purpose)",
    "CERTIFICATE_EXPIRED": "it says our certificate expired",
    "CERTIFICATE_REVOKED": "it says our certificate is revoked",
    "CERTIFICATE_UNKNOWN": "it rejected our certificate",
    "CERTIFICATE_REQUIRED": "it requires a client certificate",
    "ACCESS_DENIED": "it denied access",
    "PROTOCOL_VERSION": "no TLS version in common (livemig requires TLS 1.3)",
    "HANDSHAKE_FAILURE": "no common parameters",
    "DECRYPT_ERROR": "a signature did not verify",
}


def explain(e: ssl.SSLError, *, server: bool, hostname: str | None = None) -> TLSError:
    """Turn an OpenSSL error into a :class:`TLSError` naming the check that failed."""
    peer = _peer(server)
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = e.verify_message or e.reason or str(e)
        if e.verify_code in _HOSTNAME_MISMATCH:
            return TLSError(
                "hostname",
                f"TLS: the destination's certificate does not match tls-hostname "
                f"{hostname!r} ({msg})",
            )
        return TLSError(
            "untrusted",
            f"TLS: the {peer}'s certificate is not trusted: {msg} "
            "(is it signed by the CA in our ca-cert.pem, and valid?)",
        )
    reason = e.reason or ""
    if reason in ("UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"):
        return TLSError("version", f"TLS: the {peer} does not offer TLS 1.3 (livemig requires it)")
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return TLSError("no-certificate", "TLS: refused the source: it presented no client "
                                          "certificate (client-cert.pem)")
    if "_ALERT_" in reason:
        alert = reason.split("_ALERT_", 1)[1]
        hint = _ALERT_HINTS.get(alert, "")
        name = alert.lower().replace("_", " ")
        return TLSError(
            "peer-refused",
            f"TLS: the {peer} refused the session (alert: {name})" + (f": {hint}" if hint else ""),
        )
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                  "RECORD_LAYER_FAILURE"):
        return TLSError("plaintext", f"TLS: the {peer} does not speak TLS ({reason.lower()})")
    return TLSError("handshake", f"TLS handshake with the {peer} failed: {reason or e}")


def _bytes_view(data: Any) -> memoryview:
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


# -- the channel ------------------------------------------------------------------------------


class TLSChannel:
    """A TLS session over a connected socket, with the socket calls migration code uses.

    ``sendall``/``send`` and ``recv_into``/``recv`` may run in two threads at once (the
    migration thread writes while the return-path thread reads); ``shutdown`` may come
    from a third (cancel). Not supported: non-blocking mode, two concurrent readers
    sharing one stream position (they are serialized, which is the only sane outcome).
    """

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        inc: ssl.MemoryBIO,
        out: ssl.MemoryBIO,
        *,
        server: bool,
    ):
        self._sock = sock
        self._obj = obj
        self._in = inc
        self._out = out
        self.server_side = server
        self._ssl_lock = threading.Lock()  # the SSLObject and both BIOs
        self._send_lock = threading.Lock()  # keeps ciphertext in TLS sequence on the socket
        self._recv_lock = threading.Lock()  # one reader at a time
        self._rbuf = bytearray(_RECV)
        self._rview = memoryview(self._rbuf)
        self._failure: TLSError | None = None
        self._reader_done = threading.Event()
        self._stash = b""  # peeked plaintext (recv with MSG_PEEK)
        self._got_data = False
        self._eof = False
        self._reply_pending = False
        self._shut = False
        self._closed = False

    # -- introspection ------------------------------------------------------------------
    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._obj.cipher()

    def getpeercert(self) -> dict[str, Any]:
        return self._obj.getpeercert() or {}

    @property
    def peer_names(self) -> frozenset[str]:
        return peer_names(self.getpeercert())

    # -- writing --------------------------------------------------------------------------
    def sendall(self, data: Any, flags: int = 0) -> None:
        with self._send_lock:
            self._encrypt(_bytes_view(data))
            self._send_ciphertext(0)

    def send(self, data: Any, flags: int = 0) -> int:
        mv = _bytes_view(data)
        self.sendall(mv)
        return len(mv)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        """Scatter-gather like ``socket.sendmsg``, but always sends everything and returns
        the total. Small buffers are gathered into one record stream, large ones are
        encrypted straight from where they are (guest RAM)."""
        if ancdata or address is not None:
            raise OSError(errno.EINVAL, "a TLS channel sends no ancillary data")
        if flags & _MSG_ZEROCOPY:
            raise OSError(errno.EINVAL, "zero-copy-send cannot be used with TLS")
        total = 0
        with self._send_lock:
            staged = bytearray()
            for buf in buffers:
                mv = _bytes_view(buf)
                total += len(mv)
                if len(mv) < _GATHER:
                    staged += mv
                    if len(staged) < _CHUNK:
                        continue
                    mv = memoryview(b"")
                if staged:
                    self._encrypt(memoryview(staged))
                    staged = bytearray()
                if len(mv):
                    self._encrypt(mv)
            if staged:
                self._encrypt(memoryview(staged))
            self._send_ciphertext(0)
        return total

    def _encrypt(self, mv: memoryview) -> None:
        """Encrypt ``mv``, sending ciphertext every ``_CHUNK``. Hold ``_send_lock``."""
        off, n = 0, len(mv)
        while off < n:
            with self._ssl_lock:
                if self._failure is not None:
                    raise self._failure
                try:
                    off += self._obj.write(mv[off : off + _CHUNK])
                except ssl.SSLError as e:
                    raise self._fail(explain(e, server=self.server_side)) from e
            self._send_ciphertext(_CHUNK)

    def _send_ciphertext(self, at_least: int) -> None:
        """Send the ciphertext produced so far if there is ``at_least`` that much."""
        with self._ssl_lock:
            if not self._out.pending or self._out.pending < at_least:
                return
            ct = self._out.read()
        try:
            self._sock.sendall(ct)
        except OSError as e:
            raise self._send_failed(e) from e

    def _flush_pending(self) -> None:
        """Send what the TLS layer produced while reading (KeyUpdate replies, alerts).

        Never waits for the writer: a writer busy sending takes these bytes along with its
        next ciphertext (they are in the same BIO, in sequence)."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            self._send_ciphertext(0)
        finally:
            self._send_lock.release()

    def _send_failed(self, e: OSError) -> OSError:
        """The socket broke under a write: find the TLS reason if the peer sent one."""
        if self._failure is None and not self._shut:
            if self._recv_lock.acquire(blocking=False):
                try:  # nobody is reading: look for an alert ourselves
                    self._drain_for_alert()
                finally:
                    self._recv_lock.release()
            else:  # the reader sees the alert first; it finishes quickly either way
                self._reader_done.wait(1.0)
        return self._failure or e

    def _drain_for_alert(self) -> None:
        scratch = memoryview(bytearray(1 << 16))
        try:
            while True:
                k = self._sock.recv_into(self._rview, _RECV, socket.MSG_DONTWAIT)
                with self._ssl_lock:
                    if k:
                        self._in.write(self._rview[:k])
                    else:
                        self._in.write_eof()
                if not k:
                    break
        except ConnectionResetError:
            self._refused()
        except OSError:
            pass
        try:
            while self._decrypt(scratch) not in (None, 0):
                pass
        except OSError:
            pass

    # -- reading --------------------------------------------------------------------------
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = _bytes_view(buffer)
        if nbytes:
            view = view[:nbytes]
        if not len(view):
            return 0
        with self._recv_lock:
            if self._stash:
                n = min(len(view), len(self._stash))
                view[:n] = self._stash[:n]
                self._stash = self._stash[n:]
                return n
            return self._recv_locked(view)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            with self._recv_lock:
                if not self._stash:
                    buf = bytearray(max(bufsize, 1))
                    self._stash = bytes(buf[: self._recv_locked(memoryview(buf))])
                return self._stash[:bufsize]
        buf = bytearray(bufsize)
        n = self.recv_into(buf)
        return bytes(buf[:n])

    def pending(self) -> int:
        """Plaintext bytes readable now without waiting for the socket.

        For ``select()`` loops: bytes that arrived together with the handshake are already
        inside the TLS layer, so the socket would not signal them.
        """
        with self._recv_lock:
            if not self._stash:
                buf = bytearray(1 << 16)
                n = self._decrypt(memoryview(buf))
                if n:
                    self._stash = bytes(buf[:n])
            return len(self._stash)

    def _recv_locked(self, view: memoryview) -> int:
        while True:
            n = self._decrypt(view)
            if self._reply_pending:
                self._flush_pending()
            if n is not None:
                return n
            try:
                k = self._sock.recv_into(self._rview)
            except OSError as e:
                if not isinstance(e, TimeoutError):  # a timeout set by the caller is not the end
                    self._reader_done.set()
                if isinstance(e, ConnectionResetError):
                    refused = self._refused()
                    if refused is not None:
                        raise refused from e
                raise
            with self._ssl_lock:
                if k:
                    self._in.write(self._rview[:k])
                else:
                    self._in.write_eof()

    def _decrypt(self, view: memoryview) -> int | None:
        """Decrypt what is buffered into ``view``: a count, 0 at the end, None for more."""
        want, got = len(view), 0
        with self._ssl_lock:
            if self._eof:
                self._reader_done.set()
                return 0
            if self._failure is not None:
                raise self._failure
            try:
                while got < want:
                    r = self._obj.read(want - got, view[got:])
                    if not r:  # close_notify
                        return self._ended(got)
                    got += r
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLEOFError:  # the socket ended without close_notify
                return self._ended(got)
            except ssl.SSLError as e:
                err = self._fail(explain(e, server=self.server_side))
                if got:
                    return got  # the next call raises
                raise err from e
            finally:
                self._reply_pending = self._out.pending > 0
        if got:
            self._got_data = True
            return got
        return None

    def _ended(self, got: int) -> int:
        if got:
            self._got_data = self._eof = True
            return got
        return self._end_of_data()

    def _end_of_data(self) -> int:
        """The peer ended the session. A destination that ends it right after the handshake,
        without the session ticket it sends once tls-authz accepted us, refused us."""
        self._eof = True
        refused = self._refused()
        if refused is not None:
            raise refused
        self._reader_done.set()
        return 0

    def _refused(self) -> TLSError | None:
        """On the source: the destination closed before it accepted us (no ticket, no data)."""
        if self.server_side or self._got_data or self._accepted():
            return None
        return self._fail(TLSError(
            "authz",
            "TLS: the destination closed the connection right after the handshake without "
            "accepting this source: our client certificate's names are not in its tls-authz",
        ))

    def _accepted(self) -> bool:
        session = self._obj.session
        return bool(session is not None and session.has_ticket)

    def _fail(self, err: TLSError) -> TLSError:
        if self._failure is None:
            self._failure = err
        self._reader_done.set()
        return self._failure

    # -- ending ---------------------------------------------------------------------------
    def shutdown(self, how: int) -> None:
        self._shut = True
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify when that cannot block, then close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._shut and self._failure is None and self._send_lock.acquire(blocking=False):
                try:
                    with self._ssl_lock:
                        try:
                            self._obj.unwrap()
                        except ssl.SSLError:
                            pass
                        data = self._out.read()
                    if data:
                        self._sock.send(data, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                finally:
                    self._send_lock.release()
        finally:
            self._sock.close()

    def __enter__(self) -> TLSChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
