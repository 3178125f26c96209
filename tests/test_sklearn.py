"""scikit-learn interop: featx's estimators pass check_estimator, featx.sklearn.Embedder turns image paths into rows
through a store inside Pipeline and GridSearchCV, and the --joblib export predicts class names with one binary
decision score per row, so the roc_auc and average_precision scorers work on it."""
from __future__ import annotations

import warnings

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, get_scorer, make_scorer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import check_estimator

import featx
from featx.errors import FeatxError
from featx.heads.estimators import HEAD_TYPES, HeadOptions
from featx.heads.knn import KNNHead
from featx.heads.mlp import MLPHead
from featx.sklearn import Embedder
from heads_support import blob_store
from imagegen import make_image_folder
from options_support import HEAD_EXTRACT

EMBED = {name: value for name, value in HEAD_EXTRACT.items() if name != "taps"}  # an Embedder takes one tap


def failures(results) -> list[str]:
    return [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]


# The checks that scikit-learn's own estimators fail, with scikit-learn's reasons (its test suite lists the same
# ones as expected failures of RidgeClassifier, LinearSVC and SGDClassifier).
WEIGHTS_NOT_REPEATS = "scikit-learn: sample_weight is not equivalent to removing/repeating samples for this solver"
EXPECTED_FAILURES = {
    "ridge": {"check_non_transformer_estimators_n_iter": "scikit-learn's RidgeClassifier leaves n_iter_ None with "
                                                         "its default (direct) solver, which has no iterations"},
    "linear-svm": {"check_sample_weight_equivalence_on_dense_data": WEIGHTS_NOT_REPEATS,
                   "check_sample_weight_equivalence_on_sparse_data": WEIGHTS_NOT_REPEATS},
    "sgd": {"check_sample_weight_equivalence_on_dense_data": WEIGHTS_NOT_REPEATS,
            "check_sample_weight_equivalence_on_sparse_data": WEIGHTS_NOT_REPEATS},
}


@pytest.mark.parametrize("kind", list(HEAD_TYPES))
def test_every_head_type_builds_an_estimator_that_passes(kind):
    estimator = HEAD_TYPES[kind].build(1.0, 100, HeadOptions(hidden=32))
    expected = EXPECTED_FAILURES.get(kind, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None, expected_failed_checks=expected)
    assert failures(results) == []
    assert {r["check_name"] for r in results if r["status"] == "xfail"} == set(expected)
    assert sum(r["status"] == "passed" for r in results) >= 45
    if kind in ("mlp", "knn"):  # featx's own estimators: the one check not run is array-API input, which
        assert isinstance(estimator, (MLPHead, KNNHead))  # scikit-learn runs only with SCIPY_ARRAY_API=1
        assert {r["check_name"] for r in results if r["status"] == "skipped"} <= {"check_array_api_input"}


# Embedder's input is image paths: its tags say so (two_d_array False, string True), and scikit-learn then skips
# every check that feeds it a numeric array (all of check_estimator's but cloning). These are the checks of the
# estimator API that take no data; Pipeline and GridSearchCV below exercise fit and transform on paths.
API_CHECKS = ["check_no_attributes_set_in_init", "check_parameters_default_constructible",
              "check_get_params_invariance", "check_set_params", "check_estimator_cloneable", "check_estimator_repr",
              "check_valid_tag_types", "check_estimator_tags_renamed"]


def test_embedder_passes_the_checks_that_apply():
    embedder = Embedder(**EMBED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert failures(check_estimator(embedder, on_fail=None)) == []
    for name in API_CHECKS:
        check = getattr(estimator_checks, name)
        check("Embedder", clone(embedder))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sk")
    make_image_folder(root / "data", per_class=6)
    paths = sorted(str(p) for p in (root / "data").rglob("*.png"))
    labels = [p.split("/")[-2] for p in paths]
    return root, paths, labels


def test_embedder_rows_are_the_stores(images, tmp_path):
    root, paths, _ = images
    rows = Embedder(store=tmp_path / "e.h5", tap="avgpool", **EMBED).fit().transform(paths[::-1])
    result = featx.extract(root / "data", tmp_path / "x.h5", taps=["avgpool"], **EMBED)
    with featx.open_store(result.store_path) as store:
        by_path = dict(zip(store.paths, store.features("avgpool")))
    expected = np.stack([by_path["/".join(p.split("/")[-2:])] for p in paths[::-1]])
    np.testing.assert_array_equal(rows, expected)


def test_embedder_in_a_grid_search_extracts_each_image_once(images, tmp_path, monkeypatch):
    _, paths, labels = images
    import importlib

    extract_module = importlib.import_module("featx.extraction")
    calls = []
    real = extract_module.extract
    monkeypatch.setattr(extract_module, "extract", lambda *a, **k: calls.append(k["data"]) or real(*a, **k))
    pipeline = Pipeline([("embed", Embedder(store=tmp_path / "e.h5", **EMBED)),
                         ("clf", LogisticRegression(max_iter=500))])
    search = GridSearchCV(pipeline, {"clf__C": [0.01, 1.0]}, cv=2, error_score="raise").fit(paths, labels)
    assert search.best_score_ >= 0.9
    assert list(search.predict(paths[:2])) == labels[:2]
    extracted = [p for data in calls for p in ([data] if isinstance(data, str) else data)]
    assert sorted(extracted) == sorted(paths)  # every image once, however many fits transformed it
    with featx.open_store(tmp_path / "e.h5") as store:
        assert len(store) == len(paths)


def test_embedder_mistakes(images, tmp_path):
    _, paths, _ = images
    with pytest.raises(ValueError, match="pooling"):
        Embedder(pooling="none").fit()
    with pytest.raises(ValueError, match="image paths"):
        Embedder(store=tmp_path / "e.h5", **EMBED).fit().transform(np.zeros((3, 4)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FeatxError, match="bad.png"):
        Embedder(store=tmp_path / "e.h5", **EMBED).fit().transform([paths[0], str(tmp_path / "bad.png")])


@pytest.mark.parametrize("kind", ["logistic", "mlp", "knn", "linear-svm"])
def test_joblib_export_predicts_names_and_scores_binary(tmp_path, kind):
    X, y = blob_store(tmp_path / "s.h5", n=60, d=6, k=2)
    featx.fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "h", head=kind, joblib=True, plots=False, n_jobs=1,
                   **({"grid": 1.0} if kind in ("mlp", "linear-svm") else {}))
    model = joblib.load(tmp_path / "h" / "model.joblib")
    names = np.array(["ants", "bees"], dtype=object)[y]
    assert set(model.predict(X)) == {"ants", "bees"} and (model.predict(X) == names).mean() >= 0.95
    assert model.decision_function(X).shape == (60,)
    assert get_scorer("roc_auc")(model, X, names) >= 0.95
    ap = make_scorer(average_precision_score, response_method=("decision_function", "predict_proba"),
                     pos_label="bees")
    assert ap(model, X, names) >= 0.95
    loaded = featx.load_head(tmp_path / "h")
    assert loaded.decision_function(X).shape == (60,)
