"""Optimizer with discriminative learning rates (backbone vs head) and a per-step schedule with warmup.

Schedules, stepped once per batch: cosine (to zero), step (x0.1 after each third of the run), onecycle
(torch's OneCycleLR; --warmup sets its rising phase, 30% by default) and none (constant). --warmup rises
linearly to the base rates first.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from ..options import OptionError
from .choices import WARMUP_HELP
from .freezing import in_module

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0, "adamw": 1e-2}
DEFAULT_MOMENTUM = 0.9  # SGD momentum, Adam's beta1


def parse_warmup(spec) -> tuple[float, str]:
    """'2' / 2 -> (2.0, 'epochs'); '300steps' -> (300.0, 'steps')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(steps?|epochs?)?\s*", str(spec))
    if not match:
        raise OptionError("{warmup=}: expected {help}", warmup=spec, help=WARMUP_HELP)
    unit = "steps" if (match.group(2) or "").startswith("step") else "epochs"
    return float(match.group(1)), unit


def warmup_steps(spec, steps_per_epoch: int, total_steps: int) -> int:
    """The warmup in optimizer steps; OptionError when it is not shorter than the run."""
    value, unit = parse_warmup(spec)
    steps = int(round(value if unit == "steps" else value * steps_per_epoch))
    if steps and steps >= total_steps:
        raise OptionError("{warmup=}: {steps} steps, but the whole run has only {total}", warmup=spec, steps=steps,
                          total=total_steps)
    return steps


def build_optimizer(model: nn.Module, head_path: str, name: str, lr: float, backbone_lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Two param groups, 'backbone' at `backbone_lr` and 'head' at `lr`, holding every parameter (frozen too)."""
    head, backbone = [], []
    for pname, param in model.named_parameters():
        (head if in_module(pname, head_path) else backbone).append(param)
    groups = [
        {"params": backbone, "lr": backbone_lr, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(groups, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: int,
                    done_steps: int = 0) -> LRScheduler:
    """A scheduler stepped after every optimizer step, `warmup` steps of linear warmup first.

    done_steps > 0: the scheduler of a run that has taken that many steps already, whose optimizer state is loaded
    (its param groups hold the base rates): the next step's rates are this schedule's at step `done_steps`.
    """
    last = done_steps - 1 if done_steps > 0 else -1
    if schedule == "onecycle":
        return OneCycleLR(
            optimizer, max_lr=[group.get("max_lr", group["lr"]) for group in optimizer.param_groups],
            total_steps=max(total_steps, 2), pct_start=warmup / total_steps if warmup else 0.3, last_epoch=last,
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "step":
            return 0.1 ** min(int(3 * progress), 2)
        return 1.0

    return LambdaLR(optimizer, factor, last_epoch=last)


def run_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup, epochs: int, steps_per_epoch: int,
                  done_steps: int = 0) -> LRScheduler:
    """The scheduler of an `epochs`-epoch run (warmup as --warmup gives it), continued after `done_steps` steps."""
    total = epochs * steps_per_epoch
    return build_scheduler(optimizer, schedule, total, warmup_steps(warmup, steps_per_epoch, total), done_steps)
