"""QMP commands management layers use to steer convergence, as a mixin of
:class:`~livemig.control.vm_controller.VMController`.

* ``migrate-continue {state}``: leave ``pre-switchover`` (capability
  ``pause-before-switchover``; libvirt uses it to switch storage over first);
* ``calc-dirty-rate {calc-time, calc-time-unit?, sample-pages?, mode?}`` and
  ``query-dirty-rate {calc-time-unit?}`` (``migration.dirtyrate``);
* migration blockers: ``migrate`` is refused while the machine has one, and
  ``query-migrate`` lists them in ``blocked-reasons`` — whether or not a migration ran.

QEMU's names and messages throughout. The throttle parameters themselves
(``cpu-throttle-*``, ``vcpu-dirty-limit``, ...) are ``migrate-set-parameters`` members;
the throttle is ``migration.throttle``.
"""

from __future__ import annotations

from typing import Any

from livemig.control.qmp_server import QMPError
from livemig.migration.core import status
from livemig.migration.dirtyrate import DirtyRateCalc, DirtyRateError

CONVERGENCE_COMMANDS = ("migrate-continue", "calc-dirty-rate", "query-dirty-rate")


class ConvergenceCommands:
    machine: Any
    outgoing: Any
    incoming: Any
    _lock: Any
    _dirtyrate: DirtyRateCalc | None = None

    def register_convergence(self, qmp: Any) -> None:
        qmp.register("migrate-continue", self.migrate_continue)
        qmp.register("calc-dirty-rate", self.calc_dirty_rate)
        qmp.register("query-dirty-rate", self.query_dirty_rate)

    @property
    def dirtyrate(self) -> DirtyRateCalc:
        if self._dirtyrate is None:
            self._dirtyrate = DirtyRateCalc(self.machine)
        return self._dirtyrate

    # -- blockers ----------------------------------------------------------------------------
    def check_not_blocked(self) -> None:
        """``migrate``: QEMU's ``migration_is_blocked`` — the newest blocker's words."""
        reasons = self.machine.state.blockers
        if reasons:
            raise QMPError(reasons[0])

    def with_blocked_reasons(self, info: dict[str, Any]) -> dict[str, Any]:
        reasons = self.machine.state.blockers
        if reasons:
            info["blocked-reasons"] = reasons
        return info

    # -- commands ----------------------------------------------------------------------------
    def migrate_continue(self, state: str) -> None:
        out = self.outgoing
        current = out.status if out is not None else status.NONE
        if out is None or current != state:
            raise QMPError(f"Migration not in expected state: {current}")
        try:
            out.gate.proceed(state)
        except ValueError as e:
            raise QMPError(str(e)) from e

    def calc_dirty_rate(self, calc_time: int, calc_time_unit: str | None = None,
                        sample_pages: int | None = None, mode: str | None = None) -> None:
        inc = self.incoming
        if inc is not None and inc.status in status.POSTCOPY:
            raise QMPError("calc-dirty-rate is not available while pages still arrive by postcopy")
        with self._lock:  # migrate checks the blockers under the same lock
            out = self.outgoing
            log_in_use = bool(self.machine.dirty_log.active or (out is not None and out.is_running()))
            try:
                self.dirtyrate.start(calc_time, calc_time_unit, sample_pages, mode, log_in_use=log_in_use)
            except DirtyRateError as e:
                raise QMPError(str(e)) from e

    def query_dirty_rate(self, calc_time_unit: str | None = None) -> dict[str, Any]:
        try:
            return self.dirtyrate.query(calc_time_unit)
        except DirtyRateError as e:
            raise QMPError(str(e)) from e
