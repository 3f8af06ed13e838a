"""A QMP (QEMU Machine Protocol) server on a unix socket.

Management tools already speak QMP to QEMU: the ``qemu.qmp`` library, ``qmp-shell``,
libvirt-style scripts, or plain ``socat``. Speaking the same wire protocol lets them drive a
livemig VM unchanged, so this module follows QEMU's observable behaviour closely: the
greeting, capabilities negotiation, the error classes and descriptions, request framing that
does not depend on newlines, and events only for negotiated clients.

Threading model. The VM process is multi-threaded (vCPUs, migration), so the server owns a
private asyncio event loop on a daemon thread and never asks its caller to be async:

* ``emit()`` may be called from any thread; the event is time-stamped at the call and
  handed to the loop, which writes it to every negotiated client.
* Command handlers run on a small worker pool, not on the loop, so a handler that waits
  (say, for the vCPUs to pause) does not stall other clients. Each client's requests are
  still answered strictly in order, one at a time, as QEMU does. Handlers serving
  *different* clients can run concurrently and must therefore be thread-safe, which they
  need to be anyway since they never run on a VM thread.

Socket file. The socket is created 0600 (it is full control of the VM) and an existing file
at the path is only ever removed when it is our own stale socket; see ``_claim_path``.

Only unix sockets are supported. Out-of-band execution is not offered in the greeting;
``exec-oob`` is accepted and treated like ``execute``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_VERSION", "QMPError", "QMPServer", "QMPSocketError"]

log = logging.getLogger(__name__)

#: QEMU version reported in the greeting and by ``query-version`` unless told otherwise.
#: Clients gate features on it, so it names a real QEMU release.
DEFAULT_VERSION: tuple[int, int, int] = (10, 2, 0)

# Limits that keep one misbehaving client from exhausting memory. QEMU uses the same
# nesting limit and queues at most 8 requests per client before it stops reading.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_MAX_NESTING = 1024
_REQUEST_QUEUE_LEN = 8
_MAX_OUTPUT_BUFFER = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024

_NEGOTIATION_EXPECTED = "Expecting capabilities negotiation with 'qmp_capabilities'"
_NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"


class QMPError(Exception):
    """Raised by a command handler to make the client receive a QMP error reply.

    The error *class* is explicit because clients branch on it (``DeviceNotFound``,
    ``CommandNotFound``, ...); any other exception escaping a handler is reported as
    ``GenericError`` with ``str(exc)`` as its description.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class QMPSocketError(OSError):
    """The socket path cannot be used: in use, or something we must not remove is there.

    A subclass of ``OSError`` so that callers handle it together with bind failures.
    """


# --------------------------------------------------------------------------------------
# Commands and their arguments


_JSON_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class _Param:
    py_name: str
    required: bool
    #: Python types of acceptable JSON values, or None when the annotation is not checked.
    accepted: frozenset[type] | None
    expected: str


@dataclass(frozen=True)
class _Command:
    name: str
    func: Callable[..., Any]
    params: dict[str, _Param]  # keyed by QMP (dashed) name
    accepts_extra: bool  # the handler has **kwargs
    inline: bool  # built-ins run on the loop: they are instant and touch per-client state


def _type_spec(annotation: Any) -> tuple[frozenset[type], str] | None:
    """Map an annotation to the JSON types it admits, if it is simple enough to check.

    Checking here gives clients QEMU's "Invalid parameter type" error instead of whatever a
    handler does with a string where it wanted an int. Annotations we do not understand
    (unresolved strings, Literal, custom classes) are left to the handler.
    """
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
    else:
        members = (annotation,)
    accepted: set[type] = set()
    names: list[str] = []
    for member in members:
        if member is type(None):
            accepted.add(type(None))
            continue
        base = typing.get_origin(member) or member
        if base not in _JSON_TYPE_NAMES:
            return None
        accepted.add(base)
        names.append(_JSON_TYPE_NAMES[base])
    return frozenset(accepted), " or ".join(names) or "null"


def _json_value_matches(value: Any, accepted: frozenset[type]) -> bool:
    if isinstance(value, bool):  # before int: bool is an int subclass, JSON keeps them apart
        return bool in accepted
    if isinstance(value, int):  # a JSON integer is also a valid "number"
        return int in accepted or float in accepted
    return type(value) in accepted


