"""Sockets and files, probed from outside as another local user or a careless script would.

Each test reproduces a finding of issue 17's outside probe against real ``livemig vm``
processes and shows it fixed: a live socket at the incoming path is refused, not replaced;
every socket and file is 0600 under umask 000; ``file:`` refuses FIFOs, devices and
pseudo-filesystems without ever blocking in open(); QMP bounds what its clients can make
the VM hold.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from vm_processes import LIVEMIG, VmProcess

from livemig.control.qmp_client import QMPClient, QMPClientError
from livemig.control.qmp_server import QMPServer
from livemig.migration import channels

MiB = 1 << 20


def qmp_error(c: QMPClient, command: str, **args: object) -> str:
    with pytest.raises(QMPClientError) as e:
        c.execute(command, **args)
    return e.value.desc


def greets(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        return s.recv(4096).startswith(b'{"QMP"')


# =============================================================================================
# migrate-incoming unix:PATH never removes a live socket
# =============================================================================================


def test_incoming_unix_never_replaces_a_live_socket(tmp_path: Path):
    other = tmp_path / "other-vm.qmp"
    with QMPServer(str(other)):  # another VM's live QMP socket
        v = VmProcess(tmp_path, "--incoming", "defer")
        try:
            with v.client() as c:
                desc = qmp_error(c, "migrate-incoming", uri=f"unix:{other}")
                assert desc == (f"Failed to start incoming migration: migration socket {other} "
                                "is in use")
                assert c.execute("query-status")["status"] == "inmigrate"  # can be re-armed
                good = tmp_path / "in.sock"
                c.execute("migrate-incoming", uri=f"unix:{good}")
                assert stat.S_ISSOCK(os.lstat(good).st_mode)
        finally:
            v.stop()
        assert greets(other)  # still the other VM's socket, after our VM is gone


def test_incoming_unix_replaces_only_a_stale_socket(tmp_path: Path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # nobody listens: connect() is refused
    precious = tmp_path / "precious"
    precious.write_text("data")
    v = VmProcess(tmp_path, "--incoming", "defer")
    try:
        with v.client() as c:
            desc = qmp_error(c, "migrate-incoming", uri=f"unix:{precious}")
            assert desc.endswith(f"refusing to use migration socket path {precious}: it exists "
                                 "and is not a socket")
            assert precious.read_text() == "data"
            c.execute("migrate-incoming", uri=f"unix:{stale}")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(stale))  # the stale file was replaced by a listening socket
    finally:
        v.stop()


# =============================================================================================
# owner-only under any umask
# =============================================================================================


def test_sockets_and_files_are_owner_only_under_umask_000(tmp_path: Path):
    dst_qmp, incoming = tmp_path / "dst.qmp", tmp_path / "in.sock"
    dst = VmProcess(tmp_path, "--incoming", f"unix:{incoming}", qmp=f"unix:{dst_qmp}", umask=0)
    src = VmProcess(tmp_path, "--no-prefill", name="src", umask=0)
    stream = tmp_path / "out.stream"
    try:
        with src.client() as c:
            c.execute("migrate", uri=f"file:{stream}")
            deadline = time.monotonic() + 30
            while c.execute("query-migrate")["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        modes = {p.name: stat.S_IMODE(os.lstat(p).st_mode)
                 for p in (dst_qmp, incoming, tmp_path / "src.qmp", stream)}
        assert modes == dict.fromkeys(modes, 0o600), {k: oct(m) for k, m in modes.items()}
    finally:
        src.stop()
        dst.stop()


# =============================================================================================
# file: targets and sources
# =============================================================================================


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_migrate_to_a_special_file_is_refused_and_the_guest_runs_on(tmp_path: Path, fifo: Path):
    """Even with x-file-overwrite: the migration fails before the guest stops (it used
    to "complete" into /proc/self/comm and leave the guest paused), naming the path."""
    v = VmProcess(tmp_path, "--no-prefill")
    try:
        with v.client() as c:
            c.execute("migrate-set-parameters", **{"x-file-overwrite": True})
            for target, why in [
                ("/proc/self/comm", "on the proc pseudo-filesystem, not a stream file"),
                ("/sys/kernel/livemig-stream", "on the sysfs pseudo-filesystem, not a stream file"),
                (str(fifo), "a FIFO, not a regular file"),
                ("/dev/null", "a character device, not a regular file"),
            ]:
                t0 = time.monotonic()
                c.execute("migrate", uri=f"file:{target}")
                info = wait_finished(c)
                assert time.monotonic() - t0 < 5  # never blocked on the FIFO
                assert info["status"] == "failed" and info["error-desc"] == f"{why}: {target}"
                assert c.execute("query-status")["status"] == "running"
            c.execute("migrate", uri=f"file:{tmp_path / 'fine.stream'}")  # a real file works
            assert wait_finished(c)["status"] == "completed"
    finally:
        v.stop()


def wait_finished(c: QMPClient, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = c.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def test_migrate_incoming_from_a_fifo_fails_at_once_and_rearms(tmp_path: Path, fifo: Path):
    src = VmProcess(tmp_path, "--no-prefill", name="src")
    dst = VmProcess(tmp_path, "--incoming", "defer", name="dst")
    good = tmp_path / "good.stream"
    try:
        with src.client() as c:
            c.execute("migrate", uri=f"file:{good}")
            while c.execute("query-migrate")["status"] != "completed":
                time.sleep(0.05)
        with dst.client() as c:
            t0 = time.monotonic()
            desc = qmp_error(c, "migrate-incoming", uri=f"file:{fifo}")
            assert time.monotonic() - t0 < 2  # no writer needed to fail
            assert desc == f"Failed to start incoming migration: file:{fifo}: a FIFO, not a regular file"
            desc = qmp_error(c, "migrate-incoming", uri="file:/proc/self/environ")
            assert desc.endswith("on the proc pseudo-filesystem, not a stream file")
            assert c.execute("query-status")["status"] == "inmigrate"
            c.execute("migrate-incoming", uri=f"file:{good}")  # re-armed with a real file
            deadline = time.monotonic() + 30
            while c.execute("query-migrate")["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        src.stop()
        dst.stop()


def _returns_within(fn: object, timeout: float = 5) -> BaseException | None:
    """Run ``fn`` on a thread; the exception it raised, failing if it blocks."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()  # type: ignore[operator]
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert result, "blocked"
    return result[0]


