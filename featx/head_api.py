"""featx.fit_head, featx.predict and featx.evaluate: one call for every kind of head.

A head predicts classes or values from rows (featx.heads), or the class of every pixel from maps (featx.segment's
dense probe). These functions choose the kind, by the call's `task` (fit_head) or by the head folder (predict,
evaluate), so that a Python caller and the command line take the same path; the CLI parses options and prints
what comes back. An option of the other kind given with a value of its own is one FeatxError line.
"""
from __future__ import annotations

import inspect
import os

from .errors import FeatxError
from .segment import is_segment_head

TASKS = ("classify", "segment")  # fit_head's task
# Options of the segmentation probe, with their defaults; the classification heads take none of them.
SEGMENT_FIT = {"masks": None, "binary": False, "num_classes": None, "pixels_per_image": 256}
# Options that both kinds take, passed to the segmentation probe as they are.
SHARED_FIT = ("grid", "folds", "normalize", "val_split", "seed", "n_jobs", "overwrite")
SHARED_PREDICT = ("store", "weights", "batch_size", "device", "workers", "progress", "log")


def fit_head(data, tap: str | list[str] | None = None, output=None, *, task: str = "classify", masks=None, binary: bool = False,
             num_classes: int | None = None, pixels_per_image: int = 256, **options):
    """Fit a head on the rows of `tap` in `data` and return it (saved to `output` when given).

    task 'classify' (default): featx.heads.api.fit_head with `options` (classes, or values for float targets).
    task 'segment': the dense per-pixel probe on the maps of a `--pooling none` store (`tap` may be a list: the
    maps of several taps, fused at the finest one's size) against the image + mask pairs `masks` (featx.segment.probe.fit_dense_probe: `binary`, `num_classes`, `pixels_per_image`, and the
    search options grid, folds, normalize, val_split, seed, n_jobs, overwrite).
    """
    from .heads.api import fit_head as fit_rows_head

    taps = [tap] if tap is None or isinstance(tap, str) else list(tap) or [None]
    segment = {"masks": masks, "binary": binary, "num_classes": num_classes, "pixels_per_image": pixels_per_image}
    if task == "classify":
        given = _given(segment, SEGMENT_FIT)
        if given:
            raise FeatxError(f"{_flags(given)}: segmentation options, they need --task segment")
        if len(taps) > 1:
            raise FeatxError(f"-l {' -l '.join(map(str, taps))}: a classification head reads one tap; several taps "
                             f"are for --task segment")
        return fit_rows_head(data, taps[0], output, **options)
    if task != "segment":
        raise FeatxError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if not masks:
        raise FeatxError("fit-head --task segment: give the masks with --masks MASKS")
    others = _given({k: v for k, v in options.items() if k not in SHARED_FIT and (k, v) != ("solver", "sklearn")},
                    _defaults(fit_rows_head))
    if others:
        raise FeatxError(f"{_flags(others)}: not for a segmentation head (the dense probe fits a logistic "
                         f"regression with scikit-learn); drop them")
    from .segment.probe import fit_dense_probe

    shared = {k: v for k, v in options.items() if k in SHARED_FIT and (k, v) != ("normalize", None)}  # None: default
    return fit_dense_probe(data, masks, output, tap=taps if len(taps) > 1 else taps[0], binary=binary, num_classes=num_classes,
                           pixels_per_image=pixels_per_image, **shared)


def predict(head, data, output=None, *, overlay=None, **options):
    """Apply `head` (a Head or a head folder) to `data`.

    A classification or regression head: featx.heads.prediction.predict with `options`; returns Predictions
    (`output` is not used: the caller writes them). A segmentation head: mask PNGs of `data` in the folder
    `output` (required), and with `overlay` the images with their masks blended in
    (featx.segment.probe.predict_dense); returns {written, output, overlay, failed}.
    """
    from .heads.prediction import predict as predict_rows

    if not _is_segment(head):
        if overlay:
            raise FeatxError(f"--overlay: {head} is not a segmentation head; overlays show predicted masks")
        return predict_rows(head, data, **options)
    if not output:
        raise FeatxError(f"{head} is a segmentation head: give the folder for its mask PNGs with -o DIR")
    others = _given({k: v for k, v in options.items() if k not in SHARED_PREDICT}, _defaults(predict_rows))
    if others:
        raise FeatxError(f"{_flags(others)}: not for a segmentation head, which predicts masks of images")
    from .segment.probe import predict_dense

    shared = {k: v for k, v in options.items() if k in SHARED_PREDICT}
    return predict_dense(head, data, output, overlay=overlay, **shared)


def evaluate(head, data, *, masks=None, split: str | None = None, **options) -> dict:
    """Metrics of `head` (a Head or a head folder) on the labelled rows of `data`.

    A classification or regression head: featx.heads.api.evaluate with `split` and `options`. A segmentation
    head: pixel accuracy, mean IoU, Dice and per-class IoU on the rows of the store `data` against the image + mask
    pairs `masks` (required; featx.segment.probe.evaluate_dense). Returns the metrics dict."""
    from .heads.api import evaluate as evaluate_rows

    if not _is_segment(head):
        if masks:
            raise FeatxError(f"--masks: {head} is not a segmentation head (fit one with fit-head --task segment)")
        return evaluate_rows(head, data, split=split, **options)
    if not masks:
        raise FeatxError(f"{head} is a segmentation head: give the store's masks with --masks MASKS")
    others = _given({k: v for k, v in options.items() if k not in ("progress", "log")}, _defaults(evaluate_rows))
    if others:
        raise FeatxError(f"{_flags(others)}: not for a segmentation head, which is evaluated on a store's maps")
    from .segment.probe import evaluate_dense

    return evaluate_dense(head, data, masks, split=split)


def _is_segment(head) -> bool:
    """Whether `head` (a head folder, or a loaded head: segmentation heads carry `.segment`) predicts masks."""
    if isinstance(head, (str, os.PathLike)):
        return is_segment_head(head)
    return getattr(head, "segment", None) is not None


def _defaults(function) -> dict:
    """The keyword defaults of `function`."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _given(values: dict, defaults: dict) -> list[str]:
    """Names in `values` whose value is not their default (unknown names count as given)."""
    return [name for name, value in values.items() if name not in defaults or value != defaults[name]]


def _flags(names: list[str]) -> str:
    """The options' names as the command line spells them."""
    return ", ".join("--" + name.replace("_", "-") for name in names)
