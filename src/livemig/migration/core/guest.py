"""Stopping the guest for a switchover, and letting it run again if the migration fails.

The one rule: a migration that stopped the guest must leave it as it found it when it
does not complete — running if it was running, paused otherwise. :class:`GuestControl`
remembers both facts before it stops anything, so a failure *inside* the stop still
resumes the guest.
"""

from __future__ import annotations

from livemig.migration.core.vm import MigratableVM


class GuestControl:
    def __init__(self, vm: MigratableVM):
        self.vm = vm
        self.stopped_by_us = False
        self.was_running = False
        self.state_before = vm.runstate

    def stop(self, runstate: str) -> None:
        """Stop the vCPUs at a safe point (no guest write in flight afterwards)."""
        self.was_running = self.vm.running
        self.state_before = self.vm.runstate
        self.stopped_by_us = True  # before stopping: a failure inside stop must resume
        self.vm.stop(runstate)

    def resume(self) -> None:
        """Back to what it was before :meth:`stop` (running, or its earlier state)."""
        if not self.stopped_by_us:
            return
        self.stopped_by_us = False
        if self.was_running:
            self.vm.cont()
        else:
            self.vm.set_runstate(self.state_before if self.state_before != "running" else "paused")

    def handed_over(self, runstate: str = "postmigrate") -> None:
        """The destination runs the guest now: this side stays stopped for good."""
        self.vm.set_runstate(runstate)
        self.stopped_by_us = False
