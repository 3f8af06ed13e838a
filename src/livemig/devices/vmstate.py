"""Declarative device state: what a device puts in its migration section, and how.

A device describes its state once, as a :class:`VMStateDescription` (a name, a version and
an ordered list of :class:`Field`), and gets from it the encoder, the validating decoder
and the VMDESCRIPTION JSON entry. Keeping all three derived from one description is the
point: the bytes on the wire, the checks on load and what ``analyze-migration.py`` is told
about the section cannot drift apart.

The wire format is QEMU's vmstate format, so a section written here loads in QEMU when the
descriptions agree:

* fields follow each other with no framing, integers big-endian;
* a bitmap of ``nbits`` bits is ``ceil(nbits / 64)`` big-endian u64 words, bit *i* in
  bit ``i % 64`` of word ``i // 64``;
* a nested struct is its fields inline (and its own subsections);
* after the fields come the subsections that are needed, each as
  ``u8 0x05, u8 namelen, name, be32 version_id, fields...``. A subsection's name starts
  with its parent's name, which is how a reader knows the subsection belongs to this
  level and not to an enclosing one.

Callables in a description (``exists`` predicates, sizes computed from other fields,
``needed`` for subsections) take one argument, the values of the struct being processed:
on encode, the object being encoded (a mapping or any object with attributes); on decode,
the dict of the fields decoded so far. Writing them as ``lambda v: v["x"]`` therefore
works on both sides when the encoded object is a dict. State that only the local side
knows (a device property) is best captured in a closure.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from livemig.memory.bitmap import Bitmap, words_for

__all__ = [
    "DecodeError",
    "Field",
    "StateReader",
    "VMStateDescription",
    "VMStateError",
    "decode",
    "encode",
    "encode_with_vmdesc",
    "vmdesc_entry",
]

SizeSpec = int | str | Callable[[Any], int]
"""A size: a constant, the name of an earlier integer field, or a callable of the values."""

Predicate = Callable[[Any], bool]

DEFAULT_MAX_BITMAP_BITS = 1 << 32
"""Decode refuses bitmaps larger than this unless the field says otherwise (512 MiB)."""

DEFAULT_MAX_BUFFER = 16 << 20
"""Decode refuses variable buffers larger than this unless the field says otherwise."""

DEFAULT_MAX_STRINGS = 1024

SUBSECTION_MARK = 0x05
"""The byte that opens a subsection (QEMU's ``QEMU_VM_SUBSECTION``)."""
_SUBSECTION = SUBSECTION_MARK

_INTS: dict[str, struct.Struct] = {
    "uint8": struct.Struct(">B"),
    "uint16": struct.Struct(">H"),
    "uint32": struct.Struct(">I"),
    "uint64": struct.Struct(">Q"),
    "int32": struct.Struct(">i"),
    "int64": struct.Struct(">q"),
}
_BE32 = _INTS["uint32"]

# vmdesc "type" names understood by scripts/analyze-migration.py
_VMDESC_TYPE = {
    **{k: k for k in _INTS},
    "bitmap": "bitmap",
    "buffer": "buffer",
    "struct": "struct",
    "strings": "capability",
}


class VMStateError(ValueError):
    """The value handed to :func:`encode` does not match its description."""


class DecodeError(Exception):
    """Bytes that do not hold what their description says (or end too early).

    ``offset`` is the absolute stream offset of the byte where the problem was found (for
    a truncated read, where that read started), ``problem`` says what is wrong. The
    migration stream reader raises the same class (``qemu_file.DecodeError`` is this
    class), so a device's load and the stream framing report problems alike.
    """

    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(offset, problem)
        self.offset = offset
        self.problem = problem

    def __str__(self) -> str:
        return f"stream offset {self.offset:#x}: {self.problem}"


class StateReader(Protocol):
    """What decoding needs of a byte stream (``migration.qemu_file.StateReader``)."""

    def tell(self) -> int: ...
    def get_u8(self) -> int: ...
    def get_be16(self) -> int: ...
    def get_be32(self) -> int: ...
    def get_be64(self) -> int: ...
    def peek(self, n: int) -> bytes: ...
    def skip(self, n: int) -> None: ...
    def read_exact(self, n: int) -> bytes: ...
    def readinto_exact(self, dest: Any) -> None: ...
    def get_counted_string(self) -> bytes: ...


@dataclass(frozen=True)
class Field:
    """One field of a :class:`VMStateDescription`. Build with the classmethods.

    ``exists``: if given, the field is on the wire only when it returns true (QEMU's
    ``_TEST`` variants). ``since``: the first description version that has the field.
    ``getter``: computes the value from the enclosing object instead of reading the
    attribute/key ``name`` (for state that is derived at save time, like QEMU's
    ``VMSTATE_WITH_TMP``). ``limit``: the largest size (bits, bytes or count) decode
    accepts, so that a corrupt length cannot make the reader allocate gigabytes.
    """

    name: str
    kind: str
    size: SizeSpec | None = None
    desc: VMStateDescription | None = None
    exists: Predicate | None = None
    since: int = 0
    getter: Callable[[Any], Any] | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _VMDESC_TYPE:
            raise ValueError(f"unknown field kind {self.kind!r}")
        if self.kind in ("bitmap", "buffer", "strings") and self.size is None:
            raise ValueError(f"field {self.name!r} of kind {self.kind} needs a size")
        if self.kind == "struct" and self.desc is None:
            raise ValueError(f"struct field {self.name!r} needs a description")

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def uint8(cls, name: str, **kw: Any) -> Field:
        return cls(name, "uint8", **kw)

    @classmethod
    def uint16(cls, name: str, **kw: Any) -> Field:
        return cls(name, "uint16", **kw)

    @classmethod
    def uint32(cls, name: str, **kw: Any) -> Field:
        return cls(name, "uint32", **kw)

    @classmethod
    def uint64(cls, name: str, **kw: Any) -> Field:
        return cls(name, "uint64", **kw)

    @classmethod
    def int32(cls, name: str, **kw: Any) -> Field:
        return cls(name, "int32", **kw)

    @classmethod
    def int64(cls, name: str, **kw: Any) -> Field:
        return cls(name, "int64", **kw)

    @classmethod
    def bitmap(cls, name: str, nbits: SizeSpec, **kw: Any) -> Field:
        """``nbits`` bits as big-endian u64 words. Value: a ``Bitmap``, a numpy array of
        native u64 words, or bytes already in wire format. Decodes to a ``Bitmap``."""
        return cls(name, "bitmap", size=nbits, **kw)

    @classmethod
    def buffer(cls, name: str, size: SizeSpec, **kw: Any) -> Field:
        """Raw bytes of a fixed or field-given length. Decodes to ``bytes``."""
        return cls(name, "buffer", size=size, **kw)

    @classmethod
    def struct(cls, name: str, desc: VMStateDescription, **kw: Any) -> Field:
        """A nested description encoded inline (QEMU's ``VMSTATE_STRUCT`` and
        ``VMSTATE_WITH_TMP``); value is a mapping or object, decodes to a dict."""
        return cls(name, "struct", desc=desc, **kw)

    struct_ = struct  # alias, for code that avoids shadowing the ``struct`` module name

    @classmethod
    def strings(cls, name: str, count: SizeSpec, **kw: Any) -> Field:
        """``count`` counted strings (``u8 len, bytes`` each), as QEMU's capability list.
        Decodes to a list of ``str``."""
        return cls(name, "strings", size=count, **kw)


@dataclass(frozen=True)
class VMStateDescription:
    """Name, version and ordered fields of one piece of device state.

    ``subsections`` are optional trailing parts, sent when their ``needed`` predicate is
    true (always, if it is ``None``); their values live in the same object as the
    parent's. Decode accepts stream versions from ``minimum_version`` (default: only
    ``version``) up to ``version``.
    """

    name: str
    version: int
    fields: Sequence[Field]
    subsections: Sequence[VMStateDescription] = ()
    needed: Predicate | None = None
    minimum_version: int | None = None
    _sub_by_name: dict[bytes, VMStateDescription] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "subsections", tuple(self.subsections))
        if not self.name or len(self.name.encode()) > 0xFF:
            raise ValueError(f"description name {self.name!r} must be 1..255 bytes")
        if not 0 <= self.min_version <= self.version <= 0xFFFFFFFF:
            raise ValueError(f"{self.name}: bad version range {self.min_version}..{self.version}")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate field names in {names}")
        for sub in self.subsections:
            # the loader recognises a subsection of this level by this prefix
            if not sub.name.startswith(self.name) or len(sub.name) <= len(self.name):
                raise ValueError(f"subsection {sub.name!r} must be named {self.name!r} + suffix")
            self._sub_by_name[sub.name.encode()] = sub

    def subsection(self, name: bytes) -> VMStateDescription | None:
        """The subsection of this level called ``name`` (wire bytes), if there is one."""
        return self._sub_by_name.get(name)

    @property
    def min_version(self) -> int:
        return self.version if self.minimum_version is None else self.minimum_version


