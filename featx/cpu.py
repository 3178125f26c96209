"""This process's CPU: its model and feature flags, the cores it may use and those other processes leave idle, and
torch's intra-op thread count for a block."""
from __future__ import annotations

import contextlib
import os
import platform
import time

CPUINFO = "/proc/cpuinfo"
PROC_STAT = "/proc/stat"
SAMPLE_SECONDS = 0.1  # how long idle_cores watches the system's CPU time


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


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) clock ticks of all cores since boot, from /proc/stat's first line; None where there is none."""
    try:
        with open(PROC_STAT, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 6 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[3] + ticks[4], sum(ticks)


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores' worth of CPU time the system used over the next `seconds` (this process, asleep meanwhile, adds
    nothing); None where /proc/stat is not there."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(seconds)
    after = _cpu_times()
    total = after[1] - before[1] if after else 0
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (after[0] - before[0]) / total)


def idle_cores() -> int:
    """The cores other processes leave idle now: the cores less the CPU time the system uses over a tenth of a
    second, rounded, at least 1. Where /proc/stat is missing, the 1-minute load average stands in for that use
    (it lags by minutes: a command that just ended still counts), and without either every core counts as idle.
    Read before a run's own threads add to the load."""
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return cores
    return max(1, min(cores, round(cores - busy)))


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
