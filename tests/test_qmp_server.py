"""Tests for the QMP server.

Well-formed traffic goes through the real ``qemu.qmp`` clients (async and legacy sync), so a
deviation from the protocol as that library understands it fails here. Raw sockets cover
what a well-behaved client never sends: requests before negotiation, malformed or
mis-shaped JSON, oversized input, and hanging up in the middle of a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.control import qmp_protocol, qmp_server
from livemig.control.qmp_server import QMPError, QMPServer, QMPSocketError

VERSION = (9, 1, 2)
QUERY_VERSION_RETURN = {"qemu": {"major": 9, "minor": 1, "micro": 2}, "package": "livemig"}


@dataclass
class Probe:
    """What the test commands record, so tests can tell whether a handler really ran."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "qmp.sock")


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(sock_path: str, probe: Probe) -> Iterator[QMPServer]:
    srv = QMPServer(sock_path, version=VERSION)

    @srv.command("set-speed")
    def set_speed(
        max_bandwidth: int, downtime_limit: float = 0.3, verbose: bool = False
    ) -> dict[str, Any]:
        probe.calls.append({"max_bandwidth": max_bandwidth})
        return {
            "bandwidth-seen": max_bandwidth,
            "downtime-seen": downtime_limit,
            "verbose-seen": verbose,
        }

    @srv.command("find-device")
    def find_device(device: str) -> None:
        raise QMPError(f"Device '{device}' not found", "DeviceNotFound")

    @srv.command("explode")
    def explode() -> None:
        raise ValueError("boom")

    @srv.command("bad-return")
    def bad_return() -> Any:
        return {1, 2}

    @srv.command("nothing")
    def nothing() -> None:
        return None

    @srv.command("sleep")
    def sleep(seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    @srv.command("wait-gate")
    def wait_gate() -> bool:
        probe.started.set()
        return probe.release.wait(5)

    srv.start()
    yield srv
    probe.release.set()
    srv.stop()


def run(coro: Any) -> Any:
    """Run a client coroutine with a deadline so a protocol hang fails instead of stalling."""
    return asyncio.run(asyncio.wait_for(coro, 5))


async def connect(path: str) -> QMPClient:
    qmp = QMPClient("test")
    await qmp.connect(path)
    return qmp


def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Raw:
    """A byte-level QMP client: sends exactly what it is given, reads one line per message."""

    def __init__(self, path: str, negotiate: bool = False, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")
        self.greeting = self.recv()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\n')
            assert self.recv() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\n"), f"connection closed or partial message: {line!r}"
        return json.loads(line)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# ---- protocol through the real qemu.qmp clients


def test_greeting_has_qemu_shape_and_configured_version(server: QMPServer, sock_path: str):
    raw = Raw(sock_path)
    assert raw.greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 2, "minor": 1, "major": 9}, "package": "livemig"},
            "capabilities": [],
        }
    }
    raw.close()


def test_builtin_queries(server: QMPServer, sock_path: str):
    async def go() -> tuple[Any, Any, Any]:
        qmp = await connect(sock_path)
        try:
            greeting = qmp.greeting._asdict() if qmp.greeting else None
            return greeting, await qmp.execute("query-version"), await qmp.execute("query-commands")
        finally:
            await qmp.disconnect()

    greeting, version, commands = run(go())
    assert greeting is not None and greeting["QMP"]["version"] == QUERY_VERSION_RETURN
    assert version == QUERY_VERSION_RETURN
    names = [c["name"] for c in commands]
    assert all(set(c) == {"name"} for c in commands)
    for name in ("qmp_capabilities", "query-commands", "query-version", "set-speed", "sleep"):
        assert name in names
    assert sorted(names) == list(server.commands)


def test_default_version_is_a_qemu_release(sock_path: str):
    with QMPServer(sock_path):
        raw = Raw(sock_path)
        qemu = raw.greeting["QMP"]["version"]["qemu"]
        raw.close()
    assert (qemu["major"], qemu["minor"], qemu["micro"]) == qmp_server.DEFAULT_VERSION
    assert qmp_server.DEFAULT_VERSION >= (8, 0, 0)


