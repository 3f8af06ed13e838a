"""The RamDiscardManager interface (reference section 1).

A RamDiscardManager owns the knowledge of which parts of a RAM memory region are populated
and which are discarded (have no content). Everything that touches guest memory in bulk
(migration, snapshots, a VFIO-like mapper) asks it instead of the memory itself, because
merely reading discarded memory can allocate host memory.

Sections are expressed in bytes relative to the memory region. Replay callbacks return 0 to
continue a walk; any other value stops the walk and is returned by the replay.

**State holds.** While a migration (or a snapshot) has taken a view of what is populated,
that view must not change under it: QEMU's virtio-mem answers BUSY to plug and unplug
while ``migration_is_running()``. Here each migration takes its own :class:`StateHold`
from every manager and releases it in its clean-up, after the last thread that reads guest
memory has stopped. The manager is busy while *any* hold exists, so a migration that
ends can never clear the claim of another that has started meanwhile.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class RegionLike(Protocol):
    """What a section needs of its memory region (``memory.region.MemoryRegion``)."""

    name: str

    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class Section:
    """A byte range of a memory region: QEMU's MemoryRegionSection, reduced to what we use."""

    mr: Any  # a MemoryRegion (RegionLike); Any keeps attribute access typed loosely
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


class StateHold:
    """One claim that the populated/discarded state of a manager must not change.

    Taken with :meth:`RamDiscardManager.hold_state`; :meth:`release` is idempotent and
    thread-safe, so a clean-up path may call it unconditionally.
    """

    def __init__(self, manager: RamDiscardManager, reason: str):
        self.manager = manager
        self.reason = reason
        self.released = False

    def release(self) -> None:
        self.manager.release_hold(self)

    def __enter__(self) -> StateHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StateHold({self.reason!r}, released={self.released})"


class RamDiscardManager(ABC):
    """Interface; virtio-mem is the implementation livemig ships.

    Subclasses call ``super().__init__()``: the base keeps the state holds.
    """

    def __init__(self) -> None:
        self._holds: list[StateHold] = []
        self._holds_lock = threading.Lock()

    # -- state holds (see the module docstring) ---------------------------------------------
    def hold_state(self, reason: str) -> StateHold:
        """Forbid populate/discard changes until the returned hold is released."""
        hold = StateHold(self, reason)
        with self._holds_lock:
            self._holds.append(hold)
        return hold

    def release_hold(self, hold: StateHold) -> None:
        with self._holds_lock:
            if hold.released:
                return
            hold.released = True
            self._holds = [h for h in self._holds if h is not hold]

    def state_held(self) -> bool:
        """True while any hold exists: plug and unplug must be refused (BUSY)."""
        with self._holds_lock:
            return bool(self._holds)

    def holders(self) -> list[str]:
        """The reasons of the current holds (for messages and tests)."""
        with self._holds_lock:
            return [h.reason for h in self._holds]

    @abstractmethod
    def get_min_granularity(self, mr: RegionLike) -> int:
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
