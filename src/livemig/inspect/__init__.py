"""``livemig inspect``: offline inspection of migration stream files written by livemig or
by QEMU.

``inspect_stream(path)`` walks a whole stream file and returns a :class:`StreamReport`:
the header and configuration, every section and command in stream order, the RAM blocks
with how many ZERO and PAGE records each received (and which pages got one), the device
sections decoded with the help of the VMDESCRIPTION trailer, and the state of every
virtio-mem device (its plugged bitmap and the RAM block behind it). ``check_discard``
then answers the question livemig exists for: did any page record land in memory that
the virtio-mem bitmap says is unplugged?

A tool built on the migration engine, not part of it: RAM records are read by the
engine's own decoder (:class:`livemig.migration.ram.codec.RecordDecoder`, the one the
destination loads with), and nothing in ``livemig.migration`` imports this package.

Modules, in the order a stream is read: :mod:`.trailer` (find the VMDESCRIPTION first),
:mod:`.walk` (the records in stream order), :mod:`.ram` (RAM through the codec),
:mod:`.devices` (device sections by their description), :mod:`.virtio_mem` (its state
and RAM block), :mod:`.discard` (the check), :mod:`.report` (what comes out).
"""

from livemig.inspect.discard import check_discard
from livemig.inspect.report import (
    CommandReport,
    RamBlockReport,
    SectionReport,
    StreamReport,
    Violation,
    ViolationList,
    VirtioMemReport,
)
from livemig.inspect.walk import inspect_stream

__all__ = [
    "CommandReport",
    "RamBlockReport",
    "SectionReport",
    "StreamReport",
    "Violation",
    "ViolationList",
    "VirtioMemReport",
    "check_discard",
    "inspect_stream",
]
