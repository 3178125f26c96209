"""The C search's quality: a value's CV score does not depend on the values scored before it, ties go to the
smallest C (the strongest regularisation), and fits that stop at the solver's iteration limit are reported in the
metrics and in the printed table."""
from __future__ import annotations

import numpy as np
import pytest

from featx import fit_head
from featx.heads.cv import CVResult, search
from featx.heads.metrics import metrics_table
from heads_support import blob_store, write_rows


@pytest.fixture
def hard_store(tmp_path):
    """Unnormalised rows on scales from 3 to 300: lbfgs stops at its iteration limit, and where it stops depends on
    where it starts."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    X = (rng.normal(size=(3, 8))[y] * 0.7 + rng.normal(size=(90, 8))) * np.logspace(0, 2, 8) * 3
    write_rows(tmp_path / "hard.h5", X.astype(np.float32), y, splits=["train"] * 90)
    return tmp_path / "hard.h5"


def test_refined_values_score_as_if_they_were_in_the_first_pass(hard_store):
    refined = fit_head(hard_store, "avgpool", grid="1e-3:1e2", normalize="none", val_split=0, plots=False)
    cv = refined.metrics["cv"]
    assert len(cv["grid"]) > 6  # decades plus refined values
    listed = fit_head(hard_store, "avgpool", grid=cv["grid"], normalize="none", val_split=0, plots=False)
    assert listed.metrics["cv"]["grid"] == cv["grid"] and listed.metrics["cv"]["mean"] == cv["mean"]
    alone = fit_head(hard_store, "avgpool", grid=cv["grid"][-2:], normalize="none", val_split=0, plots=False)
    assert alone.metrics["cv"]["mean"] == cv["mean"][-2:]


def test_non_convergence_is_in_the_metrics_and_the_table(hard_store):
    head = fit_head(hard_store, "avgpool", grid="1e-2:1e1", normalize="none", val_split=0.2, plots=False)
    cv = head.metrics["cv"]
    assert len(cv["not_converged"]) == len(cv["grid"]) and all(n == cv["folds"] for n in cv["not_converged"])
    assert head.metrics["converged"] is False
    table = metrics_table(head.metrics)
    assert f"warning    not converged in CV at C = 0.01 ({cv['folds']}/{cv['folds']} folds)" in table
    assert f"warning    the final fit at C = {head.C:.3g} did not converge" in table


def test_converged_fits_print_no_warning(tmp_path):
    blob_store(tmp_path / "s.h5")
    head = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1", plots=False)
    assert head.metrics["converged"] is True and not any(head.metrics["cv"]["not_converged"])
    assert "warning" not in metrics_table(head.metrics)


def test_ties_go_to_the_smallest_c(tmp_path):
    blob_store(tmp_path / "s.h5")  # well separated: a plateau of perfect CV accuracy
    head = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e3", plots=False)
    cv = head.metrics["cv"]
    plateau = [C for C, mean in zip(cv["grid"], cv["mean"]) if mean == max(cv["mean"])]
    assert len(plateau) > 2 and head.C == cv["best"] == min(plateau)


def test_search_breaks_a_tie_between_decade_and_refined_values_towards_regularisation():
    table = {0.1: 0.5, 1.0: 0.9, 10.0: 0.9, 100.0: 0.9}

    def score_grid(values):
        scores = np.array([[table.get(float(v), 0.9 if v > 1 else 0.7)] * 2 for v in values])
        return scores, np.ones(scores.shape, dtype=bool)

    result = search(score_grid, np.array([0.1, 1.0, 10.0, 100.0]), True, "accuracy")
    assert isinstance(result, CVResult) and result.best == 1.0
    assert result.to_dict()["not_converged"] == [0] * len(result.grid)


def recorded_curve(mean_at, spread=0.01):
    """(score_grid, asked): three fold scores per C around mean_at(log10 C), and the values scored, in order."""
    asked = []

    def score_grid(values):
        asked.extend(float(v) for v in values)
        scores = np.array([[mean_at(np.log10(v)) + d for d in (-spread, 0.0, spread)] for v in values])
        return scores, np.ones(scores.shape, dtype=bool)

    return score_grid, asked


def test_decade_pass_stops_early_and_chooses_the_full_searchs_c():
    """A unimodal curve peaking at 10^-2.25 (a refined value): the stepwise search stops two decades past the best
    decade, skips the rest, and chooses the C of the search that scores every decade."""
    grid = 10.0 ** np.arange(-6, 6)
    score_grid, asked = recorded_curve(lambda x: 0.9 - 0.05 * (x + 2.25) ** 2)
    full = search(score_grid, grid, True, "accuracy", stepwise=False)
    asked.clear()
    stepwise = search(score_grid, grid, True, "accuracy", stepwise=True)
    assert stepwise.best == full.best == pytest.approx(10**-2.25)
    decades = [C for C in asked if C in grid]
    assert decades == list(grid[:7])  # up to 1e0: 1e-1 and 1e0 are the two clearly below the best, 1e-2
    assert list(stepwise.skipped) == list(grid[7:]) and stepwise.to_dict()["skipped"] == list(grid[7:])
    assert full.skipped == () and len(stepwise.grid) == len(full.grid) - 5


def test_a_plateau_of_ties_does_not_stop_the_decade_pass():
    """Tiny C predicts the majority class in every fold: equal scores are not worse, the pass goes on to the peak."""
    grid = 10.0 ** np.arange(-6, 4)
    score_grid, _ = recorded_curve(lambda x: 0.5 if x <= -3 else 0.9 - 0.1 * abs(x + 1))
    result = search(score_grid, grid, True, "accuracy", stepwise=True)
    assert result.best == pytest.approx(0.1) and list(result.skipped) == list(grid[8:])


def test_dips_within_the_fold_spread_do_not_stop_the_decade_pass():
    """Two decades below the best by less than its standard error over the folds are noise: the later, higher
    value is found. Clearly below (more than the error) twice in a row stops, even before a higher value (the
    curves of regularised linear heads have one peak; this one is built to show where the rule stops)."""
    grid = 10.0 ** np.arange(-3, 5)
    table = dict(zip(range(-3, 5), [0.80, 0.90, 0.895, 0.893, 0.91, 0.70, 0.70, 0.95]))
    score_grid, _ = recorded_curve(lambda x: table[round(x)] if np.isclose(x, round(x)) else 0.5, spread=0.03)
    result = search(score_grid, grid, False, "accuracy", stepwise=True)  # lists are scored as given, never stopped
    assert result.skipped == () and result.best == 1e4
    result = search(score_grid, grid, True, "accuracy", stepwise=True)
    assert result.best == 10.0 and list(result.skipped) == [1e4]


def test_stopping_early_chooses_the_c_of_the_full_search(tmp_path, monkeypatch):
    """240 training rows of 300 features, class signal in 4 of them: large C overfits, so the torch solver's decade
    pass stops before the last decades, and the C it chooses is the one scoring every decade chooses. The
    scikit-learn path scores every decade (in one call to its fold workers)."""
    import featx.heads.cv as cv

    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    X = rng.normal(size=(300, 300)).astype(np.float32)
    X[:, :4] += rng.normal(size=(3, 4))[y] * 0.9
    write_rows(tmp_path / "wide.h5", X, y, extra_tap=False)
    stepwise = fit_head(tmp_path / "wide.h5", "avgpool", solver="torch", plots=False)
    sklearn = fit_head(tmp_path / "wide.h5", "avgpool", solver="sklearn", plots=False)
    monkeypatch.setattr(cv, "PATIENCE", 10**9)
    full = fit_head(tmp_path / "wide.h5", "avgpool", solver="torch", plots=False)
    for every_decade in (full, sklearn):
        assert every_decade.metrics["cv"]["skipped"] == [] and len(every_decade.metrics["cv"]["grid"]) == 18
    skipped = stepwise.metrics["cv"]["skipped"]
    assert skipped and min(skipped) > stepwise.C and len(stepwise.metrics["cv"]["grid"]) == 18 - len(skipped)
    assert stepwise.C == full.C == sklearn.C


def test_large_stores_are_cross_validated_on_three_folds_unless_told(tmp_path, monkeypatch):
    from featx.heads import cv

    blob_store(tmp_path / "s.h5")
    assert fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1", plots=False).metrics["cv"]["folds"] == cv.FOLDS
    monkeypatch.setattr(cv, "FEW_FOLDS_FROM", 10)  # this store's training rows count as many
    assert fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1", plots=False).metrics["cv"]["folds"] == 3
    assert fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1", folds=4, plots=False).metrics["cv"]["folds"] == 4
