"""Stream framing: QEMUFile reader/writer, vmstate descriptions and savevm records.

Expected bytes are written out by hand from the stream format (reference section 4,
big-endian throughout), not produced by the code under test.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.devices.vmstate import (
    Field,
    VMStateDescription,
    VMStateError,
    decode,
    encode,
    encode_with_vmdesc,
    vmdesc_entry,
)
from livemig.memory.bitmap import Bitmap
from livemig.migration.stream import savevm
from livemig.migration.stream.format import (
    FILE_MAGIC,
    MigCommand,
    RamFlag,
    RPMessage,
    SectionType,
)
from livemig.migration.stream.qemu_file import (
    DIRECT_IO_MIN,
    QEMUFileReader,
    QEMUFileWriter,
    StreamError,
    bytes_reader,
    bytes_writer,
    open_reader,
    open_writer,
    socket_reader,
    socket_writer,
)


class Trickle(io.RawIOBase):
    """A readable transport that returns at most ``chunk`` bytes per read (like a slow
    socket), and records the buffers it was asked to fill."""

    def __init__(self, data: bytes, chunk: int = 1) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.chunk = chunk
        self.targets: list[memoryview] = []

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self.targets.append(b)
        n = min(len(b), self.chunk, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# =============================================================================================
# format constants
# =============================================================================================


def test_constants_match_the_reference() -> None:
    assert FILE_MAGIC.to_bytes(4, "big") == b"QEVM"
    assert [int(t) for t in SectionType] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7E]
    assert MigCommand.SWITCHOVER_START == 11 and MigCommand.RECV_BITMAP == 10
    assert RPMessage.SWITCHOVER_ACK == 7 and RPMessage.REQ_PAGES_ID == 3
    assert RamFlag.ZERO | RamFlag.CONTINUE == 0x22
    assert RamFlag.MULTIFD_FLUSH == 0x200 and RamFlag.HOOK == 0x80


# =============================================================================================
# QEMUFile primitives
# =============================================================================================


def test_stream_error_str_names_offset() -> None:
    e = StreamError(0x1234, "something is wrong")
    assert str(e) == "stream offset 0x1234: something is wrong"
    assert e.offset == 0x1234 and e.problem == "something is wrong"


def test_primitives_exact_bytes() -> None:
    w = bytes_writer()
    w.put_u8(0xAB)
    w.put_be16(0x1234)
    w.put_be32(0xDEADBEEF)
    w.put_be64(0x0102030405060708)
    w.put_bytes(b"xyz")
    w.put_counted_string("ram")
    w.put_counted_string(b"")
    assert w.bytes_written == 1 + 2 + 4 + 8 + 3 + 4 + 1
    assert w.getvalue() == bytes.fromhex("ab1234deadbeef010203040506070878797a0372616d00")


@pytest.mark.parametrize("bufsize", [64, 100, 1 << 20])
def test_primitives_round_trip(bufsize: int) -> None:
    w = bytes_writer(bufsize)
    for i in range(200):  # crosses many buffer boundaries when bufsize is small
        w.put_u8(i & 0xFF)
        w.put_be16(0xFFFF - i)
        w.put_be32(0xFFFFFFFF - i)
        w.put_be64((1 << 64) - 1 - i)
        w.put_counted_string("x" * (i % 40))
    data = w.getvalue()
    r = bytes_reader(data, bufsize)
    for i in range(200):
        assert r.get_u8() == i & 0xFF
        assert r.get_be16() == 0xFFFF - i
        assert r.get_be32() == 0xFFFFFFFF - i
        assert r.get_be64() == (1 << 64) - 1 - i
        assert r.get_counted_string() == b"x" * (i % 40)
    assert r.tell() == len(data)
    assert r.at_eof()


@pytest.mark.parametrize(
    "method,value",
    [("put_u8", 256), ("put_be16", 1 << 16), ("put_be32", 1 << 32), ("put_be64", 1 << 64)]
    + [(m, -1) for m in ("put_u8", "put_be16", "put_be32", "put_be64")],
)
def test_writer_rejects_out_of_range(method: str, value: int) -> None:
    w = bytes_writer()
    with pytest.raises(ValueError):
        getattr(w, method)(value)
    assert w.bytes_written == 0


def test_counted_string_too_long() -> None:
    with pytest.raises(ValueError):
        bytes_writer().put_counted_string("a" * 256)


def test_large_payloads_bypass_the_buffer() -> None:
    w = bytes_writer(4096)
    big = np.arange(300_000, dtype=np.uint8)
    w.put_u8(1)
    w.put_bytes(big)  # larger than the buffer and >= DIRECT_IO_MIN
    w.write_view(memoryview(b"tail"))  # small, but direct on request
    w.put_bytes(b"z" * 5000)  # larger than the buffer, smaller than DIRECT_IO_MIN
    assert w.bytes_written == 1 + big.nbytes + 4 + 5000
    assert w.getvalue() == b"\x01" + big.tobytes() + b"tail" + b"z" * 5000


def test_write_view_accepts_non_byte_buffers() -> None:
    w = bytes_writer()
    words = np.array([1, 2], dtype=">u8")
    w.write_view(words)
    assert w.getvalue() == bytes.fromhex("00000000000000010000000000000002")


def test_reserve_commit() -> None:
    w = bytes_writer(64)
    w.put_bytes(b"a" * 60)
    view = w.reserve(8)  # does not fit: flushes first
    view[:3] = b"xyz"
    w.commit(3)
    assert w.getvalue() == b"a" * 60 + b"xyz"
    with pytest.raises(ValueError):
        w.reserve(65)


def test_writer_close_and_reuse() -> None:
    bio = io.BytesIO()
    w = QEMUFileWriter(bio)
    w.put_be32(7)
    w.close()
    assert bio.getvalue() == b"\x00\x00\x00\x07" and not bio.closed
    w.close()
    with pytest.raises(ValueError):
        w.flush()


def test_reader_trickle_transport() -> None:
    data = bytes(range(256)) * 3
    r = QEMUFileReader(Trickle(data, chunk=1), buffer_size=64)
    assert r.get_be32() == 0x00010203
    assert r.peek(3) == b"\x04\x05\x06"
    assert r.tell() == 4
    assert r.read_exact(100) == data[4:104]  # larger than the buffer
    out = bytearray(200)
    r.readinto_exact(out)
    assert out == data[104:304]
    r.skip(400)
    assert r.read_exact(64) == data[704:768]
    assert r.at_eof()


def test_fill_buffered_consume() -> None:
    data = bytes(range(200))
    r = QEMUFileReader(Trickle(data, chunk=7), buffer_size=64)
    assert len(r.buffered()) == 0
    mv = r.fill(10)
    assert 10 <= len(mv) and bytes(mv) == data[: len(mv)]
    r.consume(5)
    assert r.tell() == 5 and bytes(r.buffered()[:2]) == data[5:7]
    with pytest.raises(ValueError):
        r.consume(len(r.buffered()) + 1)
    mv = r.fill(100)  # more than the buffer: it grows
    assert len(mv) >= 100 and bytes(mv[:100]) == data[5:105]
    r.consume(100)
    mv = r.fill(1000)  # fewer only at EOF
    assert bytes(mv) == data[105:]
    r.consume(len(mv))
    assert len(r.fill(1)) == 0 and r.tell() == 200


def test_readinto_exact_large_reads_go_straight_to_destination() -> None:
    data = bytes(range(256)) * 2048  # 512 KiB
    t = Trickle(b"\x09" + data, chunk=1 << 20)
    r = QEMUFileReader(t, buffer_size=4096)
    assert r.get_u8() == 9
    dest = bytearray(len(data))
    r.readinto_exact(dest)
    assert dest == data
    assert r.tell() == 1 + len(data)
    # after the first buffered chunk, the transport was asked to fill ``dest`` itself
    assert any(isinstance(v, memoryview) and v.obj is dest for v in t.targets)
    assert len(data) >= DIRECT_IO_MIN


def test_truncation_errors_name_size_and_offset() -> None:
    r = bytes_reader(b"\x01\x02\x03\x04\x05")
    assert r.get_u8() == 1
    with pytest.raises(StreamError) as ei:
        r.get_be64()
    assert ei.value.offset == 1
    assert str(ei.value) == "stream offset 0x1: truncated stream: wanted 8 bytes, got 4"

    r = bytes_reader(b"ab", buffer_size=64, offset=0x1000)
    with pytest.raises(
        StreamError, match=r"offset 0x1000: truncated stream: wanted 100000 bytes, got 2"
    ):
        r.readinto_exact(bytearray(100000))
    r = bytes_reader(b"\x05ab")
    with pytest.raises(StreamError, match="counted string at 0x0: truncated stream: wanted 5"):
        r.get_counted_string()
    r = bytes_reader(b"abc")
    with pytest.raises(StreamError, match="wanted 10 bytes, got 3"):
        r.skip(10)


def test_file_path_round_trip(tmp_path: Any) -> None:
    p = tmp_path / "stream.bin"
    payload = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8)
    with open_writer(p, 4096) as w:
        w.put_be64(0x1122334455667788)
        w.write_view(payload)
        w.put_counted_string("end")
    with open_reader(p, 4096) as r:
        assert r.get_be64() == 0x1122334455667788
        out = np.empty_like(payload)
        r.readinto_exact(out)
        assert np.array_equal(out, payload)
        assert r.get_counted_string() == b"end"
        assert r.at_eof()
    assert r.transport.closed


def test_socket_round_trip() -> None:
    a, b = socket.socketpair()
    payload = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8)

    def produce() -> None:
        w = socket_writer(a, 1 << 16)
        for i in range(1000):
            w.put_be32(i)
        w.put_u8(0x7E)
        w.write_view(payload)  # scatter-gather with the buffered fields
        w.put_be16(0xBEEF)
        w.flush()
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=produce)
    t.start()
    try:
        r = socket_reader(b, 1 << 16)
        assert [r.get_be32() for _ in range(1000)] == list(range(1000))
        assert r.get_u8() == 0x7E
        out = bytearray(payload.nbytes)
        r.readinto_exact(out)
        assert out == payload.tobytes()
        assert r.get_be16() == 0xBEEF
        assert r.at_eof()
        with pytest.raises(StreamError, match="truncated"):
            r.get_u8()
    finally:
        t.join()
        a.close()
        b.close()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("u8"), st.integers(0, 0xFF)),
        st.tuples(st.just("be16"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("be32"), st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("be64"), st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("bytes"), st.binary(max_size=300)),
        st.tuples(st.just("str"), st.binary(max_size=255)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, wbuf=st.integers(64, 512), rbuf=st.integers(64, 512), chunk=st.integers(1, 97))
def test_random_round_trip(ops: list[tuple[str, Any]], wbuf: int, rbuf: int, chunk: int) -> None:
    w = bytes_writer(wbuf)
    for kind, v in ops:
        {
            "u8": w.put_u8,
            "be16": w.put_be16,
            "be32": w.put_be32,
            "be64": w.put_be64,
            "bytes": w.put_bytes,
            "str": w.put_counted_string,
        }[kind](v)
    data = w.getvalue()
    assert w.bytes_written == len(data)
    r = QEMUFileReader(Trickle(data, chunk), rbuf)
    for kind, v in ops:
        if kind == "bytes":
            got: Any = r.read_exact(len(v))
        elif kind == "str":
            got = r.get_counted_string()
        else:
            got = getattr(r, f"get_{kind}")()
        assert got == v
    assert r.tell() == len(data) and r.at_eof()


# =============================================================================================
# vmstate
# =============================================================================================

SANITY = VMStateDescription(
    "virtio-mem-device/sanity-checks",
    1,
    [
        Field.uint64("addr"),
        Field.uint64("region_size"),
        Field.uint64("block_size"),
        Field.uint32("node"),
    ],
)
EARLY = VMStateDescription(
    "virtio-mem-device-early",
    1,
    [
        Field.struct("tmp", SANITY),
        Field.uint64("size"),
        Field.bitmap("bitmap", lambda v: v["tmp"]["region_size"] // v["tmp"]["block_size"]),
    ],
)


def _early_state(nbits: int = 100, bits: tuple[int, ...] = (0, 1, 2, 99)) -> dict[str, Any]:
    bm = Bitmap(nbits)
    for b in bits:
        bm.set_range(b, 1)
    return {
        "tmp": {
            "addr": 0x1_0000_0000,
            "region_size": nbits * 0x100000,
            "block_size": 0x100000,
            "node": 1,
        },
        "size": len(bits) * 0x100000,
        "bitmap": bm,
    }


EARLY_BYTES = bytes.fromhex(
    "0000000100000000"  # addr
    "0000000006400000"  # region_size = 100 MiB
    "0000000000100000"  # block_size = 1 MiB
    "00000001"  # node
    "0000000000400000"  # size = 4 MiB
    "0000000000000007"  # word 0: bits 0, 1, 2
    "0000000800000000"  # word 1: bit 99 = bit 35 of word 1
)


def test_virtio_mem_early_exact_bytes() -> None:
    state = _early_state()
    assert encode(EARLY, state) == EARLY_BYTES
    got = decode(EARLY, bytes_reader(EARLY_BYTES))
    assert got["tmp"] == state["tmp"] and got["size"] == state["size"]
    assert got["bitmap"] == state["bitmap"]


def test_virtio_mem_early_vmdesc() -> None:
    entry = vmdesc_entry(EARLY, _early_state(), "0/virtio-mem-device-early", 0)
    assert entry == {
        "name": "0/virtio-mem-device-early",
        "instance_id": 0,
        "vmsd_name": "virtio-mem-device-early",
        "version": 1,
        "fields": [
            {
                "name": "tmp",
                "type": "struct",
                "struct": {
                    "vmsd_name": "virtio-mem-device/sanity-checks",
                    "version": 1,
                    "fields": [
                        {"name": "addr", "type": "uint64", "size": 8},
                        {"name": "region_size", "type": "uint64", "size": 8},
                        {"name": "block_size", "type": "uint64", "size": 8},
                        {"name": "node", "type": "uint32", "size": 4},
                    ],
                },
                "size": 28,
            },
            {"name": "size", "type": "uint64", "size": 8},
            {"name": "bitmap", "type": "bitmap", "size": 16},
        ],
    }
    assert list(entry["fields"][0]) == ["name", "type", "struct", "size"]


def test_bitmap_value_forms() -> None:
    state = _early_state()
    words = state["bitmap"].words
    for value in (words.copy(), words.astype(">u8").tobytes()):
        assert encode(EARLY, {**state, "bitmap": value}) == EARLY_BYTES
    with pytest.raises(VMStateError, match="bits set beyond 100"):
        encode(EARLY, {**state, "bitmap": np.array([0, 1 << 63], dtype=np.uint64)})
    with pytest.raises(VMStateError, match="has 99 bits, expected 100"):
        encode(EARLY, {**state, "bitmap": Bitmap(99)})
    with pytest.raises(VMStateError, match="wire data is 8 bytes"):
        encode(EARLY, {**state, "bitmap": b"\0" * 8})


def test_bitmap_bits_beyond_nbits_rejected() -> None:
    bad = bytearray(EARLY_BYTES)
    bad[-8:] = (1 << 36).to_bytes(8, "big")  # bit 100 of a 100-bit bitmap
    with pytest.raises(StreamError) as ei:
        decode(EARLY, bytes_reader(bytes(bad)))
    assert ei.value.offset == len(EARLY_BYTES) - 8
    assert "virtio-mem-device-early" in str(ei.value) and "'bitmap'" in str(ei.value)
    assert "beyond its 100 bits" in str(ei.value)


def test_bitmap_size_from_stream_is_validated() -> None:
    zero_block = bytearray(EARLY_BYTES)
    zero_block[16:24] = bytes(8)  # block_size = 0
    with pytest.raises(StreamError, match="cannot size field 'bitmap'.*ZeroDivisionError") as ei:
        decode(EARLY, bytes_reader(bytes(zero_block)))
    assert ei.value.offset == 36

    huge = bytearray(EARLY_BYTES)
    huge[8:16] = (1 << 60).to_bytes(8, "big")  # region of 2**40 blocks
    with pytest.raises(StreamError, match="size 1099511627776 exceeds the limit"):
        decode(EARLY, bytes_reader(bytes(huge)))


def test_vmstate_truncation_every_prefix() -> None:
    for n in range(len(EARLY_BYTES)):
        with pytest.raises(StreamError) as ei:
            decode(EARLY, bytes_reader(EARLY_BYTES[:n]))
        assert "truncated stream" in str(ei.value)
        assert "virtio-mem-device-early" in str(ei.value)


def test_truncation_message_names_field() -> None:
    with pytest.raises(StreamError) as ei:
        decode(EARLY, bytes_reader(EARLY_BYTES[:26]))
    assert str(ei.value) == (
        "stream offset 0x18: virtio-mem-device-early.tmp: field 'node': "
        "truncated stream: wanted 4 bytes, got 2"
    )


@settings(max_examples=100, deadline=None)
@given(
    block_shift=st.integers(20, 30),
    nbits=st.integers(0, 300),
    data=st.data(),
    addr=st.integers(0, (1 << 64) - 1),
    node=st.integers(0, (1 << 32) - 1),
)
def test_virtio_mem_early_random_round_trip(
    block_shift: int, nbits: int, data: st.DataObject, addr: int, node: int
) -> None:
    bits = data.draw(st.lists(st.integers(0, max(nbits - 1, 0)), max_size=50)) if nbits else []
    bm = Bitmap(nbits)
    for b in bits:
        bm.set_range(b, 1)
    state = {
        "tmp": {
            "addr": addr,
            "region_size": nbits << block_shift,
            "block_size": 1 << block_shift,
            "node": node,
        },
        "size": bm.count() << block_shift,
        "bitmap": bm,
    }
    raw, desc = encode_with_vmdesc(EARLY, state)
    assert len(raw) == 28 + 8 + 8 * ((nbits + 63) // 64)
    assert sum(f["size"] for f in desc["fields"]) == len(raw)
    r = bytes_reader(raw)
    got = decode(EARLY, r)
    assert r.at_eof()
    assert got["tmp"] == state["tmp"] and got["size"] == state["size"]
    assert got["bitmap"] == bm


INTS = VMStateDescription(
    "ints",
    2,
    [
        Field.uint8("a"),
        Field.uint16("b"),
        Field.int32("c"),
        Field.int64("d"),
        Field.buffer("e", 3),
        Field.uint32("n"),
        Field.buffer("f", "n"),
        Field.uint64("late", since=2),
        Field.uint64("maybe", exists=lambda v: v["a"] > 100),
    ],
    minimum_version=1,
)


@settings(max_examples=100, deadline=None)
@given(
    a=st.integers(0, 0xFF),
    b=st.integers(0, 0xFFFF),
    c=st.integers(-(1 << 31), (1 << 31) - 1),
    d=st.integers(-(1 << 63), (1 << 63) - 1),
    e=st.binary(min_size=3, max_size=3),
    f=st.binary(max_size=40),
    late=st.integers(0, (1 << 64) - 1),
    maybe=st.integers(0, (1 << 64) - 1),
)
def test_integer_fields_round_trip(
    a: int, b: int, c: int, d: int, e: bytes, f: bytes, late: int, maybe: int
) -> None:
    state = {"a": a, "b": b, "c": c, "d": d, "e": e, "n": len(f), "f": f, "late": late}
    state["maybe"] = maybe
    raw = encode(INTS, state)
    expected = struct.pack(">BHiq3sI", a, b, c, d, e, len(f)) + f + struct.pack(">Q", late)
    if a > 100:
        expected += struct.pack(">Q", maybe)
    assert raw == expected
    got = decode(INTS, bytes_reader(raw))
    want = dict(state)
    if a <= 100:
        del want["maybe"]
    assert got == want


def test_field_since_and_version_range() -> None:
    state = {"a": 1, "b": 2, "c": -3, "d": -4, "e": b"abc", "n": 0, "f": b""}
    v1 = struct.pack(">BHiq3sI", 1, 2, -3, -4, b"abc", 0)
    assert decode(INTS, bytes_reader(v1), version=1) == state
    with pytest.raises(
        StreamError, match=r"ints: unsupported version 3 \(this side accepts 1..2\)"
    ):
        decode(INTS, bytes_reader(v1), version=3)
    with pytest.raises(StreamError, match="unsupported version 0"):
        decode(INTS, bytes_reader(v1), version=0)


def test_encode_errors_name_field() -> None:
    ok = {"a": 1, "b": 2, "c": 3, "d": 4, "e": b"abc", "n": 1, "f": b"x", "late": 0}
    with pytest.raises(VMStateError, match="does not fit field 'c'"):
        encode(INTS, {**ok, "c": 1 << 31})
    with pytest.raises(VMStateError, match="buffer 'e' is 2 bytes, expected 3"):
        encode(INTS, {**ok, "e": b"ab"})
    with pytest.raises(VMStateError, match="buffer 'f' is 1 bytes, expected 2"):
        encode(INTS, {**ok, "n": 2})
    with pytest.raises(VMStateError, match="ints: no value for field 'late'"):
        encode(INTS, {k: v for k, v in ok.items() if k != "late"})


def test_encode_from_object_and_getter() -> None:
    class Dev:
        addr = 1
        region_size = 128 << 20
        block_size = 2 << 20
        node = 0
        size = 0
        bitmap = Bitmap(64)

    desc = VMStateDescription(
        "virtio-mem-device-early",
        1,
        [
            Field.struct("tmp", SANITY, getter=lambda dev: dev),  # sanity values from the device
            Field.uint64("size"),
            Field.bitmap("bitmap", lambda v: v.region_size // v.block_size),
        ],
    )
    raw = encode(desc, Dev())
    assert raw[:8] == (1).to_bytes(8, "big") and len(raw) == 28 + 8 + 8


def test_buffer_limit() -> None:
    desc = VMStateDescription("d", 1, [Field.uint32("n"), Field.buffer("b", "n", limit=10)])
    with pytest.raises(StreamError, match="d: field 'b' size 11 exceeds the limit of 10") as ei:
        decode(desc, bytes_reader(struct.pack(">I", 11) + b"x" * 11))
    assert ei.value.offset == 4


# -- subsections -------------------------------------------------------------------------------

SUB_A = VMStateDescription("dev/a", 1, [Field.uint32("a")], needed=lambda v: v.get("a") is not None)
SUB_B = VMStateDescription("dev/b", 2, [Field.uint8("b")], needed=lambda v: "b" in v)
INNER_SUB = VMStateDescription("dev/inner/x", 1, [Field.uint8("x")])
INNER = VMStateDescription("dev/inner", 1, [Field.uint8("i")], subsections=[INNER_SUB])
DEV = VMStateDescription(
    "dev",
    1,
    [Field.uint16("base"), Field.struct("inner", INNER)],
    subsections=[SUB_A, SUB_B],
)


def test_subsection_wire_format() -> None:
    state = {"base": 0x0102, "inner": {"i": 3, "x": 4}, "a": 0xAABBCCDD, "b": 9}
    raw, desc = encode_with_vmdesc(DEV, state)
    expected = (
        bytes.fromhex("0102")  # base
        + b"\x03"  # inner.i
        + b"\x05\x0bdev/inner/x"
        + bytes.fromhex("00000001")
        + b"\x04"  # inner's subsection
        + b"\x05\x05dev/a"
        + bytes.fromhex("00000001")
        + bytes.fromhex("aabbccdd")
        + b"\x05\x05dev/b"
        + bytes.fromhex("00000002")
        + b"\x09"
    )
    assert raw == expected
    assert decode(DEV, bytes_reader(raw)) == {
        "base": 0x0102,
        "inner": {"i": 3, "x": 4},
        "a": 0xAABBCCDD,
        "b": 9,
    }
    assert [s["vmsd_name"] for s in desc["subsections"]] == ["dev/a", "dev/b"]
    inner_js = desc["fields"][1]["struct"]
    assert inner_js["subsections"][0]["vmsd_name"] == "dev/inner/x"
    assert desc["fields"][1]["size"] == 1 + 1 + 1 + 11 + 4 + 1


def test_subsections_not_needed_are_absent() -> None:
    state = {"base": 1, "inner": {"i": 2, "x": 3}, "a": None}
    raw, desc = encode_with_vmdesc(DEV, state)
    assert raw.endswith(b"\x03") and b"dev/a" not in raw and b"dev/b" not in raw
    assert "subsections" not in desc
    got = decode(DEV, bytes_reader(raw + b"\x7e"))  # a footer after the state
    assert got == {"base": 1, "inner": {"i": 2, "x": 3}}


def test_subsection_errors() -> None:
    base = bytes.fromhex("0001") + b"\x02" + b"\x05\x0bdev/inner/x" + bytes.fromhex("00000001")
    base += b"\x03"

    unknown = base + b"\x05\x05dev/z" + bytes.fromhex("00000001")
    with pytest.raises(StreamError, match="dev: unknown subsection 'dev/z'") as ei:
        decode(DEV, bytes_reader(unknown))
    assert ei.value.offset == len(base)

    too_new = base + b"\x05\x05dev/b" + bytes.fromhex("00000003") + b"\x01"
    with pytest.raises(StreamError, match="subsection 'dev/b' has unsupported version 3") as ei:
        decode(DEV, bytes_reader(too_new))
    assert ei.value.offset == len(base) + 7

    twice = base + (b"\x05\x05dev/b" + bytes.fromhex("00000002") + b"\x01") * 2
    with pytest.raises(StreamError, match="appears twice"):
        decode(DEV, bytes_reader(twice))

    # a subsection of the parent is not mistaken for one of the nested struct
    parent = bytes.fromhex("0001") + b"\x02" + b"\x05\x05dev/a" + bytes.fromhex("0000000100000007")
    assert decode(DEV, bytes_reader(parent)) == {"base": 1, "inner": {"i": 2}, "a": 7}


def test_description_validation() -> None:
    with pytest.raises(ValueError, match="must be named"):
        VMStateDescription("dev", 1, [], subsections=[VMStateDescription("other", 1, [])])
    with pytest.raises(ValueError, match="duplicate"):
        VMStateDescription("dev", 1, [Field.uint8("a"), Field.uint16("a")])
    with pytest.raises(ValueError, match="needs a size"):
        Field("x", "bitmap")


# =============================================================================================
# savevm records
# =============================================================================================


def test_header_bytes_and_errors() -> None:
    w = bytes_writer()
    savevm.write_header(w)
    assert w.getvalue() == bytes.fromhex("5145564d00000003")
    assert savevm.read_header(bytes_reader(w.getvalue())) == 3

    with pytest.raises(StreamError) as ei:
        savevm.read_header(bytes_reader(bytes.fromhex("7f454c4600000003")))
    assert str(ei.value) == "stream offset 0x0: not a migration stream: magic 0x7f454c46"
    with pytest.raises(StreamError) as ei:
        savevm.read_header(bytes_reader(bytes.fromhex("5145564d00000002")))
    assert str(ei.value) == (
        "stream offset 0x4: unsupported stream version 2 (QEMU_VM_FILE_VERSION_COMPAT)"
    )
    with pytest.raises(StreamError, match="offset 0x4: unsupported stream version 4 "):
        savevm.read_header(bytes_reader(bytes.fromhex("5145564d00000004")))


def test_configuration_exact_bytes() -> None:
    w = bytes_writer()
    desc = savevm.write_configuration(w, "pc", 16)
    assert w.getvalue() == (
        b"\x07"
        + bytes.fromhex("00000002")
        + b"pc"
        + b"\x05\x1econfiguration/target-page-bits"
        + bytes.fromhex("00000001")
        + bytes.fromhex("00000010")
    )
    assert desc == {
        "vmsd_name": "configuration",
        "version": 1,
        "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": 2},
        ],
        "subsections": [
            {
                "vmsd_name": "configuration/target-page-bits",
                "version": 1,
                "fields": [{"name": "target_page_bits", "type": "uint32", "size": 4}],
            }
        ],
    }
    w = bytes_writer()
    savevm.write_configuration(w, "pc")
    assert w.getvalue() == b"\x07\x00\x00\x00\x02pc"


def test_configuration_round_trip() -> None:
    uuid = bytes(range(16))
    w = bytes_writer()
    savevm.write_configuration(
        w, "pc-q35-10.2", 12, capabilities=["x-ignore-shared", "mapped-ram"], uuid=uuid
    )
    savevm.write_eof(w)
    r = bytes_reader(w.getvalue())
    assert savevm.read_section_header(r).type == SectionType.CONFIGURATION
    assert savevm.read_configuration(r) == {
        "machine": "pc-q35-10.2",
        "target_page_bits": 12,
        "capabilities": ["x-ignore-shared", "mapped-ram"],
        "uuid": uuid,
    }
    assert savevm.read_section_header(r).type == SectionType.EOF


def test_configuration_limits() -> None:
    with pytest.raises(StreamError, match="size 1000 exceeds the limit of 256") as ei:
        savevm.read_configuration(bytes_reader(struct.pack(">I", 1000) + b"x" * 1000))
    assert ei.value.offset == 4
    bad_bits = struct.pack(">I", 2) + b"pc" + b"\x05\x1econfiguration/target-page-bits"
    bad_bits += struct.pack(">II", 1, 9) + b"\x00"
    with pytest.raises(StreamError, match="target page bits 9 out of range"):
        savevm.read_configuration(bytes_reader(bad_bits))
    with pytest.raises(ValueError):
        savevm.write_configuration(bytes_writer(), "m" * 300)


def test_section_headers_round_trip() -> None:
    w = bytes_writer()
    savevm.start_section(w, SectionType.START, 0, "ram", 0, 4)
    savevm.start_section(w, SectionType.PART, 0)
    savevm.start_section(w, SectionType.END, 0)
    savevm.start_section(w, SectionType.FULL, 7, "0/virtio-mem-device-early", 2, 1)
    raw = w.getvalue()
    assert raw[:17] == bytes.fromhex("010000000003") + b"ram" + bytes.fromhex("0000000000000004")
    assert raw[17:27] == bytes.fromhex("02000000000300000000")
    r = bytes_reader(raw)
    assert savevm.read_section_header(r) == savevm.SectionHeader(
        SectionType.START, 0, "ram", 0, 4, 0
    )
    assert savevm.read_section_header(r) == savevm.SectionHeader(SectionType.PART, 0, offset=17)
    assert savevm.read_section_header(r) == savevm.SectionHeader(SectionType.END, 0, offset=22)
    assert savevm.read_section_header(r) == savevm.SectionHeader(
        SectionType.FULL, 7, "0/virtio-mem-device-early", 2, 1, 27
    )
    with pytest.raises(ValueError):
        savevm.start_section(bytes_writer(), SectionType.START, 0)
    with pytest.raises(ValueError):
        savevm.start_section(bytes_writer(), SectionType.PART, 0, "ram", 0, 4)
    with pytest.raises(ValueError):
        savevm.start_section(bytes_writer(), SectionType.EOF, 0)


def test_bad_section_types() -> None:
    with pytest.raises(StreamError) as ei:
        savevm.read_section_header(bytes_reader(b"\x00\x00\x00\x00\x42"[4:]))
    assert str(ei.value) == "stream offset 0x0: unknown section type 0x42"
    r = bytes_reader(b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04\x09")
    savevm.read_section_header(r)
    with pytest.raises(StreamError) as ei:
        savevm.read_section_header(r)
    assert str(ei.value) == "stream offset 0x11: unknown section type 0x09"
    for t in (0x05, 0x7E):
        with pytest.raises(StreamError, match=f"unexpected section type {t:#04x}"):
            savevm.read_section_header(bytes_reader(bytes([t, 0, 0, 0, 0])))
    with pytest.raises(StreamError, match="offset 0x5: empty idstr"):
        savevm.read_section_header(bytes_reader(b"\x04\x00\x00\x00\x01\x00" + bytes(8)))
    with pytest.raises(StreamError, match="not UTF-8"):
        savevm.read_section_header(bytes_reader(b"\x04\x00\x00\x00\x01\x01\xff" + bytes(8)))
    assert savevm.peek_section_type(bytes_reader(b"\x08")) is SectionType.COMMAND
    with pytest.raises(StreamError, match="unknown section type 0xff"):
        savevm.peek_section_type(bytes_reader(b"\xff"))


def test_footer() -> None:
    w = bytes_writer()
    savevm.write_footer(w, 0x0A0B)
    assert w.getvalue() == bytes.fromhex("7e00000a0b")
    savevm.check_footer(bytes_reader(w.getvalue()), 0x0A0B)
    with pytest.raises(StreamError) as ei:
        savevm.check_footer(bytes_reader(b"\x00\x10" + w.getvalue(), offset=0x100), 3)
    assert str(ei.value) == "stream offset 0x100: missing section footer for section 3 (got 0x00)"
    with pytest.raises(StreamError) as ei:
        savevm.check_footer(bytes_reader(w.getvalue()), 3)
    assert str(ei.value) == "stream offset 0x1: section footer mismatch: expected id 3, got 2571"


def test_commands() -> None:
    w = bytes_writer()
    savevm.write_command(w, MigCommand.PING, struct.pack(">I", 42))
    savevm.write_command(w, MigCommand.SWITCHOVER_START)
    savevm.write_command(w, MigCommand.RECV_BITMAP, b"\x03ram")
    raw = w.getvalue()
    assert raw[:9] == bytes.fromhex("08000200040000002a")
    r = bytes_reader(raw)
    out = []
    while not r.at_eof():
        assert savevm.read_section_header(r).type == SectionType.COMMAND
        out.append(savevm.read_command(r))
    assert out == [
        (MigCommand.PING, b"\x00\x00\x00\x2a"),
        (MigCommand.SWITCHOVER_START, b""),
        (MigCommand.RECV_BITMAP, b"\x03ram"),
    ]
    cmd, payload = out[0]
    assert cmd is MigCommand.PING and payload == b"\x00\x00\x00\x2a"

    with pytest.raises(StreamError, match="offset 0x0: unknown migration command 99"):
        savevm.read_command(bytes_reader(bytes.fromhex("00630000")))
    with pytest.raises(StreamError, match="invalid migration command 0"):
        savevm.read_command(bytes_reader(bytes.fromhex("00000000")))
    with pytest.raises(StreamError, match="offset 0x2: command PING: bad length 3, expected 4"):
        savevm.read_command(bytes_reader(bytes.fromhex("00020003010203")))
    with pytest.raises(StreamError, match="command POSTCOPY_RAM_DISCARD: length 5 is below 20"):
        savevm.read_command(bytes_reader(bytes.fromhex("00060005") + bytes(5)))
    with pytest.raises(ValueError):
        savevm.write_command(bytes_writer(), MigCommand.INVALID)
    with pytest.raises(ValueError):
        savevm.write_command(bytes_writer(), 99)


def test_vmdesc_round_trip_and_errors() -> None:
    obj = {"page_size": 4096, "devices": []}
    w = bytes_writer()
    savevm.write_vmdesc(w, obj)
    raw = w.getvalue()
    js = json.dumps(obj, separators=(",", ":")).encode()
    assert raw == b"\x06" + struct.pack(">I", len(js)) + js
    r = bytes_reader(raw)
    assert savevm.read_section_header(r).type == SectionType.VMDESCRIPTION
    assert savevm.read_vmdesc(r) == obj

    with pytest.raises(StreamError, match="offset 0x4: VMDESCRIPTION is not valid JSON"):
        savevm.read_vmdesc(bytes_reader(struct.pack(">I", 3) + b"{x}"))
    with pytest.raises(StreamError, match="not a JSON object"):
        savevm.read_vmdesc(bytes_reader(struct.pack(">I", 2) + b"[]"))
    with pytest.raises(StreamError, match="exceeds the limit"):
        savevm.read_vmdesc(bytes_reader(struct.pack(">I", 0xFFFFFFFF)))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(StreamError, match="not valid JSON"):
        savevm.read_vmdesc(bytes_reader(struct.pack(">I", len(deep)) + deep))


def test_vmdesc_length_never_contains_open_brace() -> None:
    # analyze-migration.py locates the JSON as the first '{' after the last NUL byte
    obj = {"devices": [], "pad": "x" * (0x7B - 23)}
    assert len(json.dumps(obj, separators=(",", ":"))) == 0x7B
    w = bytes_writer()
    savevm.write_eof(w)
    savevm.write_vmdesc(w, obj)
    raw = w.getvalue()
    nul = raw.rfind(b"\0")
    pos = raw.find(b"{", nul)
    assert raw[pos - 5] == SectionType.VMDESCRIPTION
    length = int.from_bytes(raw[pos - 4 : pos], "big")
    assert json.loads(raw[pos : pos + length]) == obj


def test_registry() -> None:
    reg = savevm.SaveStateRegistry()
    ram = reg.register("ram", 4)
    a = reg.register("virtio-mem-device-early", vmsd=EARLY)
    b = reg.register("virtio-mem-device-early", vmsd=EARLY)
    c = reg.register("dev", 1, instance_id=7)
    assert [e.section_id for e in reg] == [0, 1, 2, 3]
    assert (ram.instance_id, a.instance_id, b.instance_id, c.instance_id) == (0, 0, 1, 7)
    assert a.version == 1 and len(reg) == 4
    assert reg.find("virtio-mem-device-early", 1) is b and reg.by_section_id(3) is c
    assert reg.find("nope", 0) is None
    with pytest.raises(ValueError, match="already registered"):
        reg.register("dev", 1, instance_id=7)
    with pytest.raises(ValueError, match="a version is needed"):
        reg.register("x")


# =============================================================================================
# a whole stream
# =============================================================================================

RAM_SETUP = (
    struct.pack(">Q", 0x20000 | RamFlag.MEM_SIZE)
    + b"\x06pc.ram"
    + struct.pack(">Q", 0x20000)
    + struct.pack(">Q", RamFlag.EOS)
)
RAM_END = (
    struct.pack(">Q", 0x1000 | RamFlag.ZERO)
    + b"\x06pc.ram\x00"
    + struct.pack(">Q", 0x2000 | RamFlag.PAGE | RamFlag.CONTINUE)
    + bytes(range(256)) * 16
    + struct.pack(">Q", RamFlag.EOS)
)


def _write_stream() -> tuple[bytes, dict[str, Any]]:
    reg = savevm.SaveStateRegistry()
    ram = reg.register("ram", 4)
    early = reg.register("0/virtio-mem-device-early", vmsd=EARLY)
    w = bytes_writer(256)
    savevm.write_header(w)
    conf = savevm.write_configuration(w, "livemig-soft", 12)
    savevm.start_entry_section(w, SectionType.START, ram)
    w.put_bytes(RAM_SETUP)
    savevm.write_footer(w, ram.section_id)
    devices = [savevm.write_vmstate_section(w, early, _early_state())]
    savevm.write_command(w, MigCommand.SWITCHOVER_START)
    savevm.start_entry_section(w, SectionType.END, ram)
    w.put_bytes(RAM_END)
    savevm.write_footer(w, ram.section_id)
    savevm.write_eof(w)
    vmdesc = savevm.build_vmdesc(conf, devices)
    savevm.write_vmdesc(w, vmdesc)
    return w.getvalue(), vmdesc


def _read_stream(r: QEMUFileReader) -> dict[str, Any]:
    """A minimal loader: everything in the stream, as a dict. Like a real loader it
    reports every problem as a StreamError naming the offset, never as another exception."""
    got: dict[str, Any] = {"sections": [], "commands": []}
    payloads = {(SectionType.START, "ram"): len(RAM_SETUP), (SectionType.END, "ram"): len(RAM_END)}
    names: dict[int, str] = {}
    savevm.read_header(r)
    while True:
        at = r.tell()
        h = savevm.read_section_header(r)
        if h.type == SectionType.EOF:
            break
        if h.type == SectionType.CONFIGURATION:
            got["configuration"] = savevm.read_configuration(r)
        elif h.type == SectionType.COMMAND:
            got["commands"].append(savevm.read_command(r))
        elif h.type == SectionType.FULL:
            if h.idstr != "0/virtio-mem-device-early" or h.section_id is None:
                raise StreamError(at, f"unexpected FULL section {h.idstr!r}")
            names[h.section_id] = h.idstr
            got["sections"].append((h, savevm.read_vmstate_section(r, h, EARLY)))
        elif h.type in (SectionType.START, SectionType.END) and h.section_id is not None:
            if h.idstr is not None:
                names[h.section_id] = h.idstr
            size = payloads.get((h.type, names.get(h.section_id, "")))
            if size is None:
                raise StreamError(at, f"unexpected section {h.type!r} id {h.section_id}")
            data = r.read_exact(size)
            savevm.check_footer(r, h.section_id)
            got["sections"].append((h, data))
        else:
            raise StreamError(at, f"unexpected section type {h.type!r}")
    at = r.tell()
    if savevm.read_section_header(r).type != SectionType.VMDESCRIPTION:
        raise StreamError(at, "no VMDESCRIPTION after EOF")
    got["vmdesc"] = savevm.read_vmdesc(r)
    if not r.at_eof():
        raise StreamError(r.tell(), "data after VMDESCRIPTION")
    return got


def test_whole_stream_round_trip() -> None:
    raw, vmdesc = _write_stream()
    got = _read_stream(bytes_reader(raw, 64))
    assert got["configuration"] == {
        "machine": "livemig-soft",
        "target_page_bits": 12,
        "capabilities": [],
        "uuid": None,
    }
    (h0, d0), (h1, d1), (h2, d2) = got["sections"]
    assert (h0.type, h0.section_id, h0.idstr, h0.instance_id, h0.version_id) == (
        SectionType.START,
        0,
        "ram",
        0,
        4,
    )
    assert d0 == RAM_SETUP
    assert (h1.type, h1.section_id, h1.idstr, h1.version_id) == (
        SectionType.FULL,
        1,
        "0/virtio-mem-device-early",
        1,
    )
    assert d1["bitmap"] == _early_state()["bitmap"] and d1["tmp"] == _early_state()["tmp"]
    assert (h2.type, h2.section_id, h2.idstr) == (SectionType.END, 0, None)
    assert d2 == RAM_END
    assert got["commands"] == [(MigCommand.SWITCHOVER_START, b"")]
    assert got["vmdesc"] == vmdesc
    assert list(vmdesc) == ["configuration", "page_size", "devices"]
    dev = vmdesc["devices"][0]
    assert (dev["name"], dev["instance_id"], dev["vmsd_name"]) == (
        "0/virtio-mem-device-early",
        0,
        "virtio-mem-device-early",
    )
    # the device entry's sizes add up to its payload, as analyze-migration relies on
    idstr = b"0/virtio-mem-device-early"
    payload_start = raw.index(bytes([len(idstr)]) + idstr) + 1 + len(idstr) + 8
    assert raw[payload_start : payload_start + len(EARLY_BYTES)] == EARLY_BYTES
    assert sum(f["size"] for f in dev["fields"]) == len(EARLY_BYTES)


def test_whole_stream_every_truncation_is_a_stream_error() -> None:
    raw, _ = _write_stream()
    for n in range(len(raw)):
        r = bytes_reader(raw[:n], 64)
        with pytest.raises(StreamError):
            _read_stream(r)


def test_whole_stream_corruptions_are_stream_errors() -> None:
    """Flip every byte of the framing (not the page data): the load either fails with a
    StreamError that names an offset inside the stream, or succeeds and shows the change
    (no byte is ignored). Nothing else may escape: an AssertionError or KeyError here is
    a loader bug, not an accepted outcome."""
    raw, _ = _write_stream()
    original = _read_stream(bytes_reader(raw, 64))
    page_data = raw.index(bytes(range(256)))
    failed: list[int] = []
    positions = list(range(page_data)) + list(range(page_data + 4096, len(raw)))
    for i in positions:
        bad = bytearray(raw)
        bad[i] ^= 0xFF
        try:
            got = _read_stream(bytes_reader(bytes(bad), 64))
        except StreamError as e:
            assert 0 <= e.offset <= len(raw), (i, e)
            assert str(e).startswith(f"stream offset {e.offset:#x}: "), (i, e)
            failed.append(i)
        else:
            assert got != original, f"flipping byte {i:#x} changed nothing that was loaded"
    # the magic and version are always caught, and so is most of the framing
    assert set(range(8)) <= set(failed)
    assert len(failed) > len(positions) // 2, (len(failed), len(positions))


def _walk_like_analyze_migration(
    raw: bytes, ids: list[tuple[int, int, str]] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Parse a stream the way ``scripts/analyze-migration.py`` does (reference 4.3): find
    the JSON from the end, then step over every vmstate purely by the sizes and
    subsections the JSON declares. Returns the device values it saw, by field name;
    ``ids`` collects (section type, section id, name) of every section header."""
    nul = raw.rfind(b"\0")
    jpos = raw.find(b"{", nul)
    assert raw[jpos - 5] == SectionType.VMDESCRIPTION
    jlen = int.from_bytes(raw[jpos - 4 : jpos], "big")
    desc = json.loads(raw[jpos : jpos + jlen])
    page_size = desc["page_size"]
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        assert pos + n <= len(raw)
        pos += n
        return raw[pos - n : pos]

    def u(n: int) -> int:
        return int.from_bytes(take(n), "big")

    def walk(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in d["fields"]:
            if f["type"] == "struct":
                out[f["name"]] = walk(f["struct"])
            elif f["type"] == "capability":
                out.setdefault(f["name"], []).append(take(u(1)).decode())
            else:
                out[f["name"]] = take(f["size"])
        for sub in d.get("subsections", []):
            assert u(1) == SectionType.SUBSECTION
            assert take(u(1)).decode() == sub["vmsd_name"]
            u(4)
            out[sub["vmsd_name"]] = walk(sub)
        return out

    def ram() -> None:
        while True:
            addr = u(8)
            flags = addr & (page_size - 1)
            if flags & RamFlag.MEM_SIZE:
                total = addr & ~(page_size - 1)
                while total:
                    take(u(1))
                    total -= u(8)
            if flags & (RamFlag.ZERO | RamFlag.PAGE):
                if not flags & RamFlag.CONTINUE:
                    take(u(1))
                take(1 if flags & RamFlag.ZERO else page_size)
            if flags & RamFlag.EOS:
                return

    assert u(4) == FILE_MAGIC and u(4) == 3
    seen: list[tuple[str, dict[str, Any]]] = []
    section_id = -1
    while True:
        t = u(1)
        if t == SectionType.EOF:
            break
        if t == SectionType.CONFIGURATION:
            seen.append(("configuration", walk(desc["configuration"])))
        elif t in (SectionType.START, SectionType.FULL):
            section_id = u(4)
            name = take(u(1)).decode()
            instance = u(4)
            u(4)
            if ids is not None:
                ids.append((t, section_id, name))
            if name == "ram":
                ram()
            else:
                seen.append((name, walk(devices[(name, instance)])))
        elif t in (SectionType.PART, SectionType.END):
            section_id = u(4)
            if ids is not None:
                ids.append((t, section_id, ""))
            ram()
        elif t == SectionType.COMMAND:
            assert u(2) == MigCommand.SWITCHOVER_START and u(2) == 0
        elif t == SectionType.FOOTER:
            assert u(4) == section_id
        else:
            raise AssertionError(f"section type {t:#x}")
    assert pos == jpos - 5  # the walk ends exactly at the VMDESCRIPTION record
    return seen


def test_stream_is_walkable_from_its_vmdesc_like_analyze_migration() -> None:
    raw, _ = _write_stream()
    seen = _walk_like_analyze_migration(raw)
    assert [name for name, _ in seen] == ["configuration", "0/virtio-mem-device-early"]
    conf = seen[0][1]
    assert conf["name"] == b"livemig-soft"
    assert conf["configuration/target-page-bits"]["target_page_bits"] == bytes.fromhex("0000000c")
    dev = seen[1][1]
    assert dev["tmp"]["block_size"] == (0x100000).to_bytes(8, "big")
    assert dev["bitmap"] == EARLY_BYTES[-16:]


def test_configuration_with_all_subsections_is_walkable() -> None:
    w = bytes_writer()
    savevm.write_header(w)
    conf = savevm.write_configuration(
        w, "pc", 12, capabilities=["x-ignore-shared", "events"], uuid=bytes(16)
    )
    savevm.write_eof(w)
    savevm.write_vmdesc(w, savevm.build_vmdesc(conf, []))
    seen = _walk_like_analyze_migration(w.getvalue())
    caps = seen[0][1]["configuration/capabilities"]
    assert caps["capabilities"] == ["x-ignore-shared", "events"]
    assert caps["caps_count"] == bytes.fromhex("00000002")
    assert seen[0][1]["configuration/uuid"]["uuid"] == bytes(16)
