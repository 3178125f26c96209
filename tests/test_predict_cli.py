"""predict and evaluate as a user meets them: outputs checked before any work, image files as DATA (one or several,
beside folders), a read-only head folder, and evaluate scoring the val split by default and saying which rows."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

import featx
from featx.errors import FeatxError
from featx.sources import load_source
from heads_support import blob_store, every_fifth_val, write_rows
from imagegen import make_image, make_image_folder
from readonly import read_only
from cli_support import featx as featx_cli, invoke as run
from options_support import HEAD_EXTRACT as EXTRACT


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(root, data folder with train/val, head folder): resnet18 -w none at 32 px."""
    root = tmp_path_factory.mktemp("fitted")
    data = make_image_folder(root / "data", per_class=4, splits={"train": 4, "val": 2}, ext="jpg")
    featx.extract(data, root / "s.h5", **EXTRACT)
    featx.fit_head(root / "s.h5", "avgpool", root / "head", grid=1.0, plots=False, n_jobs=1)
    return root, data, root / "head"


# --------------------------------------------------------------------------------------------------------------------
# image files as DATA


def test_image_files_are_sources_alone_or_together(tmp_path, monkeypatch, image_folders):
    one = make_image(tmp_path / "few" / "a.JPG", 0, 1, fmt="JPEG")
    two = make_image(tmp_path / "b.png", 1, 2)
    folder = image_folders("data", per_class=2)
    single = load_source(one)
    assert (single.task, single.root, [i.relpath for i in single.items]) == ("unlabelled", str(one.parent), ["a.JPG"])
    monkeypatch.chdir(tmp_path)
    mixed = load_source(["few/a.JPG", two, folder, "few/a.JPG"])  # a file given twice is one item
    assert mixed.task == "classification" and mixed.classes == ["ants", "bees"] and mixed.root == str(tmp_path)
    assert sorted(i.relpath for i in mixed.items if i.label < 0) == ["b.png", "few/a.JPG"]
    assert sorted(i.relpath for i in mixed.items if i.label >= 0)[0] == "data/ants/ants_000.png"
    labelled = [i for i in mixed.items if i.label >= 0]
    assert [mixed.classes[i.label] for i in labelled] == [i.relpath.split("/")[1] for i in labelled]
    (tmp_path / "r.csv").write_text("b.png,0.5\n")
    with pytest.raises(FeatxError, match=r"classification and regression data cannot be given together"):
        load_source([folder, tmp_path / "r.csv"])
    with pytest.raises(FeatxError, match=r"^no data given"):
        load_source([])


def test_predict_takes_image_files_and_folders(fitted, monkeypatch):
    root, data, head = fitted
    images = sorted((data / "val").rglob("*.jpg"))
    whole = featx.predict(head, data / "val", workers=0)
    by_name = dict(zip(whole.names, whole.predicted))
    one = run("predict", head, images[0], "-q")
    assert one.exit_code == 0, one.output
    rows = list(csv.DictReader(io.StringIO(one.stdout)))
    assert [(r["path"], r["predicted"]) for r in rows] == [(images[0].name, by_name[f"ants/{images[0].name}"])]
    monkeypatch.chdir(data)
    several = run("predict", head, images[0], "val/bees", images[-1], "-q")
    assert several.exit_code == 0, several.output
    names = [r["path"] for r in csv.DictReader(io.StringIO(several.stdout))]
    assert sorted(names) == ["val/ants/ants_000.jpg", "val/bees/bees_000.jpg", "val/bees/bees_001.jpg"]
    mixed = run("predict", head, images[0], root / "s.h5")
    assert mixed.exit_code == 2 and "s.h5: a feature file is read alone" in mixed.output, mixed.output


# --------------------------------------------------------------------------------------------------------------------
# read-only places


def fresh_head(fitted, folder):
    """A copy of the fitted head without its cache."""
    return shutil.copytree(fitted[2], folder, ignore=shutil.ignore_patterns("cache"))


def test_predict_checks_the_output_before_computing(fitted, tmp_path):
    root, data, _ = fitted
    head = fresh_head(fitted, tmp_path / "head")
    (tmp_path / "ro").mkdir()
    (tmp_path / "p.csv").write_text("")
    with read_only(tmp_path / "ro"):
        out = run("predict", head, data / "val", "-o", tmp_path / "ro" / "p.csv", "-q")
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert f"-o {tmp_path}/ro/p.csv: cannot write in {tmp_path}/ro (read-only)" in out.output
    assert not (head / "cache").exists()  # nothing was computed
    with read_only(tmp_path / "p.csv"):
        out = run("predict", head, data / "val", "-o", tmp_path / "p.csv", "-q")
    assert out.exit_code == 2 and "the file is read-only" in out.output, out.output


