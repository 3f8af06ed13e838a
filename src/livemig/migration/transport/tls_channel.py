"""The TLS record layer of a migration socket, safe for a reader and a writer thread at once.

One migration socket carries the stream one way and the return path the other, read by
its own thread while the migration thread writes. OpenSSL does not allow two threads in
one ``SSL`` object at once, so :class:`TLSChannel` drives the TLS session through memory
BIOs (:class:`ssl.SSLObject`) under a lock held only while encrypting or decrypting;
socket I/O happens outside it. One reader and one writer proceed in parallel, and each
encrypt/decrypt call handles 256 KiB (16 records), with one system call per 256 KiB of
ciphertext.

A channel is made by ``TLSClient.wrap`` / ``TLSServer.wrap`` (``transport.tls``) once the
handshake is done; nothing here handshakes.
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from typing import Any

from livemig.migration.transport.tls_errors import TLSError, explain

__all__ = ["TLSChannel", "peer_names"]

_CHUNK = 256 << 10  # plaintext encrypted per lock hold: 16 records, ciphertext stays in cache
_RECV = 256 << 10  # ciphertext bytes asked from the socket per system call
_GATHER = 64 << 10  # sendmsg copies buffers smaller than this into one run of records
_MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)


def peer_names(cert: dict[str, Any]) -> frozenset[str]:
    """The names of a certificate as ``getpeercert()`` decodes it: CN and DNS SANs."""
    names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    names |= {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
    return frozenset(names)


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
