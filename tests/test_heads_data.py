"""Heads on awkward input: foreign HDF5/NPZ files, bad stores and options (one-line errors), the head folder's
write rules, metrics and plots."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from featx import evaluate, fit_head, load_head
from featx.errors import FeatxError
from featx.heads import predict
from featx.heads.metrics import classification_metrics, metrics_table
from heads_support import CONFIG, blob_store, blobs, every_fifth_val, write_rows


def test_foreign_npz_with_string_labels(tmp_path):
    X, y = blobs(60, 5, 2, seed=1)
    np.savez(tmp_path / "emb.npz", X=X, y=np.array(["cat", "dog"])[y], extra=np.zeros(3))
    head = fit_head(tmp_path / "emb.npz", output=tmp_path / "head", grid="0.1:10", plots=False)
    assert list(head.classes_) == ["cat", "dog"] and head.config is None and head.tap == "X"
    assert head.metrics["evaluated_on"].startswith("stratified 0.2 hold-out") and head.metrics["accuracy"] >= 0.9
    assert head.metrics["rows"] == {"train": 48, "eval": 12}
    assert evaluate(tmp_path / "head", tmp_path / "emb.npz")["accuracy"] >= 0.9
    assert list(predict(tmp_path / "head", tmp_path / "emb.npz").predicted[:2]) == ["cat", "cat"]


def test_foreign_hdf5_needs_keys_when_ambiguous(tmp_path):
    X, y = blobs(60, 5, 2, seed=2)
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["emb/a"], h5["emb/b"], h5["meta/kind"], h5["meta/id"] = X, X[:, :3], y, np.arange(60)
    with pytest.raises(FeatxError, match=r"which array holds the features\? pass x='KEY' .*emb/a \(60, 5\)"):
        fit_head(tmp_path / "other.h5")
    with pytest.raises(FeatxError, match=r"has no labels \(pass y='KEY' \(vectors of 60 values: meta/id, meta/kind\)\)"):
        fit_head(tmp_path / "other.h5", x="emb/a")
    head = fit_head(tmp_path / "other.h5", x="emb/a", y="meta/kind", grid=1.0)
    assert list(head.classes_) == ["0", "1"] and head.metrics["accuracy"] >= 0.9
    with pytest.raises(FeatxError, match=r"y='meta/nope': no such array"):
        fit_head(tmp_path / "other.h5", x="emb/a", y="meta/nope")


def test_featx_store_read_as_plain_hdf5(tmp_path):
    blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", x="features/avgpool", y="items/label", grid=1.0)
    assert head.config is None and list(head.classes_) == ["0", "1", "2"]


def test_unlabelled_store_refuses_fit_but_predicts(tmp_path):
    X, _ = blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False)
    write_rows(tmp_path / "u.h5", X)
    with pytest.raises(FeatxError, match=r"u.h5 has no labels: fitting a head needs labelled rows \(predict works on it\)"):
        fit_head(tmp_path / "u.h5", "avgpool")
    with pytest.raises(FeatxError, match="evaluate needs labelled rows"):
        evaluate(head, tmp_path / "u.h5")
    result = predict(tmp_path / "head", tmp_path / "u.h5")
    assert list(result.names[:2]) == ["img/0000.png", "img/0001.png"]
    np.testing.assert_array_equal(result.predicted, head.predict(X))
    np.testing.assert_allclose(result.scores, head.predict_proba(X))


def test_taps_must_be_named_and_known(tmp_path):
    blob_store(tmp_path / "s.h5")
    with pytest.raises(FeatxError, match=r"holds several taps \(avgpool, layer4\): choose one with tap$"):
        fit_head(tmp_path / "s.h5")
    with pytest.raises(FeatxError, match=r"tap='fc': no such tap in .*s.h5; it holds: avgpool, layer4"):
        fit_head(tmp_path / "s.h5", "fc")


def test_class_problems(tmp_path):
    X, y = blobs(60, 4, 3)
    write_rows(tmp_path / "one.h5", X, np.zeros(60, dtype=int), splits=every_fifth_val(60))
    with pytest.raises(FeatxError, match="all training rows are of class 'ants'; a head needs 2 or more classes"):
        fit_head(tmp_path / "one.h5", "avgpool")
    y_rare = np.where(np.arange(60) < 3, 2, y % 2)  # 'wasps' has 3 rows, all for training
    write_rows(tmp_path / "rare.h5", X, y_rare, splits=["train"] * 60)
    with pytest.warns(UserWarning, match="class 'wasps' has only 3 training rows: using 3 cross-validation folds"):
        head = fit_head(tmp_path / "rare.h5", "avgpool", val_split=0, grid="0.1,1")
    assert head.metrics["cv"]["folds"] == 3
    y_single = np.where(np.arange(60) == 0, 2, y % 2)
    write_rows(tmp_path / "single.h5", X, y_single, splits=["train"] * 60)
    with pytest.raises(FeatxError, match="class 'wasps' has only 1 training row: cross-validation needs 2 or more"):
        fit_head(tmp_path / "single.h5", "avgpool", val_split=0)
    assert fit_head(tmp_path / "single.h5", "avgpool", val_split=0, grid=1.0).C == 1.0


@pytest.mark.parametrize("kind", ["logistic", "sgd"])
def test_nan_rows_are_named(tmp_path, kind):
    X, y = blobs(60, 4, 2)
    X[[5, 17, 30], 1] = [np.nan, np.inf, np.nan]
    write_rows(tmp_path / "bad.h5", X, y, splits=["train"] * 60, classes=["a", "b"])
    with pytest.raises(FeatxError, match=r"\(avgpool\): 3 rows hold NaN or inf values \(rows 5 \(img/0005.png\), "
                                         r"17 \(img/0017.png\), 30 \(img/0030.png\)\)"):
        fit_head(tmp_path / "bad.h5", "avgpool", head=kind, val_split=0, chunk_rows=8)


def test_store_of_another_extractor_is_refused(tmp_path):
    X, _ = blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False)
    write_rows(tmp_path / "other.h5", X, config={**CONFIG, "weights_sha256": "b" * 64})
    with pytest.raises(FeatxError, match=r"other.h5 was made with weights_sha256 'bbbb.*but the head with 'aaaa"):
        predict(head, tmp_path / "other.h5")
    write_rows(tmp_path / "wide.h5", np.hstack([X, X]), config=CONFIG)
    with pytest.raises(FeatxError, match="has 16 features per row; the head expects 8"):
        evaluate(head, tmp_path / "wide.h5")
    with pytest.raises(FeatxError, match=r"features of shape \(2, 3\) given to a head that expects \(rows, 8\)"):
        head.predict(np.zeros((2, 3)))


def test_joblib_needs_trust(tmp_path):
    blob_store(tmp_path / "s.h5")
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, joblib=True, plots=False)
    with pytest.raises(FeatxError, match=r"model.joblib is a pickle: loading it can run arbitrary code; pass trust=True if"):
        load_head(tmp_path / "head" / "model.joblib")
    assert load_head(tmp_path / "head" / "model.joblib", trust=True).estimator.__class__.__name__ == "Pipeline"


@pytest.mark.parametrize("kind", ["logistic", "ridge", "linear-svm", "sgd", "mlp"])
def test_joblib_export_predicts_class_names(tmp_path, kind):
    """model.joblib is for scikit-learn users: its predict gives the head's class names, not class indices."""
    import joblib

    X, _ = blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", head=kind, grid=1.0, joblib=True, plots=False,
                    n_jobs=1)
    exported = joblib.load(tmp_path / "head" / "model.joblib")
    assert list(exported.classes_) == ["ants", "bees", "wasps"]
    np.testing.assert_array_equal(exported.predict(X), head.predict(X))
    assert set(head.predict(X)) == {"ants", "bees", "wasps"}
    if head.has_proba:
        np.testing.assert_allclose(exported.predict_proba(X), head.predict_proba(X), rtol=1e-6)
    trusted = load_head(tmp_path / "head" / "model.joblib", trust=True)
    np.testing.assert_array_equal(trusted.predict(X), head.predict(X))
    np.testing.assert_array_equal(predict(trusted, tmp_path / "s.h5").predicted, head.predict(X))


