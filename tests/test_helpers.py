"""The helper launcher (issue 17): helper processes are forks of a one-threaded fork server
started as a fresh interpreter — never of the multi-threaded VM process — hold only the
descriptors they were given, and die with the VM process.

Real processes throughout. The helpers are :mod:`helper_probe`'s entries (this directory
is on the launcher's PYTHONPATH); the tests of each real helper (postcopy, snapshot,
instant restore) check their own parent, descriptors and death.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import helper_probe
import pytest

from livemig.migration.core import helpers
from livemig.migration.core.helpers import HelperError, HelperLauncher
from livemig.migration.helper_modules import ON_DEMAND, PRELOADED

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REAL_HELPERS = [*PRELOADED, *ON_DEMAND]  # everything, numpy too


@pytest.fixture
def probe_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher can import helper_probe (it inherits this process's environment)."""
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(HERE) + (os.pathsep + old if old else ""))


@pytest.fixture
def launcher(probe_path: None) -> Iterator[HelperLauncher]:
    lau = HelperLauncher(REAL_HELPERS)
    try:
        yield lau
    finally:
        lau.close()


def gone(pid: int) -> bool:
    """No such process, or a zombie (exited; its new parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def descriptors(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def report(lau: HelperLauncher, extra: list[int] = ()) -> tuple[helpers.Helper, socket.socket, dict]:  # type: ignore[assignment]
    """Start helper_probe.report with a control socket (and ``extra``); its report."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        h = lau.spawn(helper_probe.report, [there.fileno(), *extra], "probe")
    finally:
        there.close()
    here.settimeout(30)
    return h, here, ast.literal_eval(here.recv(1 << 16).decode())


