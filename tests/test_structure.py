"""The shape of the source tree: layers, no import cycles, short modules, no private access.

These are checks of the code itself, run on every test run, so that the structure the
architecture document describes cannot quietly decay:

* **layers**: memory <- devices <- guest and accelerators <- machine <- migration <-
  control <- CLI and tools; a module may import its own layer or a lower one, never a
  higher one — not inside a function, not under ``TYPE_CHECKING`` either;
* **no import cycles** among modules, counting every import (lazy ones included);
* **no module over 600 lines**;
* **no access to another object's private attributes** (ruff's SLF001, switched on for
  ``src/`` in pyproject.toml, and run here too).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "livemig"
MAX_LINES = 600
# lowest first; a top-level module or package not listed is a tool or the CLI (the top)
LAYERS = ["memory", "devices", "guest", "accel", "machine", "migration", "control"]
SAME_LAYER = {"guest": "accel"}  # the guest's drivers sit beside the accelerators


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return len(LAYERS)
    top = SAME_LAYER.get(parts[1], parts[1])
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every livemig module ``name`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    """The checks below can fail: a two-module circle, and imports inside a function or
    under TYPE_CHECKING, are all seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from livemig.control import qmp_server\n"
        "def f():\n    from livemig.memory import bitmap\n"
    )
    known = {"livemig.memory.bitmap", "livemig.control.qmp_server"}
    assert imports_of("livemig.probe", path, known) == known


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_point_one_way() -> None:
    bad = [
        f"{a} (layer {LAYERS[layer_of(a)] if layer_of(a) < len(LAYERS) else 'top'}) imports {b}"
        for a, targets in sorted(graph().items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_layer_order_is_the_documented_one() -> None:
    """The order this test enforces is the order docs/architecture.md shows."""
    assert layer_of("livemig.memory.bitmap") < layer_of("livemig.devices.virtio_mem")
    assert layer_of("livemig.devices.virtio_mem") < layer_of("livemig.accel.kvm.accel")
    assert layer_of("livemig.guest.workload") == layer_of("livemig.accel.soft")
    assert layer_of("livemig.accel.soft") < layer_of("livemig.machine.machine")
    assert layer_of("livemig.machine.machine") < layer_of("livemig.migration.outgoing")
    assert layer_of("livemig.migration.outgoing") < layer_of("livemig.control.vm_controller")
    assert layer_of("livemig.control.vm_controller") < layer_of("livemig.cli")


def test_no_module_is_too_long() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_access_in_src() -> None:
    """ruff SLF001 over src/ (pyproject.toml enables it for src/ only)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (./run test installs it)")
    r = subprocess.run(
        [ruff, "check", "--no-cache", "--select", "SLF001", "--output-format", "concise", str(SRC)],
        capture_output=True, text=True, cwd=ROOT,
    )
    hits = [line for line in r.stdout.splitlines() if "SLF001" in line]
    assert not hits, "private member access:\n" + "\n".join(hits)
