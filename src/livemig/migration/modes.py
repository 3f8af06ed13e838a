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
from livemig.migration.cpr.channels import CprError
from livemig.migration.cpr.incoming import CprReceiver, cpr_incoming
from livemig.migration.cpr.source import cpr_outgoing
from livemig.migration.incoming import IncomingMigration
from livemig.migration.mapped_ram.layout import MappedRamConfigError
from livemig.migration.mapped_ram.load import MappedRamLoader
from livemig.migration.mapped_ram.restore import InstantRestore
from livemig.migration.mapped_ram.save import MappedRamSaver, check_target
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
    cpr: MigrationURI | None = None,
) -> OutgoingMigration:
    """An outgoing migration (not started) for the capabilities as they are now.

    ``cpr``: the ``cpr`` channel of a ``channels`` list (mode ``cpr-transfer`` only).
    Raises ``ValueError`` (a :class:`CprError`, ...) for a combination that cannot work.
    """
    if params.mode == "cpr-transfer":
        return cpr_outgoing(vm, uri, cpr, caps, params, emit)
    if cpr is not None:
        raise CprError("a 'cpr' channel needs the migration mode cpr-transfer")
    if caps["mapped-ram"]:
        check_target(uri, caps)
        if caps["background-snapshot"]:  # the writer process writes the mapped-ram file
            return OutgoingMigration(vm, uri, caps, params, emit, mode=BackgroundSnapshot.into_mapped_ram)
        return OutgoingMigration(vm, uri, caps, params, emit, channels=MappedRamSaver.attach)
    if params.direct_io:
        raise MappedRamConfigError("direct-io needs the mapped-ram capability")
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
    params: Parameters | None = None,
    cpr: CprReceiver | None = None,
) -> IncomingMigration:
    """An incoming migration (not started). Its modes follow the capabilities as they
    are when the source connects (QEMU's destination reads them then too).

    ``cpr``: this process was started as a cpr-transfer destination and holds the old
    process's memory (:mod:`livemig.migration.cpr.incoming`).
    """
    if cpr is not None:
        return cpr_incoming(vm, uri, caps, cpr, emit, autostart, tls)
    params = params if params is not None else Parameters()
    if caps["mapped-ram"]:
        if uri.scheme != "file":
            raise MappedRamConfigError(f"mapped-ram needs a file: migration URI, not {uri.scheme}:")
        inc = IncomingMigration(vm, uri, caps, emit, autostart, tls, params=params)
        if caps["postcopy-ram"]:  # QEMU's fast snapshot load: the guest runs at once
            InstantRestore.attach(inc)
        else:
            MappedRamLoader.attach(inc, params)
        return inc
    if params.direct_io:
        raise MappedRamConfigError("direct-io needs the mapped-ram capability")

    def channels(inc: IncomingMigration) -> object:
        return MultifdReceiver.attach(inc) if caps["multifd"] else None

    def postcopy(inc: IncomingMigration, listener: Listener) -> PostcopyIncoming | None:
        return PostcopyIncoming(inc, listener) if caps["postcopy-ram"] else None

    return IncomingMigration(vm, uri, caps, emit, autostart, tls, channels=channels, postcopy=postcopy,
                             params=params)