def test_command_arguments_use_dashed_names(server: QMPServer, sock_path: str, probe: Probe):
    async def go() -> tuple[Any, Any]:
        qmp = await connect(sock_path)
        try:
            first = await qmp.execute("set-speed", {"max-bandwidth": 1000})
            second = await qmp.execute(
                "set-speed", {"max-bandwidth": 5, "downtime-limit": 2, "verbose": True}
            )
            return first, second
        finally:
            await qmp.disconnect()

    first, second = run(go())
    assert first == {"bandwidth-seen": 1000, "downtime-seen": 0.3, "verbose-seen": False}
    assert second == {"bandwidth-seen": 5, "downtime-seen": 2, "verbose-seen": True}
    assert probe.calls == [{"max_bandwidth": 1000}, {"max_bandwidth": 5}]


def test_handler_returning_none_replies_empty_object(server: QMPServer, sock_path: str):
    async def go() -> Any:
        qmp = await connect(sock_path)
        try:
            return await qmp.execute("nothing")
        finally:
            await qmp.disconnect()

    assert run(go()) == {}


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    [
        ("set-speed", {}, "Parameter 'max-bandwidth' is missing"),
        ("set-speed", {"max-bandwidth": 1, "bogus": 2}, "Parameter 'bogus' is unexpected"),
        (
            "set-speed",
            {"max-bandwidth": 1, "max_bandwidth": 2},
            "Parameter 'max_bandwidth' is unexpected",
        ),
        (
            "set-speed",
            {"max-bandwidth": "fast"},
            "Invalid parameter type for 'max-bandwidth', expected: integer",
        ),
        (
            "set-speed",
            {"max-bandwidth": True},
            "Invalid parameter type for 'max-bandwidth', expected: integer",
        ),
        (
            "set-speed",
            {"max-bandwidth": 1, "verbose": 1},
            "Invalid parameter type for 'verbose', expected: boolean",
        ),
        (
            "set-speed",
            {"max-bandwidth": 1, "downtime-limit": None},
            "Invalid parameter type for 'downtime-limit', expected: number",
        ),
        ("nothing", {"x": 1}, "Parameter 'x' is unexpected"),
    ],
)
def test_bad_arguments_are_rejected_before_the_handler_runs(
    server: QMPServer,
    sock_path: str,
    probe: Probe,
    command: str,
    arguments: dict[str, Any],
    desc: str,
):
    async def go() -> ExecuteError:
        qmp = await connect(sock_path)
        try:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(command, arguments)
            return info.value
        finally:
            await qmp.disconnect()

    err = run(go())
    assert err.error_class == "GenericError"
    assert str(err) == desc
    assert probe.calls == []


def test_command_errors_and_server_keeps_serving(
    server: QMPServer, sock_path: str, caplog: pytest.LogCaptureFixture
):
    async def expect_error(qmp: QMPClient, command: str, args: Any = None) -> tuple[str, str]:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute(command, args)
        return info.value.error_class, str(info.value)

    async def go() -> tuple[list[tuple[str, str]], Any]:
        qmp = await connect(sock_path)
        try:
            errors = [
                await expect_error(qmp, "no-such-command"),
                await expect_error(qmp, "find-device", {"device": "disk0"}),
                await expect_error(qmp, "explode"),
                await expect_error(qmp, "bad-return"),
                await expect_error(qmp, "qmp_capabilities"),
            ]
            still = await qmp.execute("set-speed", {"max-bandwidth": 1})
        finally:
            await qmp.disconnect()
        return errors, still

    with caplog.at_level(logging.ERROR, logger="livemig.control.qmp_server"):
        errors, still = run(go())
    assert errors == [
        ("CommandNotFound", "The command no-such-command has not been found"),
        ("DeviceNotFound", "Device 'disk0' not found"),
        ("GenericError", "boom"),
        ("GenericError", "command bad-return returned a value that is not valid JSON"),
        ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"),
    ]
    assert still["bandwidth-seen"] == 1
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], ValueError)]
    assert logged and "explode" in logged[0].getMessage()
    # A fresh client is served too.
    raw = Raw(sock_path, negotiate=True)
    raw.send(b'{"execute": "query-version", "id": 1}')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": 1}
    raw.close()