def _build_command(name: str, func: Callable[..., Any], *, inline: bool = False) -> _Command:
    """Work out once, at registration, which QMP arguments a handler takes.

    Registration is where a handler that can never be called by name (positional-only
    parameters without defaults) should fail, not at the first client request.
    """
    try:
        sig = inspect.signature(func, eval_str=True)
    except Exception:  # annotations naming TYPE_CHECKING-only imports: skip type checks
        sig = inspect.signature(func)
    params: dict[str, _Param] = {}
    accepts_extra = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            if p.default is inspect.Parameter.empty:
                raise TypeError(
                    f"QMP command {name!r}: handler parameter {p.name!r} is positional-only "
                    "and cannot receive a QMP argument"
                )
        else:
            spec = _type_spec(p.annotation)
            params[p.name.replace("_", "-")] = _Param(
                py_name=p.name,
                required=p.default is inspect.Parameter.empty,
                accepted=spec[0] if spec else None,
                expected=spec[1] if spec else "",
            )
    return _Command(name, func, params, accepts_extra, inline)


def _bind_arguments(cmd: _Command, args: dict[str, Any]) -> dict[str, Any]:
    """Turn QMP arguments into handler keyword arguments, with QEMU's error messages."""
    for qmp_name, param in cmd.params.items():
        if param.required and qmp_name not in args:
            raise QMPError(f"Parameter '{qmp_name}' is missing")
    declared = {p.py_name for p in cmd.params.values()}
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        param = cmd.params.get(key)
        if param is None:
            py_name = key.replace("-", "_")
            # The underscore spelling of a declared parameter is not an alias for it.
            if not cmd.accepts_extra or py_name in declared or py_name in kwargs:
                raise QMPError(f"Parameter '{key}' is unexpected")
            kwargs[py_name] = value
            continue
        if param.accepted is not None and not _json_value_matches(value, param.accepted):
            raise QMPError(f"Invalid parameter type for '{key}', expected: {param.expected}")
        kwargs[param.py_name] = value
    return kwargs


def _call_handler(cmd: _Command, kwargs: dict[str, Any]) -> Any:
    """Run a handler on a worker thread, turning every failure into a QMPError.

    Anything else escaping into the executor future would be re-raised on the event loop,
    and a SystemExit there would take the whole server down.
    """
    try:
        return cmd.func(**kwargs)
    except QMPError:
        raise
    except BaseException as exc:
        log.exception("QMP command %s failed", cmd.name)
        raise QMPError(str(exc) or type(exc).__name__) from exc


# --------------------------------------------------------------------------------------
# Framing and parsing of the input stream

_ANY_NON_SPACE = re.compile(rb"\S")
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb'[\s{}\[\]"]')


class _InputOverflow(Exception):
    """A client sent a value too large or too deeply nested to buffer."""


class _JSONSplitter:
    """Cut a byte stream into top-level JSON texts.

    QMP does not require newlines: QEMU accepts a request split across lines, or several
    on one line, so framing follows brackets and strings rather than ``readline()``. Only
    framing happens here; each piece is then parsed on its own, so a malformed piece costs
    one error reply and the stream picks up again at the next top-level value.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte to look at
        self._start = -1  # where the current value began; -1 between values
        self._depth = 0
        self._in_string = False
        self._in_scalar = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        n = len(buf)
        pos = self._pos
        while pos < n:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                if buf[m.start()] == 0x5C:  # backslash: skip it and the escaped byte
                    pos = m.start() + 2
                    continue
                pos = m.end()
                self._in_string = False
                if self._depth == 0:
                    out.append(bytes(buf[self._start : pos]))
                    self._start = -1
            elif self._start < 0:
                m = _ANY_NON_SPACE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = self._start = m.start()
                c = buf[pos]
                if c in b"{[":
                    self._depth = 1
                    pos += 1
                elif c == 0x22:
                    self._in_string = True
                    pos += 1
                elif c in b"}]":  # stray closer: a one-byte piece that fails to parse
                    pos += 1
                    out.append(bytes(buf[self._start : pos]))
                    self._start = -1
                else:
                    self._in_scalar = True
            elif self._in_scalar:
                m = _SCALAR_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                out.append(bytes(buf[self._start : pos]))
                self._start = -1
                self._in_scalar = False
            else:
                m = _STRUCTURAL.search(buf, pos)
                if m is None:
                    pos = n
                    break
                c = buf[m.start()]
                pos = m.end()
                if c == 0x22:
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > _MAX_NESTING:
                        raise _InputOverflow("JSON parse error, nesting too deep")
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(bytes(buf[self._start : pos]))
                        self._start = -1
        # Drop what is consumed. pos may be one past the end after a trailing backslash.
        keep_from = min(pos, n) if self._start < 0 else self._start
        del buf[:keep_from]
        self._pos = pos - keep_from
        if self._start >= 0:
            self._start = 0
        if len(buf) > _MAX_MESSAGE_BYTES:
            raise _InputOverflow("JSON parse error, message too large")
        return out


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid token '{name}'")


def _parse_json(piece: bytes) -> Any:
    """Parse one framed piece as strict JSON (UTF-8, no NaN/Infinity, no duplicate keys)."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        raise QMPError("JSON parse error, invalid UTF-8 sequence") from None
    try:
        return json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise QMPError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}") from None
    except (ValueError, RecursionError) as exc:
        raise QMPError(f"JSON parse error, {exc}") from None