# -- helpers ------------------------------------------------------------------------------------


def _get(obj: Any, name: str, where: str) -> Any:
    try:
        if isinstance(obj, Mapping):
            return obj[name]
        return getattr(obj, name)
    except (KeyError, AttributeError):
        raise VMStateError(f"{where}: no value for field {name!r}") from None


def _size_on_save(f: Field, obj: Any, where: str) -> int:
    spec = f.size
    if isinstance(spec, int):
        n = spec
    elif isinstance(spec, str):
        n = _get(obj, spec, where)
    else:
        assert spec is not None
        n = spec(obj)
    if not isinstance(n, int | np.integer) or n < 0:
        raise VMStateError(f"{where}: size of field {f.name!r} is {n!r}, not a count")
    return int(n)


def _size_on_load(f: Field, values: dict[str, Any], r: StateReader, where: str) -> int:
    spec = f.size
    off = r.tell()
    try:
        if isinstance(spec, int):
            n = spec
        elif isinstance(spec, str):
            n = values[spec]
        else:
            assert spec is not None
            n = spec(values)
    except Exception as e:  # the inputs come from the stream: any failure is a stream error
        raise DecodeError(off, f"{where}: cannot size field {f.name!r}: {e!r}") from None
    if not isinstance(n, int | np.integer) or n < 0:
        raise DecodeError(off, f"{where}: field {f.name!r} has invalid size {n!r}")
    n = int(n)
    default = DEFAULT_MAX_BITMAP_BITS if f.kind == "bitmap" else DEFAULT_MAX_BUFFER
    if f.kind == "strings":
        default = DEFAULT_MAX_STRINGS
    limit = f.limit if f.limit is not None else default
    if n > limit:
        raise DecodeError(off, f"{where}: field {f.name!r} size {n} exceeds the limit of {limit}")
    return n