def test_head_folder_write_rules(tmp_path):
    blob_store(tmp_path / "s.h5")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FeatxError, match="holds no featx head; choose another output='DIR'"):
        fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    first = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=2.0, plots=False)
    with pytest.raises(FeatxError, match="holds a head already; pass overwrite=True"):
        fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head")
    second = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=0.5, overwrite=True, plots=False)
    assert load_head(tmp_path / "head").C == second.C == 0.5 != first.C
    with pytest.raises(FeatxError, match="all training rows"):
        write_rows(tmp_path / "one.h5", *blobs(20, 8, 1))
        fit_head(tmp_path / "one.h5", "avgpool", tmp_path / "failed")
    assert not (tmp_path / "failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(FeatxError, match="not a featx head folder"):
        load_head(tmp_path / "notes")


@pytest.mark.parametrize("option,value,message", [
    ("grid", "1:0.1", r"grid='1:0.1': expected LO:HI"),
    ("grid", "a,b", r"grid='a,b': expected"),
    ("grid", -1, r"grid=-1: expected"),
    ("head", "forest", r"head='forest': expected one of logistic, ridge, linear-svm, sgd, mlp"),
    ("normalize", "minmax", r"normalize='minmax': expected one of standard, l2, none"),
    ("class_weight", "auto", r"class_weight='auto': expected one of none, balanced"),
    ("val_split", 1.0, r"val_split=1.0: expected a number in \[0, 1\)"),
    ("folds", 1, r"folds=1: expected an integer >= 2"),
    ("dropout", 1.5, r"dropout=1.5: expected a number in \[0, 1\)"),
    ("seed", 2**32, r"seed=4294967296: expected an integer from 0 to 4294967295"),  # scikit-learn's limit
    ("seed", -1, r"seed=-1: expected an integer from 0 to 4294967295"),
])
def test_bad_options_are_one_line_errors(tmp_path, option, value, message):
    blob_store(tmp_path / "s.h5")
    with pytest.raises(FeatxError, match=message):
        fit_head(tmp_path / "s.h5", "avgpool", **{option: value})


def test_metrics_values_and_table():
    true = np.array(["a", "a", "a", "b", "b", "c"], dtype=object)
    pred = np.array(["a", "a", "b", "b", "b", "a"], dtype=object)
    m = classification_metrics(true, pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    table = metrics_table({**m, "rows": {"eval": 6}, "evaluated_on": "split 'val'"})
    assert "accuracy   0.6667" in table and "confusion (rows: true class" in table


def test_plots_are_written(tmp_path):
    blob_store(tmp_path / "s.h5")
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid="0.1:10")
    for name in ("confusion_matrix.png", "cv_curve.png"):
        assert (tmp_path / "head" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_larger_than_memory_are_one_line_pointing_to_sgd(tmp_path, monkeypatch, cli):
    """An in-memory head on a tap that does not fit: the store, the tap, the bytes and --head sgd, no traceback."""
    X, _ = blob_store(tmp_path / "s.h5")  # 72 'train' rows x 8 features
    real_empty = np.empty

    def empty(shape, *args, **kwargs):
        if tuple(np.atleast_1d(shape)) == (72, 8):
            raise MemoryError(f"Unable to allocate 2.25 KiB for an array with shape {shape} and data type float32")
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(np, "empty", empty)
    args = ["fit-head", str(tmp_path / "s.h5"), "-l", "avgpool", "-o", str(tmp_path / "head"), "--no-plots"]
    result = cli(*args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == (f"featx: error: {tmp_path / 's.h5'}: tap 'avgpool' does not fit in memory (72 rows x 8 "
                             "float32 features need 2,304 bytes, 0.0 GB): use --head sgd, which streams the store "
                             "in chunks\n")
    streamed = cli(*args, "--head", "sgd", "--grid", "1")
    assert streamed.exit_code == 0, streamed.output


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_rows_beyond_available_memory_are_refused_before_allocating(tmp_path, monkeypatch, solver, cli):
    """When the training rows need more than the memory this process can still get, fit-head's in-memory paths
    refuse in one line before allocating them (a large allocation would succeed and the kernel would kill the
    process later); --head sgd streams and fits."""
    import featx.heads.data as data

    blob_store(tmp_path / "s.h5")  # 72 'train' rows x 8 features: 2,304 bytes
    monkeypatch.setattr(data, "available_memory", lambda: 2000)
    args = ["fit-head", str(tmp_path / "s.h5"), "-l", "avgpool", "-o", str(tmp_path / "head"), "--no-plots"]
    result = cli(*args, "--solver", solver)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == (f"featx: error: {tmp_path / 's.h5'}: tap 'avgpool' does not fit in memory (72 rows x 8 "
                             "float32 features need 2,304 bytes, 0.0 GB, 0.0 GB available): use --head sgd, which "
                             "streams the store in chunks\n")
    assert not (tmp_path / "head").exists()
    streamed = cli(*args, "--head", "sgd", "--grid", "1")
    assert streamed.exit_code == 0, streamed.output


def test_available_memory_honours_an_address_space_cap():
    import subprocess
    import sys

    cap = 3 << 30
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
            "from featx.heads.data import available_memory; print(available_memory())").format(cap)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < cap


@pytest.mark.slow
def test_streamed_head_holds_a_bounded_number_of_row_bytes(tmp_path, monkeypatch):
    """--head sgd, cross-validation included, keeps a few chunks of rows in memory whatever the store's size: from
    1,000 to 6,000 rows of 1024 features (20 MB more rows) its peak of traced (numpy and Python) memory grows by
    less than an eighth of that, while the in-memory logistic head's grows by more than its training rows."""
    import tracemalloc

    import featx.heads.data as data

    monkeypatch.setattr(data, "CHUNK_BYTES", 2 << 20)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 1024))
    runs = {"sgd": {"grid": [0.1, 1.0], "epochs": 1}, "logistic": {"grid": 1.0}}
    peaks = {}
    for n in (1000, 6000):
        y = np.arange(n) % 3
        write_rows(tmp_path / f"{n}.h5", (centres[y] + rng.normal(size=(n, 1024)) * 4).astype(np.float32), y,
                   extra_tap=False)
        for head, options in runs.items():
            if n == 1000:  # imports and thread pools first, outside the measurement
                fit_head(tmp_path / f"{n}.h5", "avgpool", head=head, plots=False, n_jobs=1, **options)
            tracemalloc.start()
            fitted = fit_head(tmp_path / f"{n}.h5", "avgpool", head=head, plots=False, n_jobs=1, **options)
            peaks[head, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert fitted.metrics["accuracy"] > 0.9
    more_rows = 5000 * 1024 * 4
    assert peaks["sgd", 6000] - peaks["sgd", 1000] < more_rows / 8
    assert peaks["logistic", 6000] - peaks["logistic", 1000] > more_rows * 0.8


def test_running_out_of_memory_during_the_fit_is_one_line(tmp_path, monkeypatch, cli):
    import featx.heads.cv as cv

    blob_store(tmp_path / "s.h5")

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 64.0 MiB for an array with shape (13107, 1280) and data type float32")

    monkeypatch.setattr(cv, "search", exhausted)
    result = cli("fit-head", tmp_path / "s.h5", "-l", "avgpool", "-o", tmp_path / "head")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"featx: error: {tmp_path / 's.h5'}: out of memory while fitting the head (")
    assert result.output.endswith("GB available): --head sgd streams the rows, --chunk-rows rows at a time\n")
    assert not (tmp_path / "head").exists()
