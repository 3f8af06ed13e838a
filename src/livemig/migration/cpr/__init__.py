"""cpr-transfer: a VM moves to a new process on the same host without copying its memory.

QEMU 10's ``cpr-transfer`` migration mode (docs/devel/migration/CPR.rst): the old process
hands the memfd of every RAM block to the new one over a unix socket (the ``cpr``
channel, ``SCM_RIGHTS``), the new process maps them at new addresses, and the main
channel carries only device, CPU and virtio-mem state. docs/local-update.md describes it
for users.

* :mod:`.state`: the CPR state on the wire (QEMU's ``QCPR`` file: named descriptors);
* :mod:`.channels`: QEMU's ``channels`` lists and ``-incoming`` channel syntax, and the
  checks that the main channel stays on this host;
* :mod:`.source`: the outgoing mode and the old process's watch over the handover;
* :mod:`.incoming`: the new process's side: receive the memory, load device state, tell
  the old process when the guest runs here.
"""
