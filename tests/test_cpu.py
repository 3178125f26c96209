"""featx.cpu: the cores other processes leave idle, read from the system's CPU time (not the lagging load average),
and the CPU's model and flags."""
from __future__ import annotations

import os

import pytest

from featx import cpu


def stat_lines(tmp_path, *lines):
    """A /proc/stat stand-in whose first line changes on each read."""
    reads = iter(lines)
    path = tmp_path / "stat"

    def next_read(seconds):
        path.write_text(next(reads) + "\nintr 0\n")

    next_read(0)
    return path, next_read


def test_busy_cores_is_the_share_of_cpu_time_not_idle(tmp_path, monkeypatch):
    # 4 cores; between the reads 400 ticks pass, 100 of them idle or waiting on I/O: 3 cores' worth busy.
    path, advance = stat_lines(tmp_path, "cpu  100 0 100 800 0 0 0 0 0 0", "cpu  250 0 250 860 40 0 0 0 0 0")
    monkeypatch.setattr(cpu, "PROC_STAT", str(path))
    monkeypatch.setattr(cpu.time, "sleep", advance)
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    assert cpu.busy_cores() == pytest.approx(3.0)


@pytest.mark.parametrize("busy, idle", [(4.0, 1), (3.6, 1), (2.4, 2), (0.3, 4), (0.0, 4)])
def test_idle_cores_rounds_what_others_leave_and_keeps_one(monkeypatch, busy, idle):
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cpu, "busy_cores", lambda: busy)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # lagging: must not be read
    assert cpu.idle_cores() == idle


def test_without_proc_stat_the_load_average_stands_in_then_every_core(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "PROC_STAT", str(tmp_path / "missing"))
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cpu.busy_cores() is None and cpu.idle_cores() == 3

    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(cpu.os, "getloadavg", no_load_average)
    assert cpu.idle_cores() == 4


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_busy_cores_reads_this_machine():
    busy = cpu.busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    assert 1 <= cpu.idle_cores() <= (os.cpu_count() or 1)


def test_cpu_fields_name_a_model_and_usable_cores_are_counted():
    fields = cpu.cpu_fields()
    assert fields["model"] and isinstance(fields["flags"], str)
    assert 1 <= cpu.usable_cores() <= (os.cpu_count() or 1)