def _present(f: Field, values: Any, version: int, where: str, off: int | None) -> bool:
    if f.since > version:
        return False
    if f.exists is None:
        return True
    if off is None:
        return bool(f.exists(values))
    try:
        return bool(f.exists(values))
    except Exception as e:
        raise DecodeError(off, f"{where}: cannot test field {f.name!r}: {e!r}") from None


def _bitmap_words(f: Field, value: Any, nbits: int, where: str) -> bytes:
    """Wire bytes (big-endian u64 words) of a bitmap value, after checking its size."""
    nwords = words_for(nbits)
    if isinstance(value, Bitmap):
        if value.nbits != nbits:
            raise VMStateError(
                f"{where}: bitmap {f.name!r} has {value.nbits} bits, expected {nbits}"
            )
        return value.to_be_words()
    if isinstance(value, np.ndarray):
        if value.shape != (nwords,):
            raise VMStateError(
                f"{where}: bitmap {f.name!r} has {value.shape} words, expected ({nwords},)"
            )
        words = value.astype(np.uint64, copy=False)
        tail = nbits & 63
        if tail and int(words[-1]) >> tail:
            raise VMStateError(f"{where}: bitmap {f.name!r} has bits set beyond {nbits}")
        return words.astype(">u8").tobytes()
    data = bytes(value)
    if len(data) != nwords * 8:
        raise VMStateError(
            f"{where}: bitmap {f.name!r} wire data is {len(data)} bytes, expected {nwords * 8}"
        )
    return data


# -- encoding -----------------------------------------------------------------------------------


