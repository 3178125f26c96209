"""Warm start from a probe (--init-head HEAD_DIR): a linear head fitted by `featx fit-head` becomes the new head.

The head folder is read without running code (head.json + its arrays). Its standardization folds into the Linear
layer, W' = W / scale and b' = b - W' @ mean, so at step 0 the network's logits are the probe's decision function;
a binary probe's single score s becomes the logits (-s/2, s/2), whose softmax is the probe's sigmoid(s).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..options import OptionError
from ..taps import check_taps, feature_extractor, is_channels_last, penultimate_node
from ..pooling import pool

FOLDABLE = ("standard", "none")


def probe_weights(head, classes: list[str], in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of the Linear layer equivalent to a fitted linear head for `classes`."""
    where = {"init_head": str(head.path)}
    if head.model != "linear" or head.task != "classification":
        raise OptionError("{init_head=}: a {kind} head ({task}); expected a linear classification head", **where,
                          kind=head.kind, task=head.task)
    if head.normalize not in FOLDABLE:
        raise OptionError("{init_head=}: the head normalizes rows with {normalize!r}, which no Linear layer can "
                          "reproduce; fit the probe with featx.fit_head(..., normalize='standard') / "
                          "`featx fit-head --normalize standard` (or 'none')", **where,
                          normalize=head.normalize)
    probe_classes = [str(c) for c in head.classes_]
    if probe_classes != list(classes):
        raise OptionError("{init_head=}: the head's classes {probe} differ from the data's {data}", **where,
                          probe=probe_classes, data=list(classes))
    if head.n_features_in_ != in_features:
        raise OptionError("{init_head=}: the head takes {n} features, the classifier input has {in_features}", **where,
                          n=head.n_features_in_, in_features=in_features)
    arrays = head.estimator.arrays
    weight = np.asarray(arrays["coef"], dtype=np.float64).reshape(-1, in_features)
    bias = np.asarray(arrays["intercept"], dtype=np.float64).reshape(-1)
    if weight.shape[0] == 1 and len(classes) == 2:
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    if head.normalize == "standard":
        weight = weight / np.asarray(arrays["scale"], dtype=np.float64)
        bias = bias - weight @ np.asarray(arrays["mean"], dtype=np.float64)
    return weight, bias


def check_probe_features(head, bb, size: int) -> None:
    """Refuse a probe fitted on other features than those feeding the classifier of backbone `bb`: another
    backbone, other weights, or a tap whose pooled rows are not the classifier's input (checked numerically on a
    seeded random batch of `size` px images, so 'avgpool' and 'flatten' of a ResNet are both accepted)."""
    where = {"init_head": str(head.path)}
    config = head.config or {}
    if not config:
        raise OptionError("{init_head=}: the head was fitted on a foreign feature file; a featx store is needed to "
                          "check its tap", **where)
    if config.get("backbone") != bb.name:
        raise OptionError("{init_head=}: fitted on {probe} features, the finetune backbone is {name}", **where,
                          probe=config.get("backbone"), name=bb.name)
    if config.get("weights_sha256") != bb.weights_sha256 or config.get("weights_match", "name") != bb.weights_match:
        raise OptionError("{init_head=}: fitted on features of weights {probe} ({weights_match=%s}), not of the "
                          "weights being finetuned ({id}, {weights_match=})" % config.get("weights_match", "name"),
                          **where, probe=config.get("weights"), id=bb.weights_id, weights_match=bb.weights_match)
    pooling, token_pool = config.get("pooling", "avg"), config.get("token_pool", "cls")
    check_taps(bb.model, [head.tap])
    feeds = penultimate_node(bb.model)
    if not _same_rows(bb.model, head.tap, pooling, token_pool, feeds, size):
        raise OptionError("{init_head=}: fitted on tap {tap!r} with pooling {pooling}, which is not what feeds the "
                          "classifier: fit the probe on a store extracted with featx.extract(..., taps={feeds!r}) / "
                          "`featx extract -l {feeds}`", **where, tap=head.tap,
                          pooling=pooling, feeds=feeds)


@torch.no_grad()
def _same_rows(model: nn.Module, tap: str, pooling: str, token_pool: str, feeds: str, size: int) -> bool:
    """Whether the pooled rows of `tap` equal the classifier's input `feeds` on a seeded random batch."""
    if tap == feeds:
        return True
    extractor = feature_extractor(model.eval(), {feeds: "feeds", tap: "tap"})
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = extractor(x)
    rows = pool(out["tap"], pooling, token_pool, is_channels_last(model, tap))
    target = out["feeds"].float().flatten(1)
    return rows.shape == target.shape and torch.allclose(rows, target, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def init_from_probe(linear: nn.Module, head, classes: list[str]) -> None:
    """Copy the fitted head into the new Linear layer (see probe_weights)."""
    if not isinstance(linear, nn.Linear):
        raise OptionError("{init_head=}: needs {head=linear} (the probe is a linear head)", init_head=str(head.path))
    weight, bias = probe_weights(head, classes, linear.in_features)
    linear.weight.copy_(torch.from_numpy(weight))
    linear.bias.copy_(torch.from_numpy(bias))
