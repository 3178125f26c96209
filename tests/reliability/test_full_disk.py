"""Full disks: `featx extract` under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored so that write() fails with
EFBIG) and on a tiny filesystem that fills up mid-run (tmpfs, where the test may mount one).

Each fails with one line that says what happened and that a rerun resumes; nothing half-written is left behind
(the partial file is removed so the space comes back), the old store stays intact, and a later run with space
completes without recomputing what was committed.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featx.extraction import extract
from featx.errors import FeatxError
from featx.store import open_store
from featx.writer import StoreWriter

from .helpers import FAST, assert_one_line_error, featx as run_featx, listing, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ARGS = (*FAST, "--batch-size", "16")


def file_size_limit(limit: int):
    """preexec_fn: files of the child may not grow past `limit` bytes; write() then fails with EFBIG."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _parts(store: Path) -> list[str]:
    parts = store.with_name(store.name + ".parts")
    return sorted(os.listdir(parts)) if parts.exists() else []


def test_file_size_limit_while_sealing_keeps_old_store_and_committed_batches(tmp_path):
    data = tmp_path / "data"
    write_pngs(data, 100, size=24)
    store = tmp_path / "s.h5"
    extract(str(data), store, backbone="resnet18", weights="none", image_size=32, workers=0, batch_size=16)
    with open_store(store) as st:
        old_paths, tap = list(st.paths), st.taps[0]
        old_features = st.features(tap)
        old_size = store.stat().st_size
    write_pngs(data, 200, size=24, seed=3, start=1000)

    # segments (~40 kB) fit under the limit, the sealed store (~0.7 MB) does not
    limit = max(160_000, old_size // 2)
    full = run_featx("extract", data, "-o", store, *ARGS, preexec_fn=file_size_limit(limit))
    assert_one_line_error(full, "file size limit reached", "run the same command again to resume")
    with open_store(store) as st:  # the old store, untouched
        assert list(st.paths) == old_paths
        np.testing.assert_array_equal(st.features(tap), old_features)
    parts = _parts(store)
    assert parts and all(name.startswith("seg-") and name.endswith(".h5") for name in parts), parts  # no sealing.tmp

    # a segment that cannot be written at all: nothing committed, the same one line
    tiny = run_featx("extract", data, "-o", tmp_path / "t.h5", *ARGS, preexec_fn=file_size_limit(4096))
    assert_one_line_error(tiny, "file size limit reached")
    assert not (tmp_path / "t.h5.parts").exists()  # nothing committed: no parts folder either

    resumed = run_featx("extract", data, "-o", store, *ARGS, "--json")
    assert resumed.returncode == 0, resumed
    summary = json.loads(resumed.stdout)
    assert summary["computed"] == 0 and summary["reused"] == 300 and summary["items"] == 300
    with open_store(store) as st:
        index = {p: i for i, p in enumerate(st.paths)}
        np.testing.assert_array_equal(st.features(tap, [index[p] for p in old_paths]), old_features)
    assert listing(tmp_path) == ["data", "s.h5"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_filesystem_full_mid_run_then_resume_with_space(tmp_path):
    small = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(small, "300k"):
        pytest.skip("needs to mount a tmpfs (root)")
    try:
        data = tmp_path / "data"
        write_pngs(data, 300, size=24)
        store = small / "s.h5"
        full = run_featx("extract", data, "-o", store, *ARGS)
        assert_one_line_error(full, "no space left on the device", "run the same command again to resume")
        committed = _parts(store)
        assert committed and all(name.startswith("seg-") and name.endswith(".h5") for name in committed), committed
        assert not store.exists()

        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True, timeout=30)
        resumed = run_featx("extract", data, "-o", store, *ARGS, "--json")
        assert resumed.returncode == 0, resumed
        summary = json.loads(resumed.stdout)
        assert summary["reused"] >= 16 * len(committed) and summary["reused"] + summary["computed"] == 300
        with open_store(store) as st:
            assert len(st) == 300 and len(set(st.keys)) == 300
        assert os.listdir(small) == ["s.h5"]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)


def test_lock_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", no_space)
    with pytest.raises(FeatxError, match=r"cannot create the lock folder .*s\.h5\.parts \(No space left on device\)"):
        with StoreWriter(tmp_path / "s.h5", {}, "key"):
            pass
