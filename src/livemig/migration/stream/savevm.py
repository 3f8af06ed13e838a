"""Section framing of the migration stream: header, configuration, sections, commands,
footers, EOF and the VMDESCRIPTION trailer, on both the writing and the reading side.

The stream is ``header, [configuration], {section | command}, EOF, [vmdesc]``:

* header: ``be32 FILE_MAGIC, be32 FILE_VERSION``;
* configuration: ``0x07`` then the ``"configuration"`` vmstate (``be32 len, machine name``
  and optional subsections for target-page-bits, capabilities and uuid);
* section: ``u8 type, be32 section_id``, and for START/FULL also ``u8 idlen, idstr,
  be32 instance_id, be32 version_id``; then the payload, then the footer
  ``0x7e, be32 section_id``;
* command: ``0x08, be16 cmd, be16 len, data``;
* EOF: ``0x00``; vmdesc: ``0x06, be32 len, JSON``.

Each function here reads or writes one of those records, so a stream writer or loader is
a sequence of calls. Writers emit the record's type byte. On the reading side a loader
dispatches on the type: :func:`read_section_header` reads the type byte (and, for
START/PART/END/FULL, the rest of the header), then :func:`read_configuration`,
:func:`read_command` or :func:`read_vmdesc` read the body of the other record kinds. All
read errors are :class:`~livemig.migration.stream.qemu_file.StreamError` with the offset of the
bad byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from livemig.devices.vmstate import (
    Field,
    VMStateDescription,
    decode,
    encode_with_vmdesc,
)
from livemig.migration.stream.format import (
    DEFAULT_TARGET_PAGE_SIZE,
    FILE_MAGIC,
    FILE_VERSION,
    FILE_VERSION_COMPAT,
    RAM_MIN_PAGE_BITS,
    SECTIONS_WITH_ID,
    SECTIONS_WITH_IDSTR,
    MigCommand,
    SectionType,
)
from livemig.migration.stream.qemu_file import QEMUFileReader, QEMUFileWriter, StreamError

__all__ = [
    "CONFIGURATION_VMSD",
    "Command",
    "SaveStateEntry",
    "SaveStateRegistry",
    "SectionHeader",
    "build_vmdesc",
    "check_footer",
    "old_style_vmdesc_entry",
    "peek_section_type",
    "read_command",
    "read_configuration",
    "read_header",
    "read_section_header",
    "read_vmdesc",
    "read_vmstate_section",
    "start_entry_section",
    "start_section",
    "write_command",
    "write_configuration",
    "write_eof",
    "write_footer",
    "write_header",
    "write_vmdesc",
    "write_vmstate_section",
]

MAX_MACHINE_NAME = 256
"""Longest machine type name accepted in the configuration section."""

MAX_CAPABILITIES = 256
"""Most capability names accepted in the configuration section (QEMU has about 20)."""

MAX_VMDESC = 64 << 20
"""Largest VMDESCRIPTION JSON accepted (QEMU's are tens of kilobytes)."""

_U32_MAX = 0xFFFFFFFF

# -- the configuration section ------------------------------------------------------------------

_CONF_PAGE_BITS = VMStateDescription(
    "configuration/target-page-bits",
    1,
    [Field.uint32("target_page_bits")],
    needed=lambda v: v.get("target_page_bits") is not None,
)
_CONF_CAPS = VMStateDescription(
    "configuration/capabilities",
    1,
    [
        Field.uint32("caps_count"),
        Field.strings("capabilities", "caps_count", limit=MAX_CAPABILITIES),
    ],
    needed=lambda v: bool(v.get("capabilities")),
)
_CONF_UUID = VMStateDescription(
    "configuration/uuid",
    1,
    [Field.buffer("uuid", 16)],
    needed=lambda v: v.get("uuid") is not None,
)
CONFIGURATION_VMSD = VMStateDescription(
    "configuration",
    1,
    [Field.uint32("len"), Field.buffer("name", "len", limit=MAX_MACHINE_NAME)],
    subsections=[_CONF_PAGE_BITS, _CONF_CAPS, _CONF_UUID],
)
"""QEMU's configuration record: the machine type, then subsections that QEMU sends when
the target page size is not the architecture minimum, when validatable capabilities
(x-ignore-shared, mapped-ram) are on, and when validate-uuid is on."""


# -- records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionHeader:
    """A decoded section header. ``section_id`` is set for START/PART/END/FULL, the other
    fields for START/FULL only. ``offset`` is where the type byte was."""

    type: SectionType
    section_id: int | None = None
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    offset: int = 0


class Command(NamedTuple):
    """A ``QEMU_VM_COMMAND`` record (unpacks as ``cmd, payload``)."""

    cmd: MigCommand
    payload: bytes


# payload lengths: exact for fixed-size commands, a minimum for variable ones
_CMD_EXACT_LEN: dict[MigCommand, tuple[int, ...]] = {
    MigCommand.OPEN_RETURN_PATH: (0,),
    MigCommand.PING: (4,),
    MigCommand.POSTCOPY_ADVISE: (0, 16),
    MigCommand.POSTCOPY_LISTEN: (0,),
    MigCommand.POSTCOPY_RUN: (0,),
    MigCommand.PACKAGED: (4,),
    MigCommand.ENABLE_COLO: (0,),
    MigCommand.POSTCOPY_RESUME: (0,),
    MigCommand.SWITCHOVER_START: (0,),
}
_CMD_MIN_LEN: dict[MigCommand, int] = {
    # u8 version, u8 namelen, name (>= 1), u8 0, then >= 1 (be64 start, be64 length)
    MigCommand.POSTCOPY_RAM_DISCARD: 1 + 1 + 1 + 1 + 16,
    # u8 len, idstr (>= 1)
    MigCommand.RECV_BITMAP: 2,
}


# -- writing --------------------------------------------------------------------------------------


def write_header(w: QEMUFileWriter) -> None:
    """``be32 magic, be32 version``: the first 8 bytes of every stream."""
    w.put_be32(FILE_MAGIC)
    w.put_be32(FILE_VERSION)


def write_configuration(
    w: QEMUFileWriter,
    machine_name: str,
    target_page_bits: int | None = None,
    *,
    capabilities: Sequence[str] = (),
    uuid: bytes | None = None,
) -> dict[str, Any]:
    """Write the CONFIGURATION record and return its VMDESCRIPTION ``configuration`` object.

    ``target_page_bits`` is sent only if given (QEMU sends it only when the page size is
    not the architecture minimum); ``capabilities`` only if non-empty; ``uuid`` (16 bytes)
    only if given. The returned description is what analyze-migration needs to step over
    the subsections.
    """
    name = machine_name.encode()
    if len(name) > MAX_MACHINE_NAME:
        raise ValueError(f"machine name of {len(name)} bytes exceeds {MAX_MACHINE_NAME}")
    if target_page_bits is not None and not RAM_MIN_PAGE_BITS <= target_page_bits <= 31:
        raise ValueError(f"target_page_bits {target_page_bits} outside {RAM_MIN_PAGE_BITS}..31")
    caps = list(capabilities)
    if any(not c for c in caps):
        raise ValueError("empty capability name")
    if uuid is not None and len(uuid) != 16:
        raise ValueError(f"uuid must be 16 bytes, got {len(uuid)}")
    state = {
        "len": len(name),
        "name": name,
        "target_page_bits": target_page_bits,
        "caps_count": len(caps),
        "capabilities": caps,
        "uuid": uuid,
    }
    data, desc = encode_with_vmdesc(CONFIGURATION_VMSD, state)
    w.put_u8(SectionType.CONFIGURATION)
    w.put_bytes(data)
    return desc


def start_section(
    w: QEMUFileWriter,
    type: SectionType | int,
    section_id: int,
    idstr: str | None = None,
    instance_id: int | None = None,
    version_id: int | None = None,
) -> None:
    """Write a section header. START and FULL need ``idstr``, ``instance_id`` and
    ``version_id``; PART and END must not have them."""
    t = SectionType(type)
    if t not in SECTIONS_WITH_ID:
        raise ValueError(f"{t.name} is not a section type with a section id")
    extra = (idstr, instance_id, version_id)
    if t in SECTIONS_WITH_IDSTR:
        if idstr is None or instance_id is None or version_id is None:
            raise ValueError(f"a {t.name} section header needs idstr, instance_id and version_id")
        if not idstr:
            raise ValueError("empty idstr")
    elif any(x is not None for x in extra):
        raise ValueError(f"a {t.name} section header carries only the section id")
    w.put_u8(t)
    w.put_be32(section_id)
    if t in SECTIONS_WITH_IDSTR:
        assert idstr is not None and instance_id is not None and version_id is not None
        w.put_counted_string(idstr)
        w.put_be32(instance_id)
        w.put_be32(version_id)


def write_footer(w: QEMUFileWriter, section_id: int) -> None:
    """``0x7e, be32 section_id`` after every section's payload."""
    w.put_u8(SectionType.FOOTER)
    w.put_be32(section_id)


def write_eof(w: QEMUFileWriter) -> None:
    w.put_u8(SectionType.EOF)


def _vmdesc_bytes(json_obj: Any) -> bytes:
    data = (
        json_obj.encode()
        if isinstance(json_obj, str)
        else bytes(json_obj)
        if isinstance(json_obj, bytes | bytearray)
        else json.dumps(json_obj, separators=(",", ":")).encode()
    )
    # analyze-migration.py finds the JSON as "the first '{' after the last NUL byte" and
    # then checks for 0x06 five bytes earlier. A '{' (0x7b) inside the be32 length would
    # fool it, so pad with JSON whitespace until the length has none.
    while b"{" in len(data).to_bytes(4, "big"):
        data += b" "
    return data


def write_vmdesc(w: QEMUFileWriter, json_obj: Any) -> None:
    """``0x06, be32 len, JSON``: the VMDESCRIPTION trailer after EOF.

    ``json_obj`` is a JSON-serialisable object (usually from :func:`build_vmdesc`) or
    already-serialised ``str``/``bytes``.
    """
    data = _vmdesc_bytes(json_obj)
    if len(data) > _U32_MAX:
        raise ValueError("VMDESCRIPTION too large")
    w.put_u8(SectionType.VMDESCRIPTION)
    w.put_be32(len(data))
    w.put_bytes(data)


def write_command(w: QEMUFileWriter, cmd: MigCommand | int, payload: bytes = b"") -> None:
    """``0x08, be16 cmd, be16 len, data``."""
    c = MigCommand(cmd)
    if c is MigCommand.INVALID:
        raise ValueError("cannot send the INVALID command")
    if len(payload) > 0xFFFF:
        raise ValueError(f"command {c.name} payload of {len(payload)} bytes exceeds 65535")
    w.put_u8(SectionType.COMMAND)
    w.put_be16(c)
    w.put_be16(len(payload))
    w.put_bytes(payload)


# -- registry of saved state --------------------------------------------------------------------


@dataclass
class SaveStateEntry:
    """One participant in the stream: the RAM section, or a device (with its vmsd)."""

    idstr: str
    instance_id: int
    version: int
    section_id: int
    vmsd: VMStateDescription | None = None


class SaveStateRegistry:
    """Allocates section ids and remembers who owns them, in registration order.

    Section ids are handed out from 0 upwards at registration, as QEMU does, so the order
    of registration is the order of ids in the stream.
    """

    def __init__(self) -> None:
        self._entries: list[SaveStateEntry] = []
        self._by_key: dict[tuple[str, int], SaveStateEntry] = {}
        self._by_id: dict[int, SaveStateEntry] = {}

    def register(
        self,
        idstr: str,
        version: int | None = None,
        *,
        instance_id: int | None = None,
        vmsd: VMStateDescription | None = None,
    ) -> SaveStateEntry:
        """Add a participant. ``version`` defaults to ``vmsd.version``; ``instance_id``
        defaults to one more than the highest instance already registered under
        ``idstr`` (0 for the first)."""
        if not idstr or len(idstr.encode()) > 0xFF:
            raise ValueError(f"idstr {idstr!r} must be 1..255 bytes")
        if version is None:
            if vmsd is None:
                raise ValueError(f"{idstr}: a version is needed when there is no vmsd")
            version = vmsd.version
        if instance_id is None:
            ids = [e.instance_id for e in self._entries if e.idstr == idstr]
            instance_id = max(ids) + 1 if ids else 0
        if (idstr, instance_id) in self._by_key:
            raise ValueError(f"{idstr!r} instance {instance_id} is already registered")
        for v, what in ((version, "version"), (instance_id, "instance_id")):
            if not 0 <= v <= _U32_MAX:
                raise ValueError(f"{idstr}: {what} {v} does not fit in a be32")
        entry = SaveStateEntry(idstr, instance_id, version, len(self._entries), vmsd)
        self._entries.append(entry)
        self._by_key[(idstr, instance_id)] = entry
        self._by_id[entry.section_id] = entry
        return entry

    def find(self, idstr: str, instance_id: int) -> SaveStateEntry | None:
        return self._by_key.get((idstr, instance_id))

    def by_section_id(self, section_id: int) -> SaveStateEntry | None:
        return self._by_id.get(section_id)

    def __iter__(self) -> Iterator[SaveStateEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def start_entry_section(w: QEMUFileWriter, type: SectionType | int, entry: SaveStateEntry) -> None:
    """Section header for ``entry`` (idstr, instance and version added for START/FULL)."""
    t = SectionType(type)
    if t in SECTIONS_WITH_IDSTR:
        start_section(w, t, entry.section_id, entry.idstr, entry.instance_id, entry.version)
    else:
        start_section(w, t, entry.section_id)


def write_vmstate_section(
    w: QEMUFileWriter, entry: SaveStateEntry, state: Any, type: SectionType | int = SectionType.FULL
) -> dict[str, Any]:
    """Write ``state`` as a whole vmstate section (header, payload, footer) of ``entry``
    and return its VMDESCRIPTION ``devices`` entry. FULL for ordinary devices; early-setup
    devices use the same framing."""
    if entry.vmsd is None:
        raise ValueError(f"{entry.idstr} has no vmsd")
    if entry.version != entry.vmsd.version:
        raise ValueError(f"{entry.idstr}: entry version {entry.version} != vmsd version")
    data, desc = encode_with_vmdesc(entry.vmsd, state)
    start_entry_section(w, type, entry)
    w.put_bytes(data)
    write_footer(w, entry.section_id)
    return {"name": entry.idstr, "instance_id": entry.instance_id, **desc}


def old_style_vmdesc_entry(idstr: str, instance_id: int, size: int) -> dict[str, Any]:
    """VMDESCRIPTION entry of a section written without a vmsd: one opaque buffer."""
    return {
        "name": idstr,
        "instance_id": instance_id,
        "fields": [{"name": "data", "type": "buffer", "size": size}],
    }


def build_vmdesc(
    configuration: dict[str, Any] | None,
    devices: Sequence[dict[str, Any]],
    page_size: int = DEFAULT_TARGET_PAGE_SIZE,
) -> dict[str, Any]:
    """The VMDESCRIPTION object: ``{"configuration", "page_size", "devices"}``.

    ``configuration`` is what :func:`write_configuration` returned (``None`` if no
    configuration record was written); ``devices`` are the entries of the vmstate sections
    in stream order.
    """
    desc: dict[str, Any] = {}
    if configuration is not None:
        desc["configuration"] = configuration
    desc["page_size"] = page_size
    desc["devices"] = list(devices)
    return desc


# -- reading --------------------------------------------------------------------------------------


def read_header(r: QEMUFileReader) -> int:
    """Check magic and version; return the version (always :data:`FILE_VERSION`)."""
    off = r.tell()
    magic = r.get_be32()
    if magic != FILE_MAGIC:
        raise StreamError(off, f"not a migration stream: magic {magic:#010x}")
    off = r.tell()
    version = r.get_be32()
    if version == FILE_VERSION_COMPAT:
        raise StreamError(off, "unsupported stream version 2 (QEMU_VM_FILE_VERSION_COMPAT)")
    if version != FILE_VERSION:
        raise StreamError(off, f"unsupported stream version {version} (expected {FILE_VERSION})")
    return version


def _section_type(value: int, off: int) -> SectionType:
    try:
        t = SectionType(value)
    except ValueError:
        raise StreamError(off, f"unknown section type {value:#04x}") from None
    if t in (SectionType.SUBSECTION, SectionType.FOOTER):
        raise StreamError(
            off, f"unexpected section type {value:#04x} ({t.name}) where a section was expected"
        )
    return t


def peek_section_type(r: QEMUFileReader) -> SectionType:
    """The type of the next record, validated, without consuming it."""
    off = r.tell()
    head = r.peek(1)
    if not head:
        raise StreamError(off, "truncated stream: wanted 1 bytes, got 0 (expected a section)")
    return _section_type(head[0], off)


def read_section_header(r: QEMUFileReader) -> SectionHeader:
    """Read a record's type byte and, for START/PART/END/FULL, the rest of the header.

    For EOF, COMMAND, CONFIGURATION and VMDESCRIPTION only the type is read; the caller
    continues with :func:`read_command`, :func:`read_configuration` or
    :func:`read_vmdesc`.
    """
    off = r.tell()
    t = _section_type(r.get_u8(), off)
    if t not in SECTIONS_WITH_ID:
        return SectionHeader(t, offset=off)
    section_id = r.get_be32()
    if t not in SECTIONS_WITH_IDSTR:
        return SectionHeader(t, section_id, offset=off)
    soff = r.tell()
    raw = r.get_counted_string()
    if not raw:
        raise StreamError(soff, f"empty idstr in {t.name} header of section {section_id}")
    try:
        idstr = raw.decode()
    except UnicodeDecodeError:
        raise StreamError(soff, f"idstr {raw!r} of section {section_id} is not UTF-8") from None
    instance_id = r.get_be32()
    version_id = r.get_be32()
    return SectionHeader(t, section_id, idstr, instance_id, version_id, off)


def check_footer(r: QEMUFileReader, section_id: int) -> None:
    """Read and check ``0x7e, be32 section_id``: proof that the section's payload was
    consumed exactly."""
    off = r.tell()
    t = r.get_u8()
    if t != SectionType.FOOTER:
        raise StreamError(off, f"missing section footer for section {section_id} (got {t:#04x})")
    off = r.tell()
    got = r.get_be32()
    if got != section_id:
        raise StreamError(off, f"section footer mismatch: expected id {section_id}, got {got}")


def read_vmstate_section(
    r: QEMUFileReader, header: SectionHeader, vmsd: VMStateDescription
) -> dict[str, Any]:
    """Decode a START/FULL section's vmstate payload (after its header) and its footer."""
    if header.section_id is None or header.version_id is None:
        raise ValueError("read_vmstate_section needs a START or FULL header")
    values = decode(vmsd, r, header.version_id)
    check_footer(r, header.section_id)
    return values


def read_configuration(r: QEMUFileReader) -> dict[str, Any]:
    """The CONFIGURATION record after its type byte (read by :func:`read_section_header`).

    Returns ``{"machine": str, "target_page_bits": int | None, "capabilities": [str],
    "uuid": bytes | None}``; ``target_page_bits`` is ``None`` when the sender left the
    subsection out (meaning: the architecture minimum).
    """
    off = r.tell()
    v = decode(CONFIGURATION_VMSD, r)
    try:
        machine = v["name"].decode()
    except UnicodeDecodeError:
        raise StreamError(off + 4, f"machine name {v['name']!r} is not UTF-8") from None
    bits = v.get("target_page_bits")
    if bits is not None and not RAM_MIN_PAGE_BITS <= bits <= 31:
        raise StreamError(off, f"configuration: target page bits {bits} out of range")
    return {
        "machine": machine,
        "target_page_bits": bits,
        "capabilities": v.get("capabilities", []),
        "uuid": v.get("uuid"),
    }


def read_command(r: QEMUFileReader) -> Command:
    """The COMMAND record after its type byte (read by :func:`read_section_header`):
    ``be16 cmd, be16 len, data``, with the command number and, where fixed, the length
    checked."""
    off = r.tell()
    value = r.get_be16()
    try:
        cmd = MigCommand(value)
    except ValueError:
        raise StreamError(off, f"unknown migration command {value}") from None
    if cmd is MigCommand.INVALID:
        raise StreamError(off, "invalid migration command 0")
    loff = r.tell()
    length = r.get_be16()
    exact = _CMD_EXACT_LEN.get(cmd)
    if exact is not None and length not in exact:
        want = " or ".join(map(str, exact))
        raise StreamError(loff, f"command {cmd.name}: bad length {length}, expected {want}")
    minimum = _CMD_MIN_LEN.get(cmd, 0)
    if length < minimum:
        raise StreamError(loff, f"command {cmd.name}: length {length} is below {minimum}")
    return Command(cmd, r.read_exact(length))


def read_vmdesc(r: QEMUFileReader, max_len: int = MAX_VMDESC) -> dict[str, Any]:
    """The VMDESCRIPTION record after its type byte (read by :func:`read_section_header`):
    ``be32 len, JSON``, returned parsed."""
    off = r.tell()
    length = r.get_be32()
    if length > max_len:
        raise StreamError(off, f"VMDESCRIPTION of {length} bytes exceeds the limit of {max_len}")
    joff = r.tell()
    return parse_vmdesc_json(r.read_exact(length), joff)


def parse_vmdesc_json(data: bytes, joff: int) -> dict[str, Any]:
    """The VMDESCRIPTION's JSON (starting at stream offset ``joff``): a JSON object."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StreamError(joff, f"VMDESCRIPTION is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise StreamError(joff, "VMDESCRIPTION is not a JSON object")
    return obj
