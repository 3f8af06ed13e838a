"""Faults on the network and of peers (issue 17), with real processes on a real link.

Two ``livemig vm`` processes run in network namespaces joined through a router namespace
(:mod:`netns`); the test breaks the link in the router (every packet between the hosts
dropped: a silent link), freezes a VM (``SIGSTOP``/``SIGCONT``) or kills it (``SIGKILL``),
and drives both VMs over QMP as a management tool would.

* every migration socket, on both ends — main channel, multifd channels, the postcopy
  channel (also the fault handler's copy), reconnections — carries keepalive and the
  ``x-tcp-user-timeout`` of its own side (checked on each socket, :mod:`peek_sockets`);
* precopy under 20 faults at random points (a seeded RNG; ``LIVEMIG_FAULT_SEED`` replays
  a run): each migration ends ``completed`` or ``failed``, never hangs; the source guest
  runs again after a failure with its memory intact, and a silent link is noticed by
  both ends within the user timeout;
* postcopy: a link silent for 5 s is noticed by both ends within 10 s with the default
  user timeout, both go to ``postcopy-paused``, recover, three times in a row (once in
  the middle of the recovery handshake), and the guest ends with the source's memory.

What each run saw (seed, faults, timings) is printed: ``pytest -s`` or ``-rP`` shows it,
and a failure shows it too.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netns
import pytest
from peek_sockets import TcpSocket, connected_tcp_sockets, descendants
from vm_processes import VmProcess
from waiting import waiter

from livemig.control.qmp_client import QMPClient
from livemig.migration.channels import DEFAULT_TCP_USER_TIMEOUT_MS
from livemig.migration.postcopy import placer as postcopy_uffd

MiB = 1 << 20
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def link() -> Iterator[netns.Link]:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    lk = netns.Link()
    try:
        yield lk
    finally:
        lk.close()
        assert lk.leftovers() == [], "namespaces left behind"


class Host:
    """A ``livemig vm`` in one of the link's namespaces, with a QMP client."""

    def __init__(self, tmp: Path, link: netns.Link, side: str, name: str, *extra: str,
                 memory: str = "64M", incoming: bool = False) -> None:
        self.side = side
        self.ns = link.a if side == "a" else link.b
        self.addr = netns.A_ADDR if side == "a" else netns.B_ADDR
        args = [*extra, "--log", "info"] + (["--incoming", "defer"] if incoming else [])
        self.vm = VmProcess(tmp, *args, name=name, memory=memory, wrap=netns.Link.prefix(self.ns))
        try:
            self.qmp: QMPClient = self.vm.client()
        except BaseException:
            self.vm.kill()
            raise
        self.stopped = False
        self.dead = False

    def __call__(self, cmd: str, **args: Any) -> Any:
        return self.qmp.execute(cmd, **args)

    def status(self) -> str:
        return self("query-migrate").get("status", "none")

    def info(self) -> dict[str, Any]:
        return self("query-migrate")

    def checksum(self) -> str:
        return self("x-query-guest-checksum")["checksum"]

    def runstate(self) -> str:
        return self("query-status")["status"]

    def caps(self, **on: bool) -> None:
        self("migrate-set-capabilities",
             capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in on.items()])

    def params(self, **values: Any) -> None:
        self("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in values.items()})

    def sigstop(self) -> None:
        os.kill(self.vm.pid, signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        os.kill(self.vm.pid, signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        self.vm.kill()
        self.qmp.close()
        self.dead = True

    def close(self) -> None:
        """End the VM: SIGTERM and a clean exit (no traceback), unless it was killed. It
        is gone afterwards, even if that check fails."""
        if self.dead:
            return
        self.dead = True
        self.qmp.close()
        try:
            self.vm.stop()
        finally:
            self.vm.kill()  # nothing left in the namespace, whatever happened


def close_all(*hosts: Host | None) -> None:
    """Close every host; the first failure is raised after all are gone."""
    first: BaseException | None = None
    for h in hosts:
        if h is None:
            continue
        try:
            if h.stopped:
                h.sigcont()
            h.close()
        except BaseException as e:  # noqa: BLE001 - the others must still be ended
            first = first or e
    if first is not None:
        raise first


MakeHost = Callable[..., Host]


@pytest.fixture
def hosts(tmp_path: Path, link: netns.Link) -> Iterator[MakeHost]:
    """``hosts(side, name, *args, memory=, incoming=)`` starts a VM in ``link``'s namespace
    ``side`` ("a" or "b"); every VM made is ended at teardown, before the namespaces go."""
    made: list[Host] = []

    def make(side: str, name: str, *extra: str, **kw: Any) -> Host:
        h = Host(tmp_path, link, side, name, *extra, **kw)
        made.append(h)
        return h

    try:
        yield make
    finally:
        close_all(*made)


wait_until = waiter(step=0.02)  # (cond, timeout, what) -> the seconds it took


def migration_sockets(*pids: int) -> list[TcpSocket]:
    return [s for pid in pids for s in connected_tcp_sockets(pid)]


# -- every socket ---------------------------------------------------------------------------------

SRC_TIMEOUT, DST_TIMEOUT = 3100, 2900  # distinct, so each socket shows whose value it has


def assert_liveness(socks: list[TcpSocket], user_timeout: int, count: int, what: str) -> None:
    assert len(socks) == count, f"{what}: {len(socks)} TCP sockets, expected {count}: {socks}"
    for s in socks:
        assert s.keepalive and s.user_timeout_ms == user_timeout and s.keepidle == s.keepintvl == 1, (what, s)


def test_every_migration_socket_has_keepalive_and_its_sides_user_timeout(hosts: MakeHost) -> None:
    """multifd (main + 2 channels), then postcopy-preempt (main + postcopy channel, the
    fault handler's copy) before and after a reconnection: each socket of each process,
    with the value its own side set."""
    if postcopy_uffd.available() is not None:
        pytest.skip("no userfaultfd for the postcopy part")
    src = hosts("a", "src")
    dst = hosts("b", "dst", incoming=True)
    src.params(x_tcp_user_timeout=SRC_TIMEOUT, max_bandwidth=8 * MiB)
    dst.params(x_tcp_user_timeout=DST_TIMEOUT)
    assert src("query-migrate-parameters")["x-tcp-user-timeout"] == SRC_TIMEOUT
    for h in (src, dst):
        h.caps(multifd=True)
    uri = f"tcp:{dst.addr}:4444"
    dst("migrate-incoming", uri=uri)
    src("migrate", uri=uri)
    wait_until(lambda: src.status() == "active" and dst.status() == "active", 10, "multifd active")
    assert_liveness(migration_sockets(src.vm.pid), SRC_TIMEOUT, 3, "multifd source")
    assert_liveness(migration_sockets(dst.vm.pid), DST_TIMEOUT, 3, "multifd destination")
    src("migrate_cancel")
    wait_until(lambda: src.status() == "cancelled" and dst.status() == "failed", 10, "cancelled")

    for h in (src, dst):
        h.caps(multifd=False, postcopy_ram=True, postcopy_preempt=True)
    src.params(max_bandwidth=0, max_postcopy_bandwidth=2 * MiB)
    uri = f"tcp:{dst.addr}:4445"
    dst("migrate-incoming", uri=uri)
    src("migrate", uri=uri)
    src("migrate-start-postcopy")
    both_active = lambda: src.status() == dst.status() == "postcopy-active"  # noqa: E731
    wait_until(both_active, 15, "postcopy-active")

    def check(when: str) -> None:
        assert_liveness(migration_sockets(src.vm.pid), SRC_TIMEOUT, 2, f"postcopy source {when}")
        # the VM keeps its end of the postcopy channel (to shut it down on a pause)
        assert_liveness(migration_sockets(dst.vm.pid), DST_TIMEOUT, 2, f"postcopy destination {when}")
        # the fault handler (a fork of the VM's helper launcher, which holds no socket)
        # reads and writes its copy of the postcopy channel
        holders = [p for p in descendants(dst.vm.pid) if migration_sockets(p)]
        assert len(holders) == 1, f"{when}: helpers with TCP sockets: {holders}"
        assert_liveness(migration_sockets(holders[0]), DST_TIMEOUT, 1, f"fault handler {when}")

    check("at the start")
    before = {s.local for s in migration_sockets(src.vm.pid)}
    src("migrate-pause")
    wait_until(lambda: src.status() == dst.status() == "postcopy-paused", 10, "paused")
    dst("migrate-recover", uri=f"tcp:{dst.addr}:4446")
    src("migrate", uri=f"tcp:{dst.addr}:4446", resume=True)
    wait_until(both_active, 10, "resumed")
    assert not before & {s.local for s in migration_sockets(src.vm.pid)}, "not reconnected"
    check("after a reconnection")
    src.params(max_postcopy_bandwidth=0)
    wait_until(lambda: src.status() == dst.status() == "completed", 30, "completed")


def test_a_zero_user_timeout_leaves_the_kernels_defaults(hosts: MakeHost) -> None:
    """``x-tcp-user-timeout 0``: no keepalive, no user timeout (what QEMU does)."""
    src = hosts("a", "src")
    dst = hosts("b", "dst", incoming=True)
    for h in (src, dst):
        h.params(x_tcp_user_timeout=0)
    src.params(max_bandwidth=8 * MiB)
    uri = f"tcp:{dst.addr}:4444"
    dst("migrate-incoming", uri=uri)
    src("migrate", uri=uri)
    wait_until(lambda: src.status() == "active", 10, "active")
    socks = migration_sockets(src.vm.pid, dst.vm.pid)
    assert len(socks) == 2, socks
    for s in socks:
        assert not s.keepalive and s.user_timeout_ms == 0, s
    src("migrate_cancel")
    wait_until(lambda: src.status() == "cancelled", 10, "cancelled")


# -- precopy under random faults ------------------------------------------------------------------

CASES = 20
USER_TIMEOUT = 2000  # ms, both sides: short, so that the suite stays short
BANDWIDTH = 32 * MiB  # a 64 MiB guest takes ~2 s: faults land in set-up, iteration, completion
MIGRATION_S = 2.0
DETECT_S = USER_TIMEOUT / 1000 + 2.5  # the user timeout, one keepalive interval, slack
CONNECT_S = 10.0  # channels.connect's limit: a silent link before the connection is up


@dataclass
class Case:
    n: int
    kind: str
    at: float  # seconds after migrate
    length: float  # seconds the fault lasts (silence, stop)
    multifd: bool
    src_side: str
    notes: list[str] = field(default_factory=list)
    src_end: str = ""
    dst_end: str = ""

    def line(self) -> str:
        fault = f"{self.kind}" + (f" {self.length:.1f}s" if self.kind in ("silence", "stop-src", "stop-dst") else "")
        return (f"case {self.n:2d}: {fault:15s} at {self.at:4.2f}s  multifd={int(self.multifd)}  "
                f"src({self.src_side})={self.src_end:9s} dst={self.dst_end:9s} {'; '.join(self.notes)}")


def draw(rng: random.Random, n: int, src_side: str, netem: bool) -> Case:
    kinds = ["silence", "silence", "stop-src", "stop-dst", "kill-src", "kill-dst"] + (["delay"] if netem else [])
    kind = rng.choice(kinds)
    length = {
        "silence": rng.choice([rng.uniform(0.3, 1.5), rng.uniform(USER_TIMEOUT / 1000 + 2, 6)]),
        "stop-src": rng.uniform(0.5, 4), "stop-dst": rng.uniform(0.5, 5), "delay": rng.uniform(1, 3),
    }.get(kind, 0.0)
    return Case(n, kind, round(rng.uniform(0, MIGRATION_S * 1.1), 2), round(length, 1),
                rng.random() < 0.3, src_side)


class Pool:
    """The two VMs of the suite: a source (running guest) and a destination (waiting)."""

    def __init__(self, hosts: MakeHost) -> None:
        self.hosts = hosts
        self.started = 0
        self.src = self.start("a", incoming=False)
        self.dst = self.start("b", incoming=True)

    def start(self, side: str, incoming: bool) -> Host:
        self.started += 1
        h = self.hosts(side, f"vm{self.started}", "--dirty-rate", "0", incoming=incoming)
        h.params(x_tcp_user_timeout=USER_TIMEOUT, max_bandwidth=BANDWIDTH)
        h.caps(events=True)
        if not incoming:  # the guest has written its memory once: it holds still from now on
            wait_until(lambda: h("x-query-guest")["fill-done"], 30, "the guest's first fill")
        return h


def run_case(pool: Pool, link: netns.Link, case: Case, port: int) -> None:
    src, dst = pool.src, pool.dst
    for h in (src, dst):
        h.caps(multifd=case.multifd)
    ck = src.checksum()
    uri = f"tcp:{dst.addr}:{port}"
    dst("migrate-incoming", uri=uri)
    t0 = time.monotonic()
    src("migrate", uri=uri)
    time.sleep(max(0.0, t0 + case.at - time.monotonic()))
    before = (src.status(), dst.status())
    case.notes.append(f"fault during src={before[0]}/dst={before[1]}")
    t_fault = time.monotonic()
    src_gone = dst_gone = False
    if case.kind == "silence":
        link.silence()
    elif case.kind == "delay":
        link.delay(200)
    elif case.kind == "stop-src":
        src.sigstop()
    elif case.kind == "stop-dst":
        dst.sigstop()
    elif case.kind == "kill-src":
        src.kill()
        src_gone = True
    elif case.kind == "kill-dst":
        dst.kill()
        dst_gone = True

    # each live side that is not frozen must reach a final status; time it
    ended: dict[str, float] = {}
    end_by = t_fault + case.length + CONNECT_S + USER_TIMEOUT / 1000 + 5
    while time.monotonic() < end_by:
        now = time.monotonic()
        if case.length and now >= t_fault + case.length:
            link.restore()
            for h in (src, dst):
                if h.stopped:
                    h.sigcont()
        for name, h, gone in (("src", src, src_gone), ("dst", dst, dst_gone)):
            if name not in ended and not gone and not h.stopped:
                st = h.status()
                # a destination nobody reached (the silence came before the connection)
                # waits in setup: that is not a hang, it is cancelled below
                if st in FINAL or (name == "dst" and st == "setup" and ("src" in ended or src_gone)):
                    ended[name] = time.monotonic() - t_fault
        if ("src" in ended or src_gone) and ("dst" in ended or dst_gone):
            break
        time.sleep(0.02)
    link.restore()
    for h in (src, dst):
        if h.stopped:
            h.sigcont()
    case.src_end = "killed" if src_gone else src.status()
    case.dst_end = "killed" if dst_gone else dst.status()
    case.notes.append(", ".join(f"{k} ended {v:.2f}s after the fault" for k, v in sorted(ended.items())))
    assert src_gone or case.src_end in FINAL, f"source hangs in {case.src_end}"
    assert dst_gone or case.dst_end in (*FINAL, "setup"), f"destination hangs in {case.dst_end}"

    # what a silent link must do: both ends give up within the user timeout
    long_silence = case.kind == "silence" and case.length >= DETECT_S
    connected = before[1] not in ("setup", "none") and before[0] not in FINAL and before[1] not in FINAL
    if long_silence and connected:
        # each side notices: it fails within the user timeout, saying why — unless it
        # could complete without the link (all it needed had arrived before the silence:
        # then it completed while the link was still silent, not after)
        for name, h, end in (("src", src, case.src_end), ("dst", dst, case.dst_end)):
            if end == "completed" and ended[name] < case.length:
                continue
            assert end == "failed", f"{name}: a silent link must fail precopy ({end} after {ended[name]:.2f} s)"
            assert ended[name] <= DETECT_S, f"{name} noticed late: {ended}"
            assert "went silent" in (h.info().get("error-desc") or ""), h.info()

    if not src_gone:
        if case.src_end == "completed":
            assert src.runstate() == "postmigrate"
            # the destination completed too (a kill that came after it had is no failure)
            dst_done = case.dst_end == "completed" or (dst_gone and before[1] == "completed")
            assert dst_done, "the source completed, the destination did not"
        else:
            assert case.src_end == "failed", case.src_end
            assert src.runstate() == "running", "the source guest must run again"
            assert src.checksum() == ck, "the source guest's memory changed"
    if case.dst_end == "completed":
        assert dst.runstate() == "running" and dst.checksum() == ck
        if case.src_end == "failed":
            # the destination had loaded everything and said so; the source never heard
            # (QEMU has the same window): both guests run, with equal memory
            case.notes.append("SPLIT: destination completed, source failed")
    elif case.dst_end == "setup":
        dst("migrate_cancel")  # never connected: cancelled and re-armed, as any destination
        assert dst.status() == "failed"
    elif not dst_gone:
        assert dst.runstate() == "inmigrate", "a failed destination waits for another migration"


def next_roles(pool: Pool, case: Case) -> None:
    """Living, reusable VMs for the next case: a failed destination is re-armed as it is;
    after a completed migration the destination is the next source."""
    if case.src_end == "killed":
        pool.src = pool.start(pool.src.side, incoming=False)
    elif case.src_end == "completed" and case.dst_end == "killed":
        # the guest went with the destination, killed after it had completed: the
        # source, stopped for good (postmigrate), is not a running guest to migrate
        old_src, pool.src = pool.src, pool.start(pool.src.side, incoming=False)
        old_src.close()
    if case.dst_end == "killed":
        pool.dst = pool.start(pool.dst.side, incoming=True)
    elif case.dst_end == "completed":
        old_src, pool.src = pool.src, pool.dst
        pool.dst = pool.start(old_src.side, incoming=True)
        old_src.close()


@pytest.mark.timeout(900)
def test_precopy_under_faults_at_random_points(link: netns.Link, hosts: MakeHost) -> None:
    seed = int(os.environ.get("LIVEMIG_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    log = [f"seed {seed} (LIVEMIG_FAULT_SEED={seed} replays the draw); x-tcp-user-timeout {USER_TIMEOUT} ms; "
           + ("netem: delay faults on" if link.netem else "no netem in this kernel: no delay faults")]
    print(log[0], flush=True)
    t_suite = time.monotonic()
    pool = Pool(hosts)
    for n in range(CASES):
        case = draw(rng, n, pool.src.side, link.netem)
        try:
            run_case(pool, link, case, 5000 + n)
        except BaseException as e:
            log.append(case.line())
            raise AssertionError(f"{e}\n" + "\n".join(log) + f"\nsource log: {pool.src.vm.lines[-6:]}"
                                 f"\ndestination log: {pool.dst.vm.lines[-6:]}") from e
        log.append(case.line())
        print(log[-1], flush=True)
        next_roles(pool, case)
    print(f"{CASES} migrations in {time.monotonic() - t_suite:.0f} s; {pool.started} VMs started", flush=True)


# -- postcopy: a link silent for 5 s, three times ---------------------------------------------------

SILENCE_S = 5.0
DETECT_LIMIT_S = 10.0


@dataclass
class Outage:
    during: str
    detected: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        times = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(self.detected.items()))
        return f"silence during {self.during}: postcopy-paused after {times}; {self.errors}"


def silence_until_paused(link: netns.Link, src: Host, dst: Host, outage: Outage,
                         frozen: Host | None = None) -> None:
    """Silence the link for SILENCE_S; time how long each side takes to pause (by
    polling: both sides answer QMP while paused). ``frozen``: a VM held with SIGSTOP
    until the link is silent (so the silence starts at a known step), let go now."""
    t0 = time.monotonic()
    link.silence()
    if frozen is not None:
        frozen.sigcont()
    while time.monotonic() - t0 < DETECT_LIMIT_S + 2 and len(outage.detected) < 2:
        for name, h in (("source", src), ("destination", dst)):
            if name not in outage.detected and h.status() == "postcopy-paused":
                outage.detected[name] = time.monotonic() - t0
                outage.errors[name] = h.info().get("error-desc", "")
        time.sleep(0.02)
    wait_until(lambda: time.monotonic() - t0 >= SILENCE_S, SILENCE_S + 1, "the end of the silence")
    link.restore()
    missed = {"source", "destination"} - set(outage.detected)
    assert not missed, f"{outage.line()}: not noticed by the {' and the '.join(sorted(missed))}"


def migration_events(h: Host) -> list[str]:
    h("query-status")  # collects what arrived meanwhile
    return [e["data"]["status"] for e in h.qmp.events if e["event"] == "MIGRATION"]


@pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("preempt", [True, False], ids=["postcopy-channel", "main-channel-only"])
def test_postcopy_survives_a_silent_link_three_times_once_in_the_recovery_handshake(
    link: netns.Link, hosts: MakeHost, preempt: bool
) -> None:
    """With the default ``x-tcp-user-timeout``: each silence is noticed by both sides
    within 10 s (postcopy-paused), both recover over a new connection, and the guest ends
    with the source's memory. Silence 2 starts in the middle of the recovery handshake:
    the destination is held (SIGSTOP) after ``migrate-recover`` while the source connects
    (its kernel still accepts) and sends RECV_BITMAP; the link goes silent, the
    destination is let go and answers with its bitmaps into the silence."""
    src = hosts("a", "src", "--dirty-rate", "8M", memory="128M")
    dst = hosts("b", "dst", "-S", memory="128M", incoming=True)  # -S: its guest stays paused
    outages: list[Outage] = []
    try:
        assert src("query-migrate-parameters")["x-tcp-user-timeout"] == DEFAULT_TCP_USER_TIMEOUT_MS
        wait_until(lambda: src("x-query-guest")["fill-done"], 30, "the guest's first fill")
        for h in (src, dst):
            h.caps(events=True, postcopy_ram=True, postcopy_preempt=preempt)
        src.params(max_bandwidth=64 * MiB, max_postcopy_bandwidth=4 * MiB)  # busy for a while
        port = iter(range(4444, 4460))
        uri = f"tcp:{dst.addr}:{next(port)}"
        dst("migrate-incoming", uri=uri)
        src("migrate", uri=uri)
        wait_until(lambda: src.status() == "active", 10, "active")
        time.sleep(0.5)  # some precopy (the guest writes: a discard list at the switchover)
        src("migrate-start-postcopy")
        both = lambda st: lambda: src.status() == dst.status() == st  # noqa: E731

        def recover(frozen: bool = False) -> None:
            uri = f"tcp:{dst.addr}:{next(port)}"
            dst("migrate-recover", uri=uri)
            if frozen:
                dst.sigstop()
            src("migrate", uri=uri, resume=True)

        for n in range(2):  # silences 1 and 3 in postcopy-active, 2 in the handshake after 1
            wait_until(both("postcopy-active"), 15, "postcopy-active")
            time.sleep(1.0)
            assert src.info()["ram"]["remaining"] > 0, "the push ended before the fault"
            outages.append(Outage("postcopy-active"))
            silence_until_paused(link, src, dst, outages[-1])
            if n == 0:  # the next recovery's handshake meets silence 2
                recover(frozen=True)
                wait_until(lambda: src.status() == "postcopy-recover", 10, "the source in the handshake")
                outages.append(Outage("the recovery handshake"))
                silence_until_paused(link, src, dst, outages[-1], frozen=dst)
            recover()
        wait_until(both("postcopy-active"), 15, "postcopy-active")
        src.params(max_postcopy_bandwidth=0)
        wait_until(both("completed"), 60, "completed")
        assert len(outages) == 3
        for o in outages:
            assert set(o.detected) == {"source", "destination"}, o.line()
            assert max(o.detected.values()) <= DETECT_LIMIT_S, o.line()
        for o in outages:  # each side names the cause, whichever of its channels noticed
            assert all("went silent" in why for why in o.errors.values()), o.line()
        src_states, dst_states = migration_events(src), migration_events(dst)
        # silence 2: both were in the handshake, and went back to paused from there
        handshake = ["postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-paused"]
        for states in (src_states, dst_states):
            assert any(states[i:i + 4] == handshake for i in range(len(states))), states
            assert states.count("postcopy-paused") == 3 and states[-1] == "completed", states
        assert src.info()["ram"]["postcopy-recoveries"] == 3
        assert src.runstate() == "postmigrate" and dst.runstate() == "paused"
        assert src.checksum() == dst.checksum()
        dst("cont")
        assert dst.runstate() == "running"
    finally:
        for o in outages:
            print(o.line(), flush=True)


def postcopy_in_flight(hosts: MakeHost, port: int, push: int, *dst_args: str,
                       preempt: bool = False) -> tuple[Host, Host]:
    """A 128 MiB guest (writing 8 MiB/s) in ``postcopy-active`` between two new VMs, the
    source pushing at ``push`` bytes/s so that pages are still on their way."""
    src = hosts("a", "src", "--dirty-rate", "8M", memory="128M")
    dst = hosts("b", "dst", *dst_args, memory="128M", incoming=True)
    wait_until(lambda: src("x-query-guest")["fill-done"], 30, "the guest's first fill")
    for h in (src, dst):
        h.caps(events=True, postcopy_ram=True, postcopy_preempt=preempt)
    src.params(max_bandwidth=64 * MiB, max_postcopy_bandwidth=push)
    uri = f"tcp:{dst.addr}:{port}"
    dst("migrate-incoming", uri=uri)
    src("migrate", uri=uri)
    wait_until(lambda: src.status() == "active", 10, "active")
    src("migrate-start-postcopy")
    wait_until(lambda: src.status() == dst.status() == "postcopy-active", 15, "postcopy-active")
    assert src.info()["ram"]["remaining"] > 0, "the push ended before the fault"
    return src, dst


def recover_once_and_complete(src: Host, dst: Host, port: int) -> None:
    """Both paused: ``migrate-recover`` and ``migrate {resume}`` on ``port``, the push at
    full speed, completed after exactly one pause on each side."""
    uri = f"tcp:{dst.addr}:{port}"
    dst("migrate-recover", uri=uri)
    src("migrate", uri=uri, resume=True)
    wait_until(lambda: src.status() == dst.status() == "postcopy-active", 15, "postcopy-active again")
    src.params(max_postcopy_bandwidth=0)
    wait_until(lambda: src.status() == dst.status() == "completed", 60, "completed")
    assert src.info()["ram"]["postcopy-recoveries"] == 1
    for h in (src, dst):
        states = migration_events(h)
        assert states.count("postcopy-paused") == 1 and states[-1] == "completed", states


@pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")
@pytest.mark.timeout(180)
def test_postcopy_pauses_both_sides_when_the_destination_process_is_stopped(
    link: netns.Link, hosts: MakeHost
) -> None:
    """A destination held with SIGSTOP in ``postcopy-active``: its kernel still answers,
    so the source's pushes fill the socket buffers and stall on a zero window, and the
    source's user timeout pauses it; the destination, let go, finds the connection reset
    and pauses too. Both recover over a new connection and the guest ends with the
    source's memory."""
    src, dst = postcopy_in_flight(hosts, 4470, 16 * MiB, "-S")  # busy for ~8 s
    dst.sigstop()
    # the buffers fill at the push's rate, then the user timeout runs (4 s by default)
    took = wait_until(lambda: src.status() == "postcopy-paused", 15, "the source to pause")
    err = src.info().get("error-desc", "")
    assert "went silent" in err, err
    dst.sigcont()
    wait_until(lambda: dst.status() == "postcopy-paused", 10, "the destination to pause")
    print(f"source paused {took:.2f} s after SIGSTOP: {err}", flush=True)
    recover_once_and_complete(src, dst, 4471)
    assert src.checksum() == dst.checksum()
    dst("cont")
    assert dst.runstate() == "running"


@pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("preempt", [False, True], ids=["main-stream", "preempt"])
def test_postcopy_destination_pauses_when_the_source_process_is_stopped(hosts: MakeHost, preempt: bool) -> None:
    """A source held with SIGSTOP in ``postcopy-active``: its kernel acknowledges the
    destination's page requests and answers keepalives, so no socket call on the
    destination fails and TCP alone would leave the guest waiting on its faults forever.
    The fault handler sees requests unanswered for the user timeout with nothing from the
    source meanwhile, and the destination pauses; the source, let go, finds its
    connection shut and pauses too. Both recover and every page arrives."""
    # the destination's guest writes as the source's does (its own --dirty-rate)
    src, dst = postcopy_in_flight(hosts, 4476 + 2 * preempt, 8 * MiB, "--dirty-rate", "8M", preempt=preempt)
    src.sigstop()
    # the destination's guest runs on, faults on pages still at the source, and waits
    took = wait_until(lambda: dst.status() == "postcopy-paused", 15, "the destination to pause")
    err = dst.info().get("error-desc", "")
    print(f"source stopped: the destination paused after {took:.2f} s: {err}", flush=True)
    assert "a page request waited 4 s with nothing from the source" in err, err
    assert took >= 3.5, took  # the user timeout (4 s), not a reset
    src.sigcont()
    wait_until(lambda: src.status() == "postcopy-paused", 10, "the source to pause")
    recover_once_and_complete(src, dst, 4477 + 2 * preempt)
    # the guest ran on the destination all along, so the two memories differ by its
    # writes: check instead that every page arrived and the guest went on writing
    ram = dst.info()["ram"]
    assert ram["postcopy-lost-pages"] == 0 and ram["postcopy-requests"] > 0, ram
    written = dst("x-query-guest")["pages-written"]
    wait_until(lambda: dst("x-query-guest")["pages-written"] > written, 10, "the guest to write on")


@pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")
@pytest.mark.timeout(180)
def test_postcopy_silent_link_with_the_destination_guest_faulting(link: netns.Link, hosts: MakeHost) -> None:
    """A silent link while the destination's guest runs and waits on faults: the fault
    handler's check and the sockets' user timeout race on the destination; whichever
    wins, both sides pause naming the silence, and one recovery completes the migration
    with every page."""
    src, dst = postcopy_in_flight(hosts, 4480, 8 * MiB, "--dirty-rate", "8M")
    outage = Outage("postcopy-active, destination guest running")
    silence_until_paused(link, src, dst, outage)
    print(outage.line(), flush=True)
    assert max(outage.detected.values()) <= DETECT_LIMIT_S, outage.line()
    assert all("went silent" in why for why in outage.errors.values()), outage.line()
    recover_once_and_complete(src, dst, 4481)
    ram = dst.info()["ram"]
    assert ram["postcopy-lost-pages"] == 0 and ram["postcopy-requests"] > 0, ram


@pytest.mark.skipif(postcopy_uffd.available() is not None, reason="no userfaultfd")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["source", "destination"])
def test_postcopy_pauses_the_survivor_when_a_side_is_killed(hosts: MakeHost, victim: str) -> None:
    """SIGKILL of one side in ``postcopy-active``: the other gets a reset at once and
    pauses (it cannot fail: the guest's state is split between the two). Nothing can
    bring back what the dead side held, as in QEMU; the survivor waits, answering QMP,
    for a recovery that an operator may still attempt (a destination) or gives up on."""
    src, dst = postcopy_in_flight(hosts, 4472, 8 * MiB)
    dead, survivor = (src, dst) if victim == "source" else (dst, src)
    dead.kill()
    took = wait_until(lambda: survivor.status() == "postcopy-paused", 5, "the survivor to pause")
    print(f"{victim} killed: the other side paused after {took:.2f} s: "
          f"{survivor.info().get('error-desc')}", flush=True)
    assert took < 3.0  # a reset, not a timeout
    why = survivor.info().get("error-desc", "")  # names the cause, not only a stream offset
    assert "the peer closed the connection" in why or "Connection reset by peer" in why, why
    # the survivor stays paused and answers; the destination's guest (now the only one)
    # still runs, the source's stays stopped in finish-migrate (QEMU's runstate through
    # postcopy): the destination ran the guest, the source must never resume it
    time.sleep(1.0)
    assert survivor.status() == "postcopy-paused"
    assert survivor.runstate() == ("running" if survivor is dst else "finish-migrate")
