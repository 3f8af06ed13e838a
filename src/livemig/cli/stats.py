"""Migration statistics for people: QEMU's ``query-migrate`` names, human units.

Every command that shows a migration (``migrate``, ``snapshot``, ``restore``, ``info``,
``demo``) shows it through :func:`migration_rows`, so a number has one name everywhere and
that name is the one a QMP client reads (``ram.transferred`` is
``query-migrate``'s ``ram`` → ``transferred``). ``--json`` prints the same data unchanged.
"""

from __future__ import annotations

from typing import Any

from livemig.cli.sizes import format_bytes

_MS = {"total-time", "downtime", "setup-time", "expected-downtime", "postcopy-blocktime"}
_PAGES = {"duplicate", "normal", "hole-pages-skipped", "pages-read", "postcopy-requests",
          "write-fault-pages"}
_PAGE_RATES = {"dirty-pages-rate", "pages-per-second"}


def _human(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if leaf in _MS:
        return f"{value:,} ms"
    if leaf == "mbps":  # QEMU's mbps is megabits per second
        return f"{value / 8:,.1f} MB/s"
    if leaf in _PAGES:
        return f"{value:,} pages"
    if leaf in _PAGE_RATES:
        return f"{value:,} pages/s"
    if leaf.endswith(("bytes", "-size")) or leaf in ("transferred", "remaining", "total"):
        return format_bytes(value)
    return f"{value:,}"


def migration_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name, value)`` rows of a ``query-migrate`` reply, in the reply's order."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if isinstance(value, dict):
            rows.extend((f"{key}.{k}", _human(k, v)) for k, v in value.items()
                        if not isinstance(v, dict | list))
        elif not isinstance(value, list):
            rows.append((key, _human(key, value)))
    return rows


def format_rows(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    """Two aligned columns, plain text: readable in a terminal, greppable in a pipe."""
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{indent}{name:<{width}}  {value}" for name, value in rows)


def section(title: str, rows: list[tuple[str, str]]) -> str:
    """A titled table; the title is the QMP command the rows come from."""
    return title + ("\n" + format_rows(rows) if rows else "\n  (nothing)")
