"""The ``livemig`` command line (the console script and ``python -m livemig``).

``main`` runs it; ``parse_size`` reads a size the way QEMU does. One module per command,
plus the shared parts: :mod:`.errors` (one line and an exit status for every failure),
:mod:`.sizes`, :mod:`.stats` (statistics under QEMU's names) and :mod:`.progress`.
"""

from livemig.cli.main import main
from livemig.cli.sizes import parse_size

__all__ = ["main", "parse_size"]
