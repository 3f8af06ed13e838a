"""Network namespaces for fault-injection tests: two hosts and a link the test can break.

    ns A (10.77.1.2) ── veth ── router ns (10.77.1.1 | 10.77.2.1) ── veth ── ns B (10.77.2.2)

Each host is a namespace of its own with a veth pair to a *router* namespace that forwards
between them. A fault is applied in the router, on packets in transit, so neither host's
TCP stack can tell it from a real one:

* :meth:`Link.silence` — a *blackhole* route for each host's address in the router: every
  packet between the hosts is dropped silently, both ways (no ICMP, no reset, no error
  for a local sender — a cable pulled in the middle). ``tc netem loss 100%`` on the hosts'
  own devices would do the same, but needs the ``sch_netem`` module, which many kernels
  (this one's too) lack, and a route in the hosts themselves would report errors to the
  sending stack; a blackhole in the router needs nothing but iproute2 and routing;
* :meth:`Link.delay` — ``tc netem delay`` on the router's two devices, where the kernel
  has netem (:attr:`Link.netem` says; tests that need a delay skip without it).

Names carry the test process's pid, so concurrent test runs on one machine never meet
(addresses are per namespace). :meth:`Link.close` removes every namespace (and with them
the veth devices and qdiscs) whatever state the test left them in; processes started in
a namespace must be ended by their owner first (a namespace lives as long as a process
in it does).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

A_ADDR, B_ADDR = "10.77.1.2", "10.77.2.2"
_R_A, _R_B = "10.77.1.1", "10.77.2.1"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (for ``pytest.skip``), or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (./run test installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    name = f"lmprobe{os.getpid()}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    try:
        res = _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if res.returncode != 0:
            return f"cannot create a veth pair: {res.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


class Link:
    """Hosts A and B and the router between them (module docstring)."""

    def __init__(self) -> None:
        tag = f"lm{os.getpid()}x{next(_counter)}"
        self.a, self.r, self.b = f"{tag}a", f"{tag}r", f"{tag}b"
        self.silent = False
        self.delayed = False
        self._made: list[str] = []
        try:
            for ns in (self.a, self.r, self.b):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            # each pair is created with both ends in their namespaces: no name in the host's
            _ip("-n", self.a, "link", "add", "eth0", "type", "veth", "peer", "name", "to-a", "netns", self.r)
            _ip("-n", self.b, "link", "add", "eth0", "type", "veth", "peer", "name", "to-b", "netns", self.r)
            for ns, dev, addr in ((self.a, "eth0", A_ADDR), (self.r, "to-a", _R_A),
                                  (self.r, "to-b", _R_B), (self.b, "eth0", B_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", self.a, "route", "add", "default", "via", _R_A)
            _ip("-n", self.b, "route", "add", "default", "via", _R_B)
            self.router("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.netem = self._probe_netem()
        except BaseException:
            self.close()
            raise

    # -- running things --------------------------------------------------------------------
    @staticmethod
    def prefix(ns: str) -> list[str]:
        """The command prefix that runs a program in ``ns`` (``ip netns exec`` execs it:
        the pid the caller gets is the program's own)."""
        return ["ip", "netns", "exec", ns]

    def router(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(self.r), *cmd], capture_output=True, text=True,
                              check=check, timeout=20)

    # -- faults ----------------------------------------------------------------------------
    def silence(self) -> None:
        """Drop every packet between A and B, both ways, from now on."""
        for addr in (A_ADDR, B_ADDR):
            _ip("-n", self.r, "route", "add", "blackhole", f"{addr}/32")
        self.silent = True

    def restore(self) -> None:
        """The link carries packets again (and without delay)."""
        if self.silent:
            for addr in (A_ADDR, B_ADDR):
                _ip("-n", self.r, "route", "del", "blackhole", f"{addr}/32", check=False)
            self.silent = False
        if self.delayed:
            for dev in ("to-a", "to-b"):
                self.router("tc", "qdisc", "del", "dev", dev, "root", check=False)
            self.delayed = False

    def delay(self, ms: int) -> None:
        """Every packet waits ``ms`` in each direction (needs :attr:`netem`)."""
        assert self.netem, "no netem in this kernel"
        for dev in ("to-a", "to-b"):
            self.router("tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{ms}ms",
                        "limit", "100000")
        self.delayed = True

    def _probe_netem(self) -> bool:
        if shutil.which("tc") is None:
            return False
        ok = self.router("tc", "qdisc", "add", "dev", "to-a", "root", "netem", "delay", "0ms",
                         check=False).returncode == 0
        if ok:
            self.router("tc", "qdisc", "del", "dev", "to-a", "root", check=False)
        return ok

    # -- clean-up --------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the namespaces (their devices, routes and qdiscs go with them)."""
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this link that still exist (a test checks there are none)."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return [ns for ns in (self.a, self.r, self.b) if ns in listed]
