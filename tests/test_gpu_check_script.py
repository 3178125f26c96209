"""benchmarks/gpu_check.sh --dry-run: every step's command line parses, here, without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests marked cuda", "resnet50 end to end", "seed time-to-accuracy", "torch solver, 100,000 x 2048")


def dry_run(*args: str, results: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    if results is not None:
        env["RESULTS"] = str(results)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_parses_every_step(tmp_path):
    done = dry_run(results=tmp_path / "results.txt")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in STEPS:
        assert f"== {name}" in done.stdout
    assert "dry run done" in done.stdout
    assert not (tmp_path / "results.txt").exists()  # nothing measured, nothing written


@pytest.mark.slow
def test_dry_run_fails_on_a_command_that_does_not_parse():
    done = dry_run("--no-such-option")  # passed on to benchmarks/gpu_check.py
    assert done.returncode == 1
    assert "the resnet50 end to end, cpu and gpu decoding step's command does not parse" in done.stderr
