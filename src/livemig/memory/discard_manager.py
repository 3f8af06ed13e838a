"""The RamDiscardManager interface (reference section 1).

A RamDiscardManager owns the knowledge of which parts of a RAM memory region are populated
and which are discarded (have no content). Everything that touches guest memory in bulk
(migration, snapshots, a VFIO-like mapper) asks it instead of the memory itself, because
merely reading discarded memory can allocate host memory.

Sections are expressed in bytes relative to the memory region. Replay callbacks return 0 to
continue a walk; any other value stops the walk and is returned by the replay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livemig.memory.region import MemoryRegion


@dataclass(frozen=True)
class Section:
    """A byte range of a memory region: QEMU's MemoryRegionSection, reduced to what we use."""

    mr: MemoryRegion
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    def intersect(self, offset: int, size: int) -> Section | None:
        """The part of this section inside [offset, offset+size), or None if empty."""
        lo, hi = max(self.offset, offset), min(self.end, offset + size)
        if hi <= lo:
            return None
        return Section(self.mr, lo, hi - lo)


ReplayFn = Callable[[Section], int]


class RamDiscardListener:
    """Someone who must know when memory of a section is populated or discarded.

    Subclass or pass callables. ``notify_populate`` runs *before* memory becomes populated
    and may object by returning non-zero (the manager then rolls back the listeners already
    notified with ``notify_discard``). ``notify_discard`` runs *after* memory was discarded.
    """

    def __init__(
        self,
        populate: Callable[[Section], int] | None = None,
        discard: Callable[[Section], None] | None = None,
        double_discard_supported: bool = False,
    ):
        self._populate = populate
        self._discard = discard
        self.double_discard_supported = double_discard_supported
        self.section: Section | None = None

    def notify_populate(self, section: Section) -> int:
        return self._populate(section) if self._populate else 0

    def notify_discard(self, section: Section) -> None:
        if self._discard:
            self._discard(section)


class RamDiscardManager(ABC):
    """Interface; virtio-mem is the implementation livemig ships."""

    @abstractmethod
    def get_min_granularity(self, mr: MemoryRegion) -> int:
        """Granularity at which listeners are notified (virtio-mem: its block size)."""

    @abstractmethod
    def is_populated(self, section: Section) -> bool:
        """True iff nothing in the whole section is discarded."""

    @abstractmethod
    def replay_populated(self, section: Section, fn: ReplayFn) -> int:
        """Call ``fn`` for each maximal populated part inside ``section``."""

    @abstractmethod
    def replay_discarded(self, section: Section, fn: ReplayFn) -> int:
        """Call ``fn`` for each maximal discarded part inside ``section``."""

    @abstractmethod
    def register_listener(self, listener: RamDiscardListener, section: Section) -> None:
        """Register and immediately ``notify_populate`` every populated part."""

    @abstractmethod
    def unregister_listener(self, listener: RamDiscardListener) -> None:
        """``notify_discard`` everything populated in the section, then forget it."""

    # Bulk forms for the data path: the same information as the replays, as arrays.
    @abstractmethod
    def populated_runs(self, section: Section) -> tuple[list[int], list[int]]:
        """(offsets, sizes) of populated runs in ``section`` — what replay_populated visits."""

    def discarded_runs(self, section: Section) -> tuple[list[int], list[int]]:
        """(offsets, sizes) of discarded runs in ``section``."""
        offs: list[int] = []
        sizes: list[int] = []

        def take(s: Section) -> int:
            offs.append(s.offset)
            sizes.append(s.size)
            return 0

        self.replay_discarded(section, take)
        return offs, sizes
