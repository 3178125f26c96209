"""`featx fit-head`, `featx predict`, `featx evaluate` through the command line, and predict on images: the head's
extractor is rebuilt from its config and gives the same predictions as the store rows."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from featx import fit_head
from featx.errors import FeatxError
from featx.heads import predict
from cli_support import invoke as run
from heads_support import blob_store, write_rows


def test_fit_predict_evaluate_commands(tmp_path):
    X, _ = blob_store(tmp_path / "s.h5")
    fit = run("fit-head", tmp_path / "s.h5", "-l", "avgpool", "-o", tmp_path / "head", "--grid", "0.01:100", "--no-plots")
    assert fit.exit_code == 0, fit.output
    assert "5-fold CV accuracy" in fit.output and "accuracy   1.0000" in fit.output and "head written to" in fit.output

    out = run("predict", tmp_path / "head", tmp_path / "s.h5", "-o", tmp_path / "p.csv")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert list(rows[0]) == ["path", "predicted", "p_ants", "p_bees", "p_wasps"] and len(rows) == 90
    assert rows[0]["path"] == "img/0000.png" and rows[0]["predicted"] == "ants"

    top = run("predict", tmp_path / "head", tmp_path / "s.h5", "--json", "--top-k", "2")
    records = json.loads(top.output)
    assert records[-1]["predicted"] == "wasps" and [c["class"] for c in records[-1]["top_k"]][0] == "wasps"
    assert len(records[-1]["top_k"]) == 2 and 0.5 < records[-1]["top_k"][0]["probability"] <= 1

    ev = run("evaluate", tmp_path / "head", tmp_path / "s.h5", "--split", "val", "--json")
    assert ev.exit_code == 0 and json.loads(ev.output)["rows"] == {"eval": 18}


@pytest.mark.parametrize("args,message", [
    (["fit-head", "{d}/u.h5", "-l", "avgpool", "-o", "{d}/h"], "has no labels: fitting a head needs labelled rows"),
    (["predict", "{d}/head/model.joblib", "{d}/s.h5"], "model.joblib is a pickle: loading it can run arbitrary code"),
    (["evaluate", "{d}/nohead", "{d}/s.h5"], "not a featx head folder"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    X, _ = blob_store(tmp_path / "s.h5")
    write_rows(tmp_path / "u.h5", X)
    (tmp_path / "nohead").mkdir()
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, joblib=True, plots=False)
    result = run(*[a.format(d=tmp_path) for a in args])
    assert result.exit_code == 2 and message in result.output
    assert result.output.startswith("featx: error: ") and result.output.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["fit-head", "{d}", "-o", "{d}/h"], "STORE {d}: is a folder, expected a featx store (.h5) or an HDF5/NPZ"),
    (["fit-head", "{d}/nope.h5", "-o", "{d}/h"], "STORE {d}/nope.h5: no such file, expected a featx store"),
    (["evaluate", "{d}/head", "{d}/nope.h5"], "DATA {d}/nope.h5: no such file, expected a featx store"),
    (["predict", "{d}/head", "{d}/s.h5", "-o", "{d}"], "-o {d}: is a folder, expected a CSV or JSON file to write"),
    (["predict", "{d}/head", "{d}/s.h5", "-o", "{d}/no/p.csv"], "-o {d}/no/p.csv: {d}/no does not exist, expected"),
    (["predict", "{d}/head", "{d}/s.h5", "-o", "{d}/s.h5/p.csv"], "{d}/s.h5 is not a folder, expected a CSV"),
    (["predict", "{d}/head", "{d}/s.h5", "--store", "{d}"], "--store {d}: is a folder, expected the .h5 store"),
])
def test_wrong_kind_of_path_is_one_line_naming_the_option(tmp_path, args, message):
    """Not click's three-line usage error: one line, exit 2, like every other featx error."""
    blob_store(tmp_path / "s.h5")
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False)
    result = run(*[a.format(d=tmp_path) for a in args])
    assert result.exit_code == 2 and result.output.startswith("featx: error: "), result.output
    assert message.format(d=tmp_path) in result.output and result.output.count("\n") == 1, result.output


def test_predict_on_images_equals_predict_on_the_store(tmp_path, image_folders):
    from featx.extraction import extract

    data = image_folders("data", classes=("ants", "bees", "wasps"), per_class=5)
    extract(data, tmp_path / "s.h5", backbone="resnet18", weights="none", taps=["layer3", "avgpool"],
            image_size=32, batch_size=8, workers=0)
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, val_split=0, plots=False)
    on_images = predict(tmp_path / "head", data, workers=0)
    on_store = predict(head, tmp_path / "s.h5")
    assert list(on_images.names) == list(on_store.names) and len(on_images) == 15
    np.testing.assert_array_equal(on_images.predicted, on_store.predicted)
    np.testing.assert_allclose(on_images.scores, on_store.scores, rtol=1e-5, atol=1e-6)
    assert list((tmp_path / "head" / "cache").glob("*.h5"))

    out = run("predict", tmp_path / "head", data, "--workers", "0", "-q")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[1].split(",")[:2] == [on_store.names[0], on_store.predicted[0]]


