"""The sections of one outgoing stream: ids in registration order, device state encoded.

QEMU numbers sections in the order their handlers registered and resolves PART/END
records by that number. The RAM handler is registered first (id 1), then the machine's
state sections in the order their owners registered them (``machine.state``). Numbering
starts at 1: QEMU's loader compares PART/END ids with a per-handler id that is 0 until
that handler's START arrives, so an iterative section numbered 0 would resolve to the
wrong handler (platform notes, "Debian's QEMU 7.2 and livemig streams").

The migration layer knows sections only through :class:`~livemig.devices.state.
StateSection`: it neither imports a device nor the machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from livemig.devices import vmstate
from livemig.devices.state import StateSection
from livemig.migration.stream import savevm
from livemig.migration.stream.format import SectionType
from livemig.migration.stream.qemu_file import QEMUFileWriter

RAM_SECTION_ID = 1


@dataclass
class NumberedSection:
    """A state section with the id it has in this stream, and its last encoding."""

    section: StateSection
    section_id: int
    _vmdesc: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def idstr(self) -> str:
        return self.section.idstr

    @property
    def early(self) -> bool:
        return self.section.early

    def write(self, w: QEMUFileWriter) -> None:
        """One FULL section: header, the owner's state as described, footer."""
        sec = self.section
        data, js = vmstate.encode_with_vmdesc(sec.desc, sec.save())
        self._vmdesc = {"name": sec.idstr, "instance_id": sec.instance_id, **js}
        savevm.start_section(w, SectionType.FULL, self.section_id, sec.idstr, sec.instance_id, sec.version)
        w.put_bytes(data)
        savevm.write_footer(w, self.section_id)

    def vmdesc(self) -> dict[str, Any]:
        """Its VMDESCRIPTION entry (of the bytes written last, or of the state now)."""
        if self._vmdesc is None:
            sec = self.section
            js = vmstate.encode_with_vmdesc(sec.desc, sec.save())[1]
            return {"name": sec.idstr, "instance_id": sec.instance_id, **js}
        return self._vmdesc


class SectionTable:
    """Every section of one outgoing migration, numbered (see the module docstring)."""

    def __init__(self, state: Iterable[StateSection]):
        self.ram_id = RAM_SECTION_ID
        self.devices = [NumberedSection(s, i) for i, s in enumerate(state, start=RAM_SECTION_ID + 1)]

    @property
    def early(self) -> list[NumberedSection]:
        return [s for s in self.devices if s.early]

    @property
    def late(self) -> list[NumberedSection]:
        return [s for s in self.devices if not s.early]

    def write_early(self, w: QEMUFileWriter) -> None:
        for s in self.early:
            s.write(w)

    def write_late(self, w: QEMUFileWriter) -> None:
        for s in self.late:
            s.write(w)

    def vmdesc_devices(self) -> list[dict[str, Any]]:
        """VMDESCRIPTION ``devices``: the vmstate sections in stream order (RAM is not
        described)."""
        return [s.vmdesc() for s in self.early] + [s.vmdesc() for s in self.late]
