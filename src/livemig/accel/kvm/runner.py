"""A vCPU thread that another thread can pause and resume promptly.

The thread loops on :meth:`KvmVcpu.run` (``KVM_RUN`` without the GIL). Between two runs
it checks for a pause request and, if one is pending, parks on a condition variable until
:meth:`VcpuRunner.resume`. How soon it gets there depends on how soon ``KVM_RUN`` returns:

* with the guest program's periodic yield exits (``guest_program``), within one yield
  interval (a few milliseconds), with no signals involved;
* with :func:`~livemig.accel.kvm.vm.install_kick_signal`, at once, whatever the guest does.

A pause request can carry a predicate: the runner then parks only at an exit that matches
it (e.g. the guest's pass exit, where the host may rewrite the target table) and does not
kick, since a kick would only produce exits the predicate rejects.

Two more ways to stop running, for guests the user brings (``halt_on_hlt``):

* **HLT** leaves the vCPU *halted*: without an in-kernel interrupt controller KVM hands HLT
  to us, and with no interrupt source a halted vCPU stays halted until a reset. The thread
  then waits (it is not paused: a pause parks it, a resume brings it back to waiting).
* **hold** parks the thread from inside an exit callback (a guest that asked for a reset or
  a power-off must not execute one more instruction); only :meth:`VcpuRunner.release`
  undoes it, so a ``resume`` racing with the reset cannot let the guest run on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from livemig.accel.kvm import ioctls as k
from livemig.accel.kvm.vm import KvmVcpu, VcpuExit

_CONTINUE = frozenset({k.KVM_EXIT_IO, k.KVM_EXIT_INTR})


class VcpuRunner:
    """Runs one vCPU on its own thread; ``pause``/``resume``/``stop`` from any other thread.

    ``on_exit`` (optional) is called on the vCPU thread for every exit; exceptions from it
    stop the runner and are kept in :attr:`error`. I/O and EINTR exits continue the loop; HLT
    ends it normally (or halts, ``halt_on_hlt``); anything else ends it with :attr:`error`
    set, unless ``all_exits`` says that ``on_exit`` handles it (MMIO, a triple fault).
    """

    def __init__(
        self,
        vcpu: KvmVcpu,
        on_exit: Callable[[VcpuExit], None] | None = None,
        name: str | None = None,
        *,
        halt_on_hlt: bool = False,
        halted: bool = False,
        all_exits: bool = False,
        pace: Callable[[], object] | None = None,
    ):
        self.vcpu = vcpu
        self.on_exit = on_exit
        self.pace = pace  # before each KVM_RUN: a throttled vCPU sleeps here (accel.throttle)
        self.halt_on_hlt = halt_on_hlt
        self.halted = halted
        """Stopped in HLT (``halt_on_hlt``); set or cleared by others only while parked."""
        self.all_exits = all_exits
        """``on_exit`` deals with every exit (MMIO, shutdown, errors): keep looping."""
        self._held = False
        self._unparks = 0
        self.exits = 0
        self.last_exit: VcpuExit | None = None
        self.park_exit: VcpuExit | None = None  # the exit at which the runner last parked
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._want_pause = False
        self._pause_pred: Callable[[VcpuExit], bool] | None = None
        self._parked = False
        self._stop = False
        self._done = False
        self._thread = threading.Thread(
            target=self._loop, name=name or f"vcpu{vcpu.id}", daemon=True
        )

    # -- control (any thread) -------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the thread; with ``paused`` it parks before entering the guest."""
        self._want_pause = paused
        self._thread.start()
        if paused:
            self._wait_parked(5.0)

    @property
    def paused(self) -> bool:
        return self._parked

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._done

    @property
    def native_id(self) -> int | None:
        """The kernel thread id: userfaultfd reports it for a fault taken inside KVM_RUN."""
        return self._thread.native_id

    def pause(self, timeout: float = 1.0, at: Callable[[VcpuExit], bool] | None = None) -> float:
        """Park the vCPU thread; return the seconds it took. Raises TimeoutError.

        With ``at``, park only at an exit for which ``at(exit)`` is true. On timeout the
        request stays pending (the thread will park later); call :meth:`resume` to drop it.
        """
        t0 = time.perf_counter()
        with self._cv:
            self._want_pause = True  # also when parked: a hold may be released meanwhile
            self._pause_pred = at
            if self._parked:
                return 0.0
            if at is None:
                self.vcpu.kick()
            self._cv.notify_all()  # a halted vCPU waits on the condition, not in KVM_RUN
        self._wait_parked(timeout)
        return time.perf_counter() - t0

    def _wait_parked(self, timeout: float) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._parked or self._done, timeout):
                raise TimeoutError(f"vCPU {self.vcpu.id} did not pause within {timeout} s")
            if self._done and not self._parked:
                raise RuntimeError(f"vCPU {self.vcpu.id} runner ended: {self.error!r}")

    def resume(self, timeout: float = 5.0) -> None:
        """Let a parked (or about to park) vCPU thread run the guest again.

        Waits until the thread has left its parking spot, so that a ``pause`` right after
        ``resume`` asks for a *new* stop rather than finding the old one.
        """
        with self._cv:
            self._want_pause = False
            self._pause_pred = None
            self._cv.notify_all()
            left = self._unparks  # it may leave and park again (a hold) before we look
            if not self._cv.wait_for(
                lambda: not self._parked or self._done or self._unparks != left or self._held,
                timeout,
            ):
                raise TimeoutError(f"vCPU {self.vcpu.id} did not resume within {timeout} s")

    def hold(self) -> None:
        """Park at the next loop turn and stay parked until :meth:`release` (any thread).

        From an exit callback the vCPU is not re-entered; from another thread it is kicked.
        """
        with self._cv:
            self._held = True
            if threading.get_ident() != self._thread.ident:
                self.vcpu.kick()
            self._cv.notify_all()

    def release(self) -> None:
        """Undo :meth:`hold`; the thread runs again unless a pause is also pending."""
        with self._cv:
            self._held = False
            self._cv.notify_all()

    @property
    def held(self) -> bool:
        return self._held

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (kicking the vCPU out of the guest) and join it."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            self.vcpu.kick()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"vCPU {self.vcpu.id} thread did not stop in {timeout} s")

    # -- the vCPU thread ------------------------------------------------------------------
    def _should_park(self, ex: VcpuExit | None) -> bool:
        if self._held:
            return True
        if not self._want_pause:
            return False
        pred = self._pause_pred
        return pred is None or (ex is not None and pred(ex))

    def _loop(self) -> None:
        ex: VcpuExit | None = None
        try:
            while True:
                if self.pace is not None and not self.halted:
                    self.pace()  # kept out of KVM_RUN for its throttle share
                with self._cv:
                    if self._should_park(ex) and not self._stop:
                        self.vcpu.cancel_kick()  # a kick that came too late
                        self._parked = True
                        self.park_exit = ex
                        self._cv.notify_all()
                        self._cv.wait_for(
                            lambda: (not self._want_pause and not self._held) or self._stop
                        )
                        self._parked = False
                        self._unparks += 1
                        self._cv.notify_all()
                    if self._stop:
                        return
                    if self.halted:  # wait for a pause, a hold, a stop, or a reset
                        self._cv.wait_for(
                            lambda: self._should_park(None) or self._stop or not self.halted
                        )
                        ex = None
                        continue
                ex = self.vcpu.run()
                self.exits += 1
                self.last_exit = ex
                if self.on_exit is not None:
                    self.on_exit(ex)
                if ex.reason == k.KVM_EXIT_HLT:
                    if self.halt_on_hlt:
                        self.halted = True
                        continue
                    return
                if ex.reason not in _CONTINUE and not self.all_exits:
                    raise RuntimeError(f"vCPU {self.vcpu.id}: unexpected exit {ex!r}")
        except BaseException as e:  # noqa: BLE001 - reported through .error
            self.error = e
        finally:
            with self._cv:
                self._done = True
                self._parked = False
                self._cv.notify_all()
