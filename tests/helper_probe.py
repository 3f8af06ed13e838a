"""Helper entries for tests/test_helpers.py: the launcher imports this module by name
(the tests put this directory on the launcher's PYTHONPATH) and forks them."""

from __future__ import annotations

import os
import socket
import time


def report(fds: list[int]) -> int:
    """Tell the test what this process is (its parent, its threads, its descriptors) on
    the socket ``fds[0]``, then hold every descriptor until that socket ends."""
    ctrl = socket.socket(fileno=fds[0])
    ctrl.send(repr({
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "threads": len(os.listdir("/proc/self/task")),
        "fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
        "given": fds,
    }).encode())  # fmt: skip
    while ctrl.recv(16):
        pass
    return 0


def exit_with(fds: list[int]) -> int:
    """Exit with the status the test sends on ``fds[0]``."""
    ctrl = socket.socket(fileno=fds[0])
    return int(ctrl.recv(16))


def fail(fds: list[int]) -> int:
    raise RuntimeError("this helper fails on purpose")


def sleep_forever(fds: list[int]) -> int:
    """Ignore every descriptor: only a signal ends this helper."""
    while True:
        time.sleep(3600)
