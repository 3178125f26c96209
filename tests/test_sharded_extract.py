"""Sharded extraction: --num-shards in one process after another, torchrun ranks, a killed rank resumed. Every
split run must equal a one-process run: same keys and paths in the same order, each image once, rows allclose."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.extraction import extract
from featx.store import open_store
from cli_support import featx
from options_support import EXTRACT as FAST, EXTRACT_ARGS

CLI = [*EXTRACT_ARGS, "-q"]


@pytest.fixture
def folder(image_folders):
    root = image_folders("data", per_class=6, splits={"train": 6, "val": 2})
    shutil.copy(root / "train/ants/ants_000.png", root / "train/bees/copy_of_ant.png")  # one content, two files
    (root / "val/bees/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


def assert_same_store(expected: Path, actual: Path, tap: str = "flatten") -> None:
    with open_store(expected) as a, open_store(actual) as b:
        assert list(a.keys) == list(b.keys) and list(a.paths) == list(b.paths)
        assert list(a.labels) == list(b.labels) and list(a.splits) == list(b.splits)
        assert sorted(a.failed) == sorted(b.failed)
        np.testing.assert_allclose(a.features(tap), b.features(tap), rtol=1e-5, atol=1e-6)


def test_shards_one_after_another_equal_one_process(folder, tmp_path):
    extract(folder, tmp_path / "one.h5", **FAST)
    out = tmp_path / "split.h5"
    first = extract(folder, out, num_shards=2, shard_index=1, **FAST)
    assert not first.sealed and not out.exists() and "sealed once shard 0 is done" in first.summary()
    assert (tmp_path / "split.h5.parts/done-1-of-2.json").exists()
    last = extract(folder, out, num_shards=2, shard_index=0, **FAST)
    assert last.sealed and last.n_items == 17 and last.n_failed == 1
    assert first.n_computed + last.n_computed == 16  # 17 decodable files, one content twice: each computed once
    assert min(first.n_computed, last.n_computed) > 0
    assert_same_store(tmp_path / "one.h5", out)
    assert not (tmp_path / "split.h5.parts").exists()
    again = extract(folder, out, **FAST)
    assert not again.sealed and again.n_computed == 0
    assert extract(folder, out, num_shards=2, shard_index=0, **FAST).n_computed == 0
    again = extract(folder, out, num_shards=2, shard_index=1, **FAST)
    assert not again.sealed and "already up to date" in again.summary()
    assert not (tmp_path / "split.h5.parts").exists()  # nothing to add: the shards leave nothing behind


def test_one_process_run_finishes_an_unfinished_split(folder, tmp_path):
    extract(folder, tmp_path / "one.h5", **FAST)
    out = tmp_path / "split.h5"
    part = extract(folder, out, num_shards=3, shard_index=2, **FAST)
    rest = extract(folder, out, **FAST)
    assert rest.sealed and rest.n_reused == part.n_computed and rest.n_computed == 16 - part.n_computed
    assert_same_store(tmp_path / "one.h5", out)


def test_shard_markers_of_other_data_do_not_count(folder, tmp_path):
    out = tmp_path / "split.h5"
    extract(folder, out, num_shards=2, shard_index=0, **FAST)
    (folder / "val/ants/ants_000.png").unlink()  # the data changed before the other shard ran
    res = extract(folder, out, num_shards=2, shard_index=1, **FAST)
    assert not res.sealed and "sealed once shard 0 is done" in res.summary()
    assert extract(folder, out, num_shards=2, shard_index=0, **FAST).sealed


def test_rows_of_a_finished_shard_that_are_not_there_are_refused(folder, tmp_path):
    out = tmp_path / "split.h5"
    extract(folder, out, num_shards=2, shard_index=0, **FAST)
    shutil.rmtree(tmp_path / "split.h5.parts/shard-0-of-2")  # as if shard 0 wrote to a folder not shared with us
    with pytest.raises(FeatxError, match=r"the rows that shards 0 reported done are not there") as err:
        extract(folder, out, num_shards=2, shard_index=1, **FAST)
    assert "\n" not in str(err.value) and not out.exists()
    assert list((tmp_path / "split.h5.parts/shard-1-of-2").glob("seg-*.h5"))  # no committed segment lost


def test_overwrite_is_refused_for_shards(folder, tmp_path):
    with pytest.raises(FeatxError, match="overwrite: not with several shards"):
        extract(folder, tmp_path / "s.h5", overwrite=True, num_shards=2, shard_index=0, **FAST)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(folder, tmp_path):
    assert featx("extract", folder, "-o", tmp_path / "one.h5", *CLI).returncode == 0
    res = featx("extract", folder, "-o", tmp_path / "tr.h5", *CLI, launcher=TORCHRUN)
    assert res.returncode == 0, res.stderr
    assert "rank 0/2" in res.stdout or "rank 1/2" in res.stdout
    assert_same_store(tmp_path / "one.h5", tmp_path / "tr.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one.h5", "tr.h5"]


@pytest.mark.slow
def test_independent_shard_processes_and_a_final_seal_equal_one_process(folder, tmp_path):
    assert featx("extract", folder, "-o", tmp_path / "one.h5", *CLI).returncode == 0
    out = tmp_path / "split.h5"
    procs = [featx("extract", folder, "-o", out, *CLI, "--num-shards", 2, "--shard-index", i, wait=False)
             for i in range(2)]  # at the same time, as a Slurm array would run them
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert_same_store(tmp_path / "one.h5", out)
    final = featx("extract", folder, "-o", out, *CLI)  # the final seal finds nothing left to do
    assert final.returncode == 0 and "already up to date" in final.stdout


def _rank_pid(segments: Path, proc, timeout=120.0) -> int:
    """The pid of the rank that commits into `segments` (segment names carry it), once it has committed twice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(segments.glob("seg-*.h5")) if segments.exists() else []
        if len(found) >= 2:
            return int(found[0].name.split("-")[2])
        time.sleep(0.05)
    raise AssertionError(f"no 2 segments in {segments} (torchrun exit {proc.poll()})")


@pytest.mark.slow
def test_killed_rank_then_rerun_completes(tmp_path, image_folders):
    data = image_folders("data", classes=("a", "b"), per_class=20, size=(80, 60))
    args = ["extract", data, "-o", tmp_path / "tr.h5", *CLI, "--image-size", "64", "--batch-size", "2"]
    assert featx(*args[:3], tmp_path / "one.h5", *args[4:]).returncode == 0
    run = featx(*args, launcher=TORCHRUN, wait=False)
    os.kill(_rank_pid(tmp_path / "tr.h5.parts/shard-1-of-2", run), signal.SIGKILL)
    assert run.wait(timeout=300) != 0  # torchrun stops the other rank too
    assert not (tmp_path / "tr.h5").exists()
    rerun = featx(*args, launcher=TORCHRUN)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(tmp_path / "one.h5", tmp_path / "tr.h5")
