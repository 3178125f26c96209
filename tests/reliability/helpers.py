"""What the reliability tests share: real `python -m featx` subprocesses (with their peak memory), kills, fast
generation of many tiny images, and checks for one-line errors and leftover files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The cheapest real extraction: a seeded random resnet18 on 32 px crops, decoding in the main process.
FAST = ("-b", "resnet18", "-w", "none", "--image-size", "32", "--workers", "0", "-q")


@dataclass
class Result:
    """A finished featx subprocess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # VmHWM (peak resident memory) last seen in /proc; ru_maxrss where there is no /proc
    seconds: float
    vm_peak_mb: float = 0.0  # VmPeak (peak address space) last seen in /proc; 0 where there is no /proc

    def __repr__(self) -> str:
        return (f"Result(featx {' '.join(self.args[:3])} ... -> {self.returncode}, {self.seconds:.1f} s, "
                f"{self.peak_rss_mb:.0f} MB)\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}")


class Child:
    """A running `python -m featx ...` whose pipes are drained in threads and whose peak memory is watched.

    Peak RSS: ru_maxrss (from getrusage(RUSAGE_CHILDREN), or os.wait4 for one child) is no good here, because
    Linux starts a child's maxrss at the RSS of the process that forked it, so every child of a big pytest
    process would look big. The kernel's own high-water marks of the child's address space after exec, VmHWM
    (RSS) and VmPeak (virtual), are read from /proc/<pid>/status every few milliseconds instead: they only
    grow, so the last reading (the process spends its last ~0.2 s tearing down torch) is the peak.
    """

    def __init__(self, *args, preexec_fn=None, env=None, cwd=None):
        self.args = [str(a) for a in args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featx", *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, preexec_fn=preexec_fn, env=env, cwd=cwd,
        )
        self.pid = self.proc.pid
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._readers = [
            threading.Thread(target=lambda: self._out.append(self.proc.stdout.read()), daemon=True),
            threading.Thread(target=lambda: self._err.append(self.proc.stderr.read()), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._status: tuple[int, float] | None = None
        self.vm_peak_mb = self.hwm_mb = 0.0

    def _sample_memory(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmPeak:"):
                        self.vm_peak_mb = max(self.vm_peak_mb, int(line.split()[1]) / 1024)
                    elif line.startswith("VmHWM:"):
                        self.hwm_mb = max(self.hwm_mb, int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            pass

    def poll(self) -> int | None:
        """The exit code once the process has ended (reaping it), else None."""
        if self._status is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self._status = (os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024)
            self.proc.returncode = self._status[0]
        return self._status[0]

    def wait(self, timeout: float = 300) -> Result:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"featx {' '.join(self.args)} did not finish in {timeout} s")
            self._sample_memory()
            time.sleep(0.005)
        for reader in self._readers:
            reader.join(timeout=30)
        code, maxrss = self._status
        return Result(self.args, code, b"".join(self._out).decode(errors="replace"),
                      b"".join(self._err).decode(errors="replace"), self.hwm_mb or maxrss,
                      time.monotonic() - self.started, self.vm_peak_mb)

    def kill(self) -> bool:
        """SIGKILL the process; True when it was still running (a real kill, not a no-op)."""
        alive = self.poll() is None
        if alive:
            os.kill(self.pid, signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.002)
        return alive


def featx(*args, timeout: float = 300, **kwargs) -> Result:
    """Run `python -m featx ARGS` to completion."""
    return Child(*args, **kwargs).wait(timeout)


def assert_one_line_error(result: Result, *needles: str) -> str:
    """The command failed with exit code 2 and exactly one line on stderr, `featx: error: ...`, no traceback."""
    err = result.stderr.strip()
    assert result.returncode == 2, result
    assert err.startswith("featx: error: ") and "\n" not in err, result
    assert "Traceback" not in result.stderr and "HDF5-DIAG" not in result.stderr, result
    for needle in needles:
        assert needle in err, result
    return err


def files_under(root: Path) -> list[str]:
    """Every file and folder under `root`, relative and '/'-separated, sorted (symlinks not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def write_pngs(root: Path, count: int, size: int = 8, classes: int = 2, seed: int = 0, start: int = 0) -> list[Path]:
    """`count` tiny RGB PNGs with different bytes, spread over `classes` class folders: root/c<k>/<i>.png.

    Class k is a colour plus noise, so even a random backbone separates the classes a little."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        k = i % classes
        base = np.array([(60 + 150 * k) % 256, (200 - 90 * k) % 256, (40 + 70 * k) % 256], dtype=np.float64)
        arr = np.clip(base + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
        path = root / f"c{k}" / f"{i:06d}.png"
        Image.fromarray(arr, "RGB").save(path, compress_level=1)
        paths.append(path)
    return paths


def listing(folder: Path) -> list[str]:
    """The sorted names in `folder`, where a store that grew by appending (featx/rowfiles.py) counts as its file
    alone: its row folder `<store>.rows` must hold exactly the row files the store maps, nothing stale."""
    import h5py

    names = sorted(os.listdir(folder))
    for name in [n for n in names if n.endswith(".rows")]:
        with h5py.File(Path(folder) / name[: -len(".rows")], "r", locking=False) as h5:
            mapped = {Path(source.file_name).name for ds in h5["features"].values() if ds.is_virtual
                      for source in ds.virtual_sources()}
        assert set(os.listdir(Path(folder) / name)) == mapped, (name, mapped)
        names.remove(name)
    return names