def test_event_emitted_from_another_thread(server: QMPServer, sock_path: str):
    async def go() -> tuple[float, float, Any, Any]:
        qmp = await connect(sock_path)
        try:
            before = time.time()
            emitter = threading.Thread(target=server.emit, args=("MIGRATION", {"status": "active"}))
            emitter.start()
            emitter.join()
            after = time.time()
            first = await asyncio.wait_for(qmp.events.get(), 3)
            server.emit("STOP")
            second = await asyncio.wait_for(qmp.events.get(), 3)
            return before, after, dict(first), dict(second)
        finally:
            await qmp.disconnect()

    before, after, first, second = run(go())
    assert set(first) == {"event", "data", "timestamp"}
    assert first["event"] == "MIGRATION" and first["data"] == {"status": "active"}
    stamp = first["timestamp"]
    assert isinstance(stamp["seconds"], int) and isinstance(stamp["microseconds"], int)
    assert 0 <= stamp["microseconds"] < 1_000_000
    assert before - 1e-3 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= after + 1e-3
    assert second["event"] == "STOP" and "data" not in second


def test_events_reach_every_negotiated_client_only(server: QMPServer, sock_path: str):
    unnegotiated = Raw(sock_path)

    async def go() -> tuple[Any, Any]:
        a = await connect(sock_path)
        b = await connect(sock_path)
        try:
            server.emit("RESUME", {"n": 1})
            ea = await asyncio.wait_for(a.events.get(), 3)
            eb = await asyncio.wait_for(b.events.get(), 3)
            return dict(ea), dict(eb)
        finally:
            await a.disconnect()
            await b.disconnect()

    ea, eb = run(go())
    assert ea["event"] == eb["event"] == "RESUME"
    assert ea["data"] == eb["data"] == {"n": 1}
    assert ea["timestamp"] == eb["timestamp"]
    # The broadcast has happened (a and b got it); the unnegotiated client must not have
    # been sent it, so its first message after negotiating is the negotiation reply.
    unnegotiated.send(b'{"execute": "qmp_capabilities"}')
    assert unnegotiated.recv() == {"return": {}}
    unnegotiated.close()


def test_legacy_sync_client(server: QMPServer, sock_path: str):
    qmp = QEMUMonitorProtocol(sock_path)
    try:
        greeting = qmp.connect(negotiate=True)
        assert greeting is not None and greeting["QMP"]["version"] == QUERY_VERSION_RETURN
        reply = qmp.cmd("set-speed", **{"max-bandwidth": 7})
        assert reply == {"bandwidth-seen": 7, "downtime-seen": 0.3, "verbose-seen": False}
        raw_reply = qmp.cmd_obj({"execute": "find-device", "arguments": {"device": "d"}})
        assert raw_reply == {"error": {"class": "DeviceNotFound", "desc": "Device 'd' not found"}}
        server.emit("STOP")
        event = qmp.pull_event(wait=3.0)
        assert event is not None and event["event"] == "STOP"
    finally:
        qmp.close()


def test_concurrent_clients_are_not_blocked_by_a_slow_handler(
    server: QMPServer, sock_path: str, probe: Probe
):
    a = Raw(sock_path, negotiate=True)
    a.send(b'{"execute": "wait-gate", "id": "a"}')
    assert probe.started.wait(3)
    b = Raw(sock_path, negotiate=True, timeout=2.0)
    b.send(b'{"execute": "query-version", "id": "b"}')
    assert b.recv() == {"return": QUERY_VERSION_RETURN, "id": "b"}
    assert not probe.release.is_set()
    probe.release.set()
    assert a.recv() == {"return": True, "id": "a"}
    a.close()
    b.close()


def test_replies_keep_per_client_order(server: QMPServer, sock_path: str):
    raw = Raw(sock_path, negotiate=True)
    raw.send(
        b'{"execute": "sleep", "arguments": {"seconds": 0.2}, "id": 1}\n'
        b'{"execute": "query-version", "id": 2}\n'
    )
    assert raw.recv() == {"return": "slept", "id": 1}
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": 2}
    raw.close()


# ---- raw protocol edge cases


