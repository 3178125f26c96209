"""Heads on stored rows: every head type learns separable data and not random labels, C is chosen sensibly,
the pickle-free folder predicts exactly like the in-memory pipeline, and SGD streaming matches in-memory SGD."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featx import evaluate, fit_head, load_head
from featx.errors import FeatxError
from featx.heads import HEAD_TYPES
from featx.heads.data import Rows
from heads_support import blob_store, blobs, every_fifth_val, write_rows

# Small settings per head so that the whole file runs in seconds.
FAST = {
    "logistic": {"grid": "1e-3:1e2"},
    "ridge": {"grid": "1e-3:1e2"},
    "linear-svm": {"grid": "1e-3:1e2"},
    "sgd": {"grid": "1e-2:1e2", "epochs": 3},
    "mlp": {"grid": 1.0, "hidden": 64},
    "knn": {},
}


@pytest.mark.parametrize("kind", list(HEAD_TYPES))
def test_separable_blobs_reach_near_perfect_accuracy(tmp_path, kind):
    blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", head=kind, **FAST[kind])
    assert head.kind == kind and list(head.classes_) == ["ants", "bees", "wasps"]
    assert head.metrics["evaluated_on"] == "split 'val'" and head.metrics["rows"] == {"train": 72, "eval": 18}
    assert head.metrics["accuracy"] >= 0.95 and head.metrics["macro_f1"] >= 0.95


@pytest.mark.parametrize("kind", list(HEAD_TYPES))
def test_random_labels_stay_near_chance(tmp_path, kind):
    rng = np.random.default_rng(1)
    n = 150
    write_rows(tmp_path / "r.h5", rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 2, n),
               splits=every_fifth_val(n), classes=["a", "b"])
    head = fit_head(tmp_path / "r.h5", "avgpool", head=kind, **FAST[kind])
    assert head.metrics["accuracy"] < 0.75


@pytest.mark.parametrize("kind,normalize", [(k, "standard") for k in HEAD_TYPES] + [("logistic", "l2"), ("ridge", "none")])
def test_pickle_free_folder_predicts_like_the_pipeline(tmp_path, kind, normalize):
    X, _ = blob_store(tmp_path / "s.h5", k=3 if kind != "sgd" else 2)
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", head=kind, normalize=normalize, joblib=True,
                    plots=False, **FAST[kind])
    loaded = load_head(tmp_path / "head")
    probe = np.concatenate([X, np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32) * 5])
    np.testing.assert_array_equal(loaded.predict(probe), head.predict(probe))
    np.testing.assert_allclose(loaded.decision_function(probe), head.decision_function(probe), rtol=1e-12, atol=1e-12)
    if head.has_proba:
        np.testing.assert_allclose(loaded.predict_proba(probe), head.estimator.predict_proba(probe), rtol=1e-12, atol=1e-12)
    trusted = load_head(tmp_path / "head" / "model.joblib", trust=True)
    np.testing.assert_array_equal(trusted.predict(probe), head.predict(probe))
    assert loaded.config["backbone"] == "resnet18" and loaded.tap == "avgpool" and loaded.C == head.C
    assert json.loads((tmp_path / "head" / "metrics.json").read_text())["accuracy"] == head.metrics["accuracy"]


def test_head_folder_loads_without_pickles(tmp_path):
    blob_store(tmp_path / "s.h5")
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid="0.1:10")
    names = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert names == ["confusion_matrix.png", "cv_curve.png", "head.json", "metrics.json", "weights.npz"]
    with np.load(tmp_path / "head" / "weights.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["coef", "intercept", "mean", "scale"]
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["config"]["weights_sha256"] == "a" * 64 and meta["tap"] == "avgpool" and meta["link"] == "softmax"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cv_picks_c_near_the_bayes_optimal_ridge_penalty(tmp_path, seed):
    # y = Xw + noise with w ~ N(0, 0.1²), noise ~ N(0, 1): the best ridge alpha is 1 / 0.1² = 100, i.e. C = 0.005.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, 50))
    targets = X @ (rng.normal(size=50) * 0.1) + rng.normal(size=200)
    write_rows(tmp_path / "r.h5", X.astype(np.float32), targets=targets, splits=["train"] * 200)
    head = fit_head(tmp_path / "r.h5", "avgpool", val_split=0)
    cv = head.metrics["cv"]
    assert head.kind == "ridge" and 5e-4 <= head.C <= 5e-2
    assert head.C == cv["best"] and cv["mean"][cv["grid"].index(cv["best"])] == max(cv["mean"])
    assert len(cv["grid"]) > 12  # refined around the best decade


def test_cv_curve_matches_sklearn_cross_validation(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(120, 6, 3, sep=0.8, seed=3)
    write_rows(tmp_path / "s.h5", X, y, splits=["train"] * 120)
    head = fit_head(tmp_path / "s.h5", "avgpool", grid="0.01,1,100", val_split=0, seed=0)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    Xs = StandardScaler().fit_transform(X)
    for C, mean in zip(head.metrics["cv"]["grid"], head.metrics["cv"]["mean"]):
        expected = cross_val_score(LogisticRegression(C=C, max_iter=1000), Xs, y, cv=folds).mean()
        assert mean == pytest.approx(expected, abs=0.02)


def test_single_grid_value_skips_cross_validation(tmp_path):
    blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", grid="0.5")
    assert head.C == 0.5 and head.metrics["cv"] is None


def test_sgd_streaming_matches_in_memory(tmp_path, monkeypatch):
    X, y = blobs(400, 8, 2, sep=1.0, seed=4)
    write_rows(tmp_path / "s.h5", X, y, splits=every_fifth_val(400), classes=["a", "b"])
    whole = fit_head(tmp_path / "s.h5", "avgpool", head="sgd", grid=1.0, epochs=5, chunk_rows=10_000)
    monkeypatch.setattr(Rows, "read", lambda *a, **k: pytest.fail("sgd must stream, not read all rows"))
    streamed = fit_head(tmp_path / "s.h5", "avgpool", head="sgd", grid=1.0, epochs=5, chunk_rows=16)
    agreement = np.mean(streamed.predict(X) == whole.predict(X))
    coef_a, coef_b = (h.estimator.named_steps["head"].coef_.ravel() for h in (streamed, whole))
    assert agreement >= 0.97 and np.corrcoef(coef_a, coef_b)[0, 1] > 0.95
    assert abs(streamed.metrics["accuracy"] - whole.metrics["accuracy"]) <= 0.05
    np.testing.assert_allclose(streamed.estimator.named_steps["normalize"].mean_, X[every_fifth_val(400) == "train"].mean(0), rtol=1e-5, atol=1e-5)


def test_ridge_regression_on_float_targets(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 8)).astype(np.float32)
    targets = X @ rng.normal(size=8) + 0.1 * rng.normal(size=150)
    write_rows(tmp_path / "r.h5", X, targets=targets, splits=every_fifth_val(150))
    head = fit_head(tmp_path / "r.h5", "avgpool", tmp_path / "head", plots=False)
    assert head.kind == "ridge" and head.task == "regression" and head.classes_ is None
    assert head.metrics["r2"] > 0.95 and {"mae", "rmse"} <= set(head.metrics)
    np.testing.assert_allclose(load_head(tmp_path / "head").predict(X), head.predict(X), rtol=1e-12)
    assert evaluate(tmp_path / "head", tmp_path / "r.h5", split="val")["r2"] == pytest.approx(head.metrics["r2"])
    with pytest.raises(FeatxError, match="head='logistic': needs class labels.*use head='ridge'"):
        fit_head(tmp_path / "r.h5", "avgpool", head="logistic")


def test_balanced_class_weight_helps_the_rare_class(tmp_path):
    X, y = blobs(400, 4, 2, sep=0.7, seed=6)
    keep = (y == 0) | (np.arange(400) % 8 == 0)  # 200 vs 25 rows
    write_rows(tmp_path / "s.h5", X[keep], y[keep], splits=every_fifth_val(keep.sum()), classes=["common", "rare"])
    plain = fit_head(tmp_path / "s.h5", "avgpool", grid="0.01,1")
    balanced = fit_head(tmp_path / "s.h5", "avgpool", grid="0.01,1", class_weight="balanced")
    assert balanced.metrics["cv"]["scoring"] == "balanced_accuracy"
    assert balanced.metrics["per_class"]["rare"]["recall"] >= plain.metrics["per_class"]["rare"]["recall"]
    assert balanced.metrics["balanced_accuracy"] >= plain.metrics["balanced_accuracy"]


def test_evaluate_measures_a_split(tmp_path):
    blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False)
    metrics = evaluate(tmp_path / "head", tmp_path / "s.h5", split="val")
    assert metrics["accuracy"] == head.metrics["accuracy"] and metrics["rows"] == {"eval": 18}
    assert np.asarray(metrics["confusion_matrix"]).sum() == 18
    assert evaluate(head, tmp_path / "s.h5", split="all")["rows"] == {"eval": 90}
    with pytest.raises(FeatxError, match="split='test': no labelled rows .*its splits: train, val; split='all' scores"):
        evaluate(head, tmp_path / "s.h5", split="test")
