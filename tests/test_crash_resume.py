"""A real `featx extract` subprocess killed with SIGKILL mid-run, resumed, and compared with a clean run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from featx.store import open_store
from cli_support import featx
from options_support import EXTRACT, cli_args

ARGS = [*cli_args(dict(EXTRACT, image_size=64, taps=["layer3", "avgpool"])), "-q"]


def _wait_for_segments(parts: Path, count: int, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("seg-*.h5"))) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} segments in {parts} (process exit {proc.poll()})")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_clean_run(tmp_path, image_folders):
    data = image_folders("data", classes=("a", "b", "c"), per_class=40, size=(80, 60))
    clean, crashed = tmp_path / "clean.h5", tmp_path / "crashed.h5"
    assert featx("extract", data, "-o", clean, *ARGS).returncode == 0

    proc = featx("extract", data, "-o", crashed, *ARGS, wait=False)
    _wait_for_segments(crashed.with_name("crashed.h5.parts"), 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not crashed.exists()  # never sealed: nothing half-written at the final path

    resumed = featx("extract", data, "-o", crashed, *ARGS, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert '"reused": 0' not in resumed.stdout
    with open_store(clean) as a, open_store(crashed) as b:
        assert list(a.paths) == list(b.paths) and len(b) == 120
        assert list(a.keys) == list(b.keys)
        for tap in ("layer3", "avgpool"):
            np.testing.assert_allclose(a.features(tap), b.features(tap), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.h5", "crashed.h5", "data"]


@pytest.mark.slow
def test_second_writer_is_refused_while_first_completes(tmp_path, image_folders):
    data = image_folders("data", per_class=30, size=(80, 60))
    out = tmp_path / "s.h5"
    first = featx("extract", data, "-o", out, *ARGS, wait=False)
    _wait_for_segments(out.with_name("s.h5.parts"), 1, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first writer mid-run, lock taken, while the second one starts
    try:
        second = featx("extract", data, "-o", out, *ARGS)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0 and "another featx process" in second.stderr
    assert first.wait(timeout=300) == 0
    with open_store(out) as st:
        assert len(st) == 60
