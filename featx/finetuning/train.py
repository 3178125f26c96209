"""The epoch loop: freeze / unfreeze, train, validate, save the run folder, stop early; and its checkpoint state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..preprocess import TransformSpec
from ..runtime import Runtime
from .checkpoint import (
    CHECKPOINT, CURVES, FORMAT, LAST, MODEL, RunDir, cpu_state_dict, rng_state, save_torch, set_rng_state,
)
from .ddp import Session
from .freezing import SMALL_BATCH, batch_norm_fixed, set_frozen, train_mode
from .loop import evaluate, train_epoch
from .report import epoch_row, summary_line, write_curves


@dataclass
class Trainer:
    """A model ready to train with its optimizer, schedule and loaders, and the run folder it reports to."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    spec: TransformSpec
    runtime: Runtime
    frozen: set[str]
    unfreeze_at: int | None
    train_bn: bool
    epochs: int
    early_stop: int | None
    run: RunDir
    config: dict
    model_meta: dict
    progress: bool = False
    log: Callable[[str], None] = print
    history: list[dict] = field(default_factory=list)
    make_totals: Callable | None = None  # the metric totals of a pass (loop.train_epoch); None: class accuracy
    val_criterion: nn.Module | None = None  # validation loss summed over a batch; None: cross-entropy
    score_key: str = "val_acc"  # the metric that decides the best epoch (model.pt)
    session: Session = field(default_factory=Session)  # the ranks under torchrun (ddp.py); one process by default
    reschedule: Callable[[int], torch.optim.lr_scheduler.LRScheduler] | None = None  # this run's scheduler after
    # N steps: what a run extended beyond its recorded epochs continues with
    loss_name: str = "cross-entropy"  # what the loss is, for curves.png
    acc_name: str = "accuracy"  # what `acc` measures, for curves.png

    # ---- where the run stands, derived from the history alone ----------------------------------------------------
    @property
    def best(self) -> dict | None:
        """The best epoch's row: highest `score_key` (val accuracy; the earliest on ties), the last epoch without
        validation."""
        if not self.history:
            return None
        if self.val_loader is None:
            return self.history[-1]
        return max(self.history, key=lambda row: (row[self.score_key], -row["epoch"]))

    @property
    def batch(self) -> int:
        """Images in a training batch: --batch-size, or all the training images when they are fewer."""
        return min(self.config["batch_size"], self.config["n_train"])

    @property
    def from_probe(self) -> bool:
        """Whether the head was started from a probe (--init-head): BatchNorm then keeps its running statistics."""
        return self.config.get("init_head") is not None

    @property
    def stopped_early(self) -> bool:
        if not (self.early_stop and self.history and self.val_loader is not None):
            return False
        last = self.history[-1]["epoch"]
        return last < self.epochs and last - self.best["epoch"] >= self.early_stop

    @property
    def complete(self) -> bool:
        """Every epoch of the run is done, or it stopped early: `fit` has nothing left to train."""
        return len(self.history) >= self.epochs or self.stopped_early

    # ---- training --------------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train the epochs not done yet (all of them, or those after the checkpoint's), unless stopped early."""
        start = len(self.history) + 1
        batch = self.batch
        if start <= self.epochs and batch_norm_fixed(batch, self.train_bn, self.from_probe):
            why = f"batch {batch} < {SMALL_BATCH} images" if batch < SMALL_BATCH else "the head starts from a probe"
            self.log(f"BatchNorm statistics stay fixed: {why} (train_bn=True / --train-bn updates them)")
        for epoch in range(start, self.epochs + 1):
            if self.stopped_early:
                self.log(f"early stop: no val accuracy gain in {self.early_stop} epochs (best: epoch {self.best['epoch']})")
                return
            self._epoch(epoch, write_config=epoch == start)

    def _epoch(self, epoch: int, write_config: bool) -> None:
        unfrozen = self.unfreeze_at is not None and epoch >= self.unfreeze_at
        set_frozen(self.model, set() if unfrozen else self.frozen)
        if unfrozen and epoch == self.unfreeze_at:
            self.log(f"epoch {epoch}: unfreezing {len(self.frozen)} parameter tensors (unfreeze_at / --unfreeze-at)")
        train_mode(self.model, self.train_bn, self.batch, self.from_probe)
        lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        self.train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train = train_epoch(self.session.wrap(self.model), self.train_loader, self.criterion, self.optimizer,
                            self.scheduler, self.scaler, self.spec, self.runtime, f"epoch {epoch}/{self.epochs}",
                            self.progress, self.make_totals, self.session.reduce)
        self.session.sync_buffers(self.model)
        val = evaluate(self.model, self.val_loader, self.spec, self.runtime, self.val_criterion,
                       self.make_totals, self.session.reduce) if self.val_loader is not None else None
        row = epoch_row(epoch, train, val, lrs, time.perf_counter() - started)
        self.history.append(row)
        if self.session.is_main:  # under torchrun only rank 0 writes the run folder
            self._save(epoch, write_config)
        self.log(summary_line(row, self.epochs))
        if row["skipped_images"]:
            self.log(f"featx: warning: {row['skipped_images']} undecodable images skipped in epoch {epoch}")

    # ---- the run folder --------------------------------------------------------------------------------------------
    def _save(self, epoch: int, write_config: bool) -> None:
        """model.pt (when this epoch is the best), last.pt, checkpoint.pt, then config (once per fit: it does not
        change between epochs; an --overwrite run replaces the old one here), metrics and curves."""
        state = cpu_state_dict(self.model)
        row = self.history[-1]
        weights = {"model": state, "featx": {**self.model_meta, "epoch": epoch, "val_acc": row["val_acc"]}}
        if self.best["epoch"] == epoch:
            save_torch(weights, self.run / MODEL)
        save_torch(weights, self.run / LAST)
        save_torch(self.state_dict(state, epoch), self.run / CHECKPOINT)
        if write_config:
            self.run.write_config(self.config)
        self.run.write_metrics(self.history)
        write_curves(self.history, self.run / CURVES, self.loss_name, self.acc_name)

    def state_dict(self, model_state: dict, epoch: int) -> dict:
        """What a resume needs, in types torch.load(weights_only=True) reads."""
        return {
            "format": FORMAT,
            "epoch": epoch,
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "config": self.config,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Continue after the checkpoint's epoch: weights, optimizer, schedule, scaler, RNG states and history.

        A run given more epochs than the checkpoint's config records continues with this run's own schedule (that
        of a run of `epochs` epochs) from the step the checkpoint is at, instead of the recorded schedule's state.
        """
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["config"].get("epochs", self.epochs) == self.epochs:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        else:
            self.scheduler = self.reschedule(int(checkpoint["scheduler"]["last_epoch"]))
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.history = list(checkpoint["history"])
        set_rng_state(checkpoint["rng"])

    def close(self) -> None:
        """Stop the loaders' worker processes (kept alive between epochs) now rather than when garbage collected,
        so that nothing writes to the run folder once the call is over."""
        for loader in (self.train_loader, self.val_loader):
            workers = getattr(loader, "_iterator", None)  # DataLoader keeps persistent workers there
            if workers is not None and hasattr(workers, "_shutdown_workers"):
                workers._shutdown_workers()
