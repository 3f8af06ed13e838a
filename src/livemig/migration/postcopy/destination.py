"""Postcopy on the destination: advise, discard, listen, run, completion.

The stream after ``migrate-start-postcopy`` (source: :mod:`~livemig.migration.postcopy.source`):

    COMMAND POSTCOPY_ADVISE (be64 page-size summary, be64 target page size)   at setup
    ... precopy iterations ...
    COMMAND POSTCOPY_RAM_DISCARD (per block, runs still dirty at the switchover)
    COMMAND PACKAGED (be32 len), then len bytes:
        COMMAND POSTCOPY_LISTEN, FULL <device sections>, COMMAND PING 3, COMMAND POSTCOPY_RUN
    PART ram ... (background push)   END ram, EOF, VMDESCRIPTION

:class:`PostcopyIncoming` registers its commands with the
:class:`~livemig.migration.incoming.IncomingMigration`, whose section loop reads all of
it (the package in place: one reader, nothing buffered). At ADVISE it opens the
userfaultfd, the received map and starts the fault-handler process
(:mod:`~livemig.migration.postcopy.handler_control`); at LISTEN everything not received is
made missing, guest RAM is registered, the RamDiscardManagers are held (plugging answers
BUSY until postcopy ends) and the loader places pages with ``UFFDIO_COPY``
(:mod:`~livemig.migration.postcopy.received`); at RUN the guest runs here with pages
missing. If a connection fails after RUN, the load pauses and carries on over a new one
(:mod:`~livemig.migration.postcopy.destination_recovery`).

Faults are handled in a separate process, never in this one: see ``docs/postcopy.md`` for
why that, plus GIL-free guest memory access, means no fault can deadlock on the GIL.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.memory.discard_manager import Section, StateHold
from livemig.memory.ram_block import RAMBlock
from livemig.memory.region import MemoryRegion
from livemig.migration.channels import Listener, MigrationURI
from livemig.migration.core import status
from livemig.migration.core.job import describe
from livemig.migration.postcopy import placer as uffd
from livemig.migration.postcopy import wire
from livemig.migration.postcopy.destination_recovery import DestinationRecovery
from livemig.migration.postcopy.handler import RECV_DATA, RECV_NONE, RECV_ZERO
from livemig.migration.postcopy.handler_control import HandlerControl
from livemig.migration.postcopy.priority import handler_cpu, urgent_nice
from livemig.migration.postcopy.received import PostcopyPlacer, ReceivedMap
from livemig.migration.ram.state import TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from livemig.migration.stream import savevm
from livemig.migration.stream.format import MigCommand
from livemig.migration.stream.qemu_file import QEMUFileReader, StreamError

if TYPE_CHECKING:
    from livemig.migration.incoming import IncomingMigration

log = logging.getLogger(__name__)

# postcopy states of the destination (QEMU's PostcopyState)
NONE, ADVISE, DISCARD, LISTENING, RUNNING, END = range(6)
_STATE_NAMES = ("none", "advise", "discard", "listening", "running", "end")


class PostcopyIncoming:
    """The destination side of one migration with postcopy-ram (module docstring)."""

    def __init__(self, inc: IncomingMigration, listener: Listener):
        self.inc = inc
        self.listener: Listener | None = listener  # the postcopy channel connects here
        self.preempt = bool(inc.caps["postcopy-preempt"])
        self.state = NONE
        self.regions: dict[str, MemoryRegion] = {mr.block.idstr: mr for mr in inc.vm.memory.regions}
        self.blocks = [mr.block for mr in inc.vm.memory.regions]
        self.uffd = -1
        self.received: ReceivedMap | None = None
        self.placer: PostcopyPlacer | None = None
        self.registered: list[RAMBlock] = []
        self.handler = HandlerControl(self)
        self.link = DestinationRecovery(inc, self.handler, self._received_map, lambda: self.state == RUNNING)
        self.lost_pages = 0
        self.summary: dict[str, dict[str, int]] = {}
        self._holds: list[StateHold] = []
        self._pkg_end: int | None = None
        inc.commands.update({
            MigCommand.POSTCOPY_ADVISE: self._advise,
            MigCommand.POSTCOPY_RAM_DISCARD: self._discard,
            MigCommand.PACKAGED: self._packaged,
            MigCommand.POSTCOPY_LISTEN: self._listen,
            MigCommand.POSTCOPY_RUN: self._run,
            MigCommand.RECV_BITMAP: self._outside_recovery,
            MigCommand.POSTCOPY_RESUME: self._outside_recovery,
        })
        inc.job.on_cleanup("postcopy channel listener", self._close_listener)
        inc.job.on_cleanup("postcopy channel and recovery listener", self.link.close)

    # -- commands ----------------------------------------------------------------------
    def _expect(self, at: int, what: str, *states: int) -> None:
        if self.state not in states:
            want = "/".join(_STATE_NAMES[s] for s in states)
            raise StreamError(at, f"{what}: expected postcopy state {want}, got {_STATE_NAMES[self.state]}")

    def _advise(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        """Check the page sizes, open the userfaultfd and the received map, start the
        fault handler (now, so its start-up is not part of the downtime)."""
        self._expect(at, "POSTCOPY_ADVISE", NONE)
        wire.check_advise(command.payload, at, self.blocks)
        job = self.inc.job
        try:
            self.uffd = uffd.open_uffd()
        except OSError as e:
            raise StreamError(at, f"Postcopy is not supported by this host: {e}") from e
        job.on_cleanup("userfaultfd", self._close_uffd)
        self.received = ReceivedMap(self.blocks)
        job.on_cleanup("received map", self.received.close)
        self.placer = PostcopyPlacer(self.uffd, self.received)
        job.on_cleanup("fault handler", self.handler.close)
        self.handler.spawn()
        # virtio-mem must not discard unplugged ranges when its state loads: pages arrive later
        self.inc.load_ctx.postcopy = True
        self.state = ADVISE

    def _discard(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        """Drop what this side holds of pages the source will send again."""
        self._expect(at, "POSTCOPY_RAM_DISCARD", ADVISE, DISCARD)
        self._stop_prefault()
        name, pairs = wire.parse_discard(command.payload, at)
        mr = self.regions.get(name)
        if mr is None:
            raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD: unknown block \"{name}\"")
        block, loader = mr.block, self.inc.loader
        for start, length in pairs.tolist():
            if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or start + length > block.used_length:
                raise StreamError(at, f"CMD_POSTCOPY_RAM_DISCARD: bad range 0x{start:x}+0x{length:x} in {name}")
            with loader.lock:
                loader.received[name].clear_range(start >> TARGET_PAGE_BITS, length >> TARGET_PAGE_BITS)
            block.discard_range(start, length)
        self.state = DISCARD

    def _packaged(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        """The package is read in place; RUN must be its last record."""
        self._expect(at, "PACKAGED", ADVISE, DISCARD)
        self._pkg_end = r.tell() + wire.parse_packaged(command.payload, at)

    def _listen(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        """Everything not received is made missing, guest RAM is registered, the discard
        managers held and the handler set up; pages are placed from now on."""
        self._expect(at, "POSTCOPY_LISTEN", ADVISE, DISCARD)
        self._stop_prefault()
        inc, received = self.inc, self._received_map()
        loader = inc.loader
        with loader.lock:
            for b in self.blocks:
                got = loader.received[b.idstr]
                starts, lengths = got.runs(False, 0, b.used_length >> TARGET_PAGE_BITS)
                for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                    b.discard_range(s << TARGET_PAGE_BITS, n << TARGET_PAGE_BITS)
                received.load(b, got)
        # plug/unplug answer BUSY until postcopy ends; released after the unregistration
        for mr in self.regions.values():
            if mr.rdm is not None:
                hold = mr.rdm.hold_state("incoming postcopy")
                self._holds.append(hold)
                inc.job.on_cleanup("discard manager hold", hold.release)
        inc.job.on_cleanup("userfaultfd registration", self._unregister)
        try:
            for b in self.blocks:
                uffd.register_missing(self.uffd, b.host, b.used_length)
                self.registered.append(b)
        except OSError as e:
            raise StreamError(at, f"postcopy: cannot register guest RAM with userfaultfd: {e}") from e
        self._setup_handler(at)
        loader.placer = self.placer
        self.link.accept_channel(self.listener)
        self._close_listener()
        self.state = LISTENING
        if not inc.job.move(status.POSTCOPY_ACTIVE, status.ACTIVE):
            inc.job.check_cancel()

    def _setup_handler(self, at: int) -> None:
        received = self._received_map()
        blocks = []
        for b in self.blocks:
            runs = self._plugged_runs(b)
            plugged = None if runs is None else [
                [s << TARGET_PAGE_BITS, n << TARGET_PAGE_BITS]
                for s, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True)
            ]
            blocks.append({"idstr": b.idstr, "host": b.host, "length": b.used_length,
                           "recv_off": received.offsets[b.idstr], "plugged": plugged})
        setup = {
            "op": "setup",
            "blocks": blocks,
            "recv_size": received.size,
            "progress_off": received.progress_off,
            # a source that answers no request for this long is declared silent
            "stall_ms": int(self.inc.params.x_tcp_user_timeout),
            "preempt": self.preempt,
            "blocktime": bool(self.inc.caps["postcopy-blocktime"]),
            "cpu": handler_cpu(),
            "nice": urgent_nice(),
        }
        try:
            self.handler.setup(setup, [self.uffd, received.fd])
        except OSError as e:
            raise StreamError(at, str(e)) from e

    def _run(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        """The guest runs here with pages missing."""
        self._expect(at, "POSTCOPY_RUN", LISTENING)
        if self._pkg_end is not None and r.tell() != self._pkg_end:
            raise StreamError(at, "POSTCOPY_RUN is not the last record of the package")
        self.link.give_channel()
        vm = self.inc.vm
        vm.start_incoming_guest()
        self.handler.set_vcpus(vm.vcpu_native_ids())
        if self.inc.autostart:
            vm.cont()
        else:
            vm.set_runstate("paused")
        self.state = RUNNING

    def _outside_recovery(self, command: savevm.Command, r: QEMUFileReader, at: int) -> None:
        raise StreamError(at, f"{command.cmd.name} outside postcopy recovery")

    # -- the load ----------------------------------------------------------------------
    def load(self, reader: QEMUFileReader) -> bool:
        """Run the incoming load; True if it ended in postcopy (completed here), False if
        postcopy was only advised (the caller completes as precopy)."""
        inc = self.inc
        err: Exception | None = None
        try:
            inc.load_stream(reader)
        except Exception as e:
            if self.state != RUNNING:
                raise  # the guest never ran here: a failed migration
            err = e
        else:
            if self.state in (NONE, ADVISE):  # advised, never started: precopy completion
                self.close()
                return False
            if self.state != RUNNING:
                raise StreamError(reader.tell(), "stream ended inside postcopy switchover")
            err = self.link.wait_channel_end()
        while err is not None:
            if inc.job.cancel_requested.is_set():
                raise err
            self.link.pause(describe(err))
            try:
                r = self.link.wait_for_source()
                self.link.load_rest(r)
                err = self.link.wait_channel_end()
            except Exception as e:  # noqa: BLE001 - every failure is a pause in postcopy
                err = e
        self._complete()
        return True

    def _complete(self) -> None:
        """Every plugged page is here or known to be zero: stop faulting, report."""
        received = self._received_map()
        self.lost_pages = sum(received.count_in(b, self._plugged_runs(b), RECV_NONE) for b in self.blocks)
        if self.lost_pages:
            log.error("postcopy: %d plugged pages never arrived", self.lost_pages)
            self.handler.send({"op": "lost-pages", "n": self.lost_pages})
        self._audit_unplugged()
        self.summary = {b.idstr: received.summary(b) for b in self.blocks}
        self.state = END
        try:
            # the handler first: it places what it still can (pages requested, then sent
            # as zero on the main stream) and reports its last statistics; unregistering
            # then wakes any thread still waiting, whose page now faults in as usual
            self.handler.stop()
            self._unregister()
            self._drop_local_zero_pages()
        except Exception as e:  # noqa: BLE001 - the migration is complete regardless
            log.warning("postcopy clean-up: %s", e)
        self._release_holds()
        self.inc.loader.placer = None
        self.inc.send_shut(0)
        self.close()

    def _audit_unplugged(self) -> None:
        """The load's own evidence that the source sent nothing for unplugged memory (as
        a load that ends in precopy reports it): pages there with a record, from either
        stream. Must be 0; a local zero page is not a record."""
        received, n = self._received_map(), 0
        for b in self.blocks:
            mr = self.regions[b.idstr]
            if mr.rdm is not None:
                offs, sizes = mr.rdm.discarded_runs(mr.whole())
                runs = (np.asarray(offs, np.int64) >> TARGET_PAGE_BITS,
                        np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS)
                n += received.count_in(b, runs, RECV_DATA, RECV_ZERO)
        self.inc.load_ctx.report("unplugged-pages-received", n)

    def _drop_local_zero_pages(self) -> None:
        """Zero pages placed for faults on discarded memory (a guest touching unplugged
        memory) are given back: unplugged memory has no content to keep, and the
        destination must not end up holding any of it (reference 2.5 ``post_load``)."""
        received = self._received_map()
        for b in self.blocks:
            if self.regions[b.idstr].rdm is None:
                continue
            starts, counts = received.local_runs(b)
            for s, n in zip(starts.tolist(), counts.tolist(), strict=True):
                b.discard_range(s << TARGET_PAGE_BITS, n << TARGET_PAGE_BITS)

    def _plugged_runs(self, b: RAMBlock) -> tuple[np.ndarray, np.ndarray] | None:
        """(first page, count) of the plugged runs of ``b``; None without a discard manager."""
        mr = self.regions[b.idstr]
        if mr.rdm is None:
            return None
        offs, sizes = mr.rdm.populated_runs(Section(mr, 0, b.used_length))
        return (np.asarray(offs, np.int64) >> TARGET_PAGE_BITS,
                np.asarray(sizes, np.int64) >> TARGET_PAGE_BITS)

    # -- HandlerEvents -----------------------------------------------------------------
    def channel_eos(self) -> None:
        self.link.channel_eos()

    def channel_lost(self, why: str) -> None:
        self.link.channel_lost(why)

    def forward_requests(self, pages: list[list[Any]]) -> None:
        self.link.forward_requests(pages)

    def handler_exited(self) -> None:
        """The handler died while the guest runs: start another, make the threads that
        waited fault again (their fault messages died with it), and pause — the postcopy
        channel's position in its stream died too."""
        if self.state != RUNNING:
            return
        log.error("postcopy fault handler exited; starting a new one")
        try:
            self.handler.restart()
        except Exception as e:  # noqa: BLE001 - the guest waits; nothing else to do here
            log.error("postcopy: cannot restart the fault handler: %s", e)
            return
        self.handler.set_vcpus(self.inc.vm.vcpu_native_ids())
        for b in self.registered:
            uffd.wake(self.uffd, b.host, b.used_length)
        self.link.channel_lost("postcopy fault handler restarted")

    # -- QMP -----------------------------------------------------------------------------
    def pause(self) -> None:
        """``migrate-pause`` on the destination."""
        self.link.request_pause()

    def recover(self, uri: MigrationURI) -> MigrationURI:
        """``migrate-recover``: listen for the source's reconnection."""
        return self.link.recover(uri)

    # -- resources -----------------------------------------------------------------------
    def _received_map(self) -> ReceivedMap:
        assert self.received is not None, "postcopy was not advised"
        return self.received

    def _stop_prefault(self) -> None:
        """No page is populated ahead of data from here on (LISTEN makes every page that
        did not arrive missing)."""
        pf = self.inc.loader.prefault
        if pf is not None:
            pf.stop()

    def _unregister(self) -> None:
        for b in self.registered:
            try:
                uffd.unregister(self.uffd, b.host, b.used_length)
            except OSError as e:
                log.warning("UFFDIO_UNREGISTER %s: %s", b.idstr, e)
        self.registered.clear()

    def _release_holds(self) -> None:
        for hold in self._holds:
            hold.release()
        self._holds = []

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _close_uffd(self) -> None:
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def close(self) -> None:
        """Release everything now, in the order the clean-ups would (idempotent)."""
        self._unregister()
        self._release_holds()
        if self.inc.loader.placer is self.placer:
            self.inc.loader.placer = None
        self.handler.close()
        self.link.close()
        self._close_listener()
        if self.received is not None:
            self.received.close()
        self._close_uffd()

    # -- query-migrate -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        st = self.handler.stats() if self.state in (LISTENING, RUNNING) else self.handler.last_stats
        pl = self.placer
        out: dict[str, Any] = {
            # requests that went out: the handler's own count with a postcopy channel (it
            # sends them); without one, what the return path carried — the handler also
            # counts requests the load's end made moot before they could be forwarded
            "postcopy-requests": st.get("requests", 0) if self.preempt else self.link.forwarded,
            "postcopy-local-zero-pages": st.get("local-zero-pages", 0),
            "postcopy-urgent-pages": st.get("pages-placed", 0),
            "postcopy-duplicate-pages": st.get("pages-existed", 0) + (pl.loaded_existed if pl else 0),
            "postcopy-background-pages": pl.loaded_pages if pl else 0,
            "postcopy-latency-p50-us": st.get("latency-p50-us", 0.0),
            "postcopy-latency-p99-us": st.get("latency-p99-us", 0.0),
            "postcopy-latency-count": st.get("latency-count", 0),
            "postcopy-faults": st.get("faults", 0),
            "postcopy-lost-pages": self.lost_pages,
            "postcopy-recoveries": self.link.recoveries,
            "postcopy-handler-restarts": self.handler.restarts,
        }
        if st.get("latency-mean-us"):
            out["postcopy-latency"] = int(st["latency-mean-us"] * 1000)  # ns, like QEMU
        if self.inc.caps["postcopy-blocktime"]:
            out["postcopy-blocktime"] = st.get("blocktime-ms", 0)
            out["postcopy-vcpu-blocktime"] = st.get("vcpu-blocktime-ms", [])
        return out
