"""Sizes and rates on the command line, QEMU's way, and bytes shown to people.

QEMU reads a size with a suffix (``K``, ``M``, ``G``, ``T``, ``P``, ``E``; powers of 1024,
``B`` for bytes) the same everywhere, but a bare number means different things per option:
``-m 1000`` is 1000 MiB, HMP's ``migrate_set_parameter max-bandwidth 100`` is 100 MiB/s,
while a device's size property (``-device virtio-mem,size=8589934592``) is in bytes. Each
livemig option follows the QEMU option it mirrors; options QEMU has no twin for follow
the closest one (a memory amount like ``-m``, a rate like ``max-bandwidth``), and their
help says which.
"""

from __future__ import annotations

import argparse
import re

_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

MiB = 1 << 20


def parse_size(text: str, default_unit: str = "B") -> int:
    """QEMU's ``qemu_strtosz``: ``512M``, ``8G``, ``1.5G``, ``0x1000``; a bare number is in
    ``default_unit``. ``KiB``/``MB``-style spellings are accepted as the plain suffix.

    Raises ``argparse.ArgumentTypeError`` naming the value, so a command line shows one
    line about it.
    """
    m = _SIZE.match(text or "")
    suffix = m.group(2).upper() if m else ""
    if suffix.endswith("IB"):
        suffix = suffix[:-2]
    elif len(suffix) == 2 and suffix.endswith("B"):
        suffix = suffix[:-1]
    if m is None or (suffix and suffix not in _UNITS):
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 512M, 8G)")
    num = m.group(1)
    unit = _UNITS[suffix or default_unit]
    if num.lower().startswith("0x"):
        if suffix and suffix != "B":
            raise argparse.ArgumentTypeError(f"invalid size {text!r}: a hex number takes no suffix")
        value = int(num, 16) * unit
    else:
        exact = float(num) * unit
        if exact != int(exact):
            raise argparse.ArgumentTypeError(f"invalid size {text!r}: not a whole number of bytes")
        value = int(exact)
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: too large")
    return value


def size_bytes(text: str) -> int:
    """A size whose bare number is bytes, as QEMU's ``size`` properties."""
    return parse_size(text, "B")


def size_mib(text: str) -> int:
    """A size whose bare number is MiB, as QEMU's ``-m`` and HMP's ``max-bandwidth``."""
    return parse_size(text, "M")


def rate_mib(text: str) -> int:
    """Bytes per second, bare numbers in MiB/s; ``max``/``unlimited`` give -1."""
    return -1 if text in ("max", "unlimited") else size_mib(text)


def format_bytes(n: int | float) -> str:
    """``1.50 GiB``, ``512 B``: binary units, as the sizes on the command line."""
    n = float(n)
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{int(n)} B"


def size_arg(n: int) -> str:
    """A byte count written for another livemig command line, whatever that option's
    default unit: ``8G``, ``64M``, ``4096B``."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return f"{n}B"
