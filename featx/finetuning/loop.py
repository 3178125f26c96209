"""One epoch of training and one pass of validation: the loop the PyTorch transfer-learning tutorial writes, at the runtime's precision."""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..options import OptionError
from ..preprocess import TransformSpec, normalize_batch
from ..runtime import Runtime


@dataclass
class PassStats:
    """Mean loss and accuracy over the images of one pass, its duration and the undecodable images skipped; `extra`
    holds a task's further metrics (segmentation: miou, dice), logged as train_<name> / val_<name>."""

    loss: float
    acc: float
    images: int
    seconds: float
    skipped: int
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _Totals:
    """Loss and correct counts summed on the device (no host sync per batch)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.images = self.skipped = 0
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss_sum.detach()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.images += len(labels)

    def stats(self) -> PassStats:
        n = max(self.images, 1)
        return PassStats(self.loss.item() / n, self.correct.item() / n, self.images,
                         time.perf_counter() - self.started, self.skipped)


def _batch(batch, spec: TransformSpec, runtime: Runtime, totals: _Totals):
    """Normalized images and labels on the device, undecodable images dropped (None when none is left)."""
    images, labels, ok = batch
    if not ok.all():
        totals.skipped += int((~ok).sum())
        images, labels = images[ok], labels[ok]
        if not len(labels):
            return None
    x = normalize_batch(images, spec, runtime.device, runtime.channels_last)
    return x, labels.to(runtime.device, non_blocking=True)


def _batches(loader: DataLoader):
    """iter(loader), with Ctrl-C held back while the loader starts its worker processes, then raised.

    A KeyboardInterrupt raised in the middle of that start is lost (Python drops one raised in its fork handlers)
    or leaves a half-built iterator whose __del__ fails. Blocking SIGINT in this thread would not do: the kernel
    hands it to any thread that does not block it, and Python raises it here all the same. So the handler only
    notes the signal meanwhile; the workers inherit that handler and are stopped by this process instead."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    noted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        batches = iter(loader)
    finally:
        signal.signal(signal.SIGINT, previous)
    if noted:
        del batches  # a whole iterator: its workers are shut down
        raise KeyboardInterrupt
    return batches


def _logits(output) -> torch.Tensor:
    """The main logits (GoogLeNet / Inception return (logits, aux...) tuples in training mode)."""
    return output[0] if isinstance(output, tuple) else output


def train_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler, scaler: torch.amp.GradScaler, spec: TransformSpec, runtime: Runtime, desc: str,
                progress: bool, make_totals=None, reduce=None) -> PassStats:
    """One pass over `loader` with an optimizer and scheduler step per batch (the model is in training mode).
    `make_totals(device)` gives the metric totals (default: loss and accuracy of class labels); `reduce(totals)`
    adds up the totals of every rank before the means are taken (ddp.Session.reduce)."""
    totals = (make_totals or _Totals)(runtime.device)
    bar = tqdm(total=len(loader) * loader.batch_size, desc=desc, unit="img", leave=False,
               disable=None if progress else True)
    with bar:
        for batch in _batches(loader):
            moved = _batch(batch, spec, runtime, totals)
            if moved is not None:
                x, y = moved
                with runtime.autocast():
                    logits = _logits(_forward_in_training(model, x))
                loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                totals.add(loss * len(y), logits, y)
            scheduler.step()
            bar.update(len(batch[1]))
    if reduce is not None:
        reduce(totals)
    return totals.stats()


def _forward_in_training(model: nn.Module, x: torch.Tensor):
    """model(x), with batch norm's refusal of a single value per channel as one line naming the options."""
    try:
        return model(x)
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise OptionError("{batch_size=%d} at {image_size=%d}: batch norm in training needs more than one value per "
                          "channel; use a larger {batch_size} or {image_size}" % (len(x), x.shape[-1])) from None


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, spec: TransformSpec, runtime: Runtime, criterion=None,
             make_totals=None, reduce=None) -> PassStats:
    """Mean loss (`criterion` summed over a batch; default cross-entropy) and accuracy of `model` (in eval mode)
    over `loader`; `make_totals` and `reduce` as for train_epoch."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss(reduction="sum")
    totals = (make_totals or _Totals)(runtime.device)
    for batch in _batches(loader):
        moved = _batch(batch, spec, runtime, totals)
        if moved is not None:
            x, y = moved
            with runtime.autocast():
                logits = model(x)
            totals.add(criterion(logits.float(), y), logits, y)
    if reduce is not None:
        reduce(totals)
    return totals.stats()
