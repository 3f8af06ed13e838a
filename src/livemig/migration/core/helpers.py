"""Helper processes, started from a clean state and fast: the helper launcher (issue 17).

Three helpers serve userfaultfd faults outside the VM process, because a VM thread that
faults on guest memory while it holds the GIL would stop a resolver thread of its own
process too (docs/postcopy.md): postcopy's fault handler
(:mod:`livemig.migration.postcopy.handler`), the background snapshot's writer
(:mod:`livemig.migration.snapshot.writer`) and instant restore's fault handler
(:mod:`livemig.migration.mapped_ram.fault_handler`). All three start here, one way.

**Why not fork the VM process.** It has many threads (vCPUs, QMP, migration threads, the
guest's driver). ``fork()`` copies only the calling thread: a lock another thread held
at that moment (the C library's malloc or stdio lock, a Python module's, livemig's)
stays held in the child for ever, and the child's first use of it hangs. The child also
inherits every descriptor of the VM process: its QMP socket, listening sockets, in tests
the memfds of other VMs in the same process.

**Why not a fresh interpreter per helper.** ``subprocess.Popen`` of ``python -m ...``
is clean (no Python code runs between its fork and its ``exec``, only the passed
descriptors survive) but slow: 30-50 ms for the standard-library fault handlers and
0.15 s for the writer (numpy) on an idle machine, several times that on the loaded
two-CPU development machine, where instant restore is meant to run the guest within
100 ms of ``migrate-incoming`` (``benchmarks/bench_helpers.py``).

**The launcher: a fork server.** Once per VM process, early — as the first step of
the ``livemig vm`` command, else when a VM's controller is made (:func:`prestart`), else at the first
helper (:func:`launcher`) — ``python -m livemig.migration.core.helpers`` is started with
``Popen``: a fresh interpreter, off any migration's critical path. It imports the modules
it is given to preload (one at a time, in the order given, serving any request that
arrives between two; :mod:`livemig.migration.helper_modules` says which and why) and
waits for requests on a ``SOCK_SEQPACKET`` socket. Each request names a helper's entry
(``module:function``, imported first if it is not loaded yet; called with the list of
descriptors it was given) and carries its descriptors (``SCM_RIGHTS``); the launcher
forks, and the child runs the entry. The launcher never starts a thread, and it checks
before every fork that it has exactly one (``/proc/self/task``): numpy's BLAS would
start a thread pool at import, so it is started with ``OPENBLAS_NUM_THREADS=1`` (and
OpenMP's and MKL's equivalents), and a module that starts a thread anyway makes every
spawn fail with :class:`HelperError` rather than fork a multi-threaded process. A fork
of the small launcher takes milliseconds.

**Descriptors.** The launcher holds only its request socket, a pidfd of the VM process,
and a pidfd and a status socket per running helper. A child closes every descriptor but
0, 1, 2 (the VM's stdout and stderr at the launcher's start; stdin is ``/dev/null``) and
the ones its request carried, before the entry runs — no other helper's, no guest memfd
of anyone, no QMP socket; the launcher closes its copies before it answers. The VM
process gets back the helper's pid and a pidfd of it;
the status socket tells it the exit status once the launcher has reaped the helper.

**Death.** A helper must not outlive the VM process: it would sit for ever on what it was
given (a userfaultfd, a mapped-ram file, a migration socket), serving no one. Each
helper is the launcher's child, not the VM's, so ``PR_SET_PDEATHSIG`` against the VM is
not possible; instead the chain is: the launcher watches the VM process (its pidfd, and
the end of its request socket) and, when it ends, kills and reaps its helpers and exits;
each helper has ``PR_SET_PDEATHSIG(SIGKILL)`` against the launcher (single-threaded, so
the "parent thread" of that rule is the launcher for its whole life), armed right after
the fork and checked against a launcher that died before it was armed. A helper thus
dies when the VM process dies, and also when the launcher dies however it dies.

**Shutdown.** :meth:`HelperLauncher.close` (registered with ``atexit`` for this process's
launcher) shuts its request socket down; the launcher kills and reaps its helpers and
exits; the VM process reaps the launcher. A launcher found dead is started again at the
next spawn.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

HelperMain = Callable[[list[int]], int]
"""A helper's entry: called in the child with its descriptors; returns the exit status."""

