"""One trainer builder for every finetuning task.

A task (classification in `classify.py`, segmentation in `segment.py`) supplies what differs: its data
and split, the model around the backbone, the loaders, the loss and metrics, and the fields it adds to config.json
and model.pt. `build_trainer` does the steps they share, in one order: seeding, freezing, the device, the
optimizer and schedule, the recorded config and the Trainer.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import torchvision
from torch import nn

from .. import __version__
from ..backbones import Backbone
from ..options import OptionError
from ..runtime import Runtime, default_workers, prepare_model
from .checkpoint import RunDir, seed_everything
from .data import Splits
from .freezing import freeze_table, frozen_parameters, loaded_parameters, set_frozen
from .optim import build_optimizer, run_scheduler
from .options import TrainOptions
from .train import Trainer


class Task:
    """What one kind of finetuning supplies to `build_trainer`; subclasses fill in each step."""

    name = ""
    unit = "images"  # what one training example is called in messages
    uses_decoded_cache = False  # whether the loaders can keep decoded pixels (featx.finetuning.decoded)
    trainer_class = Trainer

    def load(self, data, opts: TrainOptions, log) -> tuple[str, Splits]:
        """The data's description and its train / val split."""
        raise NotImplementedError

    def build_model(self, bb: Backbone, splits: Splits, crop: int, opts: TrainOptions, log) -> tuple[nn.Module, str]:
        """The model to train around the loaded backbone, and the dotted name of its new head."""
        raise NotImplementedError

    def loaders(self, splits: Splits, spec, opts: TrainOptions, loader_args: dict):
        """The train loader and the val loader (None without validation)."""
        raise NotImplementedError

    def head_name(self, opts: TrainOptions) -> str:
        """The head recorded in model.pt."""
        raise NotImplementedError

    def record(self, splits: Splits) -> dict:
        """Fields this task adds to config.json and model.pt (none for classification)."""
        return {}

    def trainer_options(self, splits: Splits, opts: TrainOptions) -> dict:
        """The Trainer's criterion and metric arguments."""
        raise NotImplementedError


def build_trainer(task: Task, data, bb: Backbone, weights, init_head, opts: TrainOptions, runtime: Runtime, workers,
                  run: RunDir, progress: bool, log, cache=None) -> Trainer:
    """Load the data, put the task's head on the backbone, freeze, and build the loaders, optimizer and schedule."""
    description, splits = task.load(data, opts, log)
    if opts.batch_size > len(splits.train):
        raise OptionError("{batch_size=}: larger than the {n} training {unit}", batch_size=opts.batch_size,
                          n=len(splits.train), unit=task.unit)
    log(f"data: {description}; validation: {splits.how}")
    report = bb.load_report
    if report is not None:
        log(report.summary())
        if report.missing or report.unexpected or report.mismatched:
            log(report.details())
    spec = bb.transform.with_sizes(opts.image_size)
    seed_everything(opts.seed)
    loaded = loaded_parameters(bb)
    model, head_path = task.build_model(bb, splits, spec.crop, opts, log)
    frozen = frozen_parameters(model, opts.freeze, head_path, loaded)
    set_frozen(model, frozen)
    log(freeze_table(model))
    model = prepare_model(model, runtime)

    workers = default_workers() if workers is None else workers
    loader_args = dict(batch_size=opts.batch_size, workers=workers, seed=opts.seed, pin_memory=runtime.is_cuda)
    if task.uses_decoded_cache:
        loader_args["cache"] = cache
    train_loader, val_loader = task.loaders(splits, spec, opts, loader_args)
    optimizer = build_optimizer(model, head_path, opts.optimizer, opts.lr, opts.backbone_lr, opts.momentum,
                                opts.weight_decay)
    schedule = functools.partial(run_scheduler, optimizer, opts.schedule, opts.warmup, opts.epochs, len(train_loader))
    extra = task.record(splits)
    config = {**run_config(data, bb, weights, init_head, opts, splits, description, spec, runtime, head_path,
                           workers), **extra}
    meta = {
        "backbone": bb.name, "classes": splits.classes, "num_classes": len(splits.classes),
        "head": task.head_name(opts), "classifier": head_path, "transform": spec.to_dict(), "decode": opts.decode,
        "weights_id": bb.weights_id, "weights_sha256": bb.weights_sha256, "weights_match": bb.weights_match,
        "featx_version": __version__, **extra,
    }
    return task.trainer_class(
        model=model, optimizer=optimizer, scheduler=schedule(), reschedule=schedule,
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16"),
        train_loader=train_loader, val_loader=val_loader, spec=spec, runtime=runtime, frozen=frozen,
        unfreeze_at=opts.unfreeze_at, train_bn=opts.train_bn, epochs=opts.epochs, early_stop=opts.early_stop, run=run,
        config=config, model_meta=meta, progress=progress, log=log, **task.trainer_options(splits, opts),
    )


def run_config(data, bb: Backbone, weights, init_head, opts: TrainOptions, splits: Splits, description: str, spec,
               runtime: Runtime, head_path: str, workers: int) -> dict:
    """config.json: what decides the run's numbers (compared on resume), plus provenance (api.PROVENANCE)."""
    config = {
        "data": os.path.abspath(data) if os.path.exists(str(data)) else str(data),
        "source": description,
        "classes": splits.classes,
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "backbone": bb.name,
        "weights": bb.weights_id,
        "weights_sha256": bb.weights_sha256,
        "weights_path": os.path.abspath(weights) if os.path.isfile(str(weights)) else None,
        "weights_match": bb.weights_match,
        "init_head": os.path.abspath(init_head) if init_head is not None else None,
        **opts.to_dict(),
        "classifier": head_path,
        "transform": spec.to_dict(),
        "precision": runtime.precision,
        "device": str(runtime.device),
        "workers": workers,
        "featx_version": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        **bb.versions,
    }
    return json.loads(json.dumps(config))
