"""Finetuning: a torchvision backbone with a new head, trained end to end or in part.

    choices.py     the option lists and help texts (no torch: the CLI's option table loads them)
    options.py     the training options, checked, with defaults
    heads.py       the new head (linear or MLP) put where the architecture's classifier is
    probe.py       warm start of the head from a linear head fitted by `featx fit-head`
    freezing.py    --freeze strategies, frozen BatchNorm layers, the trainable/frozen table
    optim.py       optimizer with backbone / head learning rates, schedules with warmup
    data.py        train / val split, augmentation, loaders with a seed-determined order
    loop.py        one training epoch, one validation pass
    train.py       the epoch loop: unfreeze, save, early stop, resume state
    checkpoint.py  the run folder: atomic files, RNG states, the lock
    report.py      metrics rows, the epoch summary line, curves.png
    task.py        what a task supplies (data, model, loaders, loss, metrics) and the one trainer builder
    classify.py    the classification task and its model
    segment.py     the segmentation task (featx.segment's masks, decoder and metrics): loss, totals, preview PNG
    api.py         finetune() and its FinetuneResult
"""
from __future__ import annotations

__all__ = ["finetune", "FinetuneResult"]


def __getattr__(name: str):
    """Import the training stack on first use, so that the CLI's option tables load without it."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'featx.finetuning' has no attribute {name!r}")