def test_predict_on_images_refuses_other_weights(tmp_path, image_folders):
    blob_store(tmp_path / "s.h5")  # its config claims weights sha256 'aaaa...' for resnet18 / none
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False)
    data = image_folders("data", per_class=2)
    with pytest.raises(FeatxError, match=r"weights none have sha256 .*, but the head was trained on features of "
                                         r"weights with sha256 aaaaaaaaaaaaaaaa"):
        predict(tmp_path / "head", data, workers=0)


def test_predict_refuses_a_changed_weights_file_before_extracting(tmp_path, image_folders):
    import torch
    import torchvision

    from featx.extraction import extract

    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    data = image_folders("data", per_class=3)
    extract(data, tmp_path / "s.h5", backbone="resnet18", weights=str(weights), taps=["avgpool"], image_size=32,
            workers=0)
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, val_split=0, plots=False)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    with pytest.raises(FeatxError, match=r"weights file .*w.pth has changed since the features were computed: pass weights="):
        predict(tmp_path / "head", data, workers=0)
    assert not (tmp_path / "head" / "cache").exists()


@pytest.fixture
def trained(tmp_path, image_folders):
    """A labelled folder, its store and a head fitted on it (resnet18 -w none at 32 px)."""
    from featx.extraction import extract

    data = image_folders("data", per_class=4, splits={"train": 3, "val": 2})
    extract(data, tmp_path / "train.h5", backbone="resnet18", weights="none", image_size=32, workers=0)
    fit_head(tmp_path / "train.h5", None, tmp_path / "head", grid=1.0, val_split=0, plots=False)
    return data, tmp_path / "train.h5", tmp_path / "head"


def test_predict_into_a_training_store_only_adds_rows(trained, tmp_path, image_folders):
    from featx.store import open_store

    data, store, head = trained
    few = image_folders("few", classes=("ants",), per_class=3, seed=9)
    result = run("predict", head, few, "--store", store, "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    assert [line.split(",")[0] for line in result.stdout.splitlines()[1:]] == ["ants/ants_000.png", "ants/ants_001.png",
                                                                               "ants/ants_002.png"]
    assert f"cache: 3 images in {store} " in result.stderr and "3 computed, 0 reused, 0 dropped" in result.stderr
    assert f"it also keeps 10 rows of {data.resolve()}" in result.stderr
    with open_store(store) as st:
        assert st.root_counts() == {str(data.resolve()): 10, str(few.resolve()): 3}
        assert (st.labels >= 0).sum() == 13 and list(st.splits).count("train") == 6


def test_the_heads_cache_keeps_every_folder_predicted(trained, tmp_path, image_folders):
    data, _, head = trained
    few = image_folders("few", classes=("ants",), per_class=2, seed=3)
    other = image_folders("other", classes=("bees",), per_class=2, seed=4)
    lines = []
    for folder in (few, other, few, other):
        predicted = predict(head, folder, workers=0, log=lines.append)
        assert len(predicted) == 2
    cache = [line for line in lines if line.startswith("cache: ")]
    assert "2 computed" in cache[0] and "2 computed" in cache[1]
    assert "(already up to date): 0 computed, 2 reused, 0 dropped" in cache[2] and "it also keeps 2 rows of" in cache[2]
    assert "(already up to date)" in cache[3]


def test_the_heads_cache_is_bounded_oldest_folders_first(trained, tmp_path, monkeypatch, image_folders):
    from featx.heads import prediction
    from featx.store import open_store

    data, _, head = trained
    monkeypatch.setattr(prediction, "HEAD_CACHE_BYTES", 5 * 512 * 4)  # five rows of 512 float32
    folders = [image_folders(f"f{i}", classes=("ants",), per_class=2, seed=10 + i) for i in range(3)]
    for folder in folders:
        predict(head, folder, workers=0)
    cache = next((head / "cache").glob("*.h5"))
    with open_store(cache) as st:  # f0's first row went to make room; f2's rows, the call's own, all stay
        assert st.root_counts() == {str(folders[0].resolve()): 1, str(folders[1].resolve()): 2,
                                    str(folders[2].resolve()): 2}
    big = image_folders("big", classes=("ants",), per_class=7, seed=20)
    assert len(predict(head, big, workers=0)) == 7  # more than the bound alone: the call's rows all stay
    with open_store(cache) as st:
        assert st.root_counts() == {str(big.resolve()): 7}
