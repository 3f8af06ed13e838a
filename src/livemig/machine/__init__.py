"""A virtual machine: its configuration, how it is assembled, and its run state.

``machine.Machine`` is the VM; ``factory`` decides the accelerator and the guest that runs
on it (the one place that knows both, so the accelerator and guest layers stay apart).
"""

from livemig.machine.machine import MAX_BASE_RAM, RUNSTATES, Machine, MachineConfig, VirtioMemConfig

__all__ = ["MAX_BASE_RAM", "RUNSTATES", "Machine", "MachineConfig", "VirtioMemConfig"]
