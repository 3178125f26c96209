"""Which parameters train: the --freeze strategies, BatchNorm modes, and the trainable/frozen table.

Strategies (several --freeze values are combined, frozen = union):
    none            every parameter trains
    backbone        only the new head trains (the fixed feature extractor)
    until:LAYER     every parameter registered up to and including module LAYER (dotted names work) is frozen
    loaded          what came from the weights file is frozen; new modules (the head, unmatched layers) train
    PATTERN         parameter names matching an fnmatch pattern ('layer1.*', 'conv1*') are frozen, and so are the
                    parameters of modules matching it ('layer1', 'features.0')

Freezing sets requires_grad only: every parameter stays in the optimizer, so --unfreeze-at changes neither the
param groups, the scheduler nor the optimizer state.
"""
from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

from ..errors import FeatxError
from ..options import OptionError
from .choices import FREEZE_HELP


def frozen_parameters(model: nn.Module, specs, head_path: str, loaded: set[str] | None) -> set[str]:
    """Names of the parameters that the --freeze `specs` freeze.

    `head_path` is the dotted name of the new head (never frozen by 'backbone' or 'loaded'); `loaded` holds the
    parameter names that came from the weights file, None when nothing was loaded (-w none).
    """
    specs = [str(s).strip() for s in specs] or ["none"]
    if "none" in specs and len(specs) > 1:
        raise OptionError("{freeze=none} cannot be combined with {others}",
                          others=", ".join(s for s in specs if s != "none"))
    names = [name for name, _ in model.named_parameters()]
    in_head = {name for name in names if in_module(name, head_path)}
    frozen: set[str] = set()
    for spec in specs:
        if spec == "none":
            continue
        if spec == "backbone":
            frozen |= set(names) - in_head
        elif spec == "loaded":
            if loaded is None:
                raise OptionError("{freeze=loaded}: {weights=none} loads no weights, so nothing would be frozen")
            frozen |= (set(names) & loaded) - in_head
        elif spec.startswith("until:"):
            frozen |= _until(model, spec[len("until:"):].strip())
        else:
            frozen |= _matching(model, spec, names)
    if frozen and len(frozen) == len(names):
        raise OptionError("{freeze=} freezes every parameter: nothing would train", freeze=specs)
    return frozen


def loaded_parameters(bb) -> set[str] | None:
    """Parameter names whose values came from the weights of Backbone `bb`: the load report's matched keys for a
    weights file, every parameter for torchvision weights, None for -w none. The old classifier's names are in
    it: frozen_parameters never freezes the new head through 'loaded', even where its shapes match the file's."""
    if bb.load_report is not None:
        params = {name for name, _ in bb.model.named_parameters()}
        return set(bb.load_report.matched) & params
    if bb.weights_id == "none":
        return None
    return {name for name, _ in bb.model.named_parameters()}


def in_module(name: str, prefix: str) -> bool:
    """Whether dotted parameter/module `name` is module `prefix` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def _until(model: nn.Module, layer: str) -> set[str]:
    """Parameters of every module up to and including `layer`, in registration (pre-order) order."""
    if not layer:
        example = next((name for name, _ in model.named_children()), "")
        raise OptionError("{freeze=}: needs a module name, e.g. until:{example}; {names}", freeze="until:",
                          example=example, names=_module_names(model))
    frozen, reached = set(), False
    for name, module in model.named_modules():
        inside = in_module(name, layer)
        if reached and not inside:
            return frozen
        reached = reached or inside
        frozen |= {f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)}
    if not reached:
        raise OptionError("{freeze=}: no module named {layer!r}; {names}", freeze=f"until:{layer}", layer=layer,
                          names=_module_names(model, layer))
    return frozen


def _matching(model: nn.Module, pattern: str, names: list[str]) -> set[str]:
    """Parameter names matching the fnmatch `pattern`, or inside modules matching it ('layer1' = 'layer1.*')."""
    matched = {name for name in names
               if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")}
    if not matched:
        raise OptionError("{freeze=}: no parameter name matches (names look like {example}); expected {help}; {names}",
                          freeze=pattern, example=names[0], help=FREEZE_HELP, names=_module_names(model))
    return matched


def _module_names(model: nn.Module, near: str = "") -> str:
    """The module names to choose from: the children of the deepest existing module on the dotted path `near`."""
    modules = dict(model.named_modules())
    parent = ""
    for part in near.split(".")[:-1]:
        candidate = f"{parent}.{part}" if parent else part
        if candidate not in modules:
            break
        parent = candidate
    children = ", ".join(f"{parent}.{name}" if parent else name for name, _ in modules[parent].named_children())
    return f"modules in {parent}: {children}" if parent else f"top-level modules: {children}"


def set_frozen(model: nn.Module, frozen: set[str]) -> None:
    """requires_grad False for the `frozen` parameter names, True for the rest."""
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen (those keep eval mode, i.e. fixed statistics)."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
    ]


# Below this many images per batch BatchNorm keeps its running statistics: a few images give per-channel statistics
# too noisy to normalise with (a finetune at batch 8 can collapse to one class), which is why detection libraries
# freeze BatchNorm (torchvision's FrozenBatchNorm2d, detectron2's FrozenBN) at their few images per batch.
SMALL_BATCH = 16


def batch_norm_fixed(batch_size: int, train_bn: bool, from_probe: bool = False) -> bool:
    """Whether every BatchNorm layer keeps its running statistics (eval mode; its scale and shift still train):
    batches under SMALL_BATCH, or a head started from a probe (`from_probe`, --init-head: the probe was fitted on
    features normalised with the running statistics, and batch statistics feed it other features, so its logits
    are no longer the probe's), unless `train_bn`."""
    return (batch_size < SMALL_BATCH or from_probe) and not train_bn


def train_mode(model: nn.Module, train_bn: bool, batch_size: int = SMALL_BATCH, from_probe: bool = False) -> None:
    """model.train(), except BatchNorm layers whose running statistics stay fixed: the frozen ones (unless
    `train_bn`), and all of them when batch_norm_fixed(batch_size, train_bn, from_probe)."""
    model.train()
    if train_bn:
        return
    fixed = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if batch_norm_fixed(batch_size, train_bn, from_probe) else frozen_batchnorms(model)
    for module in fixed:
        module.eval()


def freeze_table(model: nn.Module) -> str:
    """Trainable and frozen parameter counts per top-level module, with a total line."""
    trainable, frozen, order = Counter(), Counter(), {}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        order.setdefault(top, len(order))
        (trainable if param.requires_grad else frozen)[top] += param.numel()
    rows = [(top, trainable[top], frozen[top]) for top in order]
    rows.append(("total", sum(trainable.values()), sum(frozen.values())))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    lines += [f"{top:<{width}}  {t:>12,}  {f:>12,}" for top, t, f in rows]
    return "\n".join(lines)
