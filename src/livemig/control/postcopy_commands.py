"""QMP commands of postcopy, as a mixin of :class:`~livemig.control.vm_controller.VMController`.

``migrate-start-postcopy``, ``migrate-pause``, ``migrate-recover {uri}`` and the
``resume`` flag of ``migrate``, with QEMU's names and (where QEMU has one) its messages.
"""

from __future__ import annotations

from typing import Any

from livemig.control.qmp_server import QMPError
from livemig.migration.channels import URIError, parse_uri
from livemig.migration.core import status

POSTCOPY_COMMANDS = ("migrate-start-postcopy", "migrate-pause", "migrate-recover")


class PostcopyCommands:
    outgoing: Any
    incoming: Any
    caps: Any
    params: Any

    def register_postcopy(self, qmp: Any) -> None:
        qmp.register("migrate-start-postcopy", self.migrate_start_postcopy)
        qmp.register("migrate-pause", self.migrate_pause)
        qmp.register("migrate-recover", self.migrate_recover)

    def check_postcopy_start(self, target: Any) -> None:
        """Refuse, before a migration starts, what postcopy cannot do."""
        if not self.caps["postcopy-ram"]:
            return
        if target.scheme not in ("tcp", "unix"):
            raise QMPError("Postcopy needs a socket migration URI (tcp: or unix:)")
        if self.caps["postcopy-preempt"] and getattr(self.params, "tls_creds", ""):
            raise QMPError("postcopy-preempt over TLS is not supported by livemig")

    def migrate_start_postcopy(self) -> None:
        if not self.caps["postcopy-ram"]:
            raise QMPError("Enable postcopy with migrate-set-capabilities before the start of migration")
        out = self.outgoing
        if out is None or out.status not in (status.SETUP, status.ACTIVE):
            raise QMPError("Postcopy must be started after migration has been started")
        if out.postcopy is None:
            raise QMPError("Enable postcopy with migrate-set-capabilities before the start of migration")
        out.postcopy.request_start()

    def migrate_resume(self, uri: str) -> None:
        out = self.outgoing
        if out is None or out.postcopy is None or out.status != status.POSTCOPY_PAUSED:
            raise QMPError("Cannot resume if there is no paused migration")
        try:
            out.postcopy.resume(parse_uri(uri))
        except (URIError, RuntimeError) as e:
            raise QMPError(str(e)) from e

    def migrate_pause(self) -> None:
        for mig in (self.outgoing, self.incoming):
            if mig is not None and getattr(mig, "postcopy", None) is not None and mig.status in (
                status.POSTCOPY_ACTIVE,
                status.POSTCOPY_RECOVER,
                status.POSTCOPY_RECOVER_SETUP,
            ):
                try:
                    mig.postcopy.pause()
                except RuntimeError as e:
                    raise QMPError(str(e)) from e
                return
        raise QMPError(
            "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
        )

    def migrate_recover(self, uri: str) -> None:
        inc = self.incoming
        if inc is None or inc.postcopy is None:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        try:
            inc.uri = inc.postcopy.recover(parse_uri(uri))
        except (URIError, RuntimeError, OSError) as e:
            raise QMPError(str(e)) from e

    def check_cancel_allowed(self) -> None:
        out = self.outgoing
        if out is not None and out.status in status.POSTCOPY:
            raise QMPError("Postcopy migration cannot be cancelled (use migrate-pause and recover)")
