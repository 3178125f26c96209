"""`fit_head` and `evaluate`: the small-data path from stored rows to a fitted, saved and measured head."""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..options import OptionError
from . import cv
from .data import ALL_ROWS, Rows, available_memory, evaluation_rows, no_labels_error, open_rows, train_eval_rows
from .estimators import HeadOptions, get_head_type
from .inmemory import InMemoryFit
from .metrics import classification_metrics, regression_metrics
from .model import Head
from .options import FitHeadOptions
from .persistence import atomic_folder, check_output, load_head, save_head
from .plots import write_plots
from .prediction import is_feature_file, predict
from .streaming import StreamingFit
from .torchfit import TorchFit

# Training rows x features from which --solver auto fits the logistic head in torch (docs/INTERNALS.md, heads: the
# measurements). Below it scikit-learn is as fast or faster (torch's import) and keeps the C earlier releases chose:
# on small, nearly separable stores the two solvers stop at different points at large C.
TORCH_MIN_WORK = 5_000_000


def fit_head(
    data,
    tap: str | None = None,
    output=None,
    *,
    head: str | None = None,
    normalize: str | None = None,
    grid=None,
    folds: int | None = None,
    class_weight: str | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    n_jobs: int | None = -1,
    x: str | None = None,
    y: str | None = None,
    epochs: int | None = None,
    hidden: int = 512,
    dropout: float = 0.5,
    neighbors: int = 20,
    temperature: float = 0.07,
    chunk_rows: int = 65536,
    solver: str = "auto",
    device: str = "auto",
    joblib: bool = False,
    plots: bool = True,
    overwrite: bool = False,
) -> Head:
    """Fit a head on the rows of `tap` in `data` (a featx store, or an HDF5/NPZ file with arrays `x` and `y`).

    head: 'logistic' (default; 'ridge' for float targets), 'ridge', 'linear-svm', 'sgd' (streamed), 'mlp' or 'knn'
    (weighted k-NN on cosine similarity, `neighbors` k and `temperature` T; it has no C and keeps its training rows).
    normalize: 'standard', 'l2' or 'none' (None: 'none' for knn, else 'standard'). class_weight: 'balanced', or
    None ('none') for equal weights. featx.heads.options.FitHeadOptions holds every option's range.
    Training rows are split 'train' when the file has splits, else all labelled rows less a stratified `val_split`
    fraction held out for the metrics. C is chosen by `folds`-fold cross-validation (None: 5, 3 from 50,000 training rows on) on `grid` ('LO:HI' searched
    per decade then refined, a list of values, or one value to skip the search), and the head is refit on all
    training rows. solver 'torch' fits the logistic head by full-batch L-BFGS in torch on `device` (cpu, cuda,
    cuda:N; auto: CUDA when present), minimising scikit-learn's objective at the same C; 'auto' takes it for a
    logistic head on TORCH_MIN_WORK training rows x features or more, or when `device` names one, and scikit-learn
    otherwise. With `output` the head folder is written atomically (`overwrite` replaces a head there;
    `joblib` adds a model.joblib pickle, `plots` the PNGs). Returns the Head, with its metrics.
    """
    FitHeadOptions.of(locals())  # an OptionError for a value the option does not take
    class_weight = None if class_weight == "none" else class_weight
    if output is not None:
        check_output(Path(output), overwrite)
    started = time.perf_counter()
    with _out_of_memory_in_one_line(data), open_rows(data, tap, x, y) as rows:
        head_type = get_head_type(head, rows.task, str(rows.path))
        train, held, held_how = train_eval_rows(rows, val_split, seed)
        solver = choose_solver(solver, head_type.name, len(train) * rows.n_features, device)
        y_train, classes = _targets(rows, train)
        options = HeadOptions(task=rows.task, class_weight=class_weight, seed=seed, epochs=epochs, hidden=hidden,
                              dropout=dropout, device=device, neighbors=neighbors, temperature=temperature)
        normalize = head_type.default_normalize if normalize is None else normalize
        values, refine = _grid(head_type, grid)
        fit_started = time.perf_counter()
        trainer_type = TorchFit if solver == "torch" else StreamingFit if head_type.streaming else InMemoryFit
        trainer = trainer_type(head_type, options, rows, train, y_train, len(classes or ()), normalize, chunk_rows,
                               n_jobs)
        result = None
        if len(values) > 1:
            scoring = cv.scoring_for(rows.task, class_weight)
            trainer.set_folds(cv.make_folds(y_train, folds, classes, seed), scoring)
            result = cv.search(trainer.score_grid, values, refine, scoring, trainer.stepwise)
        C = result.best if result else None if values[0] is None else float(values[0])
        pipeline = trainer.fit(C)
        fit_seconds = time.perf_counter() - fit_started
        fitted = Head(
            pipeline, kind=head_type.name, task=rows.task, model=head_type.model, classes=classes,
            n_features=rows.n_features, tap=rows.tap, normalize=normalize, link=head_type.link,
            C=C, config=rows.config, config_key=rows.config_key,
        )
        metrics = {
            "head": head_type.name, "tap": rows.tap, "n_features": rows.n_features, "task": rows.task,
            "trained_on": str(rows.path), "rows": {"train": len(train), "eval": len(held)}, "C": fitted.C,
            "cv": result.to_dict() if result else None, "converged": trainer.converged, "fit_seconds": fit_seconds,
            "solver": solver,
        }
        if not head_type.regularized:
            metrics.update(neighbors=neighbors, temperature=temperature)
        if len(held):
            metrics.update(evaluated_on=held_how, **_metrics_on(fitted, rows, held, chunk_rows))
        metrics["total_seconds"] = time.perf_counter() - started
        fitted.metrics = metrics
    if output is not None:
        with atomic_folder(output, overwrite) as folder:
            save_head(fitted, folder, joblib=joblib)
            if plots:
                write_plots(fitted.metrics, folder)
        fitted.path = Path(output)
    return fitted


