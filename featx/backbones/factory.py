"""One factory over the model sources: `load_backbone` builds a model of any source (torchvision names bare,
`timm/<name>` from timm) with its weights and its eval transform.

`-w` (weights) is one of: the source's pretrained weights (a torchvision weights name such as `DEFAULT` or
`IMAGENET1K_V2`, a timm tag such as `DEFAULT` or `in1k`), loaded through that library's own cache; a path to a
local state dict or checkpoint, loaded into a seeded random model by key and shape (`match='name'`) or by position
(`match='order'`, for a file of the same architecture in another implementation's names); or `none`, the seeded
random model itself.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from ..errors import FeatxError
from ..options import OptionError
from ..taps import final_layer, model_label
from ..preprocess import TransformSpec
from .weights import (
    BN_COUNTER,
    LoadReport,
    check_weights_match,
    load_by_order,
    load_partial,
    looks_like_path,
    read_weights_file,
    sha256_file,
)

SEED = 0
DEFAULT_BACKBONE = "resnet50"  # -b when neither given nor recorded in the weights file
SOURCES = {"timm/": "featx.backbones.timm", "": "featx.backbones.torchvision"}  # prefix -> source, longest first


@dataclass
class Backbone:
    """A model ready for extraction (eval mode, CPU) with where its weights came from and its eval transform."""

    name: str  # 'resnet50' | 'timm/tf_efficientnet_lite0'
    model: nn.Module
    weights_id: str  # 'IMAGENET1K_V2' | 'in1k' | 'file:<basename>' | 'none'
    weights_sha256: str | None
    transform: TransformSpec
    load_report: LoadReport | None = None
    meta: dict = field(default_factory=dict)  # the 'featx' dict of a featx finetune model.pt
    weights_match: str = "name"  # how a weights file was paired with the model: 'name' | 'order'
    versions: dict = field(default_factory=dict)  # the model library's version when it is not torchvision
    weights_file: str | None = None  # the file the weights were read from (a torch hub cache file, or -w FILE)


def _source(name: str) -> tuple[ModuleType, str]:
    """(source module, architecture name within it) of a backbone name."""
    prefix = next(p for p in SOURCES if str(name).startswith(p))
    return importlib.import_module(SOURCES[prefix]), str(name)[len(prefix):]


LIST_BACKBONES = "featx.backbones.list_backbones() / `featx layers --list`"  # a hint: where every name is


def list_backbones() -> list[str]:
    """Every torchvision classification model name and, when timm is installed, every timm name (timm/...), sorted."""
    names = list(_source("")[0].names())
    timm_source = _source("timm/")[0]
    if importlib.util.find_spec("timm") is not None:
        names += [timm_source.PREFIX + name for name in timm_source.names()]
    return sorted(names)


def check_backbone(name: str) -> None:
    """OptionError with the closest names unless `name` is a model of its source (timm: needs timm installed)."""
    source, arch = _source(name)
    names = source.names()
    if arch in names:
        return
    close = [source.PREFIX + n for n in difflib.get_close_matches(arch.lower(), names, n=3, cutoff=0.5)]
    timm_name = _timm_name(source, arch)
    hint = ": it is a timm model, {backbone=}" if timm_name else ": did you mean {close}?" if close else ""
    tag = {"backbone": source.PREFIX + arch.partition(".")[0], "weights": arch.partition(".")[2]} \
        if source.PREFIX and "." in arch else {}
    raise OptionError("unknown backbone {name!r}" + hint + (" (a pretrained tag goes into the weights: {backbone=} "
                      "{weights=})" if tag else "") + f" ({LIST_BACKBONES} names them all)", name=name,
                      close=", ".join(close), **({"backbone": timm_name} if timm_name else tag))


def _timm_name(source: ModuleType, arch: str) -> str | None:
    """timm/NAME when a bare name is timm's (and timm is installed)."""
    timm_source = _source("timm/")[0]
    if source is timm_source or importlib.util.find_spec("timm") is None or arch not in timm_source.names():
        return None
    return timm_source.PREFIX + arch


def classifier_path(model: nn.Module) -> str:
    """Dotted name of the final classifier nn.Linear: 'fc', 'classifier.6', 'heads.head', timm's get_classifier()."""
    name = final_layer(model)
    if name is None or not isinstance(model.get_submodule(name), nn.Linear):
        raise FeatxError(
            f"{model_label(model)} has no nn.Linear classifier "
            f"(its last layer is {name or 'unknown'}): choose a backbone with a linear head"
        )
    return name


