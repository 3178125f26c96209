"""Metrics of a head on labelled rows, and the table the CLI prints.

Classification: accuracy, balanced accuracy, macro F1, per-class precision / recall / F1 / support and the
confusion matrix (rows = true class, columns = predicted). Regression: R², MAE, RMSE.
"""
from __future__ import annotations

import numpy as np

from .cv import confusion_score

MAX_CONFUSION_CLASSES = 20  # larger confusion matrices go to the PNG and metrics.json only


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """Metrics from true and predicted class names; `labels` orders the per-class entries and the matrix."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": confusion_score(confusion, "accuracy"),
        "balanced_accuracy": confusion_score(confusion, "balanced_accuracy"),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "classes": list(labels),
        "confusion_matrix": confusion.tolist(),
    }


def regression_metrics(y_true, y_pred) -> dict:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    return {
        "r2": float(r2_score(y_true, y_pred)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
    }


def metrics_table(metrics: dict) -> str:
    """The human-readable report of a fit or an evaluation."""
    lines = []
    if "fit_seconds" in metrics:
        lines.append(
            f"head       {metrics['head']} on {metrics['tap']} ({metrics['n_features']} features), "
            f"{metrics['rows']['train']} training rows, fit in {metrics['fit_seconds']:.2f} s"
        )
    cv = metrics.get("cv")
    if cv:
        best = cv["grid"].index(cv["best"])
        skipped = cv.get("skipped")
        past_peak = f"; {len(skipped)} larger values skipped past the peak" if skipped else ""
        lines.append(
            f"C          {cv['best']:.3g}  ({cv['folds']}-fold CV {cv['scoring']} {cv['mean'][best]:.4f} "
            f"± {cv['std'][best]:.4f}; {len(cv['grid'])} values from {cv['grid'][0]:.0e} to {cv['grid'][-1]:.0e}"
            f"{past_peak})"
        )
    elif metrics.get("neighbors") is not None:
        lines.append(f"k-NN       k {metrics['neighbors']}, temperature {metrics['temperature']:.3g}  (no C)")
    elif metrics.get("C") is not None:
        lines.append(f"C          {metrics['C']:.3g}  (given, no cross-validation)")
    lines += _convergence(metrics)
    if not metrics.get("rows", {}).get("eval"):
        lines.append("evaluated  no rows held out")
        return "\n".join(lines)
    lines.append(f"evaluated  on {metrics['evaluated_on']}, {metrics['rows']['eval']} rows")
    if "r2" in metrics:
        lines += [f"R²         {metrics['r2']:.4f}", f"MAE        {metrics['mae']:.4g}",
                  f"RMSE       {metrics['rmse']:.4g}"]
        return "\n".join(lines)
    lines += [
        f"accuracy   {metrics['accuracy']:.4f}",
        f"balanced   {metrics['balanced_accuracy']:.4f}",
        f"macro F1   {metrics['macro_f1']:.4f}",
        "",
        _per_class(metrics),
    ]
    if len(metrics["classes"]) <= MAX_CONFUSION_CLASSES:
        lines += ["", _confusion(metrics)]
    return "\n".join(lines)


def _convergence(metrics: dict) -> list[str]:
    """Lines on fits that stopped at their solver's iteration limit: in the CV grid, and the final refit."""
    lines = []
    cv = metrics.get("cv") or {}
    failed = [(C, n) for C, n in zip(cv.get("grid", []), cv.get("not_converged", [])) if n]
    if failed:
        shown = ", ".join(f"{C:.3g} ({n}/{cv['folds']} folds)" for C, n in failed[:6])
        more = f" and {len(failed) - 6} more" if len(failed) > 6 else ""
        lines.append(f"warning    not converged in CV at C = {shown}{more}: those scores depend on the iteration "
                     f"limit")
    if metrics.get("converged") is False:
        lines.append(f"warning    the final fit at C = {metrics['C']:.3g} did not converge (iteration limit reached)")
    return lines


def _per_class(metrics: dict) -> str:
    width = max(5, *(len(name) for name in metrics["classes"]))
    rows = [f"{'class':<{width}}  precision  recall  f1      support"]
    for name, m in metrics["per_class"].items():
        rows.append(f"{name:<{width}}  {m['precision']:<9.4f}  {m['recall']:<6.4f}  {m['f1']:<6.4f}  {m['support']}")
    return "\n".join(rows)


def _confusion(metrics: dict) -> str:
    names = metrics["classes"]
    matrix = np.asarray(metrics["confusion_matrix"])
    width = max(5, *(len(name) for name in names))
    cell = max(len(str(matrix.max())), *(len(name) for name in names)) + 1
    rows = ["confusion (rows: true class, columns: predicted)", " " * width + "".join(f"{n:>{cell}}" for n in names)]
    for name, counts in zip(names, matrix):
        rows.append(f"{name:<{width}}" + "".join(f"{c:>{cell}}" for c in counts))
    return "\n".join(rows)