def evaluate(head, data, *, split: str | None = None, tap: str | None = None, x: str | None = None,
             y: str | None = None, trust: bool = False, store=None, weights=None, batch_size: int = 64,
             device: str = "auto", workers: int | None = None, progress: bool = False, log=None,
             chunk_rows: int = 65536) -> dict:
    """Metrics of `head` (a Head or a head folder) on the labelled rows of `data`: a featx store or an HDF5/NPZ
    file, or labelled images (an ImageFolder, a CSV, ...), whose features are extracted through the head's cache as
    `predict` does (`store`, `weights`, `batch_size`, `device`, `workers`, `progress`, `log`: as there).

    `split`: the rows of that split; 'all': every labelled row; None (default): the 'val' split when the data has
    one, else 'test', else every labelled row. Returns the metrics dict (see metrics.py) with `split` (the split
    scored, or 'all'), `evaluated_on` (which rows, in words) and `rows` (`eval`: how many were scored).
    """
    head = head if isinstance(head, Head) else load_head(head, trust=trust)
    if not is_feature_file(data):
        return _evaluate_images(head, data, split, dict(store=store, weights=weights, batch_size=batch_size,
                                                        device=device, workers=workers, progress=progress, log=log))
    with open_rows(data, tap or head.tap, x, y) as rows:
        head.check_rows(rows)
        _check_task(head, rows.task, rows.path)
        if not rows.labelled.any():
            raise no_labels_error(rows, "evaluate")
        index, chosen, where = evaluation_rows(rows.labelled, rows.splits, split, rows.path)
        if chosen == ALL_ROWS and split is None and _same_file(rows.path, head.metrics.get("trained_on")):
            where += ", the rows the head was fitted on among them"
        return {"head": head.kind, "tap": rows.tap, "data": str(rows.path), "split": chosen,
                "rows": {"eval": len(index)}, "evaluated_on": where, **_metrics_on(head, rows, index, chunk_rows)}


def _evaluate_images(head: Head, data, split: str | None, options: dict) -> dict:
    """evaluate on labelled images: the head's predictions through its extractor, the labels from the source."""
    from ..sources import load_source

    source = load_source(data)
    _check_task(head, source.task, data)
    if source.task == "unlabelled":
        raise FeatxError(f"{data} has no labels: evaluate needs labelled images (predict works on these)")
    predictions = predict(head, data, **options)
    by_path = {item.relpath: item for item in source.items}
    scored = np.array([str(name) in by_path for name in predictions.names], dtype=bool)  # rows of these images
    items = [by_path[str(name)] for name in predictions.names[scored]]
    labelled = np.array([item.label >= 0 or np.isfinite(item.target) for item in items], dtype=bool)
    index, chosen, where = evaluation_rows(labelled, [item.split for item in items], split, data)
    if source.task == "regression":
        truth = np.array([items[i].target for i in index])
    else:
        truth = np.array([source.classes[items[i].label] for i in index], dtype=object)
    failed = {"failed": len(predictions.failed)} if predictions.failed else {}
    return {"head": head.kind, "tap": head.tap, "data": str(data), "split": chosen,
            "rows": {"eval": len(index), **failed}, "evaluated_on": where,
            **_scores(head, truth, predictions.predicted[scored][index])}


