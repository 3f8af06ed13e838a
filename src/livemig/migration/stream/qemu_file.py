"""Buffered big-endian byte streams over a socket or a file: livemig's ``QEMUFile``.

The migration stream is a long run of tiny framing fields (u8 section types, be32 ids,
be64 page headers) interleaved with large payloads (4 KiB pages, megabyte bitmaps). The
two need opposite treatment, which is what this module is for:

* tiny fields go through a fixed 1 MiB buffer, so each one costs a ``struct`` call and no
  system call;
* large payloads bypass the buffer in both directions: :meth:`QEMUFileWriter.write_view`
  hands guest RAM straight to ``sendall``/``sendmsg``, and
  :meth:`QEMUFileReader.readinto_exact` receives straight into guest RAM with
  ``recv_into``, so a page is never copied through Python ``bytes``.

The vectorized RAM decoder needs to parse many page records at once with numpy, so the
reader exposes its buffer: :meth:`QEMUFileReader.fill` makes bytes available,
:meth:`QEMUFileReader.buffered` shows them and :meth:`QEMUFileReader.consume` marks them
read. The writer has the mirror image, :meth:`QEMUFileWriter.reserve` and
:meth:`QEMUFileWriter.commit`.

Every format problem found while reading is a :class:`StreamError` carrying the absolute
stream offset, so an error report can be checked against a hex dump of the stream.
"""

from __future__ import annotations

import io
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Self

from livemig.devices.vmstate import DecodeError

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DIRECT_IO_MIN",
    "BytesWriter",
    "QEMUFileReader",
    "QEMUFileWriter",
    "StreamError",
    "bytes_reader",
    "bytes_writer",
    "open_reader",
    "open_writer",
    "socket_reader",
    "socket_writer",
]

DEFAULT_BUFFER_SIZE = 1 << 20
"""Internal buffer size: big enough that framing fields rarely cause a system call."""

DIRECT_IO_MIN = 64 << 10
"""Payloads at least this large skip the internal buffer (no extra copy)."""

_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


StreamError = DecodeError
"""A malformed or truncated migration stream (offset, problem): the class device state
decoding raises too, defined with it in :mod:`livemig.devices.vmstate`."""


def _byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (bytes, mmap, numpy array...)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


# -- transports -------------------------------------------------------------------------------


def _make_sender(transport: Any) -> Callable[[list[memoryview]], None]:
    """Return ``send(views)`` that writes all views, in order, completely.

    Sockets with ``sendmsg`` get scatter-gather so that a buffered header and a page
    payload leave in one system call; partial sends are resumed.
    """
    if type(transport) is socket.socket:  # not ssl.SSLSocket: its sendmsg is unsupported
        sendmsg = transport.sendmsg

        def send_socket(views: list[memoryview]) -> None:
            views = [v for v in views if len(v)]
            while views:
                n = sendmsg(views)
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if n:
                    views[0] = views[0][n:]

        return send_socket

    sendall = getattr(transport, "sendall", None)
    if sendall is not None:

        def send_all(views: list[memoryview]) -> None:
            for v in views:
                if len(v):
                    sendall(v)

        return send_all

    write = getattr(transport, "write", None)
    if write is None:
        raise TypeError(f"{type(transport).__name__} is not a writable transport (sendall/write)")

    def send_file(views: list[memoryview]) -> None:
        for v in views:
            while len(v):
                n = write(v)
                if n is None:
                    raise BlockingIOError("non-blocking transport is not supported")
                v = v[n:]

    return send_file


def _make_receiver(transport: Any) -> Callable[[memoryview], int]:
    """Return ``recv(view) -> n`` reading up to ``len(view)`` bytes; 0 means end of stream."""
    recv_into = getattr(transport, "recv_into", None)
    if recv_into is not None:
        return lambda view: recv_into(view, len(view))
    readinto = getattr(transport, "readinto", None)
    if readinto is None:
        raise TypeError(
            f"{type(transport).__name__} is not a readable transport (recv_into/readinto)"
        )

    def recv_file(view: memoryview) -> int:
        n = readinto(view)
        if n is None:
            raise BlockingIOError("non-blocking transport is not supported")
        return n

    return recv_file


# -- writer -----------------------------------------------------------------------------------