def _seeded(build):
    """Run `build()` under torch.manual_seed(SEED) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _set_classes(source: ModuleType, model: nn.Module, num_classes: int | None) -> None:
    """Give the classifier num_classes outputs (seeded, the source's own way) when it has another number."""
    if num_classes is None:
        return
    path = classifier_path(model)
    if model.get_submodule(path).out_features != num_classes:
        _seeded(lambda: source.set_classes(model, path, num_classes))


def _random_model(source: ModuleType, arch: str, num_classes: int | None) -> nn.Module:
    """The source's architecture with its own initialisation, seeded so every run gets the same model."""
    model = _seeded(lambda: source.build(arch))
    _set_classes(source, model, num_classes)
    return model


def _file_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the file's classifier when it is a Linear of another size than the model's."""
    name = final_layer(model)
    layer = model.get_submodule(name) if name else None
    weight = state_dict.get(f"{name}.weight")
    if not isinstance(layer, nn.Linear) or weight is None or weight.dim() != 2:
        return None
    rows, cols = weight.shape
    return rows if cols == layer.in_features and rows != layer.out_features else None


def _file_backbone(name: str | None, path: str, meta: dict) -> str:
    """The backbone for a weights file: `name`, else the one a featx model.pt records, else DEFAULT_BACKBONE.
    A name that contradicts the file's record is an OptionError naming both."""
    trained_on = meta.get("backbone")
    if name is not None and trained_on and trained_on != name:
        raise OptionError("{weights=}: was trained from backbone {trained_on}, not {backbone=$name} (drop {backbone} "
                          "to use {trained_on})", weights=path, name=name, trained_on=trained_on)
    return name or trained_on or DEFAULT_BACKBONE


def _from_file(source: ModuleType, name: str, arch: str, path: str, state_dict: dict[str, torch.Tensor], meta: dict,
               num_classes: int | None, match: str) -> Backbone:
    """A seeded random model with the file's tensors loaded into it, by key and shape or by position."""
    label = os.path.basename(path)
    if match == "order":
        model = _random_model(source, arch, meta.get("num_classes"))  # a featx model.pt has its own classes
        report = load_by_order(model, state_dict, weights=path, source=label)
        _set_classes(source, model, num_classes)
    else:
        model = _random_model(source, arch, num_classes)
        if num_classes is None:
            _set_classes(source, model, _file_classes(model, state_dict))
        report = load_partial(model, state_dict, source=label)
        if not report.matched:
            example = next(iter(state_dict))
            raise OptionError(
                "{weights=}: none of its {n} tensors fit {name} (keys like {example!r}): is it for another "
                "backbone? (a file in another implementation's names: {weights_match=order})", weights=path,
                n=len(state_dict), name=name, example=example)
    transform = _file_transform(path, meta) or source.transform(model)
    return Backbone(name, model.eval(), f"file:{label}", sha256_file(path), transform, report, meta, match,
                    source.versions(), os.path.realpath(path))


def _file_transform(path: str, meta: dict) -> TransformSpec | None:
    """The transform recorded in a featx model.pt, None when there is none."""
    if not isinstance(meta.get("transform"), dict):
        return None
    try:
        return TransformSpec.from_dict(meta["transform"])
    except (KeyError, TypeError, ValueError) as err:
        raise OptionError("{weights=}: its featx 'transform' entry is malformed ({err!r})", weights=path,
                          err=err) from err


def check_complete(bb: Backbone, weights: str) -> None:
    """One-line OptionError unless every tensor of the backbone, its classifier aside, came from the weights file
    `weights`: rows of a partly random backbone mean nothing (a file of another version or architecture)."""
    report = bb.load_report
    if report is None:
        return
    head = final_layer(bb.model)

    def in_backbone(key: str) -> bool:
        return (head is None or not key.startswith(head + ".")) and key.rsplit(".", 1)[-1] != BN_COUNTER

    mismatched = [entry for entry in report.mismatched if in_backbone(entry.split(":")[0])]
    missing = [key for key in report.missing if in_backbone(key)]
    if mismatched or missing:
        first = mismatched[0] if mismatched else f"{missing[0]} not in the file"
        raise OptionError(
            "{weights=}: does not fit {name} (a file of another version or architecture?): {mismatched} of its "
            "tensors have other shapes, {missing} are missing ({first}); features need every tensor of the backbone",
            weights=weights, name=bb.name, mismatched=len(mismatched), missing=len(missing), first=first)


def load_backbone(name: str | None = None, weights: str = "DEFAULT", *, num_classes: int | None = None,
                  match: str = "name") -> Backbone:
    """Build backbone `name` (a torchvision name, or timm/<name>) with `weights` (the source's pretrained weights
    name or tag, a path to a weights file, or 'none'), in eval mode on the CPU. `name` None: the backbone that a
    weights file written by `featx finetune` records, else DEFAULT_BACKBONE. `num_classes` replaces the
    classifier with a new Linear of that size; by default the classifier has the size the weights give it (a
    finetuned file's own number of classes). `match` pairs a weights file's tensors with the model's by key and
    shape ('name') or by position ('order')."""
    check_weights_match(match)
    given = name
    if given is not None:
        check_backbone(given)  # a wrong name is reported before a large weights file is read
    weights = str(weights)
    from_file = weights.lower() != "none" and looks_like_path(weights)
    if match == "order" and not from_file:
        raise OptionError("{weights_match=order}: pairs the tensors of a weights file ({weights=FILE}), not "
                          "{weights=}", weights=weights)
    if from_file:
        state_dict, meta = read_weights_file(weights)
    name = _file_backbone(given, weights, meta) if from_file else given or DEFAULT_BACKBONE
    if name != given:
        check_backbone(name)
    source, arch = _source(name)
    if weights.lower() == "none":
        model = _random_model(source, arch, num_classes).eval()
        backbone = Backbone(name, model, "none", None, source.transform(model), versions=source.versions())
    elif from_file:
        backbone = _from_file(source, name, arch, weights, state_dict, meta, num_classes, match)
    else:
        model, weights_id, path, transform = source.pretrained(arch, weights)
        _set_classes(source, model, num_classes)
        backbone = Backbone(name, model.eval(), weights_id, sha256_file(path), transform,
                            versions=source.versions(), weights_file=os.path.realpath(path))
    backbone.model.featx_backbone = name  # names the model in error messages of featx.layers
    return backbone
