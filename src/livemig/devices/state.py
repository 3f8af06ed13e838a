"""How a component makes its state migratable: it registers :class:`StateSection` objects.

Every part of a machine that has state a migration must carry — a device, the vCPUs, the
guest's workload — describes that state once (a :class:`~livemig.devices.vmstate.
VMStateDescription`) and registers a section with the machine's :class:`StateRegistry`
when it is created, beside its runtime code. The migration layer only walks the registry:
it writes each section's bytes on the source and hands each incoming section to its
owner's ``load`` on the destination. It imports no device, no accelerator and no machine
class (QEMU's ``vmstate_register``; Firecracker's ``Persist`` beside each component).

A section is FULL in the stream (QEMU's framing), either *early* — sent during set-up,
before any RAM page (virtio-mem's plugged bitmap: the destination must know what is
plugged before memory arrives) — or *late*, with the device state at switchover.

Loading gets a :class:`LoadContext`: the few facts about the incoming migration a
component may need to decide what to do (QEMU's components ask globals such as
``migration_in_incoming_postcopy()``; here they are handed over explicitly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from livemig.devices.vmstate import DecodeError, StateReader, VMStateDescription, decode

__all__ = ["DecodeError", "LoadContext", "StateRegistry", "StateSection"]


@dataclass
class LoadContext:
    """What a loading component may need to know about the incoming migration, and
    where it reports what it found.

    ``postcopy``: RAM pages will still arrive after the device state (postcopy), so a
    component must not discard or populate guest memory now (virtio-mem's ``post_load``
    skips discarding unplugged ranges then; faults on them are answered locally).
    ``ram_ignored``: guest RAM is not migrated but handed over with its content (QEMU's
    ignored blocks; cpr-transfer): a component must neither discard nor populate it.
    ``figures``: numbers a component measured while loading (:meth:`report`); the
    destination shows them in ``query-migrate`` — audits of what the load itself did,
    taken before a later step (a discard) could tidy the evidence away.
    """

    postcopy: bool = False
    ram_ignored: bool = False  # guest RAM is not migrated but shared (cpr-transfer): leave it
    figures: dict[str, int] = field(default_factory=dict)

    def report(self, name: str, value: int) -> None:
        self.figures[name] = self.figures.get(name, 0) + int(value)


LoadFn = Callable[[StateReader, int, LoadContext], None]


@dataclass
class StateSection:
    """One FULL section of a component: identity, description, save and load.

    ``save()`` returns the object ``desc`` encodes. ``load(reader, version, ctx)`` reads
    the section's payload (normally ``vmstate.decode(desc, reader, version)``) and applies
    it; a value the component cannot accept is a :class:`DecodeError` naming the field
    and the offset. Use :meth:`simple` when decoding the description is all there is.
    """

    idstr: str
    desc: VMStateDescription
    save: Callable[[], Any]
    load: LoadFn
    instance_id: int = 0
    early: bool = False

    @property
    def version(self) -> int:
        return self.desc.version

    @classmethod
    def simple(
        cls,
        idstr: str,
        desc: VMStateDescription,
        save: Callable[[], Any],
        apply: Callable[[dict[str, Any]], None],
        *,
        instance_id: int = 0,
        early: bool = False,
    ) -> StateSection:
        """A section whose load decodes ``desc`` and hands the values to ``apply``.

        ``apply`` may raise ``ValueError`` or ``OSError`` for values it refuses; the load
        reports them as a :class:`DecodeError` at the section's payload offset, prefixed
        with the section's name.
        """

        def load(r: StateReader, version: int, ctx: LoadContext) -> None:
            at = r.tell()
            values = decode(desc, r, version)
            try:
                apply(values)
            except (ValueError, OSError) as e:
                raise DecodeError(at, f"{idstr}: {e}") from e

        return cls(idstr, desc, save, load, instance_id=instance_id, early=early)


class StateRegistry:
    """The sections of one machine, in registration order (the order of the stream).

    It also holds the machine's *migration blockers* (QEMU's ``migrate_add_blocker``):
    reasons, in words, why the machine cannot be migrated right now. While there is one,
    ``migrate`` is refused with it and ``query-migrate`` lists them in ``blocked-reasons``.
    """

    def __init__(self) -> None:
        self._sections: list[StateSection] = []
        self._blockers: list[str] = []

    def add_blocker(self, reason: str) -> None:
        self._blockers.append(reason)

    def remove_blocker(self, reason: str) -> None:
        if reason in self._blockers:
            self._blockers.remove(reason)

    @property
    def blockers(self) -> list[str]:
        """The reasons, newest first (QEMU's ``blocked-reasons`` order)."""
        return list(reversed(self._blockers))

    def register(self, section: StateSection) -> StateSection:
        key = (section.idstr, section.instance_id)
        if not section.idstr or len(section.idstr.encode()) > 0xFF:
            raise ValueError(f"section name {section.idstr!r} must be 1..255 bytes")
        if any((s.idstr, s.instance_id) == key for s in self._sections):
            raise ValueError(f"state section {section.idstr!r} {section.instance_id} registered twice")
        self._sections.append(section)
        return section

    def find(self, idstr: str, instance_id: int = 0) -> StateSection | None:
        for s in self._sections:
            if s.idstr == idstr and s.instance_id == instance_id:
                return s
        return None

    def __iter__(self) -> Iterator[StateSection]:
        return iter(list(self._sections))

    def __len__(self) -> int:
        return len(self._sections)
