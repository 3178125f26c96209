"""A store that grows by appending (featx/rowfiles.py): new rows go to a row file of their own, old rows are never
rewritten, plain h5py reads /features/<tap> as one dataset, kills lose nothing, and dead rows are compacted."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx import rowfiles, writer
from featx.errors import FeatxError
from featx.extraction import extract
from featx.store import open_store
from imagegen import make_image
from options_support import EXTRACT, cli_args

OPTIONS = dict(EXTRACT, precision="fp32", taps=["layer3", "avgpool"])
CLI = [*cli_args(OPTIONS), "-q"]


@pytest.fixture(autouse=True)
def append_always(monkeypatch):
    """Every store appends, however small (the default writes stores under 64 MiB of rows whole)."""
    monkeypatch.setattr(writer, "APPEND_FROM_BYTES", 0)
    monkeypatch.setenv("FEATX_APPEND_FROM_BYTES", "0")


def same_as_clean(store: Path, data: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean" / "c.h5"
    extract(data, clean, **OPTIONS)
    with open_store(store) as got, open_store(clean) as want:
        assert list(got.paths) == list(want.paths) and list(got.keys) == list(want.keys)
        for tap in OPTIONS["taps"]:
            np.testing.assert_allclose(got.features(tap), want.features(tap), rtol=1e-4, atol=1e-5)
    with h5py.File(store, "r") as plain, h5py.File(clean, "r") as want:  # any h5py reader: one dataset
        for tap in OPTIONS["taps"]:
            np.testing.assert_allclose(plain["features"][tap][...], want["features"][tap][...], rtol=1e-4, atol=1e-5)


def test_new_rows_go_to_a_row_file_and_old_rows_are_not_rewritten(tmp_path, image_folders):
    data = image_folders("data", per_class=4)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    first = os.stat(out)
    make_image(data / "ants" / "zz.png", 0, 500)
    make_image(data / "bees" / "aa.png", 1, 501)  # sorts first among the bees: rows are in the data's order
    result = extract(data, out, **OPTIONS)
    assert (result.n_computed, result.n_reused) == (2, 8)
    files = sorted(rowfiles.rows_folder(out).iterdir())
    assert result.store_bytes == out.stat().st_size + sum(f.stat().st_size for f in files)  # what it weighs
    assert len(files) == 2
    base = next(f for f in files if os.stat(f).st_ino == first.st_ino)  # the old store, linked, not copied
    assert os.stat(base).st_mtime_ns == first.st_mtime_ns
    with h5py.File(next(f for f in files if f != base), "r") as added:
        assert added["features/avgpool"].shape[0] == 2  # only the new rows were written
    with h5py.File(out, "r") as h5:
        assert h5["features/avgpool"].is_virtual and h5["rows/file"].shape == (10,)
    same_as_clean(out, data, tmp_path)


def test_dead_rows_are_compacted_when_worth_it(tmp_path, image_folders):
    data = image_folders("data", per_class=6)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    make_image(data / "ants" / "new.png", 0, 600)
    extract(data, out, **OPTIONS)
    sorted((data / "bees").iterdir())[0].unlink()  # one dead row of 13: kept in its row file
    extract(data, out, **OPTIONS)
    assert rowfiles.rows_folder(out).is_dir()
    for victim in sorted((data / "bees").iterdir())[:3]:  # 4 dead of 13: more than a quarter, compacted
        victim.unlink()
    result = extract(data, out, **OPTIONS)
    assert result.n_dropped == 3 and not rowfiles.rows_folder(out).exists()
    with h5py.File(out, "r") as h5:
        assert not h5["features/avgpool"].is_virtual and "rows" not in h5
    same_as_clean(out, data, tmp_path)


def test_a_missing_row_file_is_one_line(tmp_path, image_folders, featx_run):
    data = image_folders("data", per_class=2)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    make_image(data / "ants" / "zz.png", 0, 500)
    extract(data, out, **OPTIONS)
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(out, moved / "s.h5")  # moved without its row folder
    with pytest.raises(FeatxError, match=r"live in .*s\.h5\.rows, which lacks .*: copy or move a store together"):
        open_store(moved / "s.h5")
    proc = featx_run("extract", data, "-o", moved / "s.h5", *CLI, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_reader_keeps_its_row_files_until_it_closes(tmp_path, image_folders):
    data = image_folders("data", per_class=6)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    make_image(data / "ants" / "new.png", 0, 600)
    extract(data, out, **OPTIONS)
    with open_store(out) as reader:
        for victim in sorted((data / "bees").iterdir())[:4]:
            victim.unlink()
        extract(data, out, **OPTIONS)  # compacts, but the reader holds the row folder
        assert rowfiles.rows_folder(out).is_dir()
        assert np.isfinite(reader.features("avgpool")).all() and len(reader) == 13
    make_image(data / "bees" / "later.png", 1, 700)
    extract(data, out, **OPTIONS)  # the next seal removes what no store maps
    assert not rowfiles.rows_folder(out).exists() or len(list(rowfiles.rows_folder(out).iterdir())) <= 2
    same_as_clean(out, data, tmp_path)


def test_rows_added_by_another_tool_are_one_line_and_change_nothing(tmp_path, image_folders, featx_run):
    data = image_folders("data", per_class=2)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    with h5py.File(out, "r+") as h5:  # another tool appends a row to one dataset
        rows = h5["features/avgpool"][...]
        del h5["features/avgpool"]
        h5["features"].create_dataset("avgpool", data=np.vstack([rows, rows[:1]]))
    before = out.read_bytes()
    proc = featx_run("extract", data, "-o", out, *CLI, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "/features/avgpool has 5 rows" in proc.stderr
    assert out.read_bytes() == before


@pytest.mark.slow
def test_kills_while_appending_lose_nothing(tmp_path, image_folders, featx_run):
    """A `featx extract` appending to a store, SIGKILLed at random instants: the store is always the old one or
    the new one, complete, and a final run equals a clean extraction."""
    rng = random.Random(3)
    data = image_folders("data", per_class=8)
    out = tmp_path / "s.h5"
    extract(data, out, **OPTIONS)
    env = {"FEATX_APPEND_FROM_BYTES": "0"}
    lengths = {16}
    for round_ in range(6):
        for i in range(3):
            make_image(data / ("ants", "bees")[i % 2] / f"r{round_}-{i}.png", i % 2, 1000 + 10 * round_ + i)
        lengths.add(16 + 3 * (round_ + 1))
        proc = featx_run("extract", data, "-o", out, *CLI, env=env, wait=False)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.kill()
        proc.wait()
        with open_store(out) as store:  # complete and readable, whichever it is
            assert len(store) in lengths
            for tap in OPTIONS["taps"]:
                assert np.isfinite(store.features(tap)).all()
    final = featx_run("extract", data, "-o", out, *CLI, env=env, timeout=300)
    assert final.returncode == 0, final.stderr
    same_as_clean(out, data, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["clean", "data", "s.h5", "s.h5.rows"],
                                                          ["clean", "data", "s.h5"])