def test_file_channel_never_blocks_in_open(fifo: Path):
    """What the migration threads open, whatever the QMP command checked before: a FIFO
    without a writer (reading) or a reader (writing) is refused at once."""
    err = _returns_within(lambda: channels.open_file_for_read(str(fifo)))
    assert isinstance(err, OSError) and err.strerror == "a FIFO, not a regular file"
    err = _returns_within(lambda: channels.open_file_for_write(str(fifo), overwrite=True))
    assert isinstance(err, OSError) and err.strerror == "a FIFO, not a regular file"
    err = _returns_within(lambda: channels.open_file_for_write("/proc/self/comm", overwrite=True))
    assert isinstance(err, OSError) and "proc pseudo-filesystem" in err.strerror


def test_inspect_does_not_hang_on_a_fifo(fifo: Path):
    proc = subprocess.run([*LIVEMIG, "inspect", str(fifo)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == f"livemig inspect: {fifo}: cannot read: a FIFO, not a regular file\n"


# =============================================================================================
# QMP: what clients can make the VM hold
# =============================================================================================


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_qmp_clients_cannot_make_the_vm_hold_unbounded_memory(tmp_path: Path):
    """The probe: 24 clients, each sending most of a 16 MiB message and never the end.
    Before, the VM grew by the sum (394 MiB); now all partial input together stays under
    the 32 MiB budget, the clients past it are told and cut off, and the VM answers."""
    v = VmProcess(tmp_path, "--no-prefill")
    path = v.address.removeprefix("unix:")
    clients: list[socket.socket] = []
    try:
        time.sleep(0.5)
        before = _rss(v.proc.pid)
        chunk = b'{"execute": "x", "arguments": {"s": "' + b"a" * (15 * MiB)
        refused = 0
        for _ in range(24):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            reader = s.makefile("rb")
            assert reader.readline().startswith(b'{"QMP"')
            s.sendall(b'{"execute": "qmp_capabilities"}\n')
            assert reader.readline() == b'{"return": {}}\n'
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # cut off while sending
            clients.append(s)
        time.sleep(1.0)
        grown = _rss(v.proc.pid) - before
        for s in clients:
            s.settimeout(0.2)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue  # still connected, still holding its part of the budget
            if b"QMP input limit reached" in data or data == b"":
                refused += 1
        print(f"\nQMP probe: 24 clients x 15 MiB partial messages: VM RSS grew by "
              f"{grown / MiB:.0f} MiB; {refused} clients cut off")
        assert refused >= 22  # at most two 15 MiB messages fit in the 32 MiB budget
        assert grown < 96 * MiB
        with v.client() as c:
            assert c.execute("query-status")["running"] is True
    finally:
        for s in clients:
            s.close()
        v.stop()
