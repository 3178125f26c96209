"""fit-head --head knn: DINO's weighted k-NN (cosine, exp(cos / T) votes), saved as arrays, loaded, predicted and
evaluated like the other heads, and accurate on a small separable set."""
from __future__ import annotations

import json

import numpy as np
import pytest

import featx
from featx.errors import FeatxError
from featx.heads.knn import KNNHead
from featx.heads.search import knn_votes
from heads_support import blob_store, blobs


def dino_votes(X_train, y_train, X, k, T, n_classes):
    """DINO's knn_classifier, written out: top-k cosine similarities, exp(sim / T) weighted one-hot votes."""
    a = X_train / np.linalg.norm(X_train, axis=1, keepdims=True)
    b = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = b @ a.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(X), n_classes))
    for i in range(len(X)):
        for j in top[i]:
            votes[i, y_train[j]] += np.exp(sims[i, j] / T)
    return votes / votes.sum(axis=1, keepdims=True)


def test_votes_are_dinos():
    X, y = blobs(n=60, d=5, k=3, sep=0.7, seed=3)  # overlapping classes: the weights decide
    train, test = np.arange(60) % 4 != 0, np.arange(60) % 4 == 0
    head = KNNHead(n_neighbors=7, temperature=0.1).fit(X[train], y[train])
    expected = dino_votes(X[train], y[train], X[test], 7, 0.1, 3)
    np.testing.assert_allclose(head.predict_proba(X[test]), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(head.predict(X[test]), np.argmax(expected, axis=1))


def test_k_above_the_training_rows_uses_them_all():
    X, y = blobs(n=6, d=3, k=2, seed=1)
    votes = knn_votes(X, X / np.linalg.norm(X, axis=1, keepdims=True), y, 2, 100, 0.07)
    assert votes.shape == (6, 2) and np.allclose(votes.sum(axis=1), 1)


@pytest.mark.parametrize("params", [dict(n_neighbors=0), dict(n_neighbors=2.5), dict(temperature=0),
                                    dict(temperature=float("nan"))])
def test_bad_parameters_are_refused_at_fit(params):
    X, y = blobs(n=10, d=3, k=2)
    with pytest.raises(ValueError):
        KNNHead(**params).fit(X, y)


def test_fit_save_load_predict_evaluate(tmp_path):
    blob_store(tmp_path / "s.h5", n=90, d=8, k=3)
    head = featx.fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "knn", head="knn", n_jobs=1, plots=False)
    assert head.metrics["accuracy"] == 1.0 and head.metrics["neighbors"] == 20
    assert head.metrics["C"] is None and head.normalize == "none"
    loaded = featx.load_head(tmp_path / "knn")
    assert loaded.kind == "knn" and loaded.model == "knn"
    with featx.open_store(tmp_path / "s.h5") as store:
        X = store.features("avgpool")
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-5, atol=1e-7)
    assert list(loaded.predict(X)) == list(head.predict(X))
    predictions = featx.predict(tmp_path / "knn", tmp_path / "s.h5")
    assert predictions.probabilities and predictions.scores.shape == (90, 3)
    metrics = featx.evaluate(tmp_path / "knn", tmp_path / "s.h5")
    assert metrics["accuracy"] == 1.0 and metrics["split"] == "val"


def test_a_random_labelling_is_not_learnt(tmp_path):
    """The accuracy test can fail: rows whose labels carry no signal score near chance."""
    X, _ = blobs(n=90, d=8, k=3)
    y = np.random.default_rng(5).integers(0, 3, size=90)
    from heads_support import every_fifth_val, write_rows

    write_rows(tmp_path / "r.h5", X, y, splits=every_fifth_val(90))
    head = featx.fit_head(tmp_path / "r.h5", "avgpool", head="knn", n_jobs=1, plots=False)
    assert head.metrics["accuracy"] < 0.7


def test_cli(tmp_path, cli):
    blob_store(tmp_path / "s.h5", n=90, d=8, k=3)
    answer = cli("fit-head", tmp_path / "s.h5", "-l", "avgpool", "--head", "knn", "--neighbors", "5",
                 "--temperature", "0.5", "-o", tmp_path / "h", "--no-plots", "--json", "--jobs", "1")
    assert answer.exit_code == 0, answer.output
    metrics = json.loads(answer.output)
    assert metrics["neighbors"] == 5 and metrics["temperature"] == 0.5 and metrics["accuracy"] == 1.0
    table = cli("fit-head", tmp_path / "s.h5", "-l", "avgpool", "--head", "knn", "-o", tmp_path / "h2", "--no-plots",
                "--jobs", "1")
    assert "k-NN       k 20, temperature 0.07" in table.output
    refused = cli("fit-head", tmp_path / "s.h5", "-l", "avgpool", "--head", "knn", "--grid", "0.1:10", "-o",
                  tmp_path / "h3")
    assert refused.exit_code == 2 and "has no C to search" in refused.output


def test_grid_refused_in_the_api(tmp_path):
    blob_store(tmp_path / "s.h5", n=30, d=4, k=3)
    with pytest.raises(FeatxError, match="temperature=-1.0"):
        featx.fit_head(tmp_path / "s.h5", "avgpool", head="knn", temperature=-1.0)
