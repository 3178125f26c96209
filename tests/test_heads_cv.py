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
