"""QMP's wire protocol, below the commands: framing a byte stream into JSON texts,
strict parsing, the request envelope, and the error reply.

Kept apart from the server so that the part every byte from a client goes through is
small enough to read whole, and testable without sockets.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Largest single message a client may send. QEMU uses the same nesting limit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_NESTING = 1024


class QMPError(Exception):
    """Raised by a command handler to make the client receive a QMP error reply.

    The error *class* is explicit because clients branch on it (``DeviceNotFound``,
    ``CommandNotFound``, ...); any other exception escaping a handler is reported as
    ``GenericError`` with ``str(exc)`` as its description.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


_ANY_NON_SPACE = re.compile(rb"\S")
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb'[\s{}\[\]"]')


class InputOverflow(Exception):
    """A client sent a value too large or too deeply nested to buffer."""


class JSONSplitter:
    """Cut a byte stream into top-level JSON texts.

    QMP does not require newlines: QEMU accepts a request split across lines, or several
    on one line, so framing follows brackets and strings rather than ``readline()``. Only
    framing happens here; each piece is then parsed on its own, so a malformed piece costs
    one error reply and the stream picks up again at the next top-level value.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
        self._buf = bytearray()
        self._pos = 0  # next byte to look at
        self._start = -1  # where the current value began; -1 between values
        self._depth = 0
        self._in_string = False
        self._in_scalar = False

    @property
    def buffered(self) -> int:
        """Bytes held for the value being received (what a slow or hostile client costs)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        n = len(buf)
        pos = self._pos
        while pos < n:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                if buf[m.start()] == 0x5C:  # backslash: skip it and the escaped byte
                    pos = m.start() + 2
                    continue
                pos = m.end()
                self._in_string = False
                if self._depth == 0:
                    out.append(bytes(buf[self._start : pos]))
                    self._start = -1
            elif self._start < 0:
                m = _ANY_NON_SPACE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = self._start = m.start()
                c = buf[pos]
                if c in b"{[":
                    self._depth = 1
                    pos += 1
                elif c == 0x22:
                    self._in_string = True
                    pos += 1
                elif c in b"}]":  # stray closer: a one-byte piece that fails to parse
                    pos += 1
                    out.append(bytes(buf[self._start : pos]))
                    self._start = -1
                else:
                    self._in_scalar = True
            elif self._in_scalar:
                m = _SCALAR_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                out.append(bytes(buf[self._start : pos]))
                self._start = -1
                self._in_scalar = False
            else:
                m = _STRUCTURAL.search(buf, pos)
                if m is None:
                    pos = n
                    break
                c = buf[m.start()]
                pos = m.end()
                if c == 0x22:
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > MAX_NESTING:
                        raise InputOverflow("JSON parse error, nesting too deep")
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(bytes(buf[self._start : pos]))
                        self._start = -1
        # Drop what is consumed. pos may be one past the end after a trailing backslash.
        keep_from = min(pos, n) if self._start < 0 else self._start
        del buf[:keep_from]
        self._pos = pos - keep_from
        if self._start >= 0:
            self._start = 0
        if len(buf) > self.max_bytes:
            raise InputOverflow("JSON parse error, message too large")
        return out


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid token '{name}'")


def parse_json(piece: bytes) -> Any:
    """Parse one framed piece as strict JSON (UTF-8, no NaN/Infinity, no duplicate keys)."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        raise QMPError("JSON parse error, invalid UTF-8 sequence") from None
    try:
        return json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise QMPError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}") from None
    except (ValueError, RecursionError) as exc:
        raise QMPError(f"JSON parse error, {exc}") from None


def check_envelope(req: Any) -> tuple[str, dict[str, Any]]:
    """Validate the request object itself, before looking at the command."""
    if not isinstance(req, dict):
        raise QMPError("QMP input must be a JSON object")
    for key, value in req.items():
        if key in ("execute", "exec-oob"):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" in req and "exec-oob" in req:
        raise QMPError("QMP input must not contain both 'execute' and 'exec-oob'")
    name = req.get("execute", req.get("exec-oob"))
    if name is None:
        raise QMPError("QMP input lacks member 'execute'")
    return name, req.get("arguments", {})


def error_reply(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
