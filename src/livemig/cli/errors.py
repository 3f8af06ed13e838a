"""How a command fails: one line on stderr that names the thing, and an exit status.

A user's mistake (a wrong path, a bad value, a VM that is not there) is not a bug, so it
never shows a traceback. Commands raise :class:`CLIError` with the line to print;
:func:`guarded` prints it as ``livemig CMD: message`` and also turns Ctrl-C and a closed
stdout (``livemig info | head``) into quiet exits.

Exit statuses: 0 success, 1 the operation failed (a migration failed, the VM cannot be
reached), 2 the command line is wrong, 130 interrupted (Ctrl-C), 141 stdout closed early
(as a process killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from livemig.control.qmp_client import QMPAddressError, QMPClient, QMPClientError, QMPConnectError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class CLIError(Exception):
    """A failure to report as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``livemig vm: argument --memory: invalid size
    'x' (use e.g. 512M, 8G); see livemig vm --help`` instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise
    BrokenPipeError again on the way out (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def guarded(prog: str, func: Callable[[], int]) -> int:
    """Run a command; failures become one line on stderr and an exit status."""
    try:
        code = func()
        sys.stdout.flush()  # a closed pipe shows here, inside the guard
        return code
    except CLIError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def open_qmp(address: str, timeout: float = 30.0, option: str = "--qmp") -> QMPClient:
    """Connect to a VM's QMP, as a CLI does: a bad address or an unreachable VM is a
    CLIError naming it, at once (no waiting for a socket that is not there)."""
    try:
        return QMPClient(address, timeout=timeout, connect_timeout=5.0)
    except QMPAddressError as e:
        raise CLIError(f"{option}: {e}", EXIT_USAGE) from None
    except QMPConnectError as e:
        raise CLIError(str(e)) from None
    except QMPClientError as e:
        raise CLIError(f"QMP negotiation failed: {e.desc}") from None


def qmp_call(client: QMPClient, command: str, **arguments: Any) -> Any:
    """``client.execute`` with the VM's error as a CLIError that names the command."""
    try:
        return client.execute(command, **arguments)
    except QMPClientError as e:
        raise CLIError(f"{command}: {e.desc}") from None
    except QMPConnectError as e:
        raise CLIError(str(e)) from None
