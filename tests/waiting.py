"""Waiting in tests: poll a condition until it holds, or fail naming what never came.

One helper for every test file (each used to define its own copy, differing only in the
default timeout and the polling step)."""

from __future__ import annotations

import time
from collections.abc import Callable


def waiter(default_timeout: float = 30.0, step: float = 0.01) -> Callable[..., float]:
    """A ``wait_for(cond, timeout=default_timeout, what=...)`` polling every ``step`` s."""

    def wait_for(cond: Callable[[], object], timeout: float = default_timeout, what: str = "condition") -> float:
        """Poll ``cond`` until it is true; the seconds it took. AssertionError naming
        ``what`` after ``timeout`` seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(step)
        return time.monotonic() - t0

    return wait_for


wait_for = waiter()
