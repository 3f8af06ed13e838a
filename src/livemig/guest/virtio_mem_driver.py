"""The guest side of virtio-mem for the software guest, shaped like Linux's driver.

It reads the device's config space, and whenever ``requested_size`` differs from what it
has plugged, it sends raw ``virtio_mem_req`` PLUG or UNPLUG requests for chunks of blocks:

* plug: request first, and only on ACK hand the blocks to the guest's allocator;
* unplug: take the blocks away from the allocator first (so nothing writes them any more:
  for a guest whose vCPUs do not take the allocator lock, ``UsableMemory.quiesce`` waits
  until they are done with the blocks), then request; on BUSY (a migration is running) or
  an error, give them back and retry.

This ordering is what guarantees that a well-behaved guest never writes unplugged memory.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

import numpy as np

from livemig.guest.usable_memory import UsableMemory
from livemig.memory.region import MemoryRegion

log = logging.getLogger(__name__)

REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, REQ_STATE = 0, 1, 2, 3
RESP_ACK, RESP_NACK, RESP_BUSY, RESP_ERROR = 0, 1, 2, 3
_REQ = struct.Struct("<HHHHQHHHH")
_CONFIG = struct.Struct("<QH6xQQQQQ")


def encode_request(kind: int, addr: int = 0, nb_blocks: int = 0) -> bytes:
    return _REQ.pack(kind, 0, 0, 0, addr, nb_blocks, 0, 0, 0)


def decode_config(raw: bytes) -> dict[str, int]:
    bs, node, addr, region, usable, plugged, requested = _CONFIG.unpack_from(raw)
    return {
        "block_size": bs,
        "node_id": node,
        "addr": addr,
        "region_size": region,
        "usable_region_size": usable,
        "plugged_size": plugged,
        "requested_size": requested,
    }


class VirtioMemDriver:
    """Follows ``requested_size`` in a thread of its own, retrying on BUSY."""

    def __init__(
        self,
        read_config: Callable[[], bytes],
        send_request: Callable[[bytes], bytes],
        mr: MemoryRegion,
        usable: UsableMemory,
        on_plugged: Callable[[MemoryRegion, int, int], None] | None = None,
        chunk_blocks: int = 64,
        retry_interval: float = 0.05,
    ):
        self._read_config = read_config
        self._send = send_request
        self.mr = mr
        self.usable = usable
        self.on_plugged = on_plugged
        self.chunk_blocks = chunk_blocks
        self.retry_interval = retry_interval
        cfg = decode_config(read_config())
        self.block_size = cfg["block_size"]
        self.addr = cfg["addr"]
        self.plugged = np.zeros(cfg["region_size"] // self.block_size, bool)
        self.busy_replies = 0
        self.requests_sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        # a real driver is guest code: it acts only while the guest's vCPUs run (the
        # machine says when; a driver on its own runs from the start)
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def adopt(self, plugged_blocks: np.ndarray) -> None:
        """Take over blocks already plugged (the guest state that came with a migration)."""
        self.plugged[:] = plugged_blocks
        pages_per_block = self.block_size // self.mr.block.page_size
        with self.usable.lock:
            for first, n in _runs(self.plugged):
                self.usable.add(self.mr, first * pages_per_block, n * pages_per_block)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="virtio-mem-driver", daemon=True)
        self._thread.start()
        self._wake.set()

    def config_changed(self) -> None:
        """The device's config interrupt."""
        self._idle.clear()
        self._wake.set()

    def set_running(self, running: bool) -> None:
        """The guest's vCPUs run, or stopped: a stopped guest plugs and unplugs nothing
        (a paused destination or a source after its migration keeps its memory as it is)."""
        if running:
            self._running.set()
        else:
            self._running.clear()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()  # a wait for the guest to run ends too
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)

    def wait_settled(self, timeout: float = 30.0) -> bool:
        """Wait until plugged size equals requested size (tests, demo)."""
        return self._idle.wait(timeout)

    @property
    def settled(self) -> bool:
        """Plugged size equals requested size and the driver has nothing left to do."""
        return self._idle.is_set()

    @property
    def plugged_size(self) -> int:
        return int(np.count_nonzero(self.plugged)) * self.block_size

    # -- main loop ---------------------------------------------------------------------------
    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._running.wait()  # the guest is stopped: nothing happens in it
                    continue
                try:
                    progress = self._step()
                except Exception:  # the driver must survive anything the device says
                    log.exception("virtio-mem driver step failed")
                    progress = "retry"
                if progress == "done":
                    self._idle.set()
                    break
                if progress == "retry":
                    self._wake.wait(self.retry_interval)
                    self._wake.clear()

    def _step(self) -> str:
        cfg = decode_config(self._read_config())
        target = cfg["requested_size"]
        have = self.plugged_size
        usable_blocks = cfg["usable_region_size"] // self.block_size
        if have < target:
            return self._plug(min((target - have) // self.block_size, self.chunk_blocks), usable_blocks)
        if have > target:
            return self._unplug(min((have - target) // self.block_size, self.chunk_blocks))
        return "done"

    def _request(self, kind: int, first: int, nb: int) -> int:
        self.requests_sent += 1
        resp = self._send(encode_request(kind, self.addr + first * self.block_size, nb))
        code = struct.unpack_from("<H", resp)[0]
        if code == RESP_BUSY:
            self.busy_replies += 1
        return code

    def _plug(self, want: int, usable_blocks: int) -> str:
        free = np.flatnonzero(~self.plugged[:usable_blocks])
        if len(free) == 0:
            return "retry"
        first = int(free[0])
        # length of the unplugged run starting at `first`
        run_end = np.flatnonzero(self.plugged[first:usable_blocks])
        run = int(run_end[0]) if len(run_end) else usable_blocks - first
        nb = min(want, run)
        code = self._request(REQ_PLUG, first, nb)
        if code != RESP_ACK:
            return "retry"
        self.plugged[first : first + nb] = True
        ppb = self.block_size // self.mr.block.page_size
        with self.usable.lock:
            self.usable.add(self.mr, first * ppb, nb * ppb)
        if self.on_plugged:
            self.on_plugged(self.mr, first * ppb, nb * ppb)
        return "progress"

    def _unplug(self, want: int) -> str:
        used = np.flatnonzero(self.plugged)
        last = int(used[-1])
        gaps = np.flatnonzero(~self.plugged[: last + 1])
        run_start = int(gaps[-1]) + 1 if len(gaps) else 0
        nb = min(want, last + 1 - run_start)
        first = last + 1 - nb
        ppb = self.block_size // self.mr.block.page_size
        with self.usable.lock:  # offline first: no write can target these blocks any more
            self.usable.remove(self.mr, first * ppb, nb * ppb)
        # vCPUs that write without the lock (KVM) must be done with the blocks too
        quiesced = self.usable.quiesce(self._stop.is_set)
        code = self._request(REQ_UNPLUG, first, nb) if quiesced else RESP_ERROR
        if code != RESP_ACK:
            with self.usable.lock:
                self.usable.add(self.mr, first * ppb, nb * ppb)
            return "retry"
        self.plugged[first : first + nb] = False
        return "progress"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