def _encode(
    desc: VMStateDescription,
    obj: Any,
    out: bytearray,
    js: dict[str, Any] | None,
    where: str,
) -> None:
    if js is not None:
        js["vmsd_name"] = desc.name
        js["version"] = desc.version
        js["fields"] = []
    for f in desc.fields:
        if not _present(f, obj, desc.version, where, None):
            continue
        value = f.getter(obj) if f.getter is not None else _get(obj, f.name, where)
        start = len(out)
        fjs: dict[str, Any] | None = None
        if js is not None and f.kind != "strings":
            fjs = {"name": f.name, "type": _VMDESC_TYPE[f.kind]}
            js["fields"].append(fjs)
        kind = f.kind
        if kind in _INTS:
            try:
                out += _INTS[kind].pack(value)
            except struct.error:
                raise VMStateError(
                    f"{where}: {value!r} does not fit field {f.name!r} ({kind})"
                ) from None
        elif kind == "bitmap":
            out += _bitmap_words(f, value, _size_on_save(f, obj, where), where)
        elif kind == "buffer":
            data = bytes(value)
            n = _size_on_save(f, obj, where)
            if len(data) != n:
                raise VMStateError(f"{where}: buffer {f.name!r} is {len(data)} bytes, expected {n}")
            out += data
        elif kind == "struct":
            assert f.desc is not None
            sub_js: dict[str, Any] | None = None
            if fjs is not None:
                sub_js = fjs["struct"] = {}
            _encode(f.desc, value, out, sub_js, f"{where}.{f.name}")
        else:  # strings
            items = list(value)
            n = _size_on_save(f, obj, where)
            if len(items) != n:
                raise VMStateError(f"{where}: {f.name!r} has {len(items)} strings, expected {n}")
            for i, s in enumerate(items):
                b = s.encode() if isinstance(s, str) else bytes(s)
                if len(b) > 0xFF:
                    raise VMStateError(f"{where}: string {i} of {f.name!r} exceeds 255 bytes")
                out.append(len(b))
                out += b
                if js is not None:
                    js["fields"].append(
                        {"name": f.name, "index": i, "type": "capability", "size": 1 + len(b)}
                    )
            continue
        if fjs is not None:
            fjs["size"] = len(out) - start
    subs_js: list[dict[str, Any]] = []
    for sub in desc.subsections:
        if sub.needed is not None and not sub.needed(obj):
            continue
        name = sub.name.encode()
        out.append(_SUBSECTION)
        out.append(len(name))
        out += name
        out += _BE32.pack(sub.version)
        sjs: dict[str, Any] | None = {} if js is not None else None
        _encode(sub, obj, out, sjs, sub.name)
        if sjs is not None:
            subs_js.append(sjs)
    if js is not None and subs_js:
        js["subsections"] = subs_js


def encode(desc: VMStateDescription, obj: Any) -> bytes:
    """The wire bytes of ``obj`` described by ``desc`` (raises :class:`VMStateError`)."""
    out = bytearray()
    _encode(desc, obj, out, None, desc.name)
    return bytes(out)


def encode_with_vmdesc(desc: VMStateDescription, obj: Any) -> tuple[bytes, dict[str, Any]]:
    """Wire bytes plus the matching VMDESCRIPTION description (``vmsd_name``, ``version``,
    ``fields``, ``subsections``), computed in one pass so that they agree."""
    out = bytearray()
    js: dict[str, Any] = {}
    _encode(desc, obj, out, js, desc.name)
    return bytes(out), js


def vmdesc_entry(
    desc: VMStateDescription, obj: Any, idstr: str, instance_id: int
) -> dict[str, Any]:
    """The VMDESCRIPTION ``devices`` entry of a FULL section holding ``obj``.

    Field sizes depend on the value (bitmap length, optional fields, needed subsections),
    hence ``obj``. When the section is also written, use :func:`encode_with_vmdesc`.
    """
    _, js = encode_with_vmdesc(desc, obj)
    return {"name": idstr, "instance_id": instance_id, **js}


# -- decoding -----------------------------------------------------------------------------------


def _read_int(r: StateReader, kind: str) -> int:
    if kind == "uint8":
        return r.get_u8()
    if kind == "uint16":
        return r.get_be16()
    if kind == "uint32":
        return r.get_be32()
    if kind == "uint64":
        return r.get_be64()
    if kind == "int32":
        v = r.get_be32()
        return v - (1 << 32) if v & 0x8000_0000 else v
    v = r.get_be64()
    return v - (1 << 64) if v >> 63 else v