def test_commands_before_negotiation_are_refused(server: QMPServer, sock_path: str, probe: Probe):
    raw = Raw(sock_path)
    expecting = {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
    }
    raw.send(b'{"execute": "query-version", "id": 7}\n')
    assert raw.recv() == {"error": expecting, "id": 7}
    raw.send(b'{"execute": "set-speed", "arguments": {"max-bandwidth": 1}}\n')
    assert raw.recv() == {"error": expecting}
    raw.send(b'{"execute": "no-such-command"}\n')
    assert raw.recv() == {"error": expecting}
    assert probe.calls == []
    # Asking for a capability that is not offered fails and leaves negotiation pending.
    raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 8}')
    assert raw.recv() == {
        "error": {"class": "GenericError", "desc": "Capability oob not available"},
        "id": 8,
    }
    raw.send(b'{"execute": "query-version"}')
    assert raw.recv() == {"error": expecting}
    raw.send(b'{"execute": "qmp_capabilities", "id": "neg"}')
    assert raw.recv() == {"return": {}, "id": "neg"}
    raw.send(b'{"execute": "query-version", "id": 9}')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": 9}
    raw.close()


def test_exec_oob_is_treated_like_execute(server: QMPServer, sock_path: str):
    raw = Raw(sock_path, negotiate=True)
    raw.send(b'{"exec-oob": "query-version", "id": "x"}')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": "x"}
    raw.close()


PARSE_ERROR = "JSON parse error, "


@pytest.mark.parametrize(
    ("data", "desc", "reply_id"),
    [
        (b'{"execute": }\n', PARSE_ERROR, None),
        (b"nonsense\n", PARSE_ERROR, None),
        (b"}\n", PARSE_ERROR, None),
        (b'{"execute": "query-version", "execute": "x"}', PARSE_ERROR, None),
        (b'{"execute": "set-speed", "arguments": {"max-bandwidth": NaN}}', PARSE_ERROR, None),
        (b'"\xff\xfe"', "JSON parse error, invalid UTF-8 sequence", None),
        (b"[1, 2]\n", "QMP input must be a JSON object", None),
        (b"42\n", "QMP input must be a JSON object", None),
        (b'"execute"', "QMP input must be a JSON object", None),
        (b'{"id": 3}', "QMP input lacks member 'execute'", 3),
        (
            b'{"execute": "query-version", "foo": 1, "id": 4}',
            "QMP input member 'foo' is unexpected",
            4,
        ),
        (
            b'{"execute": "query-version", "arguments": [1], "id": [5]}',
            "QMP input member 'arguments' must be an object",
            [5],
        ),
        (b'{"execute": 5}', "QMP input member 'execute' must be a string", None),
        (
            b'{"execute": "a", "exec-oob": "b"}',
            "QMP input must not contain both 'execute' and 'exec-oob'",
            None,
        ),
    ],
)
def test_malformed_input_gets_an_error_and_the_connection_survives(
    server: QMPServer, sock_path: str, data: bytes, desc: str, reply_id: Any
):
    raw = Raw(sock_path, negotiate=True)
    raw.send(data)
    reply = raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc)
    if desc == PARSE_ERROR:
        assert len(reply["error"]["desc"]) > len(PARSE_ERROR)
    if reply_id is None:
        assert "id" not in reply
    else:
        assert reply["id"] == reply_id
    raw.send(b'{"execute": "query-version", "id": "after"}')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": "after"}
    raw.close()


def test_requests_are_framed_by_json_not_by_lines(server: QMPServer, sock_path: str):
    raw = Raw(sock_path, negotiate=True)
    raw.send(b'{"execute": "query-version", "id": 1}{"execute": "nothing", "id": 2}\n')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN, "id": 1}
    assert raw.recv() == {"return": {}, "id": 2}
    # One request in three pieces, with braces and an escaped quote inside a string.
    raw.send(b'{"execute": "set-speed", "argu')
    time.sleep(0.05)
    raw.send(b'ments": {"max-bandwidth": 3},\n "id": "}{\\')
    time.sleep(0.05)
    raw.send(b'"x"}')
    reply = raw.recv()
    assert reply["id"] == '}{"x'
    assert reply["return"]["bandwidth-seen"] == 3
    raw.close()