START_TIMEOUT = 60.0  # seconds for an answer to a spawn (a launcher still importing, a loaded host)
STOP_TIMEOUT = 5.0  # seconds for the launcher to exit once told
REAP_TIMEOUT = 5.0  # seconds from a helper's exit until the launcher reports its status
MSG_MAX = 1 << 16
FDS_MAX = 250  # descriptors one request may carry (SCM_RIGHTS allows 253)
LAUNCHER_NAME = "livemig-helpers"
ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
EXIT_ORPHAN = 125  # the launcher died between the fork and PR_SET_PDEATHSIG

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


class HelperError(OSError):
    """A helper could not be started (the launcher refused, failed or is unreachable)."""


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(obj, separators=(",", ":")).encode()], list(fds))


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MSG_MAX, FDS_MAX)
    return (json.loads(data) if data else None), fds


def readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` is readable (or hung up) within ``timeout`` seconds (None: wait)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


# -- the VM process's side ---------------------------------------------------------------
class Helper:
    """A started helper as the VM process sees it: a small ``Popen`` (pid, poll, wait,
    kill, returncode). The helper is the launcher's child: its exit is seen on a pidfd
    and its exit status comes from the launcher, which reaps it."""

    def __init__(self, name: str, pid: int, pidfd: int, status: socket.socket):
        self.name = name
        self.pid = pid
        self.pidfd = pidfd  # readable once the helper has exited
        self.returncode: int | None = None  # as Popen's: negative for a signal
        self._status = status
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        """The exit status if the helper has exited, else None."""
        with self._lock:
            if self.returncode is None and self.pidfd >= 0 and readable(self.pidfd, 0):
                self._collect()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Until the helper has exited; ``TimeoutError`` after ``timeout`` seconds."""
        if self.returncode is None and self.pidfd >= 0 and not readable(self.pidfd, timeout):
            raise TimeoutError(f"{self.name} (pid {self.pid}) has not exited")
        code = self.poll()
        assert code is not None
        return code

    def _collect(self) -> None:
        """The helper has exited: the status the launcher read when it reaped it. No
        answer means the launcher is gone, and it kills its helpers as it goes."""
        code = -signal.SIGKILL
        if readable(self._status.fileno(), REAP_TIMEOUT):
            try:
                m, fds = recv_msg(self._status)
            except OSError:
                m, fds = None, []
            for fd in fds:
                os.close(fd)
            if m is not None and "exit" in m:
                code = int(m["exit"])
        self.returncode = code

    def kill(self) -> None:
        """SIGKILL (through the pidfd: never another process that reused the pid)."""
        if self.returncode is None and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self, timeout: float = 0) -> None:
        """Give it ``timeout`` seconds to exit, kill it if it has not, wait, and let the
        descriptors go (idempotent)."""
        if self.pidfd >= 0:
            try:
                self.wait(timeout)
            except TimeoutError:
                self.kill()
                self.wait()
        with self._lock:  # poll() from another thread must not see a closed number
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1
            self._status.close()


class HelperLauncher:
    """The fork server and its request socket (module docstring). One per VM process
    (:func:`launcher`); a test may make its own."""

    def __init__(self, preload: Iterable[str] = ()):
        self.preload: list[str] = list(dict.fromkeys(preload))
        self.owner = os.getpid()
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The launcher's pid (0 when not running)."""
        return self.proc.pid if self.proc is not None else 0

    def start(self, preload: Iterable[str] = ()) -> None:
        """Start the launcher unless it runs; modules not loaded yet are loaded (by a
        running launcher between requests)."""
        with self._lock:
            new = [m for m in dict.fromkeys(preload) if m not in self.preload]
            self.preload += new
            if not self._start_locked() and new and self._sock is not None:
                try:
                    send_msg(self._sock, {"op": "preload", "modules": new})
                except OSError:
                    pass  # dead: the next spawn starts another, with the whole list

    def _start_locked(self) -> bool:
        """Start a launcher unless one runs; True if one was started."""
        if self.proc is not None and self.proc.poll() is None:
            return False
        self._drop_locked()
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owner = os.pidfd_open(os.getpid())
        env = {**os.environ, **ONE_THREAD_ENV}
        # the directory that holds the livemig package: src/livemig/migration/core/<this>
        src = str(pathlib.Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(there.fileno()), str(owner), *self.preload],
                pass_fds=[there.fileno(), owner],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
            os.close(owner)
        self._sock = here
        return True

    def spawn(self, main: HelperMain, fds: Sequence[int], name: str,
              timeout: float = START_TIMEOUT) -> Helper:  # fmt: skip
        """Fork a helper from the launcher; it runs ``main(its copies of fds)``. The
        caller keeps (and closes) its own ``fds``. ``name`` becomes the process's comm."""
        entry = f"{main.__module__}:{main.__qualname__}"
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                self._start_locked()
                sock = self._sock
            assert sock is not None
            try:
                send_msg(sock, {"op": "spawn", "entry": entry, "name": name}, [there.fileno(), *fds])
            except OSError as e:
                raise HelperError(f"{name}: the helper launcher is unreachable ({e})") from e
            there.close()  # the launcher's copy is the only one: its exit ends the status
            if not readable(here.fileno(), timeout):
                raise HelperError(f"{name}: no answer from the helper launcher within {timeout:.0f} s")
            m, got = recv_msg(here)
            if m is None or "error" in m:
                for fd in got:
                    os.close(fd)
                why = m["error"] if m is not None else "the helper launcher exited"
                raise HelperError(f"{name}: {why}")
            return Helper(name, int(m["pid"]), got[0], here)
        except BaseException:
            here.close()
            there.close()
            raise

    def close(self) -> None:
        """Stop the launcher and its helpers, reap it (idempotent)."""
        with self._lock:
            self._drop_locked()

    def _drop_locked(self) -> None:
        sock, proc = self._sock, self.proc
        self._sock = self.proc = None
        if os.getpid() != self.owner:  # a fork of the VM process: the launcher is not ours
            if sock is not None:
                sock.close()  # our copy only: a shutdown would cut the VM process off too
            return
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # even if a fork of this process holds a copy
            except OSError:
                pass
            sock.close()
        if proc is not None:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _ProcessLauncher:
    """This process's launcher: made at first use, again in a fork of this process."""

    lock = threading.Lock()
    current: HelperLauncher | None = None


def launcher() -> HelperLauncher:
    """This process's helper launcher (started at its first :meth:`~HelperLauncher.spawn`
    unless :func:`prestart` started it); closed at exit."""
    with _ProcessLauncher.lock:
        cur = _ProcessLauncher.current
        if cur is None or cur.owner != os.getpid():
            cur = _ProcessLauncher.current = HelperLauncher()
            atexit.register(cur.close)
        return cur


def prestart(modules: Iterable[str]) -> None:
    """Start this process's launcher now, with ``modules`` loaded: the interpreter's start
    is then out of the way when the first helper is needed."""
    launcher().start(modules)


# -- the launcher process ---------------------------------------------------------------------
def set_comm(name: str) -> None:
    """The process's name in ps and /proc/PID/comm (15 bytes at most)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


class LauncherServer:
    """The fork server's loop (runs in the launcher process only; module docstring)."""

    def __init__(self, sock_fd: int, owner_fd: int):
        self.pid = os.getpid()
        self.sock = socket.socket(fileno=sock_fd)
        self.owner_fd = owner_fd
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, status)
        self.poller = select.poll()
        self.poller.register(sock_fd, select.POLLIN)
        self.poller.register(owner_fd, select.POLLIN)
        self.to_load: list[str] = []  # modules to preload, first first

    def load_next(self) -> None:
        """Import one module of the preload list (a request never waits for the whole
        list, only for the module being imported)."""
        name = self.to_load.pop(0)
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the spawn that needs it reports it
            traceback.print_exc()
        gc.freeze()  # what is loaded now stays out of the children's collections: fewer copied pages

    def serve(self) -> None:
        """Until the VM process ends or closes its end; then the helpers go too. Modules
        are preloaded while no request waits."""
        while True:
            events = self.poller.poll(0 if self.to_load else None)
            if not events and self.to_load:
                self.load_next()
            for fd, _ev in events:
                if fd == self.owner_fd:
                    return self.stop()  # the VM process has ended
                if fd == self.sock.fileno():
                    try:
                        m, fds = recv_msg(self.sock)
                    except OSError:
                        m, fds = None, []
                    if m is None:
                        return self.stop()
                    self.request(m, fds)
                elif fd in self.children:
                    self.reap(fd)

    def request(self, m: dict[str, Any], fds: list[int]) -> None:
        if m.get("op") == "preload":
            self.to_load += [str(n) for n in m.get("modules", [])]
            for fd in fds:
                os.close(fd)
            return
        if not fds:
            return  # no status socket: nobody to answer
        self.spawn(socket.socket(fileno=fds[0]), str(m["entry"]), str(m.get("name", "helper")), fds[1:])

    def spawn(self, status: socket.socket, entry: str, name: str, fds: list[int]) -> None:
        """Fork a helper; its descriptors are closed here before the VM process hears of
        it, so the launcher never holds them longer than the fork."""
        try:
            main = self.resolve(entry)
            threads = len(os.listdir("/proc/self/task"))
            if threads != 1:
                raise HelperError(f"the helper launcher has {threads} threads; it forks single-threaded only")
            pid = os.fork()
            if pid == 0:
                self.child(main, name, fds, status)  # never returns
            pidfd = os.pidfd_open(pid)
        except Exception as e:  # noqa: BLE001 - reported to the VM process
            try:
                send_msg(status, {"error": f"{type(e).__name__}: {e}"})
            except OSError:
                pass
            status.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        try:
            send_msg(status, {"pid": pid}, [pidfd])
        except OSError:  # the VM process gave up waiting: nobody wants this helper
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        self.children[pidfd] = (pid, status)
        self.poller.register(pidfd, select.POLLIN)

    def resolve(self, entry: str) -> HelperMain:
        module, _, qualname = entry.partition(":")
        loaded = module in sys.modules
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not loaded:
            gc.freeze()
        return obj

    def child(self, main: HelperMain, name: str, fds: list[int], status: socket.socket) -> NoReturn:
        """In the forked child: die with the launcher, keep only ``fds``, run ``main``."""
        code = 1
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.pid:
                os._exit(EXIT_ORPHAN)
            set_comm(name)
            # the launcher's sockets are not ours: forget them without closing a number
            # the helper may reuse, then close every descriptor but 0-2 and ``fds``
            for sock in (self.sock, status, *(st for _pid, st in self.children.values())):
                sock.detach()
            lo = 0
            for fd in sorted({0, 1, 2, *fds}):
                if fd > lo:
                    os.closerange(lo, fd)
                lo = fd + 1
            os.closerange(lo, os.sysconf("SC_OPEN_MAX"))
            code = main(list(fds))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported on stderr; the exit status says it failed
            traceback.print_exc()
        finally:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError):
                    pass
        os._exit(code)

    def reap(self, pidfd: int) -> None:
        pid, status = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        _, st = os.waitpid(pid, 0)
        os.close(pidfd)
        try:
            send_msg(status, {"exit": os.waitstatus_to_exitcode(st)})
        except OSError:
            pass
        status.close()

    def stop(self) -> None:
        """Kill and reap every helper (the VM process is gone or closing)."""
        for pidfd in list(self.children):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(pidfd)


def server_main(argv: list[str]) -> int:
    """``python -m livemig.migration.core.helpers SOCK_FD OWNER_PIDFD [MODULE ...]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the VM's terminal is the VM's
    set_comm(LAUNCHER_NAME)
    server = LauncherServer(int(argv[0]), int(argv[1]))
    server.to_load = argv[2:]
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(server_main(sys.argv[1:]))
