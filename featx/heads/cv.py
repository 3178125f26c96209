"""Choosing the regularization strength C by (stratified) k-fold cross-validation on a log grid.

C is the inverse regularization strength of the linear-probe protocols (large C = weak regularization); each head
maps it onto its own parameter. A 'LO:HI' grid is searched one value per decade, upwards, then refined in quarter
decades around the best value. The decade pass stops early once PATIENCE decades in a row score clearly below the
best one (by more than the best value's standard error over the folds): the larger C values it leaves out are the
costliest fits, and on the unimodal curves of a regularised linear head they cannot win. Scores come from a
`score_grid(values) -> (scores, converged)` callable (two (len(values), folds) arrays), so that rows in memory
(inmemory.py: parallel folds) and rows streamed from disk (streaming.py) share the search. Only a trainer whose
`stepwise` is True (torchfit.py) is scored one value at a time and stopped early; the others (a call sends the
rows to worker processes, or makes passes over the store) score the whole decade pass in one call. inmemory.py fits every (C, fold) from scratch, so there a score is a function of C and the
fold alone, never of the values scored before it: a refined value scores as it would in the decade pass
(torchfit.py warm-starts along C instead). Among equal mean scores the smallest C (the strongest regularisation)
wins, and fits that stopped at their solver's iteration limit are counted per C.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import FeatxError
from ..options import OptionError

DEFAULT_GRID = "1e-6:1e5"
REFINE_STEPS = 4  # values per decade when refining
PATIENCE = 2  # decades in a row clearly below the best after which the decade pass stops
FOLDS = 5  # cross-validation folds by default ...
FEW_FOLDS, FEW_FOLDS_FROM = 3, 50_000  # ... and from this many training rows on


@dataclass
class CVResult:
    """Scores of every grid value on every fold, and the chosen C."""

    grid: np.ndarray  # sorted C values
    scores: np.ndarray  # (len(grid), folds)
    scoring: str
    converged: np.ndarray  # (len(grid), folds) bool: False where the solver stopped at its iteration limit
    skipped: tuple = ()  # grid values the decade pass left out after PATIENCE decades clearly below the best

    @property
    def mean(self) -> np.ndarray:
        return self.scores.mean(axis=1)

    @property
    def std(self) -> np.ndarray:
        return self.scores.std(axis=1)

    @property
    def not_converged(self) -> np.ndarray:
        """Per C, how many folds' fits stopped at the solver's iteration limit."""
        return (~self.converged).sum(axis=1)

    @property
    def best(self) -> float:
        """The C with the highest mean score; among ties (a plateau, e.g. on separable data) the smallest, the
        strongest regularisation."""
        mean = self.mean
        return float(self.grid[np.flatnonzero(mean >= mean.max() - 1e-12)[0]])

    def to_dict(self) -> dict:
        return {
            "param": "C",
            "best": self.best,
            "scoring": self.scoring,
            "folds": int(self.scores.shape[1]),
            "grid": self.grid.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "not_converged": self.not_converged.tolist(),
            "skipped": [float(C) for C in self.skipped],
        }


def parse_grid(grid) -> tuple[np.ndarray, bool]:
    """(C values, refine?) from 'LO:HI' (one value per decade, then refined), a list of values or one value."""
    what = OptionError("{grid=}: expected LO:HI (a log range such as 1e-6:1e5) or positive values such as 0.1,1,10",
                       grid=grid)
    try:
        if isinstance(grid, str) and ":" in grid:
            lo, hi = (float(part) for part in grid.split(":"))
            if not 0 < lo < hi:
                raise ValueError
            values = 10.0 ** np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 0.5)
            return np.clip(values, lo, hi), True
        if isinstance(grid, str):
            grid = grid.split(",")
        values = np.unique(np.atleast_1d(np.asarray(grid, dtype=np.float64)))
    except (TypeError, ValueError) as err:
        raise what from err
    if values.size == 0 or not np.all(np.isfinite(values)) or values.min() <= 0:
        raise what
    return values, False


def search(score_grid, values: np.ndarray, refine: bool, scoring: str, stepwise: bool = False) -> CVResult:
    """Score `values`, then (when refine) the quarter decades around the best one within the grid's range. A
    'LO:HI' grid (refine) is scored upwards one value at a time when `stepwise`, stopping early (see PATIENCE)."""
    if refine and stepwise:
        result = _ascend(score_grid, values, scoring)
    else:
        scores, converged = score_grid(values)
        result = CVResult(values, scores, scoring, converged)
    if refine and len(values) > 1:
        best = np.log10(result.best)
        steps = best + np.arange(-REFINE_STEPS + 1, REFINE_STEPS) / REFINE_STEPS
        lo, hi = np.log10(values[0]), np.log10(values[-1])
        extra = 10.0 ** steps[(steps > lo) & (steps < hi) & (steps != best)]
        extra = extra[~np.isin(extra, values)]
        if extra.size:
            grid = np.concatenate([result.grid, extra])
            order = np.argsort(grid)
            scores, converged = score_grid(extra)
            result = CVResult(grid[order], np.concatenate([result.scores, scores])[order], scoring,
                              np.concatenate([result.converged, converged])[order], result.skipped)
    return result


def _ascend(score_grid, values: np.ndarray, scoring: str) -> CVResult:
    """The decade pass: ascending values one at a time, until PATIENCE in a row score clearly below the best."""
    values = np.sort(values)
    scores, converged = [], []
    below = 0
    for i, C in enumerate(values):
        value_scores, value_converged = score_grid(values[i : i + 1])
        scores.append(value_scores[0])
        converged.append(value_converged[0])
        result = CVResult(values[: i + 1], np.array(scores), scoring, np.array(converged))
        best = int(np.argmax(result.grid == result.best))
        margin = result.std[best] / np.sqrt(result.scores.shape[1])
        below = below + 1 if result.mean[-1] < result.mean[best] - margin else 0
        if below == PATIENCE:
            return CVResult(result.grid, result.scores, scoring, result.converged, tuple(values[i + 1 :]))
    return result


def default_folds(rows: int) -> int:
    """Folds when none are given: FOLDS, and FEW_FOLDS from FEW_FOLDS_FROM training rows on. A fold's fits see
    (folds - 1) / folds of the rows, so the search costs rows x (folds - 1): 3 folds halve the cost of 5, while each
    held-out third (over 16,000 rows) still scores a C to about 0.3 points of accuracy, finer than the grid's
    steps change it on rows this many (benchmarks/scale_heads.py measures both)."""
    return FEW_FOLDS if rows >= FEW_FOLDS_FROM else FOLDS


def make_folds(y: np.ndarray, folds: int | None, classes: list[str] | None,
               seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: stratified for classification (y = class indices), shuffled k-fold for regression.

    `folds` None: default_folds(len(y)). When the rarest class has fewer rows than `folds`, fewer folds are used,
    with a warning.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if folds is None:
        folds = default_folds(len(y))

    if not isinstance(folds, int) or folds < 2:
        raise OptionError("{folds=}: expected an integer of 2 or more", folds=folds)
    if classes is None:
        k = min(folds, len(y))
        if k < 2:
            raise FeatxError(f"cross-validation needs at least 2 training rows, got {len(y)}")
        return list(KFold(k, shuffle=True, random_state=seed).split(y))
    counts = np.bincount(y, minlength=len(classes))
    present = np.flatnonzero(counts)
    rarest = present[np.argmin(counts[present])]
    k = min(folds, int(counts[rarest]))
    if k < 2:
        raise OptionError("class {name!r} has only 1 training row: cross-validation needs 2 or more per class (add "
                          "rows, or fix C with a single {grid} value)", name=classes[rarest])
    if k < folds:
        warnings.warn(
            f"class {classes[rarest]!r} has only {counts[rarest]} training rows: using {k} cross-validation folds "
            f"instead of {folds}",
            stacklevel=2,
        )
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def scoring_for(task: str, class_weight) -> str:
    """accuracy for classification (balanced accuracy with balanced class weights), R² for regression."""
    if task == "regression":
        return "r2"
    return "balanced_accuracy" if class_weight == "balanced" else "accuracy"


def confusion_score(confusion: np.ndarray, scoring: str) -> float:
    """accuracy or balanced accuracy (mean recall over the classes present) from a confusion matrix."""
    if scoring == "accuracy":
        return float(np.trace(confusion) / max(confusion.sum(), 1))
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def score(y_true: np.ndarray, y_pred: np.ndarray, scoring: str, n_classes: int) -> float:
    if scoring == "r2":
        from sklearn.metrics import r2_score

        return float(r2_score(y_true, y_pred))
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, -1)
    return confusion_score(confusion, scoring)
