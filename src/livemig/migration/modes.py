"""Which parts a migration is assembled from: the one place that knows every mode.

The orchestrators (:mod:`~livemig.migration.outgoing`, :mod:`~livemig.migration.incoming`)
know only the plug-in interfaces; the modes (multifd, postcopy, background snapshot)
know the orchestrators' building blocks. This module, above both, picks the plug-ins a
migration's capabilities ask for.
"""

from __future__ import annotations

from livemig.migration.channels import Listener, MigrationURI
from livemig.migration.core import status
from livemig.migration.core.params import Capabilities, Parameters
from livemig.migration.core.vm import MigratableVM
from livemig.migration.incoming import IncomingMigration
from livemig.migration.multifd.receiver import MultifdReceiver
from livemig.migration.multifd.sender import MultifdSender
from livemig.migration.outgoing import OutgoingMigration
from livemig.migration.postcopy.destination import PostcopyIncoming
from livemig.migration.postcopy.source import PostcopySource
from livemig.migration.snapshot.snapshot import BackgroundSnapshot
from livemig.migration.transport.tls import TLSServer


def outgoing_migration(
    vm: MigratableVM,
    uri: MigrationURI,
    caps: Capabilities,
    params: Parameters,
    emit: status.EventFn = status.no_events,
) -> OutgoingMigration:
    """An outgoing migration (not started) for the capabilities as they are now."""
    if caps["background-snapshot"]:
        return OutgoingMigration(vm, uri, caps, params, emit, mode=BackgroundSnapshot)
    channels = MultifdSender.attach if caps["multifd"] else None
    if caps["postcopy-ram"]:
        out = OutgoingMigration(vm, uri, caps, params, emit, mode=PostcopySource, channels=channels)
        out.postcopy = out.mode
        return out
    return OutgoingMigration(vm, uri, caps, params, emit, channels=channels)


def incoming_migration(
    vm: MigratableVM,
    uri: MigrationURI,
    caps: Capabilities,
    emit: status.EventFn = status.no_events,
    autostart: bool = True,
    tls: TLSServer | None = None,
) -> IncomingMigration:
    """An incoming migration (not started). Its modes follow the capabilities as they
    are when the source connects (QEMU's destination reads them then too)."""

    def channels(inc: IncomingMigration) -> object:
        return MultifdReceiver.attach(inc) if caps["multifd"] else None

    def postcopy(inc: IncomingMigration, listener: Listener) -> PostcopyIncoming | None:
        return PostcopyIncoming(inc, listener) if caps["postcopy-ram"] else None

    return IncomingMigration(vm, uri, caps, emit, autostart, tls, channels=channels, postcopy=postcopy)
