"""The RAM record decoder on its own, as both of its users drive it.

``RecordDecoder`` hands runs of records to a consumer and says where each run starts; the
loader applies them, ``livemig inspect`` counts them and, for the discard check, derives
every record's offset from the run's start and stride. These tests write record sequences
byte by byte (not with the encoder), decode them through readers with small buffers (so
runs break at buffer ends), and compare every record the consumer was handed, with its
offset, against what was written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.migration.ram.codec import ZERO_RECORD, RecordDecoder, read_block_list
from livemig.migration.stream.format import RAM_FLAG_REMOVED_COMPRESS_PAGE, RamFlag
from livemig.migration.stream.qemu_file import StreamError, bytes_reader

BLOCK_PAGES = 4096


@dataclass
class Block:
    idstr: str
    used_length: int


@dataclass
class Recorder:
    """A consumer that writes down every record it is handed: (offset, block, page, kind,
    first payload byte); offsets from the run's start and the documented strides."""

    page_record: int
    records: list[tuple[int, str, int, str, int]] = field(default_factory=list)
    flushes: list[int] = field(default_factory=list)
    calls: int = 0

    def pages(self, block: Any, pages: np.ndarray, data: np.ndarray, at: int) -> None:
        self.calls += 1
        assert data.shape == (len(pages), self.page_record - 8)
        for i, p in enumerate(pages.tolist()):
            self.records.append(
                (at + i * self.page_record, block.idstr, p, "PAGE", int(data[i, 0]))
            )

    def zeros(self, block: Any, pages: np.ndarray, at: int) -> None:
        self.calls += 1
        for i, p in enumerate(pages.tolist()):
            self.records.append((at + i * ZERO_RECORD, block.idstr, p, "ZERO", 0))

    def flush(self, at: int) -> None:
        self.flushes.append(at)

    def encoded(self, block: Any, page: int, kind: int, at: int) -> None:
        name = "XBZRLE" if kind == RamFlag.XBZRLE else "COMPRESSED"
        self.records.append((at, block.idstr, page, name, -1))


KINDS = {
    "PAGE": int(RamFlag.PAGE),
    "ZERO": int(RamFlag.ZERO),
    "XBZRLE": int(RamFlag.XBZRLE),
    "COMPRESSED": RAM_FLAG_REMOVED_COMPRESS_PAGE,
}


def write_records(
    recs: list[tuple[str, str, int]], page_bits: int
) -> tuple[bytes, list[tuple[int, str, int, str, int]], list[int]]:
    """Records (kind, block, page) as a sender writes them: the block named when it
    changes; MULTIFD_FLUSH for kind "FLUSH". Returns the bytes (ending with EOS), the
    records a consumer must see, and the flush offsets."""
    ps = 1 << page_bits
    out = bytearray()
    want: list[tuple[int, str, int, str, int]] = []
    flushes: list[int] = []
    last = None
    for i, (kind, block, page) in enumerate(recs):
        at = len(out)
        if kind == "FLUSH":
            out += struct.pack(">Q", RamFlag.MULTIFD_FLUSH)
            flushes.append(at)
            continue
        flags = KINDS[kind] | (RamFlag.CONTINUE if block == last else 0)
        out += struct.pack(">Q", (page << page_bits) | flags)
        if block != last:
            out += bytes([len(block)]) + block.encode()
            last = block
        fill = 1 + i % 250
        if kind == "PAGE":
            out += bytes([fill]) + bytes(ps - 1)
        elif kind == "ZERO":
            out += b"\0"
            fill = 0
        elif kind == "XBZRLE":
            out += b"\x01" + struct.pack(">H", 5) + b"xbzrl"
            fill = -1
        else:
            out += struct.pack(">I", 3) + b"zzz"
            fill = -1
        want.append((at, block, page, kind, fill))
    out += struct.pack(">Q", RamFlag.EOS)
    return bytes(out), want, flushes


def decode(data: bytes, page_bits: int, buffer: int, encoded: bool = False) -> Recorder:
    blocks = {n: Block(n, BLOCK_PAGES << page_bits) for n in ("a", "bb")}
    rec = Recorder(8 + (1 << page_bits))
    dec = RecordDecoder(blocks, page_bits=page_bits, on_encoded=rec.encoded if encoded else None)
    r = bytes_reader(data, buffer_size=buffer)
    dec.read_section(r, rec)
    assert r.at_eof()
    return rec


segment = st.tuples(
    st.sampled_from(["PAGE", "ZERO", "ZERO", "XBZRLE", "COMPRESSED", "FLUSH"]),
    st.sampled_from(["a", "a", "bb"]),
    st.integers(1, 150),  # run length: one record, a few, past the 64-record window
    st.integers(0, BLOCK_PAGES - 150),
)


@settings(max_examples=150, deadline=None)
@given(
    segments=st.lists(segment, min_size=1, max_size=12),
    page_bits=st.sampled_from([10, 12, 14]),
    buffer=st.integers(64, 40_000),
    alternate=st.booleans(),
)
def test_every_record_reaches_the_consumer_at_its_offset(
    segments: list[tuple[str, str, int, int]], page_bits: int, buffer: int, alternate: bool
) -> None:
    recs: list[tuple[str, str, int]] = []
    for kind, block, n, first in segments:
        if kind in ("XBZRLE", "COMPRESSED", "FLUSH"):
            n = min(n, 3)
        for k in range(n):
            other = "ZERO" if kind == "PAGE" else "PAGE"
            recs.append((other if alternate and k % 2 else kind, block, first + k))
    data, want, flushes = write_records(recs, page_bits)
    got = decode(data, page_bits, buffer, encoded=True)
    assert got.records == want
    assert got.flushes == flushes


