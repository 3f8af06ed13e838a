"""A 16550A UART (COM1 at 0x3f8), polled, with its state in QEMU's ``serial`` section.

Registers (offset from the base; DLAB is LCR bit 7):

======  =====================  ===========================================================
offset  read                   write
======  =====================  ===========================================================
0       RBR (DLAB: DLL)        THR (DLAB: DLL)
1       IER (DLAB: DLM)        IER (DLAB: DLM)
2       IIR                    FCR
3       LCR                    LCR
4       MCR                    MCR
5       LSR                    (ignored)
6       MSR                    (ignored)
7       SCR                    SCR
======  =====================  ===========================================================

Transmission is instant: a byte written to THR goes to the backend at once (or, in
loopback, MCR bit 4, to the receive side), and THRE/TEMT are set again before the guest's
next access, so a guest polling LSR for THRE never waits. Received bytes (from the backend,
or looped back) fill RBR, or the 16-byte receive FIFO when FCR enables it; the FIFO's
character timeout counts as expired at once (there is no timer to run). No interrupt line
is wired (this machine has no interrupt controller yet): IIR still says what a guest
would be interrupted for, so a guest may poll it.

Migration: section ``serial``, instance 0, version 3 — QEMU's ISA serial layout, verified
against a stream QEMU 7.2 wrote: a ``state`` struct with divider, rbr, ier, iir, lcr, mcr,
lsr, msr, scr, fcr_vmstate, then the subsections QEMU would send for this state:
``serial/thr_ipending`` (when THRI is enabled and the pending bit disagrees with IIR),
``serial/recv_fifo`` (a Fifo8: 16 data bytes, head, num; when bytes are waiting) and
``serial/timeout_ipending``. Bytes the backend delivered but the guest has not let in yet
(a full FIFO) stay with the backend, as QEMU's chardev keeps them.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from livemig.devices.chardev import Backend
from livemig.devices.state import StateRegistry, StateSection
from livemig.devices.vmstate import Field, VMStateDescription

COM1_BASE = 0x3F8
FIFO_SIZE = 16

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI, IIR_ID, IIR_FIFO = 0x01, 0x02, 0x04, 0x06, 0x0C, 0x0E, 0xC0
FCR_FE, FCR_RFR, FCR_XFR = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_LOOP, MCR_OUT2 = 0x10, 0x08
LSR_DR, LSR_OE, LSR_BI, LSR_INT_ANY, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x10, 0x1E, 0x20, 0x40
MSR_DCD, MSR_DSR, MSR_CTS, MSR_DELTA = 0x80, 0x20, 0x10, 0x0F
_TRIGGER = (1, 4, 8, 14)

FIFO8_DESC = VMStateDescription(
    "Fifo8", 1, [Field.buffer("data", FIFO_SIZE), Field.uint32("head"), Field.uint32("num")]
)


def _thr_ipending_needed(v: Any) -> bool:
    if not v["ier"] & IER_THRI:
        return False  # THRE is sampled again when THRI is enabled: nothing to carry
    return bool(v["thr_ipending"]) != ((v["iir"] & IIR_ID) == IIR_THRI)


SERIAL_DESC = VMStateDescription(
    "serial",
    3,
    [
        Field.uint16("divider", since=2),
        *(Field.uint8(n) for n in ("rbr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr")),
        Field.uint8("fcr_vmstate", since=3),
    ],
    subsections=[
        VMStateDescription("serial/thr_ipending", 1, [Field.int32("thr_ipending")], needed=_thr_ipending_needed),
        VMStateDescription(
            "serial/recv_fifo", 1, [Field.struct("recv_fifo", FIFO8_DESC)], needed=lambda v: v["recv_fifo"]["num"] > 0
        ),
        VMStateDescription(
            "serial/timeout_ipending", 1, [Field.int32("timeout_ipending")], needed=lambda v: v["timeout_ipending"] != 0
        ),
    ],
    minimum_version=2,
)
ISA_SERIAL_DESC = VMStateDescription("serial", 3, [Field.struct("state", SERIAL_DESC)], minimum_version=2)
"""The ISA wrapper QEMU registers: one ``state`` struct holding the UART."""


class Serial16550:
    """One UART; ``io_read``/``io_write`` on the vCPU thread, input from backend threads."""

    def __init__(self, backend: Backend, name: str = "serial0"):
        self.name = name
        self.backend = backend
        self._lock = threading.RLock()
        self._pending: deque[int] = deque()  # delivered by the backend, not yet let in
        self.fifo: deque[int] = deque()
        self.reset()
        backend.set_receiver(self.feed)

    def reset(self) -> None:
        """Power-on values (the 16550A data sheet's, QEMU's divider 12 = 9600 baud)."""
        with self._lock:
            self.divider = 12
            self.rbr = 0
            self.ier = 0
            self.iir = IIR_NO_INT
            self.lcr = 0
            self.mcr = MCR_OUT2
            self.lsr = LSR_TEMT | LSR_THRE
            self.msr = MSR_DCD | MSR_DSR | MSR_CTS
            self.scr = 0
            self.fcr = 0
            self.thr_ipending = 0
            self.timeout_ipending = 0
            self.fifo.clear()

    # -- helpers ----------------------------------------------------------------------------
    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_FE)

    def _update_iir(self) -> None:
        ident = IIR_NO_INT
        if self.ier & IER_RLSI and self.lsr & LSR_INT_ANY:
            ident = IIR_RLSI
        elif self.ier & IER_RDI and self.timeout_ipending:
            ident = IIR_CTI
        elif self.ier & IER_RDI and self.lsr & LSR_DR and (
            not self.fifo_enabled or len(self.fifo) >= _TRIGGER[self.fcr >> 6]
        ):
            ident = IIR_RDI
        elif self.ier & IER_THRI and self.thr_ipending:
            ident = IIR_THRI
        elif self.ier & IER_MSI and self.msr & MSR_DELTA:
            ident = 0
        self.iir = ident | (IIR_FIFO if self.fifo_enabled else 0)

    def _receive(self, byte: int) -> None:
        if self.fifo_enabled:
            if len(self.fifo) >= FIFO_SIZE:
                self.lsr |= LSR_OE
            else:
                self.fifo.append(byte)
            self.timeout_ipending = 1  # no timer: the character timeout has always run out
        else:
            if self.lsr & LSR_DR:
                self.lsr |= LSR_OE
            self.rbr = byte
        self.lsr |= LSR_DR
        self._update_iir()

    def _room(self) -> int:
        if self.mcr & MCR_LOOP:
            return 0  # the outside is disconnected in loopback
        if self.fifo_enabled:
            return FIFO_SIZE - len(self.fifo)
        return 0 if self.lsr & LSR_DR else 1

    def _accept_input(self) -> None:
        while self._pending and self._room() > 0:
            self._receive(self._pending.popleft())

    def feed(self, data: bytes) -> None:
        """Bytes from the backend: in as far as RBR/FIFO have room, the rest waits."""
        with self._lock:
            self._pending.extend(data)
            self._accept_input()

    # -- register access --------------------------------------------------------------------
    def io_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == 0 and dlab:
            self.divider = (self.divider & 0xFF00) | value
        elif offset == 1 and dlab:
            self.divider = (self.divider & 0x00FF) | (value << 8)
        elif offset == 0:
            self.thr_ipending = 0
            if self.mcr & MCR_LOOP:
                self._receive(value)
            else:
                self.backend.write(bytes((value,)))
            self.lsr |= LSR_THRE | LSR_TEMT  # sent at once
            self.thr_ipending = 1
            self._update_iir()
        elif offset == 1:
            changed = (self.ier ^ value) & IER_THRI
            self.ier = value & 0x0F
            if changed and self.ier & IER_THRI and self.lsr & LSR_THRE:
                self.thr_ipending = 1
            self._update_iir()
        elif offset == 2:
            self._write_fcr(value)
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
            self._accept_input()
        elif offset == 7:
            self.scr = value
        # 5 (LSR) and 6 (MSR) are read-only

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_FE or value & FCR_RFR:
            self.fifo.clear()  # enabling or disabling the FIFOs, or an explicit reset
            self.lsr &= ~(LSR_DR | LSR_BI)
            self.timeout_ipending = 0
        self.fcr = value & 0xC9
        self._update_iir()
        self._accept_input()

    def io_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == 0 and dlab:
            return self.divider & 0xFF
        if offset == 1 and dlab:
            return self.divider >> 8
        if offset == 0:
            if self.fifo_enabled:
                value = self.fifo.popleft() if self.fifo else 0
                if not self.fifo:
                    self.lsr &= ~(LSR_DR | LSR_BI)
                self.timeout_ipending = 0
            else:
                value = self.rbr
                self.lsr &= ~(LSR_DR | LSR_BI)
            self._update_iir()
            self._accept_input()
            return value
        if offset == 1:
            return self.ier
        if offset == 2:
            value = self.iir
            if value & IIR_ID == IIR_THRI:
                self.thr_ipending = 0  # reading IIR acknowledges THRE
                self._update_iir()
            return value
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            value = self.lsr
            if value & (LSR_BI | LSR_OE):
                self.lsr &= ~(LSR_BI | LSR_OE)
                self._update_iir()
            return value
        if offset == 6:
            if self.mcr & MCR_LOOP:  # outputs looped to inputs: OUT2->DCD OUT1->RI RTS->CTS DTR->DSR
                m = self.mcr
                return ((m & 0x0C) << 4) | ((m & 0x02) << 3) | ((m & 0x01) << 5)
            value = self.msr
            self.msr &= ~MSR_DELTA
            self._update_iir()
            return value
        return self.scr

    # -- migration --------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        with self._lock:
            data = bytes(self.fifo).ljust(FIFO_SIZE, b"\0")
            state = {
                "divider": self.divider,
                "rbr": self.rbr,
                "ier": self.ier,
                "iir": self.iir,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "lsr": self.lsr,
                "msr": self.msr,
                "scr": self.scr,
                "fcr_vmstate": self.fcr,
                "thr_ipending": self.thr_ipending,
                "recv_fifo": {"data": data, "head": 0, "num": len(self.fifo)},
                "timeout_ipending": self.timeout_ipending,
            }
        return {"state": state}

    def load(self, values: dict[str, Any]) -> None:
        s = values["state"]
        fifo = s.get("recv_fifo", {"data": b"", "head": 0, "num": 0})
        head, num, data = int(fifo["head"]), int(fifo["num"]), bytes(fifo["data"])
        if num > FIFO_SIZE or head >= FIFO_SIZE:
            raise ValueError(f"receive FIFO head {head} / count {num} beyond {FIFO_SIZE} bytes")
        with self._lock:
            self.divider = int(s.get("divider", 12))
            for name in ("rbr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr"):
                setattr(self, name, int(s[name]))
            self.fcr = int(s.get("fcr_vmstate", 0)) & 0xC9
            expected = int((self.iir & IIR_ID) == IIR_THRI)
            self.thr_ipending = int(s.get("thr_ipending", expected))
            self.timeout_ipending = int(s.get("timeout_ipending", 0))
            self.fifo = deque(data[(head + i) % FIFO_SIZE] for i in range(num))
            self._accept_input()

    def register_state(self, registry: StateRegistry) -> None:
        registry.register(StateSection.simple("serial", ISA_SERIAL_DESC, self.save, self.load))
