"""featx.fit_head, featx.predict and featx.evaluate: one call for every kind of head.

A head predicts classes or values from rows (featx.heads), or the class of every pixel from maps (featx.segment's
dense probe). These functions choose the kind, by the call's `task` (fit_head) or by the head folder (predict,
evaluate), so that a Python caller and the command line take the same path; the CLI parses options and prints
what comes back. An option of the other kind given with a value of its own is one OptionError line.
"""
from __future__ import annotations

import inspect
import os

from .options import OptionError
from .segment import is_segment_head

SHARED_PREDICT = ("store", "weights", "batch_size", "device", "workers", "progress", "log")


def fit_head(data, tap: str | list[str] | None = None, output=None, *, task: str = "classify", masks=None, binary: bool = False,
             num_classes: int | None = None, pixels_per_image: int = 256, **options):
    """Fit a head on the rows of `tap` in `data` and return it (saved to `output` when given).

    task 'classify' (default): featx.heads.api.fit_head with `options` (classes, or values for float targets).
    task 'segment': the dense per-pixel probe on the maps of a `--pooling none` store (`tap` may be a list: the
    maps of several taps, fused at the finest one's size) against the image + mask pairs `masks`
    (featx.segment.probe.fit_dense_probe: `binary`, `num_classes`, `pixels_per_image`, and the
    search options grid, folds, normalize, val_split, seed, n_jobs, overwrite).
    """
    from .heads.api import fit_head as fit_rows_head
    from .heads.options import FitHeadOptions

    checked = FitHeadOptions.of({**options, "task": task, "masks": masks, "binary": binary,
                                 "num_classes": num_classes, "pixels_per_image": pixels_per_image})
    options = {**options, **checked.to_dict()}  # an unknown keyword stays: a TypeError, as Python's own
    defaults = FitHeadOptions.defaults()
    segment_only = FitHeadOptions.names(fits="segment")
    task, masks = options.pop("task"), options["masks"]
    taps = [tap] if tap is None or isinstance(tap, str) else list(tap) or [None]
    if task == "classify":
        given = _given({name: options.pop(name) for name in segment_only}, defaults)
        if given:
            raise OptionError(f"{_fields(given)}: segmentation options, they need {{task=}}", task="segment")
        if len(taps) > 1:
            raise OptionError("{tap=}: a classification head reads one tap; several taps are for {task=segment}",
                              tap=taps)
        return fit_rows_head(data, taps[0], output, **options)
    if not masks:
        raise OptionError("{task=}: give the image + mask pairs with {masks=MASKS}", task=task)
    shared = FitHeadOptions.names(fits="both")
    others = _given({k: v for k, v in options.items() if k not in shared + segment_only
                     and (k, v) != ("solver", "sklearn")}, defaults)
    if others:
        raise OptionError(f"{_fields(others)}: not for a segmentation head (the dense probe fits a logistic "
                          f"regression with scikit-learn); drop them")
    from .segment.probe import fit_dense_probe

    kept = {k: v for k, v in options.items() if k in shared and (k, v) != ("normalize", None)}  # None: default
    segment = {k: options[k] for k in segment_only if k != "masks"}
    return fit_dense_probe(data, masks, output, tap=taps if len(taps) > 1 else taps[0], **segment, **kept)


def predict(head, data, output=None, *, overlay=None, **options):
    """Apply `head` (a Head or a head folder) to `data`.

    A classification or regression head: featx.heads.prediction.predict with `options`; returns Predictions
    (`output` is not used: the caller writes them). A segmentation head: mask PNGs of `data` in the folder
    `output` (required), and with `overlay` the images with their masks blended in
    (featx.segment.probe.predict_dense); returns {written, output, overlay, failed}.
    """
    from .heads.options import PredictOptions
    from .heads.prediction import predict as predict_rows

    PredictOptions.of({**options, "overlay": overlay})  # an OptionError for a value an option does not take
    if not _is_segment(head):
        if overlay:
            raise OptionError("{overlay}: {path} is not a segmentation head; overlays show predicted masks", path=head)
        return predict_rows(head, data, **options)
    if not output:
        raise OptionError("{path} is a segmentation head: give the folder for its mask PNGs with {output=DIR}",
                          path=head)
    others = _given({k: v for k, v in options.items() if k not in SHARED_PREDICT}, _defaults(predict_rows))
    if others:
        raise OptionError(f"{_fields(others)}: not for a segmentation head, which predicts masks of images")
    from .segment.probe import predict_dense

    shared = {k: v for k, v in options.items() if k in SHARED_PREDICT}
    return predict_dense(head, data, output, overlay=overlay, **shared)


def evaluate(head, data, *, masks=None, split: str | None = None, **options) -> dict:
    """Metrics of `head` (a Head or a head folder) on the labelled rows of `data`.

    A classification or regression head: featx.heads.api.evaluate with `split` and `options`. A segmentation
    head: pixel accuracy, mean IoU, Dice and per-class IoU on the rows of the store `data` against the image + mask
    pairs `masks` (required; featx.segment.probe.evaluate_dense). Returns the metrics dict."""
    from .heads.api import evaluate as evaluate_rows
    from .heads.options import EvaluateOptions

    EvaluateOptions.of({**options, "masks": masks, "split": split})  # an OptionError for a value out of range
    if not _is_segment(head):
        if masks:
            raise OptionError("{masks}: {path} is not a segmentation head (fit one with featx.fit_head(..., "
                              "task='segment') / `featx fit-head --task segment`)",
                              path=head)
        return evaluate_rows(head, data, split=split, **options)
    if not masks:
        raise OptionError("{path} is a segmentation head: give the store's masks with {masks=MASKS}", path=head)
    others = _given({k: v for k, v in options.items() if k not in ("progress", "log")}, _defaults(evaluate_rows))
    if others:
        raise OptionError(f"{_fields(others)}: not for a segmentation head, which is evaluated on a store's maps")
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


def _fields(names: list[str]) -> str:
    """The parameters `names` as OptionError fields (each read as the caller spells it)."""
    return ", ".join("{%s}" % name for name in names)