def test_splitter_handles_any_chunking():
    stream = b' {"a": "}\\"{", "b": [1, {"c": 2}]}\n[3]  42\t"q\\\\"{"z":1}\n'
    expected = [{"a": '}"{', "b": [1, {"c": 2}]}, [3], 42, "q\\", {"z": 1}]
    whole = qmp_protocol.JSONSplitter().feed(stream)
    splitter = qmp_protocol.JSONSplitter()
    bytewise = [piece for i in range(len(stream)) for piece in splitter.feed(stream[i : i + 1])]
    assert [json.loads(p) for p in whole] == expected
    assert [json.loads(p) for p in bytewise] == expected


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": "x", "arguments": {"s": "' + b"a" * 4096, "message too large"),
        (b"[" * 1100, "nesting too deep"),
    ],
)
def test_oversized_input_drops_only_that_client(
    server: QMPServer, sock_path: str, monkeypatch: pytest.MonkeyPatch, data: bytes, desc: str
):
    monkeypatch.setattr(qmp_protocol, "MAX_MESSAGE_BYTES", 1024)
    other = Raw(sock_path, negotiate=True)
    raw = Raw(sock_path, negotiate=True)
    raw.send(data)
    assert raw.recv() == {"error": {"class": "GenericError", "desc": f"JSON parse error, {desc}"}}
    assert raw.reader.readline() == b""  # disconnected
    raw.close()
    other.send(b'{"execute": "query-version", "id": 1}')
    assert other.recv() == {"return": QUERY_VERSION_RETURN, "id": 1}
    other.close()


def test_clients_hanging_up_mid_request_do_not_hurt(
    server: QMPServer, sock_path: str, probe: Probe
):
    cut = Raw(sock_path, negotiate=True)
    cut.send(b'{"execute": "set-speed", "arguments": {"max-band')
    cut.close()
    mid_command = Raw(sock_path, negotiate=True)
    mid_command.send(b'{"execute": "sleep", "arguments": {"seconds": 0.1}}')
    mid_command.close()
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.connect(sock_path)
    garbage.sendall(b"\x00\xff{{{]]]\n")
    garbage.close()
    assert wait_until(lambda: server.client_count == 0)
    assert probe.calls == []  # the truncated request was never executed

    async def go() -> Any:
        qmp = await connect(sock_path)
        try:
            return await qmp.execute("set-speed", {"max-bandwidth": 9})
        finally:
            await qmp.disconnect()

    assert run(go())["bandwidth-seen"] == 9


def test_half_closed_client_still_gets_its_replies(server: QMPServer, sock_path: str):
    raw = Raw(sock_path)
    raw.send(
        b'{"execute": "qmp_capabilities"}\n'
        b'{"execute": "sleep", "arguments": {"seconds": 0.05}, "id": 1}\n'
    )
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.recv() == {"return": {}}
    assert raw.recv() == {"return": "slept", "id": 1}
    assert raw.reader.readline() == b""
    raw.close()


# ---- socket file handling


def test_socket_is_owner_only_whatever_the_umask(tmp_path: Path):
    path = str(tmp_path / "open.sock")
    old = os.umask(0)
    try:
        srv = QMPServer(path)
        srv.start()
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
    finally:
        srv.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux bind() semantics")
def test_socket_file_never_exists_with_a_wider_mode(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
):
    """On Linux the file is born 0600, so no chmod() (and no window before it) is needed."""

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("socket file was created with the wrong mode and needed chmod")

    old = os.umask(0o022)
    monkeypatch.setattr(os, "chmod", no_chmod)
    try:
        with QMPServer(sock_path):
            assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    finally:
        os.umask(old)


def test_stale_socket_is_replaced(sock_path: str):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        Raw(sock_path)
    with QMPServer(sock_path, version=VERSION):
        raw = Raw(sock_path, negotiate=True)
        raw.send(b'{"execute": "query-version"}')
        assert raw.recv() == {"return": QUERY_VERSION_RETURN}
        raw.close()


def test_socket_in_use_is_refused(server: QMPServer, sock_path: str):
    with pytest.raises(QMPSocketError, match=f"QMP socket {sock_path} is in use"):
        QMPServer(sock_path).start()
    raw = Raw(sock_path, negotiate=True)  # the first server is unharmed
    raw.send(b'{"execute": "query-version"}')
    assert raw.recv() == {"return": QUERY_VERSION_RETURN}
    raw.close()


def test_regular_file_is_refused_and_untouched(sock_path: str):
    Path(sock_path).write_text("precious")
    os.chmod(sock_path, 0o644)
    with pytest.raises(QMPSocketError, match="exists and is not a socket"):
        QMPServer(sock_path).start()
    assert Path(sock_path).read_text() == "precious"
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o644