def test_runs_are_handed_over_whole() -> None:
    """A long run is one call per buffer, not one per record (the loader's speed)."""
    recs = [("PAGE", "a", p) for p in range(1000)] + [("ZERO", "a", p) for p in range(1000, 3000)]
    data, want, _ = write_records(recs, 12)
    got = decode(data, 12, 8 << 20)
    assert got.records == want
    assert got.calls == 3  # the first record names its block; then one run of each kind


def test_encoded_records_are_refused_without_a_hook() -> None:
    """The loader has no hook: XBZRLE is unsupported and the removed COMPRESS_PAGE flag
    unknown, each at its record's offset; the inspector's hook sees both."""
    for kind, message in (
        ("XBZRLE", "unsupported RAM record flags 0x60 (XBZRLE)"),
        ("COMPRESSED", "unknown RAM record flags 0x120"),
    ):
        data, want, _ = write_records([("PAGE", "a", 1), (kind, "a", 2)], 12)
        with pytest.raises(StreamError) as e:
            decode(data, 12, 1 << 16)
        assert e.value.offset == want[1][0] and message in str(e.value)
        assert decode(data, 12, 1 << 16, encoded=True).records == want


@pytest.mark.parametrize(
    ("kind", "payload", "message", "offset"),
    [
        ("XBZRLE", b"\x02" + struct.pack(">H", 5), "XBZRLE record with encoding byte 0x02", 10),
        (
            "XBZRLE",
            b"\x01" + struct.pack(">H", 4097),
            "XBZRLE record of 4097 bytes exceeds a page",
            11,
        ),
        ("COMPRESSED", struct.pack(">I", 5000), "compressed page of 5000 bytes exceeds 4110", 10),
    ],
)
def test_encoded_payload_sizes_are_checked(
    kind: str, payload: bytes, message: str, offset: int
) -> None:
    """The payload's framing is checked where it is read: encoding byte, then length."""
    data = struct.pack(">Q", (7 << 12) | KINDS[kind]) + b"\x01a" + payload + bytes(5000)
    with pytest.raises(StreamError) as e:
        decode(data, 12, 1 << 16, encoded=True)
    assert message in str(e.value) and e.value.offset == offset


def test_offset_beyond_the_block_in_a_run_names_the_record() -> None:
    recs = [("ZERO", "a", p) for p in range(100)]
    recs[70] = ("ZERO", "a", BLOCK_PAGES)  # one past the end, inside a run
    data, want, _ = write_records(recs, 12)
    with pytest.raises(StreamError) as e:
        decode(data, 12, 1 << 16)
    assert e.value.offset == want[70][0] and "beyond used length" in str(e.value)


def test_page_bits_out_of_range() -> None:
    with pytest.raises(ValueError):
        RecordDecoder({}, page_bits=9)


def _block_list(entries: list[bytes], total: int) -> bytes:
    return (
        struct.pack(">Q", total | RamFlag.MEM_SIZE)
        + b"".join(entries)
        + struct.pack(">Q", RamFlag.EOS)
    )


def _entry(name: str, length: int, *extra: int) -> bytes:
    return (
        bytes([len(name)])
        + name.encode()
        + struct.pack(">Q", length)
        + b"".join(struct.pack(">Q", x) for x in extra)
    )


def test_block_list_optional_fields() -> None:
    """Postcopy page sizes (sent only for some blocks) and x-ignore-shared addresses."""
    data = _block_list([_entry("a", 1 << 21, 1 << 21), _entry("bb", 1 << 20)], 3 << 20)
    total, entries, _ = read_block_list(bytes_reader(data), postcopy=True)
    assert total == 3 << 20
    assert [(e.name, e.length, e.page_size) for e in entries] == [
        ("a", 1 << 21, 1 << 21),
        ("bb", 1 << 20, None),
    ]
    assert [e.at for e in entries] == [8, 8 + 2 + 8 + 8]
    data = _block_list([_entry("a", 1 << 21, 0x1000_0000)], 1 << 21)
    _, (e,), _ = read_block_list(bytes_reader(data), ignore_shared=True)
    assert (e.addr, e.page_size) == (0x1000_0000, None)


@pytest.mark.parametrize(
    ("entries", "message", "offset"),
    [
        ([_entry("", 4096)], "empty block name", 8),
        ([bytes([2]) + b"\xff\xfe" + struct.pack(">Q", 4096)], "is not UTF-8", 8),
        ([_entry("a", 4096), _entry("a", 4096)], 'RAM block "a" listed twice', 18),
        ([_entry("a", 4097)], "not a positive multiple of the page size 0x1000", 10),
        ([_entry("a", 0)], "not a positive multiple", 10),
    ],
)
def test_block_list_problems(entries: list[bytes], message: str, offset: int) -> None:
    with pytest.raises(StreamError) as e:
        read_block_list(bytes_reader(_block_list(entries, 8192)))
    assert message in str(e.value) and e.value.offset == offset