def _decode_bitmap(f: Field, r: StateReader, nbits: int, where: str) -> Bitmap:
    off = r.tell()
    nwords = words_for(nbits)
    raw = np.empty(nwords, dtype=">u8")
    r.readinto_exact(raw.view(np.uint8))
    words = raw.astype(np.uint64)
    tail = nbits & 63
    if tail and nwords and int(words[-1]) >> tail:
        raise DecodeError(
            off + (nwords - 1) * 8,
            f"{where}: bitmap {f.name!r} has bits set beyond its {nbits} bits",
        )
    return Bitmap(nbits, words=words)


def _decode_field(
    f: Field, r: StateReader, values: dict[str, Any], where: str, version: int
) -> Any:
    kind = f.kind
    if kind == "struct":
        assert f.desc is not None
        return _decode_struct(f.desc, r, f.desc.version, f"{where}.{f.name}", check=False)
    try:
        if kind in _INTS:
            return _read_int(r, kind)
        n = _size_on_load(f, values, r, where)
        if kind == "bitmap":
            return _decode_bitmap(f, r, n, where)
        if kind == "buffer":
            return r.read_exact(n)
        items = []
        for _ in range(n):
            off = r.tell()
            b = r.get_counted_string()
            try:
                items.append(b.decode())
            except UnicodeDecodeError:
                raise DecodeError(
                    off, f"{where}: string in {f.name!r} is not UTF-8: {b!r}"
                ) from None
        return items
    except DecodeError as e:
        if e.problem.startswith(where):
            raise
        raise DecodeError(e.offset, f"{where}: field {f.name!r}: {e.problem}") from None


def _decode_struct(
    desc: VMStateDescription,
    r: StateReader,
    version: int,
    where: str,
    check: bool = True,
    values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if check and not desc.min_version <= version <= desc.version:
        raise DecodeError(
            r.tell(),
            f"{where}: unsupported version {version} "
            f"(this side accepts {desc.min_version}..{desc.version})",
        )
    if values is None:
        values = {}
    for f in desc.fields:
        if _present(f, values, version, where, r.tell()):
            values[f.name] = _decode_field(f, r, values, where, version)
    _decode_subsections(desc, r, values, where)
    return values


def _decode_subsections(
    desc: VMStateDescription, r: StateReader, values: dict[str, Any], where: str
) -> None:
    prefix = desc.name.encode()
    seen: set[bytes] = set()
    while True:
        head = r.peek(2)
        if len(head) < 2 or head[0] != _SUBSECTION or head[1] <= len(prefix):
            return
        n = head[1]
        name = r.peek(2 + n)[2:]
        if len(name) < n or not name.startswith(prefix):
            # not ours (a parent's subsection or the next field); a truncated name is
            # left for the next read to report
            return
        off = r.tell()
        label = name.decode(errors="replace")
        sub = desc.subsection(name)
        if sub is None:
            raise DecodeError(off, f"{where}: unknown subsection {label!r}")
        if name in seen:
            raise DecodeError(off, f"{where}: subsection {label!r} appears twice")
        seen.add(name)
        r.skip(2 + n)
        voff = r.tell()
        try:
            version = r.get_be32()
        except DecodeError as e:
            raise DecodeError(e.offset, f"{where}: subsection {label!r}: {e.problem}") from None
        if not sub.min_version <= version <= sub.version:
            raise DecodeError(
                voff,
                f"{where}: subsection {label!r} has unsupported version {version} "
                f"(this side accepts {sub.min_version}..{sub.version})",
            )
        _decode_struct(sub, r, version, label, check=False, values=values)


def decode(
    desc: VMStateDescription, r: StateReader, version: int | None = None
) -> dict[str, Any]:
    """Read the state described by ``desc`` and return it as a dict.

    ``version`` is the version id from the section header (default ``desc.version``).
    Nested structs decode to nested dicts, bitmaps to ``Bitmap``, buffers to ``bytes``.
    Subsection values are merged into the same dict, as their fields belong to the same
    object. Every problem is a :class:`DecodeError` naming the description and field.
    """
    return _decode_struct(desc, r, desc.version if version is None else version, desc.name)