@pytest.mark.parametrize("target_kind", ["file", "stale-socket", "dangling"])
def test_symlink_is_refused_and_untouched(tmp_path: Path, sock_path: str, target_kind: str):
    target = tmp_path / "target"
    if target_kind == "file":
        target.write_text("precious")
    elif target_kind == "stale-socket":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(target))
        stale.close()
    os.symlink(target, sock_path)
    with pytest.raises(QMPSocketError, match="symbolic link"):
        QMPServer(sock_path).start()
    assert os.readlink(sock_path) == str(target)
    if target_kind == "file":
        assert target.read_text() == "precious"
    elif target_kind == "stale-socket":
        assert stat.S_ISSOCK(os.lstat(target).st_mode)
    else:
        assert not target.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's socket")
def test_socket_owned_by_another_user_is_refused(sock_path: str):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    os.chown(sock_path, 4242, 4242, follow_symlinks=False)
    with pytest.raises(QMPSocketError, match="owned by uid 4242"):
        QMPServer(sock_path).start()
    assert os.lstat(sock_path).st_uid == 4242


# ---- lifecycle and API


def test_unix_prefix_and_stop_cleanup(sock_path: str):
    srv = QMPServer("unix:" + sock_path)
    assert srv.path == sock_path
    srv.start()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    raw = Raw(sock_path, negotiate=True)
    srv.stop()
    assert not os.path.lexists(sock_path)
    assert raw.reader.readline() == b""  # connected clients are hung up on
    raw.close()
    srv.stop()  # idempotent
    srv.emit("STOP")  # dropped, not an error
    assert srv.wait_closed(0)
    with pytest.raises(RuntimeError):
        srv.start()


def test_handler_can_stop_the_server(sock_path: str):
    srv = QMPServer(sock_path)
    srv.register("quit", srv.stop)
    srv.start()
    raw = Raw(sock_path, negotiate=True)
    raw.send(b'{"execute": "quit"}')
    assert srv.wait_closed(3)
    assert not os.path.lexists(sock_path)
    raw.close()


def test_serve_forever_returns_when_stopped(sock_path: str):
    srv = QMPServer(sock_path)
    runner = threading.Thread(target=srv.serve_forever)
    runner.start()
    try:
        assert wait_until(lambda: os.path.lexists(sock_path))
        raw = Raw(sock_path, negotiate=True)
        raw.close()
        assert runner.is_alive()
    finally:
        srv.stop()
        runner.join(3)
    assert not runner.is_alive()
    assert not os.path.lexists(sock_path)