def test_a_helper_is_a_fork_of_the_one_threaded_launcher(launcher: HelperLauncher) -> None:
    """This process has threads (as a VM process has); the helper's parent is the
    launcher, a fresh interpreter with numpy and the real helpers' modules loaded and
    exactly one thread (numpy's BLAS pool would be a second one)."""
    stop = threading.Event()
    busy = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]
    for t in busy:
        t.start()
    try:
        h, ctrl, rep = report(launcher)
        assert rep["pid"] == h.pid and h.pid != os.getpid()
        assert rep["ppid"] == launcher.pid != os.getpid()
        assert rep["threads"] == 1
        assert status_field(launcher.pid, "Threads") == "1"
        assert status_field(launcher.pid, "PPid") == str(os.getpid())
        with open(f"/proc/{launcher.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[1:3] == [b"-m", b"livemig.migration.core.helpers"]
        with open(f"/proc/{h.pid}/comm") as f:
            assert f.read().strip() == "probe"
        ctrl.close()
        assert h.wait(10) == 0
        h.close()
    finally:
        stop.set()


def test_a_launcher_that_has_a_thread_refuses_to_fork(probe_path: None) -> None:
    """A module that starts a thread at import makes the launcher multi-threaded: it must
    refuse every fork rather than fork anyway."""
    lau = HelperLauncher(["helper_probe_thread"])
    try:
        lau.start()
        deadline = time.monotonic() + 30
        while status_field(lau.pid, "Threads") != "2":  # the module is loaded
            assert time.monotonic() < deadline, "the probe's thread did not start"
            time.sleep(0.01)
        with pytest.raises(HelperError, match="2 threads; it forks single-threaded only"):
            lau.spawn(helper_probe.sleep_forever, [], "never")
    finally:
        lau.close()


def test_a_helper_holds_only_the_descriptors_it_was_given(launcher: HelperLauncher, tmp_path: Path) -> None:
    """This process holds a listening socket (like a QMP socket), another VM's memory (a
    memfd) and a first helper's sockets; a second helper gets a memfd of its own and a
    control socket, and holds those, stdin, stdout and stderr — nothing else."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "qmp.sock"))
    listener.listen()
    other = os.memfd_create("other-vm-ram")
    given = os.memfd_create("given")
    first, first_ctrl, _ = report(launcher)
    try:
        h, ctrl, rep = report(launcher, [given])
        fds = descriptors(h.pid)
        assert sorted(fds) == sorted({0, 1, 2, *rep["given"]}), fds
        links = [fds[fd] for fd in rep["given"]]
        assert links[1] == "/memfd:given (deleted)"
        assert links[0].startswith("socket:")
        mine = set(descriptors(os.getpid()).values())
        assert links[0] not in mine  # its own end of the control socket, not one of ours
        assert fds[0] == "/dev/null"
        # the launcher itself holds none of this process's things either
        lfds = descriptors(launcher.pid)
        assert not any(t.startswith("/memfd:") for t in lfds.values()), lfds
        assert not {t for t in lfds.values() if t.startswith("socket:")} & mine, lfds
        ctrl.close()
        assert h.wait(10) == 0
    finally:
        first_ctrl.close()
        first.close(10)
        listener.close()
        os.close(other)
        os.close(given)


def test_exit_status_kill_and_failure_are_reported(launcher: HelperLauncher) -> None:
    """The VM process sees a helper like a Popen: poll, wait, kill, returncode."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    h = launcher.spawn(helper_probe.exit_with, [there.fileno()], "exit")
    there.close()
    assert h.poll() is None
    with pytest.raises(TimeoutError):
        h.wait(0.2)
    here.send(b"7")
    assert h.wait(10) == 7 and h.returncode == 7
    h.close()
    failing = launcher.spawn(helper_probe.fail, [], "fail")
    assert failing.wait(10) == 1
    failing.close()
    sleeper = launcher.spawn(helper_probe.sleep_forever, [], "sleep")
    sleeper.kill()
    assert sleeper.wait(10) == -signal.SIGKILL
    sleeper.close()
    with pytest.raises(HelperError, match="ModuleNotFoundError"):
        launcher.spawn(type("F", (), {"__module__": "no_such_module", "__qualname__": "f"}), [], "x")  # type: ignore[arg-type]


def test_helpers_die_with_the_launcher_and_a_new_launcher_starts(launcher: HelperLauncher) -> None:
    """PR_SET_PDEATHSIG against the launcher: however the launcher dies, its helpers go
    (a helper holding a userfaultfd must not outlive it). The next spawn starts another."""
    h = launcher.spawn(helper_probe.sleep_forever, [], "orphan")
    old = launcher.pid
    os.kill(old, signal.SIGKILL)
    assert wait_gone(h.pid, 10), "the helper outlived its launcher"
    assert h.wait(10) == -signal.SIGKILL
    h.close()
    again = launcher.spawn(helper_probe.sleep_forever, [], "again")
    assert launcher.pid != old and status_field(again.pid, "PPid") == str(launcher.pid)
    again.close()


def test_close_stops_the_helpers_and_reaps_the_launcher(launcher: HelperLauncher) -> None:
    """At shutdown the launcher is told (its request socket ends): it kills and reaps its
    helpers and exits by itself, and this process reaps it."""
    h = launcher.spawn(helper_probe.sleep_forever, [], "sleep")
    pid, proc = launcher.pid, launcher.proc
    assert proc is not None
    t0 = time.monotonic()
    launcher.close()
    assert time.monotonic() - t0 < helpers.STOP_TIMEOUT
    assert proc.returncode == 0  # it exited, not killed
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped
    assert gone(h.pid) and h.wait(1) == -signal.SIGKILL
    h.close()


VM_SCRIPT = """
import os, sys, threading, time
from livemig.migration.core.helpers import HelperLauncher
import helper_probe
lau = HelperLauncher(["livemig.migration.snapshot.writer"])
lau.start()
stray = os.fork()  # a fork of the VM (one thread yet) holds its end of the launcher's socket
if stray == 0:
    time.sleep(60)
    os._exit(0)
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
h = lau.spawn(helper_probe.sleep_forever, [], "vm-helper")
print(stray, lau.pid, h.pid, flush=True)
time.sleep(60)
"""


def test_the_launcher_and_its_helpers_die_with_the_vm_process(probe_path: None) -> None:
    """A VM process killed with SIGKILL: the launcher sees it on the VM's pidfd (not only
    as the end of its request socket, which a stray fork of the VM may still hold), kills
    its helpers and exits."""
    vm = subprocess.Popen([sys.executable, "-c", VM_SCRIPT], stdout=subprocess.PIPE, text=True)
    stray = 0
    try:
        assert vm.stdout is not None
        stray, lau, helper = (int(x) for x in vm.stdout.readline().split())
        assert not gone(lau) and not gone(helper)
        vm.kill()
        vm.wait()
        assert wait_gone(helper, 10), "the helper outlived the VM process"
        assert wait_gone(lau, 10), "the launcher outlived the VM process"
    finally:
        vm.kill()
        vm.wait()
        if stray:
            try:
                os.kill(stray, signal.SIGKILL)
            except ProcessLookupError:
                pass


FORK_SCRIPT = """
import os, sys
from livemig.migration.core import helpers
import helper_probe
lau = helpers.launcher()
lau.start()
before = lau.pid
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: this process's atexit handlers run in the fork
os.waitpid(child, 0)
h = lau.spawn(helper_probe.fail, [], "after-fork")
print(before, lau.pid, h.wait(10), flush=True)
"""


def test_a_fork_of_the_vm_process_leaves_its_launcher_alone(probe_path: None) -> None:
    """A fork of the VM process that exits normally runs the launcher's atexit clean-up:
    it must not shut the VM process's launcher down (the socket is shared)."""
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after, code = (int(x) for x in out.stdout.split())
    assert after == before and code == 1


def test_a_vm_controller_starts_this_process_launcher() -> None:
    """The launcher starts with the VM's controller (off any migration's critical path),
    once per process, with the urgent helpers' modules loaded."""
    from livemig.control.vm_controller import VMController
    from livemig.machine import Machine, MachineConfig

    m = Machine(MachineConfig(memory=16 << 20, accel="soft"))
    try:
        VMController(m)
        lau = helpers.launcher()
        assert lau is helpers.launcher() and lau.proc is not None and lau.proc.poll() is None
        assert set(PRELOADED) <= set(lau.preload)
    finally:
        m.close()


def test_the_preload_list_names_every_helper() -> None:
    """The launcher preloads helpers by module name (a VM process starts it before it
    imports them): the lists name exactly the modules that define a helper's entry."""
    entries = {
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in SRC.rglob("*.py")
        if "\ndef helper_main(fds: list[int]) -> int:" in p.read_text()
    }
    assert entries == set(PRELOADED) | set(ON_DEMAND)
