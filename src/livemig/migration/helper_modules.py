"""Which modules the helper launcher preloads: every helper process's module, by name.

By name, not imported, so that ``livemig vm`` can start its launcher
(:mod:`livemig.migration.core.helpers`) as its very first step, before it imports the
heavy parts of livemig itself (numpy, the machine, the migration engine: about 0.25 s):
the launcher's interpreter and imports then run meanwhile, on the other CPU, and are done
before the VM's QMP socket takes a ``migrate-incoming``. The most urgent helper comes first
(the launcher imports them in this order, serving requests between two): instant
restore's fault handler (the guest is meant to run within 100 ms), postcopy's (started
at POSTCOPY_ADVISE), then the snapshot writer (numpy; the guest runs while it starts).
``tests/test_helpers.py`` checks the names against the entries the code spawns.
"""

from __future__ import annotations

from livemig.migration.core import helpers

HELPER_MODULES = (
    "livemig.migration.mapped_ram.fault_handler",
    "livemig.migration.postcopy.handler",
    "livemig.migration.snapshot.writer",
)


def prestart_helpers() -> None:
    """Start this process's helper launcher now (if it does not run), with every helper's
    module to preload."""
    helpers.prestart(HELPER_MODULES)
