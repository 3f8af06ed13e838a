"""Build the test guests of ``tests/guests`` (real assembly) with binutils, at test time.

``./run test`` installs binutils (``as``, ``ld``); elsewhere a test that needs a guest is
skipped with the reason. Each guest is built once per test session, into a temporary
directory:

* ``boot``: a flat 512-byte boot sector linked at 0x7c00;
* ``elf``: a Multiboot ELF32 kernel linked at 1 MiB;
* ``aout``: the same source with ``--defsym AOUT=1``, a flat binary whose Multiboot header
  carries the load addresses (the "a.out kludge").
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"
_built: dict[tuple[str, str], Path] = {}
_dir: Path | None = None


def binutils_missing() -> str | None:
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    return f"binutils missing ({', '.join(missing)}): ./run test installs them" if missing else None


def build(name: str, kind: str) -> Path:
    """The built guest ``tests/guests/<name>.S`` as ``kind`` (module docstring)."""
    global _dir
    if (why := binutils_missing()) is not None:
        pytest.skip(why)
    key = (name, kind)
    if key in _built:
        return _built[key]
    if _dir is None:
        _dir = Path(tempfile.mkdtemp(prefix="livemig-guests-"))
    src = GUESTS / f"{name}.S"
    obj = _dir / f"{name}-{kind}.o"
    out = _dir / f"{name}-{kind}.{'elf' if kind == 'elf' else 'bin'}"
    asm = ["as", "--32", "-I", str(GUESTS), "-o", str(obj), str(src)]
    if kind == "aout":
        asm[2:2] = ["--defsym", "AOUT=1"]
    if kind == "boot":
        link = ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary"]
    elif kind == "elf":
        link = ["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start"]
    elif kind == "aout":
        link = ["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "--oformat", "binary"]
    else:
        raise ValueError(kind)
    for cmd in (asm, [*link, "-o", str(out), str(obj)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    _built[key] = out
    return out