def _check_envelope(req: Any) -> tuple[str, dict[str, Any]]:
    """Validate the request object itself, before looking at the command."""
    if not isinstance(req, dict):
        raise QMPError("QMP input must be a JSON object")
    for key, value in req.items():
        if key in ("execute", "exec-oob"):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" in req and "exec-oob" in req:
        raise QMPError("QMP input must not contain both 'execute' and 'exec-oob'")
    name = req.get("execute", req.get("exec-oob"))
    if name is None:
        raise QMPError("QMP input lacks member 'execute'")
    return name, req.get("arguments", {})


def _error_reply(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


# --------------------------------------------------------------------------------------
# Socket file


def _claim_path(path: str) -> None:
    """Make ``path`` free for bind(), removing only our own stale socket.

    A VM that crashed leaves its socket behind, and refusing to start over it would make
    restarts need manual cleanup. Anything else is left alone: a live socket belongs to a
    running VM, and a regular file, a symlink or another user's socket may be a mistake or
    an attack (a symlink planted to make us delete or bind somewhere else). lstat() is used
    so that a symlink is never followed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise QMPSocketError(f"refusing to use QMP socket path {path}: it is a symbolic link")
    if not stat.S_ISSOCK(st.st_mode):
        raise QMPSocketError(
            f"refusing to use QMP socket path {path}: it exists and is not a socket"
        )
    if st.st_uid != os.geteuid():
        raise QMPSocketError(
            f"refusing to use QMP socket path {path}: it is owned by uid {st.st_uid}"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)  # a listener with a full backlog makes connect() wait
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale QMP socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except (TimeoutError, BlockingIOError):
        pass
    finally:
        probe.close()
    raise QMPSocketError(f"QMP socket {path} is in use")


def _open_listener(path: str) -> tuple[socket.socket, int]:
    """Bind and listen on ``path`` with mode 0600; return the socket and the file's inode.

    The process umask is not touched: it is process-wide and the VM has other threads that
    create files. On Linux, bind() gives the new file the mode of the socket inode, so an
    fchmod() beforehand creates it 0600 directly. Elsewhere the chmod() after bind() is
    still safe because nobody can connect before listen().
    """
    _claim_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        with contextlib.suppress(OSError):
            os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        bound = True
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock, st.st_ino


# --------------------------------------------------------------------------------------
# The server


class _Client:
    """Per-connection state, touched only on the event loop thread."""

    __slots__ = ("number", "writer", "negotiated", "task")

    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.negotiated = False
        self.task: asyncio.Task[None] | None = None

    def send(self, text: str) -> bool:
        """Queue one message; drop the client if it has stopped reading.

        Events are broadcast without waiting for each client to drain, so a client that
        never reads would otherwise make the server buffer without bound.
        """
        transport = self.writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > _MAX_OUTPUT_BUFFER:
            log.warning("QMP client %d stopped reading its messages; disconnecting", self.number)
            transport.abort()
            return False
        self.writer.write(text.encode() + b"\n")
        return True

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except Exception:  # the peer went away; the reader notices and cleans up
            pass


class QMPServer:
    """QMP server on a unix socket, running on its own event loop thread.

    Typical use::

        server = QMPServer("/run/vm1/qmp.sock")

        @server.command("migrate-set-parameters")
        def set_params(max_bandwidth: int | None = None) -> None: ...

        server.start()
        ...
        server.emit("STOP")
        ...
        server.stop()

    QMP argument names are the handler's parameter names with ``_`` spelled ``-``
    (``max_bandwidth`` is ``max-bandwidth``). Simple annotations (bool, int, float, str,
    list, dict, optionally ``| None``) are checked against the JSON value.
    """

    def __init__(
        self,
        path: str,
        version: tuple[int, int, int] = DEFAULT_VERSION,
        *,
        package: str = "livemig",
        max_workers: int = 4,
    ) -> None:
        if path.startswith("unix:"):
            path = path[len("unix:") :]
        if not path:
            raise ValueError("QMP socket path is empty")
        if len(version) != 3 or not all(isinstance(v, int) and v >= 0 for v in version):
            raise ValueError(f"QMP version must be three non-negative ints, got {version!r}")
        self.path = path
        self.version = (version[0], version[1], version[2])
        self.package = package
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._commands: dict[str, _Command] = {}
        for name, func in (
            ("qmp_capabilities", self._qmp_capabilities),
            ("query-commands", self._query_commands),
            ("query-version", self._query_version),
        ):
            self._commands[name] = _build_command(name, func, inline=True)
        self._state = "new"  # -> "running" -> "stopped"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_event: asyncio.Event | None = None
        self._clients: set[_Client] = set()
        self._client_numbers = itertools.count(1)
        self._socket_ino: int | None = None
        self._stopped = threading.Event()

    # ---- registration

    def register(self, name: str, handler: Callable[..., Any]) -> None:
        """Make ``handler`` answer command ``name``; also allowed while running.

        ``handler(**arguments)`` runs on a worker thread. Its return value is the reply
        (``None`` means ``{}``); raising ``QMPError`` sends that error, any other exception
        is logged and sent as ``GenericError``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("QMP command name must be a non-empty string")
        cmd = _build_command(name, handler)
        with self._lock:
            if name in self._commands:
                raise ValueError(f"QMP command {name!r} is already registered")
            self._commands[name] = cmd

    def command(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of ``register``; returns the function unchanged."""

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name, func)
            return func

        return decorator

    @property
    def commands(self) -> tuple[str, ...]:
        """Names of all commands, built-ins included, sorted."""
        with self._lock:
            return tuple(sorted(self._commands))

    @property
    def client_count(self) -> int:
        """Number of connected clients, negotiated or not."""
        return len(self._clients)

    # ---- lifecycle

    def start(self) -> None:
        """Bind, listen and start serving; return once clients can connect.

        Raises ``QMPSocketError`` (an ``OSError``) if the path is taken, and ``OSError`` for
        other bind failures, in the calling thread.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"QMP server cannot be started: it is {self._state}")
            self._state = "starting"
        try:
            sock, self._socket_ino = _open_listener(self.path)
        except BaseException:
            self._state = "new"
            raise
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self._max_workers, thread_name_prefix="qmp-worker"
        )
        self._loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_loop, args=(sock, ready), name="qmp-server", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            self._executor.shutdown(wait=False)
            self._remove_socket_file()
            self._state = "stopped"
            self._stopped.set()
            raise
        with self._lock:
            stop_requested = self._state == "stopped"  # stop() ran while we were starting
            self._state = "running"
        if stop_requested:
            self.stop()

    def stop(self) -> None:
        """Disconnect all clients, stop the loop and remove the socket file. Idempotent.

        Handlers still running on worker threads are not interrupted; their replies are
        dropped. May be called from a handler, but not from the event loop thread.
        """
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("QMPServer.stop() cannot run on the server's own loop thread")
        with self._lock:
            was_running = self._state == "running"
            if self._state == "new":
                self._stopped.set()  # never started: nothing to wait for
            self._state = "stopped"
        if not was_running:
            return
        assert self._loop is not None and self._thread is not None
        assert self._stop_event is not None and self._executor is not None
        with contextlib.suppress(RuntimeError):  # loop already gone
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._remove_socket_file()
        self._stopped.set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until ``stop()`` has finished, socket file included; True if it has.

        For a thread that did not stop the server itself, e.g. a main thread waiting while
        a ``quit`` command handler calls ``stop()``.
        """
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start if needed and block until ``stop()``, for a main thread with nothing else to do.

        Joins in short slices so that Ctrl-C is delivered promptly; any exception (including
        KeyboardInterrupt) stops the server on the way out.
        """
        if self._state == "new":
            self.start()
        try:
            while not self.wait_closed(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- events

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client. Thread-safe and non-blocking.

        The timestamp is taken here, in the caller, so it records when the event happened
        rather than when the loop got round to it. The data is serialised here too, so
        later mutation by the caller cannot leak into it and non-JSON data raises in the
        code that emitted it. Events emitted while the server is not running are dropped,
        as QEMU drops events nobody is connected to receive.
        """
        if not isinstance(event, str) or not event:
            raise ValueError("QMP event name must be a non-empty string")
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"QMP event data must be a dict, got {type(data).__name__}")
        now_us = time.time_ns() // 1000
        msg: dict[str, Any] = {"event": event}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}
        text = json.dumps(msg, allow_nan=False)
        loop = self._loop
        if loop is None or self._state != "running":
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: we are stopping
            loop.call_soon_threadsafe(self._broadcast, text)

    def _broadcast(self, text: str) -> None:
        for client in list(self._clients):
            if client.negotiated:
                client.send(text)

    # ---- built-in commands (run inline on the loop)

    def _qmp_capabilities(self, enable: list[Any] | None = None) -> None:
        if enable:
            names = ", ".join(str(cap) for cap in enable)
            raise QMPError(f"Capability {names} not available")

    def _query_commands(self) -> list[dict[str, str]]:
        return [{"name": name} for name in self.commands]

    def _query_version(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": self.package,
        }

    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self._query_version(), "capabilities": []}}

    # ---- event loop side

    def _run_loop(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sock, ready))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:
            log.exception("QMP server loop failed")
            if not ready.done():
                ready.set_exception(exc)
        finally:
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        self._stop_event = asyncio.Event()
        try:
            server = await asyncio.start_unix_server(self._handle_client, sock=sock)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for client in list(self._clients):
                client.writer.transport.abort()
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await server.wait_closed()
            for _ in range(3):  # let the transports' close callbacks run
                await asyncio.sleep(0)

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read and frame one client's input; a separate task answers it in order.

        The bounded queue between the two is what stops reading from a client that floods
        requests faster than they are answered.
        """
        client = _Client(next(self._client_numbers), writer)
        client.task = asyncio.current_task()
        self._clients.add(client)
        queue: asyncio.Queue[bytes | str | None] = asyncio.Queue(_REQUEST_QUEUE_LEN)
        answerer = asyncio.create_task(self._answer_requests(client, queue))
        splitter = _JSONSplitter()
        try:
            client.send(json.dumps(self._greeting()))
            while True:
                try:
                    data = await reader.read(_READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                try:
                    pieces = splitter.feed(data)
                except _InputOverflow as exc:
                    await queue.put(json.dumps(_error_reply(str(exc))))
                    break
                for piece in pieces:
                    await queue.put(piece)
            # EOF may be a half-close by a client still waiting for its replies (socat).
            await queue.put(None)
            await answerer
        except asyncio.CancelledError:
            # Only stop() cancels this task. Ending normally rather than cancelled avoids
            # asyncio 3.11's stream callback calling exception() on it, which logs an error.
            pass
        except Exception:
            log.exception("QMP client %d: unexpected failure", client.number)
        finally:
            answerer.cancel()
            self._clients.discard(client)
            writer.close()

    async def _answer_requests(
        self, client: _Client, queue: asyncio.Queue[bytes | str | None]
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            text = item if isinstance(item, str) else await self._execute(client, item)
            if client.send(text):
                await client.drain()

    async def _execute(self, client: _Client, piece: bytes) -> str:
        """Answer one framed request; never raises, whatever the input or the handler do."""
        req_id: Any = None
        has_id = False
        name = "?"
        reply: dict[str, Any]
        try:
            req = _parse_json(piece)
            if isinstance(req, dict) and "id" in req:
                has_id, req_id = True, req["id"]
            name, args = _check_envelope(req)
            if not client.negotiated:
                if name != "qmp_capabilities":
                    raise QMPError(_NEGOTIATION_EXPECTED, "CommandNotFound")
            elif name == "qmp_capabilities":
                raise QMPError(_NEGOTIATION_DONE, "CommandNotFound")
            cmd = self._commands.get(name)
            if cmd is None:
                raise QMPError(f"The command {name} has not been found", "CommandNotFound")
            kwargs = _bind_arguments(cmd, args)
            if cmd.inline:
                result = cmd.func(**kwargs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, _call_handler, cmd, kwargs)
            if name == "qmp_capabilities":
                client.negotiated = True
            reply = {"return": {} if result is None else result}
        except QMPError as exc:
            reply = _error_reply(exc.desc, exc.cls)
        except Exception as exc:
            log.exception("QMP command %s: internal error", name)
            reply = _error_reply(f"internal error: {exc}")
        if has_id:
            reply["id"] = req_id
        try:
            return json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError) as exc:
            log.error("QMP command %s returned a value that is not JSON: %s", name, exc)
            reply = _error_reply(f"command {name} returned a value that is not valid JSON")
            if has_id:
                reply["id"] = req_id
            return json.dumps(reply)

    def _remove_socket_file(self) -> None:
        """Unlink the socket file, but only if it is still the one we created."""
        ino, self._socket_ino = self._socket_ino, None
        if ino is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == ino and st.st_uid == os.geteuid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