def test_a_read_only_head_predicts_uncached_with_a_warning(fitted, tmp_path):
    root, data, _ = fitted
    head = fresh_head(fitted, tmp_path / "head")
    expected = featx.predict(head, data / "val", store=tmp_path / "s.h5", workers=0)
    with read_only(head):
        out = run("predict", head, data / "val", "--workers", "0", "-q")
        assert out.exit_code == 0, out.output
        stored = run("predict", head, data / "val", "--store", tmp_path / "kept.h5", "--workers", "0", "-q")
    assert out.stderr.splitlines()[0] == f"featx: warning: {head} is read-only: the images' features are not cached " \
                                         f"(pass --store FILE.h5 to keep them)"
    rows = [line.split(",")[:2] for line in out.stdout.splitlines()[1:]]
    assert rows == [[str(n), p] for n, p in zip(expected.names, expected.predicted)]
    assert not (head / "cache").exists()
    assert stored.exit_code == 0 and "read-only" not in stored.output and (tmp_path / "kept.h5").is_file()


@pytest.mark.slow
def test_read_only_places_in_a_real_process(fitted, tmp_path):
    """The user's journey: no traceback, exit 2 before any work for an unwritable -o; exit 0 and one warning line for
    a read-only head."""
    root, data, _ = fitted
    head = fresh_head(fitted, tmp_path / "head")
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        refused = featx_cli("predict", head, data, "-o", tmp_path / "ro" / "pred.csv", "-q")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("featx: error: -o ") and refused.stderr.count("\n") == 1, refused.stderr
    assert not (head / "cache").exists() and not (tmp_path / "ro" / "pred.csv").exists()
    with read_only(head):
        done = featx_cli("predict", head, data / "val" / "ants" / "ants_000.jpg", "--workers", "0", "-q")
    assert done.returncode == 0 and done.stderr.count("\n") == 1 and "read-only" in done.stderr, done.stderr
    assert done.stdout.splitlines()[1].startswith("ants_000.jpg,")


# --------------------------------------------------------------------------------------------------------------------
# evaluate: which rows


def test_evaluate_scores_the_val_split_by_default_and_says_so(tmp_path):
    X, y = blob_store(tmp_path / "s.h5")
    head = featx.fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False, n_jobs=1)
    default = featx.evaluate(head, tmp_path / "s.h5")
    assert (default["split"], default["rows"]) == ("val", {"eval": 18})
    assert default["accuracy"] == head.metrics["accuracy"]
    assert default["evaluated_on"] == "split 'val' (by default; split 'all' scores every labelled row)"
    every = featx.evaluate(head, tmp_path / "s.h5", split="all")
    assert (every["split"], every["rows"], every["evaluated_on"]) == ("all", {"eval": 90}, "all labelled rows")
    with pytest.raises(FeatxError, match=r"split='test': no labelled rows .*its splits: train, val; split='all'"):
        featx.evaluate(head, tmp_path / "s.h5", split="test")

    write_rows(tmp_path / "t.h5", X, y, splits=np.where(every_fifth_val(90) == "val", "test", "train"))
    assert featx.evaluate(head, tmp_path / "t.h5")["split"] == "test"
    fitted_here = featx.fit_head(tmp_path / "t.h5", "avgpool", grid=1.0, plots=False, n_jobs=1)
    write_rows(tmp_path / "u.h5", X, y)
    plain = featx.fit_head(tmp_path / "u.h5", "avgpool", tmp_path / "plain", grid=1.0, plots=False, n_jobs=1)
    unsplit = featx.evaluate(plain, tmp_path / "u.h5")
    assert (unsplit["split"], unsplit["rows"]["eval"]) == ("all", 90)
    assert unsplit["evaluated_on"] == "all labelled rows (no val or test split), the rows the head was fitted on among them"
    assert "fitted on" not in featx.evaluate(fitted_here, tmp_path / "u.h5")["evaluated_on"]

    text = run("evaluate", tmp_path / "head", tmp_path / "s.h5")
    assert text.exit_code == 0 and text.output.splitlines()[0] == \
        "evaluated  on split 'val' (by default; split 'all' scores every labelled row), 18 rows"
    as_json = json.loads(run("evaluate", tmp_path / "head", tmp_path / "s.h5", "--json").output)
    assert (as_json["split"], as_json["rows"]["eval"]) == ("val", 18)


def test_evaluate_on_labelled_images_through_the_head_cache(fitted):
    root, data, head = fitted
    on_store = featx.evaluate(head, root / "s.h5", split="val")
    on_images = featx.evaluate(head, data, workers=0)
    assert (on_images["split"], on_images["rows"]) == ("val", {"eval": 4})
    assert on_images["confusion_matrix"] == on_store["confusion_matrix"]
    assert featx.evaluate(head, data, split="train", workers=0)["rows"] == {"eval": 8}
    with pytest.raises(FeatxError, match=r"has no labels: evaluate needs labelled images"):
        featx.evaluate(head, data / "val" / "ants" / "ants_000.jpg", workers=0)
    out = run("evaluate", head, data, "-q", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["rows"] == {"eval": 4}, out.output
