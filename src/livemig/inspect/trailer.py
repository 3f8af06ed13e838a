"""The VMDESCRIPTION trailer: found at the end of the file before anything else is read.

A FULL device section has no length field, so it can be parsed only with the field
layouts of the JSON description QEMU appends after the EOF record. The trailer is located
by looking backwards from the end of the file for ``0x06, be32 len`` whose length matches
what follows: JSON text never contains a raw 0x06 byte, which makes the backward search
reliable. A trailer that is there but broken is kept as :attr:`Trailer.problem` and
raised only when the walk needs the description, so a stream damaged elsewhere reports
its first problem first.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from livemig.migration.stream import savevm
from livemig.migration.stream.format import RAM_MIN_PAGE_BITS
from livemig.migration.stream.qemu_file import StreamError
from livemig.migration.stream.savevm import MAX_VMDESC

_BE32 = struct.Struct(">I")


@dataclass
class Trailer:
    """Where the VMDESCRIPTION is, its JSON, or why a trailer that seems there is unusable."""

    desc: dict[str, Any] | None = None
    offset: int | None = None  # offset of the 0x06 byte
    size: int | None = None
    problem: StreamError | None = None  # why a trailer that seems to be there is unusable


def parse_vmdesc_json(data: bytes, joff: int) -> dict[str, Any]:
    """The loader's parse (a JSON object), then what inspect relies on to decode devices."""
    obj = savevm.parse_vmdesc_json(data, joff)
    devices = obj.get("devices", [])
    if not isinstance(devices, list):
        raise StreamError(joff, "VMDESCRIPTION: 'devices' is not a list")
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            raise StreamError(joff, f"VMDESCRIPTION: device entry #{i} has no name")
        if not isinstance(dev.get("instance_id", 0), int):
            raise StreamError(joff, f"VMDESCRIPTION: device {dev['name']!r} has a bad instance_id")
    ps = obj.get("page_size")
    if ps is not None and (not isinstance(ps, int) or ps < 1 << RAM_MIN_PAGE_BITS or ps & (ps - 1)):
        raise StreamError(joff, f"VMDESCRIPTION: bad page_size {ps!r}")
    return obj


def find_vmdesc(path: str | os.PathLike[str], file_size: int) -> Trailer:
    """Locate ``[0x00 EOF] 0x06, be32 len, JSON`` at the very end of the file.

    Looks at the last megabyte first (QEMU's descriptions are tens of kilobytes) and only
    then at the largest tail a description may occupy. A trailer that is there but broken
    (bad JSON, a length that does not match, cut short) is returned as ``problem`` and
    raised only when the walk needs the description, so a stream damaged elsewhere
    reports its first problem first.
    """
    tr = Trailer()
    with open(path, "rb") as f:
        for tail in sorted({min(file_size, 1 << 20), min(file_size, MAX_VMDESC + 6)}):
            f.seek(file_size - tail)
            data = f.read(tail)
            base = file_size - tail
            pos = len(data)
            suspect: tuple[int, int] | None = None
            while True:
                p = data.rfind(b"\x06", 0, pos)
                if p < 0:
                    break
                pos = p
                if data[p + 5 : p + 6] != b"{":
                    continue
                n = _BE32.unpack_from(data, p + 1)[0]
                follow = len(data) - p - 5
                if n == follow:  # the EOF byte before it is checked by the walk
                    tr.offset, tr.size = base + p, n
                    try:
                        tr.desc = parse_vmdesc_json(bytes(data[p + 5 :]), base + p + 5)
                    except StreamError as e:
                        tr.problem = e
                    return tr
                if suspect is None and data[p + 5 : p + 7] == b'{"' and p and data[p - 1] == 0:
                    suspect = (p, n)
            if tail != min(file_size, MAX_VMDESC + 6):
                continue
            for k in range(4):  # cut inside "0x06, be32 len": 0..3 length bytes left
                if len(data) >= k + 2 and data[-(k + 2)] == 0 and data[-(k + 1)] == 6:
                    tr.problem = StreamError(
                        file_size - k - 1,
                        f"truncated stream: VMDESCRIPTION header cut short ({k} of 4 length bytes)",
                    )
                    return tr
            if suspect is not None:
                p, n = suspect
                follow = len(data) - p - 5
                what = "cut short" if n > follow else "followed by more data"
                tr.problem = StreamError(
                    base + p + 1,
                    f"VMDESCRIPTION length field says {n} bytes but {follow} follow ({what})",
                )
    return tr