def _check_task(head: Head, task: str, where) -> None:
    if (head.task == "regression") != (task == "regression") and task != "unlabelled":
        raise FeatxError(f"{where} holds {task} data but the head is a {head.task} head")


def _same_file(path, other) -> bool:
    try:
        return other is not None and Path(path).resolve() == Path(other).resolve()
    except OSError:
        return False


def choose_solver(solver: str, head: str, work: int, device: str) -> str:
    """'sklearn' or 'torch' for `--solver solver` and `--head head` on `work` = training rows x features.

    'auto' is torch for the logistic head when `device` names a device or when work >= TORCH_MIN_WORK, where the
    torch solver (the folds in one pass over the rows, warm starts, preconditioning) is faster than scikit-learn's
    cold starts; below it, scikit-learn (torch's import and set-up cost more than they save).
    """
    device_named = str(device).strip().lower() != "auto"
    if solver == "auto":
        if head != "logistic":
            if device_named:
                raise OptionError("{device=}: only the logistic head runs on a device ({head=} fits with "
                                  "scikit-learn); drop {device}", device=device, head=head)
            return "sklearn"
        return "torch" if device_named or work >= TORCH_MIN_WORK else "sklearn"
    if solver == "torch" and head != "logistic":
        raise OptionError("{solver=torch}: only the logistic head has a torch solver, not {head=}", head=head)
    return solver


@contextlib.contextmanager
def _out_of_memory_in_one_line(data):
    """A MemoryError during the fit becomes a one-line OptionError (the head folder is only written afterwards)."""
    try:
        yield
    except MemoryError:
        available = available_memory()
        free = f" ({available / 1e9:.1f} GB available)" if available is not None else ""
        raise OptionError("{data}: out of memory while fitting the head{free}: {head=sgd} streams the rows, "
                          "{chunk_rows} rows at a time", data=data, free=free) from None


def _grid(head_type, grid):
    """(C values, refine) to search; [None] for a head without C (a --grid for it is refused)."""
    if head_type.regularized:
        return cv.parse_grid(head_type.default_grid if grid is None else grid)
    if grid is not None:
        raise OptionError("{grid=}: the {kind} head has no C to search; set {neighbors} and {temperature}", grid=grid,
                          kind=head_type.name)
    return [None], False


def _targets(rows: Rows, train: np.ndarray):
    """(y for training, class names) : class indices over the classes present in the training rows."""
    if rows.task == "regression":
        return rows.targets[train], None
    present, y = np.unique(rows.labels[train], return_inverse=True)
    if len(present) < 2:
        raise FeatxError(
            f"{rows.path}: all training rows are of class {rows.classes[present[0]]!r}; a head needs 2 or more classes"
        )
    return y.astype(np.int64), [rows.classes[i] for i in present]


def _metrics_on(head: Head, rows: Rows, index: np.ndarray, chunk_rows: int) -> dict:
    """The metrics of `head` on store rows `index`, predicted chunk by chunk."""
    pred = np.concatenate([head.predict(block) for _, block in rows.iter_chunks(index, chunk_rows)])
    truth = rows.targets[index] if head.task == "regression" else \
        np.asarray(rows.classes, dtype=object)[rows.labels[index]]
    return _scores(head, truth, pred)


def _scores(head: Head, truth: np.ndarray, pred: np.ndarray) -> dict:
    """Regression or classification metrics of predictions `pred` against `truth` (values, or class names)."""
    if head.task == "regression":
        return regression_metrics(truth, pred)
    labels = [str(c) for c in head.classes_]
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        warnings.warn(f"classes the head never saw count as errors: {', '.join(unknown)}", stacklevel=3)
    return classification_metrics(truth, pred, labels + unknown)
