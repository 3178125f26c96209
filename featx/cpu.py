"""This process's CPU: its model and feature flags, the cores it may use and those other processes leave idle, and
torch's intra-op thread count for a block."""
from __future__ import annotations

import contextlib
import os
import platform

CPUINFO = "/proc/cpuinfo"


def cpu_fields() -> dict[str, str]:
    """The first processor's 'model name' and 'flags' from /proc/cpuinfo ('Features' on ARM); '' when unknown."""
    fields = {"model": "", "flags": ""}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not fields["model"]:
                    fields["model"] = value.strip()
                elif name in ("flags", "Features") and not fields["flags"]:
                    fields["flags"] = value.strip()
                if fields["model"] and fields["flags"]:
                    break
    except OSError:
        pass
    fields["model"] = fields["model"] or platform.processor() or platform.machine()
    return fields


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def idle_cores() -> int:
    """The cores other processes leave idle: the cores less the 1-minute load average, rounded, at least 1 (every
    core where the system has no load average). Read before a run's own threads add to the load."""
    cores = os.cpu_count() or 1
    try:
        return max(1, min(cores, round(cores - os.getloadavg()[0])))
    except OSError:
        return cores


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside the block (None: left alone)."""
    import torch

    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