def test_registration_errors(sock_path: str):
    srv = QMPServer(sock_path)
    srv.register("a", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        srv.register("a", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        srv.register("query-version", lambda: None)

    def positional_only(x: int, /) -> None: ...

    with pytest.raises(TypeError, match="positional-only"):
        srv.register("b", positional_only)
    assert "b" not in srv.commands and "a" in srv.commands


def test_emit_rejects_data_that_is_not_json(server: QMPServer):
    with pytest.raises(TypeError):
        server.emit("X", {"o": object()})
    with pytest.raises(ValueError):
        server.emit("X", {"f": float("nan")})
    with pytest.raises(TypeError):
        server.emit("X", [1, 2])  # type: ignore[arg-type]


# ---- events a guest can trigger are rate-limited, as QEMU's monitor does


class Listener:
    """Reads every message of a raw client on a thread, noting when each arrived."""

    def __init__(self, raw: Raw) -> None:
        self.raw = raw
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.raw.sock.settimeout(None)
        for line in self.raw.reader:
            self.got.append((time.monotonic(), json.loads(line)))

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in list(self.got) if m.get("event") == name]

    def close(self) -> None:
        self.raw.sock.shutdown(socket.SHUT_RDWR)  # ends the reading thread first
        self.thread.join(5)
        self.raw.close()


def _size_change(device: str, size: int) -> dict[str, Any]:
    return {"id": device, "size": size, "qom-path": f"/machine/peripheral/{device}"}


def test_memory_device_size_change_is_throttled_per_device(sock_path: str):
    """QEMU: the first event goes out at once, later ones within a second are held back,
    only the latest of them is sent when the second is over; each qom-path on its own."""
    with QMPServer(sock_path) as srv:
        listener = Listener(Raw(sock_path, negotiate=True))
        t0 = time.monotonic()
        for size in range(8):  # one resize: eight size changes in quick succession
            srv.emit("MEMORY_DEVICE_SIZE_CHANGE", _size_change("vm0", size))
        emitted_last = time.time()
        srv.emit("MEMORY_DEVICE_SIZE_CHANGE", _size_change("vm1", 100))
        srv.emit("STOP")  # not throttled
        assert wait_until(lambda: len(listener.got) >= 3)
        time.sleep(0.7)
        first = [(m["event"], m.get("data", {}).get("size")) for _, m in listener.got]
        assert first == [("MEMORY_DEVICE_SIZE_CHANGE", 0), ("MEMORY_DEVICE_SIZE_CHANGE", 100),
                         ("STOP", None)]
        assert wait_until(lambda: len(listener.events("MEMORY_DEVICE_SIZE_CHANGE")) == 3, 2.0)
        arrived, last = listener.events("MEMORY_DEVICE_SIZE_CHANGE")[2]
        assert last["data"] == _size_change("vm0", 7)  # the latest, the others dropped
        assert 0.9 <= arrived - t0 <= 1.6
        # it carries the time it happened, not the time it was sent
        stamp = last["timestamp"]["seconds"] + last["timestamp"]["microseconds"] / 1e6
        assert abs(stamp - emitted_last) < 0.1
        # the next period ends with nothing held back; then an event goes out at once
        time.sleep(1.2)
        assert len(listener.events("MEMORY_DEVICE_SIZE_CHANGE")) == 3
        sent = time.monotonic()
        srv.emit("MEMORY_DEVICE_SIZE_CHANGE", _size_change("vm0", 8))
        assert wait_until(lambda: len(listener.events("MEMORY_DEVICE_SIZE_CHANGE")) == 4, 0.5)
        assert listener.events("MEMORY_DEVICE_SIZE_CHANGE")[3][0] - sent < 0.3
        listener.close()


# ---- what all clients together can make the server hold


def test_client_count_is_bounded_and_the_refused_client_is_told(sock_path: str):
    with QMPServer(sock_path, max_clients=3) as srv:
        clients = [Raw(sock_path, negotiate=True) for _ in range(3)]
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(5)
        extra.connect(sock_path)
        reader = extra.makefile("rb")
        assert json.loads(reader.readline()) == {
            "error": {"class": "GenericError",
                      "desc": "too many QMP clients (3 connected, limit 3)"}}
        assert reader.readline() == b""  # hung up
        extra.close()
        clients.pop().close()
        assert wait_until(lambda: srv.client_count == 2)
        again = Raw(sock_path, negotiate=True)  # a place is free again
        again.send(b'{"execute": "query-version"}')
        assert again.recv()["return"]["package"] == "livemig"
        for c in [*clients, again]:
            c.close()


def test_unanswered_input_of_all_clients_is_bounded(sock_path: str):
    """Partial messages under the per-message cap, from several clients, add up to the
    server's budget; the client that crosses it gets an error and is cut off, the others
    and the server carry on."""
    limit = 1 << 20
    with QMPServer(sock_path, max_input_bytes=limit) as srv:
        holders = [Raw(sock_path, negotiate=True) for _ in range(3)]
        for h in holders[:2]:
            h.send(b'{"execute": "x", "arguments": {"s": "' + b"a" * (400 << 10))
        assert wait_until(lambda: srv.input_bytes_held >= 800 << 10)
        offender = holders[2]
        offender.send(b'{"execute": "x", "arguments": {"s": "' + b"a" * (400 << 10))
        reply = offender.recv()
        assert reply["error"]["desc"].startswith("QMP input limit reached: clients hold")
        assert "(limit 1 MiB)" in reply["error"]["desc"]
        assert offender.reader.readline() == b""  # disconnected
        assert srv.input_bytes_held <= limit
        # the two holders finish their requests and are answered
        for h in holders[:2]:
            h.send(b'"}}')
            assert h.recv()["error"]["desc"] == "The command x has not been found"
        assert wait_until(lambda: srv.input_bytes_held == 0)
        for h in holders:
            h.close()
