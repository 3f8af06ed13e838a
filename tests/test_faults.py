"""Faults from outside (issue 17): a destination is never held by its peer.

An idle connection and a peer that drips a byte now and then are cut off at the set-up
deadline; a destination can be cancelled over QMP whatever its peer does, and re-armed
with a new ``migrate-incoming`` that then completes a real migration.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from test_precopy import MiB, boot, machine, wait_for

from livemig.control.vm_controller import VMController
from livemig.migration import incoming as incoming_mod

DEADLINE = 1.0


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incoming_mod, "SETUP_DEADLINE", DEADLINE)


def connect_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def migrate_for_real(src_ctl: VMController, dst_ctl: VMController, src, dst, uri: str) -> None:  # noqa: ANN001
    dst_ctl.migrate_incoming(uri)
    src_ctl.migrate(uri)
    assert src_ctl.outgoing.wait(60) and src_ctl.outgoing.status == "completed", src_ctl.query_migrate()
    assert dst_ctl.incoming.wait(60) and dst_ctl.incoming.status == "completed", dst_ctl.query_migrate()
    assert src.checksum() == dst.checksum()


@pytest.mark.parametrize("peer", ["idle", "dripping"])
def test_a_silent_or_dripping_peer_is_cut_off_and_the_destination_re_arms(
    tmp_path: Path, short_deadline: None, peer: str
) -> None:
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    stop = threading.Event()
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 32 * MiB)
        path = tmp_path / "in.sock"
        cd.migrate_incoming(f"unix:{path}")
        s = connect_unix(path)
        if peer == "dripping":  # QEMU's magic, one byte at a time, never the whole header

            def drip() -> None:
                for b in b"QEVM\x00\x00\x00\x03":
                    if stop.wait(DEADLINE / 4):
                        return
                    try:
                        s.send(bytes([b]))
                    except OSError:
                        return

            threading.Thread(target=drip, daemon=True).start()
        t0 = time.monotonic()
        wait_for(lambda: cd.query_migrate()["status"] == "failed", timeout=DEADLINE * 5, what="cut off")
        took = time.monotonic() - t0
        assert DEADLINE * 0.8 <= took <= DEADLINE * 3, took
        assert "stream header did not finish within" in cd.query_migrate()["error-desc"]
        assert dst.runstate == "inmigrate"
        s.close()
        migrate_for_real(cs, cd, src, dst, f"unix:{tmp_path / 'again.sock'}")
    finally:
        stop.set()
        src.close()
        dst.close()


def test_qmp_cancel_frees_a_destination_held_by_an_idle_peer(tmp_path: Path) -> None:
    """Before the deadline: ``migrate_cancel`` on the destination ends the incoming
    migration at once (it did nothing before), and ``migrate-incoming`` works again."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 32 * MiB)
        path = tmp_path / "in.sock"
        cd.migrate_incoming(f"unix:{path}")
        s = connect_unix(path)
        wait_for(lambda: cd.query_migrate()["status"] == "active", what="accepted")
        t0 = time.monotonic()
        cd.migrate_cancel()
        assert time.monotonic() - t0 < 2
        info = cd.query_migrate()
        assert info["status"] == "failed" and info["error-desc"] == "incoming migration cancelled", info
        s.close()
        migrate_for_real(cs, cd, src, dst, f"unix:{tmp_path / 'again.sock'}")
    finally:
        src.close()
        dst.close()


def test_qmp_cancel_frees_a_destination_nobody_connected_to(tmp_path: Path) -> None:
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src, 32 * MiB)
        cd.migrate_incoming(f"unix:{tmp_path / 'waiting.sock'}")
        assert cd.query_migrate()["status"] == "setup"
        cd.migrate_cancel()
        assert cd.query_migrate()["status"] == "failed"
        migrate_for_real(cs, cd, src, dst, f"unix:{tmp_path / 'again.sock'}")
    finally:
        src.close()
        dst.close()


def test_a_destination_that_never_answers_the_switchover_fails_it_and_the_guest_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination takes the whole stream and then stalls (never sends its verdict):
    the source gives up at its switchover deadline, the guest runs again with its memory."""
    from livemig.migration import outgoing as outgoing_mod

    monkeypatch.setattr(outgoing_mod, "COMPLETION_DEADLINE", 1.0)
    src = machine(False, dirty_rate=0)
    path = tmp_path / "stall.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    taken = [0]

    def swallow() -> None:  # read everything, answer nothing
        conn, _ = lst.accept()
        while data := conn.recv(1 << 20):
            taken[0] += len(data)
        conn.close()

    t = threading.Thread(target=swallow, daemon=True)
    t.start()
    try:
        cs = VMController(src)
        boot(src, 32 * MiB)
        before = src.checksum()
        cs.migrate(f"unix:{path}")
        assert cs.outgoing.wait(15), "the source waited for the stalled destination"
        info = cs.query_migrate()
        assert info["status"] == "failed", info
        assert "the switchover did not finish within 1 s" in info["error-desc"], info
        assert src.runstate == "running" and src.checksum() == before
        assert taken[0] > 0
    finally:
        lst.close()
        src.close()
