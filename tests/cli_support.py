"""Running featx from tests: in the test's process through click's runner, or as a `python -m featx` process."""
from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner


def invoke(*args, env: dict | None = None):
    """`featx ARGS` in this process (click's CliRunner); arguments may be paths or numbers, `env` sets variables."""
    from featx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, prog_name="featx")


def featx(*args, wait: bool = True, env: dict | None = None, launcher: list | None = None, cwd=None,
          timeout: float = 600, stdout=subprocess.DEVNULL):
    """`python -m featx ARGS` as a process: run to completion (CompletedProcess, text output captured), or with
    wait=False started (Popen, stderr piped, stdout to `stdout`: subprocess.PIPE to read it). `env` adds variables;
    `launcher` replaces `python -m` (torchrun)."""
    cmd = [*(launcher or [sys.executable, "-m"]), "featx", *map(str, args)]
    env = {**os.environ, **(env or {})}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
