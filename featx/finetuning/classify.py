"""Classification finetuning: an image folder's classes, a new linear or MLP head where the classifier was,
cross-entropy with optional label smoothing."""
from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone, classifier_path
from ..options import OptionError
from ..sources import load_source
from .data import Splits, make_loader, split_items
from .heads import parse_head, replace_classifier
from .options import TrainOptions
from .probe import check_probe_features, init_from_probe
from .task import Task


class ClassifyTask(Task):
    """Classification: `init_head` is a head folder written by `featx fit-head` that warm-starts the new head."""

    name = "classify"
    uses_decoded_cache = True

    def __init__(self, init_head=None):
        self.init_head = init_head

    def load(self, data, opts: TrainOptions, log) -> tuple[str, Splits]:
        source = load_source(data)
        return source.description, split_items(source, opts.val_split, opts.seed)

    def build_model(self, bb: Backbone, splits: Splits, crop: int, opts: TrainOptions, log) -> tuple[nn.Module, str]:
        return build_model(bb, splits.classes, opts.head, crop, self.init_head, log)

    def loaders(self, splits: Splits, spec, opts: TrainOptions, loader_args: dict):
        train = make_loader(splits.train, spec, opts.augment, train=True, decode=opts.decode, **loader_args)
        val = make_loader(splits.val, spec, "none", train=False, decode=opts.decode, **loader_args) \
            if splits.val else None
        return train, val

    def head_name(self, opts: TrainOptions) -> str:
        return opts.head

    def trainer_options(self, splits: Splits, opts: TrainOptions) -> dict:
        smoothing = opts.label_smoothing
        return {"criterion": nn.CrossEntropyLoss(label_smoothing=smoothing),
                "loss_name": "cross-entropy" + (f" (label smoothing {smoothing:g})" if smoothing else "")}


def build_model(bb: Backbone, classes: list[str], head: str = "linear", crop: int | None = None, init_head=None,
                log=None) -> tuple[nn.Module, str]:
    """`bb.model` with its classifier replaced by a new `head` for `classes` (warm-started from the linear head
    folder `init_head` when given), checked to run on `crop` px inputs; returns (model, dotted name of the head)."""
    log = log or (lambda line: None)
    crop = crop or bb.transform.crop
    model = bb.model
    _dry_run(model, bb.name, crop)
    head_path = classifier_path(model)
    probe = None
    if init_head is not None:
        from ..heads import load_head

        probe = load_head(init_head)
        check_probe_features(probe, bb, crop)
    new_head = replace_classifier(model, head_path, parse_head(head), len(classes))
    if probe is not None:
        init_from_probe(new_head, probe, classes)
        log(f"head {head_path} initialised from the probe {probe.path}")
    return model, head_path


def _dry_run(model: nn.Module, name: str, size: int) -> None:
    """Fail fast, before any image is decoded, when the model cannot take this input size."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, size, size))
    except Exception as err:  # noqa: BLE001 - shape errors, traced asserts (ViT), too-small maps: all say the size
        raise OptionError("backbone {name} cannot run on {size}x{size} inputs ({reason}): check {image_size}",
                          name=name, size=size, reason=str(err).splitlines()[0][:150]) from err