class QEMUFileWriter:
    """Buffered writer of big-endian fields and raw payloads.

    ``transport`` is a socket (``sendmsg``/``sendall``) or a binary file object
    (``write``). Nothing reaches the transport until the buffer fills, :meth:`flush` is
    called, or a large payload is written with :meth:`write_view`.
    """

    def __init__(
        self,
        transport: Any,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        *,
        owns_transport: bool = False,
    ) -> None:
        if buffer_size < 64:
            raise ValueError(f"buffer_size {buffer_size} is too small")
        self.transport = transport
        self._send = _make_sender(transport)
        self._tflush = getattr(transport, "flush", None)
        self._owns = owns_transport
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._sent = 0
        self._closed = False

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        """Total stream bytes written so far, including those still buffered."""
        return self._sent + self._pos

    def tell(self) -> int:
        """Absolute offset of the next byte to be written (same as :attr:`bytes_written`)."""
        return self._sent + self._pos

    @property
    def buffer_size(self) -> int:
        return len(self._buf)

    def _room(self, n: int) -> int:
        """Ensure ``n`` free bytes in the buffer; return the write position."""
        if self._pos + n > len(self._buf):
            self.flush()
        return self._pos

    # -- fixed-size fields ------------------------------------------------------------------
    def _put(self, st: struct.Struct, value: int, what: str) -> None:
        p = self._room(st.size)
        try:
            st.pack_into(self._buf, p, value)
        except struct.error:
            raise ValueError(f"{value!r} does not fit in a {what}") from None
        self._pos = p + st.size

    def put_u8(self, value: int) -> None:
        self._put(_U8, value, "u8")

    def put_be16(self, value: int) -> None:
        self._put(_BE16, value, "be16")

    def put_be32(self, value: int) -> None:
        self._put(_BE32, value, "be32")

    def put_be64(self, value: int) -> None:
        self._put(_BE64, value, "be64")

    # -- byte strings -----------------------------------------------------------------------
    def put_bytes(self, data: Any) -> None:
        """Write a byte buffer; large ones go straight to the transport (see ``write_view``)."""
        mv = _byte_view(data)
        n = len(mv)
        p = self._pos
        if n <= len(self._buf) - p:
            self._mv[p : p + n] = mv
            self._pos = p + n
        elif n >= DIRECT_IO_MIN or n > len(self._buf):
            self.write_view(mv)
        else:
            self.flush()
            self._mv[:n] = mv
            self._pos = n

    def put_counted_string(self, s: str | bytes) -> None:
        """``u8 len, bytes``: how QEMU writes idstrs and RAM block names."""
        b = s.encode() if isinstance(s, str) else bytes(s)
        if len(b) > 0xFF:
            raise ValueError(f"counted string of {len(b)} bytes exceeds 255: {b[:32]!r}...")
        p = self._room(1 + len(b))
        self._buf[p] = len(b)
        self._mv[p + 1 : p + 1 + len(b)] = b
        self._pos = p + 1 + len(b)

    def write_view(self, data: Any) -> None:
        """Send ``data`` now, after whatever is buffered, without copying it.

        Meant for guest RAM: the caller's buffer (memoryview, mmap, numpy array) is handed
        to the transport as is. The caller may reuse it as soon as this returns.
        """
        mv = _byte_view(data)
        self._check_open()
        pending = self._mv[: self._pos]
        self._send([pending, mv])
        self._sent += self._pos + len(mv)
        self._pos = 0

    # -- direct buffer access for vectorized encoders ---------------------------------------
    def reserve(self, n: int) -> memoryview:
        """Return ``n`` writable bytes at the end of the buffer (flushing first if needed).

        Fill them, then call :meth:`commit` with the number of bytes actually used. The
        view is only valid until the next call on this writer.
        """
        if n < 0 or n > len(self._buf):
            raise ValueError(f"cannot reserve {n} bytes in a {len(self._buf)}-byte buffer")
        p = self._room(n)
        return self._mv[p : p + n]

    def commit(self, n: int) -> None:
        """Mark ``n`` bytes of the last :meth:`reserve` as written."""
        if n < 0 or self._pos + n > len(self._buf):
            raise ValueError(f"cannot commit {n} bytes at buffer position {self._pos}")
        self._pos += n

    # -- flushing ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O on a closed QEMUFileWriter")

    def flush(self) -> None:
        """Hand everything buffered to the transport (and flush a file object's own buffer)."""
        self._check_open()
        if self._pos:
            self._send([self._mv[: self._pos]])
            self._sent += self._pos
            self._pos = 0
        if self._tflush is not None:
            self._tflush()

    def close(self) -> None:
        """Flush, and close the transport if this writer opened it. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._owns:
                self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytesWriter(QEMUFileWriter):
    """A writer into memory, for tests and for building small sub-streams."""

    def __init__(self, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self._bio = io.BytesIO()
        super().__init__(self._bio, buffer_size)

    def getvalue(self) -> bytes:
        """Everything written so far (flushes)."""
        self.flush()
        return self._bio.getvalue()


# -- reader -----------------------------------------------------------------------------------


class QEMUFileReader:
    """Buffered reader of big-endian fields and raw payloads.

    ``transport`` is a socket (``recv_into``) or a binary file object (``readinto``).
    ``offset`` is the absolute stream offset of the first byte the transport will yield;
    it only affects :meth:`tell` and error messages.

    Memoryviews returned by :meth:`fill` and :meth:`buffered` point into the internal
    buffer and are valid only until the next call that reads from this reader.
    """

    def __init__(
        self,
        transport: Any,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        *,
        offset: int = 0,
        owns_transport: bool = False,
    ) -> None:
        if buffer_size < 64:
            raise ValueError(f"buffer_size {buffer_size} is too small")
        self.transport = transport
        self._recv = _make_receiver(transport)
        # a connection (recv_into: a socket, TLS too): its end is the peer closing it
        self._connection = getattr(transport, "recv_into", None) is not None
        self._owns = owns_transport
        self._buf = bytearray(buffer_size)
        self._mv = memoryview(self._buf)
        self._start = 0  # first unread byte in _buf
        self._end = 0  # one past the last valid byte in _buf
        self._base = offset  # absolute stream offset of _buf[0]
        self._eof = False
        self._closed = False

    # -- position ---------------------------------------------------------------------------
    def tell(self) -> int:
        """Absolute stream offset of the next unread byte."""
        return self._base + self._start

    def _truncated(self, offset: int, wanted: int, got: int) -> StreamError:
        why = " (the peer closed the connection)" if self._connection else ""
        return StreamError(offset, f"truncated stream: wanted {wanted} bytes, got {got}{why}")

    # -- buffer access ------------------------------------------------------------------------
    def buffered(self) -> memoryview:
        """The unread bytes currently in the buffer (possibly empty); no I/O."""
        return self._mv[self._start : self._end]

    def consume(self, n: int) -> None:
        """Mark ``n`` bytes of :meth:`buffered` as read."""
        if n < 0 or n > self._end - self._start:
            raise ValueError(f"cannot consume {n} bytes, {self._end - self._start} buffered")
        self._start += n

    def fill(self, min_bytes: int = 1) -> memoryview:
        """Read until at least ``min_bytes`` are buffered, or the stream ends.

        Returns :meth:`buffered`, which may hold more than ``min_bytes`` (each read asks
        the transport for as much as fits) and fewer only at end of stream. Requests larger
        than the buffer grow it.
        """
        avail = self._end - self._start
        if avail >= min_bytes or self._eof:
            return self._mv[self._start : self._end]
        if self._closed:
            raise ValueError("I/O on a closed QEMUFileReader")
        if min_bytes > len(self._buf):
            new = bytearray(max(min_bytes, 2 * len(self._buf)))
            new[:avail] = self._mv[self._start : self._end]
            self._buf = new
            self._mv = memoryview(new)
            self._base += self._start
            self._start, self._end = 0, avail
        elif self._start:
            # move the unread tail to the front so each read gets the largest free space
            self._mv[:avail] = self._mv[self._start : self._end]
            self._base += self._start
            self._start, self._end = 0, avail
        mv, recv = self._mv, self._recv
        while self._end - self._start < min_bytes:
            n = recv(mv[self._end :])
            if not n:
                self._eof = True
                break
            self._end += n
        return mv[self._start : self._end]

    def seek(self, offset: int) -> None:
        """Go on reading at stream offset ``offset`` of a file read from its start; what
        is buffered is dropped (a mapped-ram stream skips each block's page region)."""
        seekable = getattr(self.transport, "seekable", None)
        if seekable is None or not seekable():
            raise StreamError(self.tell(), "the stream cannot seek here (not a file)")
        self.transport.seek(offset)
        self._base = offset
        self._start = self._end = 0
        self._eof = False

    def at_eof(self) -> bool:
        """True if no byte is left (reads from the transport to find out)."""
        return not len(self.fill(1))

    def _take(self, n: int) -> int:
        """Consume ``n`` bytes from the buffer and return the index of the first one."""
        s = self._start
        if self._end - s < n:
            off = self.tell()
            got = len(self.fill(n))
            if got < n:
                raise self._truncated(off, n, got)
            s = self._start
        self._start = s + n
        return s

    # -- fixed-size fields --------------------------------------------------------------------
    def get_u8(self) -> int:
        s = self._take(1)
        return self._buf[s]

    def get_be16(self) -> int:
        s = self._take(2)
        return _BE16.unpack_from(self._buf, s)[0]

    def get_be32(self) -> int:
        s = self._take(4)
        return _BE32.unpack_from(self._buf, s)[0]

    def get_be64(self) -> int:
        s = self._take(8)
        return _BE64.unpack_from(self._buf, s)[0]

    # -- byte strings ---------------------------------------------------------------------------
    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes without consuming them (fewer only at end of stream)."""
        mv = self.fill(n)
        return bytes(mv[:n])

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes as ``bytes``. For large payloads prefer :meth:`readinto_exact`."""
        if n < 0:
            raise ValueError(f"negative read size {n}")
        if n <= len(self._buf):
            s = self._take(n)
            return bytes(self._mv[s : s + n])
        out = bytearray(n)
        self.readinto_exact(out)
        return bytes(out)

    def readinto_exact(self, dest: Any) -> None:
        """Fill the writable buffer ``dest`` completely from the stream.

        Buffered bytes are copied first; once the buffer is empty, a remainder of at least
        :data:`DIRECT_IO_MIN` bytes is received directly into ``dest`` (guest RAM).
        """
        view = _byte_view(dest)
        n = len(view)
        off = self.tell()
        s, e = self._start, self._end
        k = min(e - s, n)
        view[:k] = self._mv[s : s + k]
        self._start = s + k
        got = k
        while got < n:
            remaining = n - got
            if remaining >= DIRECT_IO_MIN and not self._eof:
                # buffer is empty here: read straight into the destination
                r = self._recv(view[got:])
                if not r:
                    self._eof = True
                    raise self._truncated(off, n, got)
                self._base += r
                got += r
                continue
            mv = self.fill(min(remaining, len(self._buf)))
            k = min(len(mv), remaining)
            if not k:
                raise self._truncated(off, n, got)
            view[got : got + k] = mv[:k]
            self._start += k
            got += k

    def skip(self, n: int) -> None:
        """Discard ``n`` bytes."""
        off = self.tell()
        remaining = n
        while remaining:
            mv = self.fill(min(remaining, len(self._buf)))
            k = min(len(mv), remaining)
            if not k:
                raise self._truncated(off, n, n - remaining)
            self._start += k
            remaining -= k

    def get_counted_string(self) -> bytes:
        """``u8 len, bytes``."""
        off = self.tell()
        try:
            n = self.get_u8()
            return self.read_exact(n)
        except StreamError as e:
            raise StreamError(e.offset, f"counted string at {off:#x}: {e.problem}") from None

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the transport if this reader opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns:
            self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- constructors for the usual transports --------------------------------------------------


def socket_writer(sock: Any, buffer_size: int = DEFAULT_BUFFER_SIZE) -> QEMUFileWriter:
    """Writer on a connected socket; the caller keeps ownership of the socket."""
    return QEMUFileWriter(sock, buffer_size)


def socket_reader(sock: Any, buffer_size: int = DEFAULT_BUFFER_SIZE) -> QEMUFileReader:
    """Reader on a connected socket; the caller keeps ownership of the socket."""
    return QEMUFileReader(sock, buffer_size)


def open_writer(
    path: str | os.PathLike[str], buffer_size: int = DEFAULT_BUFFER_SIZE
) -> QEMUFileWriter:
    """Create (truncate) ``path`` and return a writer that closes it on :meth:`close`."""
    f = open(path, "wb", buffering=0)  # closed by the writer
    return QEMUFileWriter(f, buffer_size, owns_transport=True)


def open_reader(
    path: str | os.PathLike[str], buffer_size: int = DEFAULT_BUFFER_SIZE
) -> QEMUFileReader:
    """Open ``path`` and return a reader that closes it on :meth:`close`."""
    f = open(path, "rb", buffering=0)  # closed by the reader
    return QEMUFileReader(f, buffer_size, owns_transport=True)


def bytes_reader(
    data: bytes | bytearray | memoryview | io.BytesIO,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    *,
    offset: int = 0,
) -> QEMUFileReader:
    """Reader over in-memory data (tests, PACKAGED sub-streams)."""
    bio = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    return QEMUFileReader(bio, buffer_size, offset=offset)


def bytes_writer(buffer_size: int = DEFAULT_BUFFER_SIZE) -> BytesWriter:
    """Writer into memory; :meth:`BytesWriter.getvalue` returns the stream."""
    return BytesWriter(buffer_size)
