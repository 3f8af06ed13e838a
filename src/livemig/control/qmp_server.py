"""A QMP (QEMU Machine Protocol) server on a unix or TCP socket.

Management tools already speak QMP to QEMU: the ``qemu.qmp`` library, ``qmp-shell``,
libvirt-style scripts, or plain ``socat``. Speaking the same wire protocol lets them drive a
livemig VM unchanged, so this module follows QEMU's observable behaviour closely: the
greeting, capabilities negotiation, the error classes and descriptions, request framing that
does not depend on newlines (:mod:`.qmp_protocol`), argument checking against the handler's
signature (:mod:`.qmp_commands`), events only for negotiated clients, and QEMU's rate limit
on events a guest can trigger (:mod:`.qmp_events`).

Threading model. The VM process is multi-threaded (vCPUs, migration), so the server owns a
private asyncio event loop on a daemon thread and never asks its caller to be async:

* ``emit()`` may be called from any thread; the event is time-stamped at the call and
  handed to the loop, which writes it to every negotiated client.
* Command handlers run on a small worker pool, not on the loop, so a handler that waits
  (say, for the vCPUs to pause) does not stall other clients. Each client's requests are
  still answered strictly in order, one at a time, as QEMU does. Handlers serving
  *different* clients can run concurrently and must therefore be thread-safe, which they
  need to be anyway since they never run on a VM thread.

Memory. Clients cannot make the server hold unbounded memory: at most ``max_clients``
connections (QEMU serves one per monitor), one message of at most 16 MiB each, at most
``max_input_bytes`` of unanswered input for all clients together (partial messages and
queued requests; the client whose input crosses the limit gets an error and is
disconnected) and a bounded output buffer per client.

Socket file (unix). Created 0600 whatever the umask, present only once the socket listens,
and an existing file at the path is only ever removed when it is our own stale socket; see
:mod:`.qmp_address`.

Out-of-band execution is not offered in the greeting; ``exec-oob`` is accepted and treated
like ``execute``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from livemig.control.qmp_address import (
    QMPAddressError,
    QMPSocketError,
    open_listener,
    parse_address,
)
from livemig.control.qmp_commands import Command, bind_arguments, build_command, call_handler
from livemig.control.qmp_events import QEMU_THROTTLED_EVENTS, EventThrottle
from livemig.control.qmp_protocol import (
    InputOverflow,
    JSONSplitter,
    QMPError,
    check_envelope,
    error_reply,
    parse_json,
)
from livemig.migration.channels import remove_own_socket

__all__ = [
    "DEFAULT_VERSION",
    "QMPAddressError",
    "QMPError",
    "QMPServer",
    "QMPSocketError",
]

log = logging.getLogger(__name__)

#: QEMU version reported in the greeting and by ``query-version`` unless told otherwise.
#: Clients gate features on it, so it names a real QEMU release.
DEFAULT_VERSION: tuple[int, int, int] = (10, 2, 0)

# Limits that keep misbehaving clients from exhausting memory. QEMU queues at most 8
# requests per client before it stops reading.
_REQUEST_QUEUE_LEN = 8
_MAX_OUTPUT_BUFFER = 2 * 1024 * 1024
_READ_CHUNK = 64 * 1024
#: Connections served at once (QEMU serves one per monitor; more wait in its backlog).
MAX_CLIENTS = 16
#: Unanswered input (partial messages and queued requests) of all clients together.
MAX_INPUT_BYTES = 32 * 1024 * 1024

_NEGOTIATION_EXPECTED = "Expecting capabilities negotiation with 'qmp_capabilities'"
_NEGOTIATION_DONE = "Capabilities negotiation is already complete, command ignored"


class _Client:
    """Per-connection state, touched only on the event loop thread."""

    __slots__ = ("number", "writer", "negotiated", "task", "partial", "queued", "held")

    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.negotiated = False
        self.task: asyncio.Task[None] | None = None
        self.partial = 0  # bytes of the message being received
        self.queued = 0  # bytes of received requests not yet answered
        self.held = 0  # partial + queued, as counted in the server's total

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
    """QMP server on a unix or TCP socket, running on its own event loop thread.

    Typical use::

        server = QMPServer("unix:/run/vm1/qmp.sock")   # or "tcp:127.0.0.1:4444"

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
        address: str,
        version: tuple[int, int, int] = DEFAULT_VERSION,
        *,
        package: str = "livemig",
        max_workers: int = 4,
        max_clients: int = MAX_CLIENTS,
        max_input_bytes: int = MAX_INPUT_BYTES,
        event_rates: Mapping[str, tuple[float, str | None]] = QEMU_THROTTLED_EVENTS,
    ) -> None:
        if not address:
            raise ValueError("QMP socket path is empty")
        try:
            self._address = parse_address(address)
        except QMPAddressError as e:
            raise ValueError(str(e)) from None
        if len(version) != 3 or not all(isinstance(v, int) and v >= 0 for v in version):
            raise ValueError(f"QMP version must be three non-negative ints, got {version!r}")
        #: The unix socket's path ("" for TCP).
        self.path = self._address.path
        self.version = (version[0], version[1], version[2])
        self.package = package
        self.max_clients = max_clients
        self.max_input_bytes = max_input_bytes
        self._event_rates = dict(event_rates)
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        for name, func in (
            ("qmp_capabilities", self._qmp_capabilities),
            ("query-commands", self._query_commands),
            ("query-version", self._query_version),
        ):
            self._commands[name] = build_command(name, func, inline=True)
        self._state = "new"  # -> "running" -> "stopped"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_event: asyncio.Event | None = None
        self._throttle: EventThrottle | None = None
        self._clients: set[_Client] = set()
        self._client_numbers = itertools.count(1)
        self._input_held = 0
        self._socket_ino: int | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """Where clients connect, as a QEMU address (the real port once a TCP server runs)."""
        return str(self._address)

    # ---- registration

    def register(self, name: str, handler: Callable[..., Any]) -> None:
        """Make ``handler`` answer command ``name``; also allowed while running.

        ``handler(**arguments)`` runs on a worker thread. Its return value is the reply
        (``None`` means ``{}``); raising ``QMPError`` sends that error, any other exception
        is logged and sent as ``GenericError``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("QMP command name must be a non-empty string")
        cmd = build_command(name, handler)
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
            sock, self._socket_ino, self._address = open_listener(self._address)
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
            loop.call_soon_threadsafe(self._offer_event, event, data, text)

    def _offer_event(self, event: str, data: dict[str, Any] | None, text: str) -> None:
        if self._throttle is not None:
            self._throttle.offer(event, data, text)

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
        self._throttle = EventThrottle(asyncio.get_running_loop(), self._broadcast, self._event_rates)
        try:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._handle_client, sock=sock)
            else:
                server = await asyncio.start_server(self._handle_client, sock=sock)
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
        if len(self._clients) >= self.max_clients:
            await self._refuse(writer)
            return
        client = _Client(next(self._client_numbers), writer)
        client.task = asyncio.current_task()
        self._clients.add(client)
        queue: asyncio.Queue[bytes | str | None] = asyncio.Queue(_REQUEST_QUEUE_LEN)
        answerer = asyncio.create_task(self._answer_requests(client, queue))
        splitter = JSONSplitter()
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
                except InputOverflow as exc:
                    await queue.put(json.dumps(error_reply(str(exc))))
                    break
                client.partial = splitter.buffered
                client.queued += sum(len(p) for p in pieces)
                self._account(client)
                if self._input_held > self.max_input_bytes:
                    log.warning(
                        "QMP client %d: clients hold %d bytes of unanswered input (limit "
                        "%d); disconnecting it", client.number, self._input_held,
                        self.max_input_bytes,
                    )
                    await queue.put(json.dumps(error_reply(
                        f"QMP input limit reached: clients hold {self._input_held >> 20} MiB "
                        f"of unanswered input (limit {self.max_input_bytes >> 20} MiB); "
                        "disconnecting"
                    )))
                    client.partial = client.queued = 0
                    self._account(client)
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
            client.partial = client.queued = 0
            self._account(client)
            self._clients.discard(client)
            writer.close()

    def _account(self, client: _Client) -> None:
        """Bring the total of unanswered input (what the budget limits) up to date with
        what ``client`` holds now: its partial message plus its queued requests."""
        held = client.partial + client.queued
        self._input_held += held - client.held
        client.held = held

    @property
    def input_bytes_held(self) -> int:
        """Unanswered input all clients hold right now (read on the loop thread)."""
        return self._input_held

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """More clients than ``max_clients``: say why, instead of a greeting, and hang up."""
        log.warning("QMP: refusing a client, %d are connected (limit)", len(self._clients))
        desc = f"too many QMP clients ({len(self._clients)} connected, limit {self.max_clients})"
        with contextlib.suppress(Exception):
            writer.write(json.dumps(error_reply(desc)).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()

    async def _answer_requests(
        self, client: _Client, queue: asyncio.Queue[bytes | str | None]
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            text = item if isinstance(item, str) else await self._execute(client, item)
            if isinstance(item, bytes):
                client.queued = max(client.queued - len(item), 0)
                self._account(client)
            if client.send(text):
                await client.drain()

    async def _execute(self, client: _Client, piece: bytes) -> str:
        """Answer one framed request; never raises, whatever the input or the handler do."""
        req_id: Any = None
        has_id = False
        name = "?"
        reply: dict[str, Any]
        try:
            req = parse_json(piece)
            if isinstance(req, dict) and "id" in req:
                has_id, req_id = True, req["id"]
            name, args = check_envelope(req)
            if not client.negotiated:
                if name != "qmp_capabilities":
                    raise QMPError(_NEGOTIATION_EXPECTED, "CommandNotFound")
            elif name == "qmp_capabilities":
                raise QMPError(_NEGOTIATION_DONE, "CommandNotFound")
            cmd = self._commands.get(name)
            if cmd is None:
                raise QMPError(f"The command {name} has not been found", "CommandNotFound")
            kwargs = bind_arguments(cmd, args)
            if cmd.inline:
                result = cmd.func(**kwargs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, call_handler, cmd, kwargs)
            if name == "qmp_capabilities":
                client.negotiated = True
            reply = {"return": {} if result is None else result}
        except QMPError as exc:
            reply = error_reply(exc.desc, exc.cls)
        except Exception as exc:
            log.exception("QMP command %s: internal error", name)
            reply = error_reply(f"internal error: {exc}")
        if has_id:
            reply["id"] = req_id
        try:
            return json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError) as exc:
            log.error("QMP command %s returned a value that is not JSON: %s", name, exc)
            reply = error_reply(f"command {name} returned a value that is not valid JSON")
            if has_id:
                reply["id"] = req_id
            return json.dumps(reply)

    def _remove_socket_file(self) -> None:
        """Unlink the socket file, but only if it is still the one we created."""
        ino, self._socket_ino = self._socket_ino, None
        if ino is not None:
            remove_own_socket(self.path, ino)
