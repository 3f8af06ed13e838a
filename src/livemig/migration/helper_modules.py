"""Which helper modules the helper launcher preloads, by name.

By name, not imported, so that ``livemig vm`` can start its launcher
(:mod:`livemig.migration.core.helpers`) as its command's very first step, before it
imports the machine, QMP and the migration engine (about 0.15 s, plus the machine's
set-up): the launcher's interpreter and imports run meanwhile, on the other CPU, and are
done before the VM's QMP socket takes a ``migrate-incoming``.

Preloaded: the helpers whose start is urgent, in order — instant restore's fault handler
(the guest is meant to run within 100 ms of ``migrate-incoming``) and postcopy's (started
at POSTCOPY_ADVISE). Both are standard library only: the launcher is ready about 50 ms
after its start on an idle machine.

Not preloaded: the snapshot writer. It needs numpy and the RAM state, an import of about
0.1 s (0.3 s loaded) that the launcher, being single-threaded, could not interrupt for a
restore's request arriving meanwhile — measured: an instant restore's guest then ran
after 102 ms instead of 25. The launcher imports it at the first writer of the process
(the guest runs while the writer starts, and the VM process populates memory
meanwhile); later writers are forks of a launcher that has it.

``tests/test_helpers.py`` checks these names against the modules that define a helper's
entry.
"""

from __future__ import annotations

from livemig.migration.core import helpers

PRELOADED = (
    "livemig.migration.mapped_ram.fault_handler",
    "livemig.migration.postcopy.handler",
)
ON_DEMAND = ("livemig.migration.snapshot.writer",)


def prestart_helpers() -> None:
    """Start this process's helper launcher now (if it does not run), the urgent helpers'
    modules to preload."""
    helpers.prestart(PRELOADED)
