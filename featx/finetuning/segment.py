"""`featx finetune --task segment`: the segmentation task (pairs, loss, metric totals, trainer) of a run.

The run reuses classification's machinery whole: TrainOptions, freezing, optimizer and schedule, RunDir with its
checkpoints and --resume, metrics.jsonl and curves.png. What differs is here: the loss (cross-entropy, or BCE on
one logit for binary masks, plus `dice_weight` x soft Dice), per-epoch pixel accuracy / mean IoU / Dice, the best
epoch by val mean IoU, and predictions.png (a few val images with the true and the predicted masks of model.pt).
"""
from __future__ import annotations

import functools
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FeatxError
from ..options import OptionError
from ..preprocess import normalize_batch
from ..segment.metrics import confusion, predicted_ids, summarize
from ..segment.model import HEAD_NAME, build_segmenter, check_tap_count, parse_decoder, segment_taps
from ..segment.source import IGNORE, MaskPair, MaskSource, load_mask_source, read_mask
from ..segment.transforms import JointTransform, mask_image
from ..sources import DecodeError, decode_image
from .checkpoint import atomic_write
from .data import ImageDataset, Splits, hold_out, loader_for
from .loop import PassStats
from .options import TrainOptions
from .task import Task
from .train import Trainer

PREVIEW = "predictions.png"
PREVIEW_IMAGES = 4


class SegmentLoss(nn.Module):
    """Mean cross-entropy over pixels (BCE on one logit for binary masks) plus `dice_weight` x (1 - soft Dice of
    the foreground classes); IGNORE pixels count nowhere. reduction 'sum' multiplies by the batch size."""

    def __init__(self, dice_weight: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.dice_weight, self.reduction = float(dice_weight), reduction

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        valid = masks != IGNORE
        if logits.shape[1] == 1:
            target = (masks > 0).float()
            per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
            loss = per_pixel[valid].sum() / valid.sum().clamp(min=1)
            probs, onehot = torch.sigmoid(logits[:, 0])[:, None], target[:, None]
        else:
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE)
            probs = torch.softmax(logits, 1)[:, 1:]
            onehot = F.one_hot(torch.where(valid, masks, 0), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        if self.dice_weight:
            weight = valid[:, None].float()
            inter = (probs * onehot * weight).sum((0, 2, 3))
            total = ((probs + onehot) * weight).sum((0, 2, 3))
            loss = loss + self.dice_weight * (1 - ((2 * inter + 1) / (total + 1)).mean())
        return loss * len(masks) if self.reduction == "sum" else loss

    def name(self, binary: bool) -> str:
        """What the loss is: 'binary cross-entropy' (one logit) or 'cross-entropy', with its Dice term."""
        name = "binary cross-entropy" if binary else "cross-entropy"
        return name + (f" + {self.dice_weight:g} x (1 - Dice)" if self.dice_weight else "")


class SegmentTotals:
    """Loss and the pixel confusion matrix of one pass, summed on the device (the loop's _Totals interface)."""

    def __init__(self, device: torch.device, classes: list[str]):
        self.classes = classes
        self.loss = torch.zeros((), device=device)
        self.matrix = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=device)
        self.images = self.skipped = 0
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.loss += loss_sum.detach()
        self.matrix += confusion(masks, predicted_ids(logits.detach()), len(self.classes))
        self.images += len(masks)

    def stats(self) -> PassStats:
        metrics = summarize(self.matrix.cpu().numpy(), self.classes)
        return PassStats(self.loss.item() / max(self.images, 1), metrics["pixel_acc"], self.images,
                         time.perf_counter() - self.started, self.skipped,
                         extra={"miou": metrics["miou"], "dice": metrics["dice"]})


class PairDataset(ImageDataset):
    """(uint8 image, int64 mask, decoded ok) for a key (index, seed); a pair that cannot be decoded, or whose
    decoded sizes differ, gives a zero image, an IGNORE mask and False."""

    def __init__(self, pairs: list[MaskPair], transform: JointTransform, binary: bool):
        super().__init__(pairs, transform)
        self.binary = binary

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        pair = self.items[index]
        try:
            img = decode_image(pair.image)
            ids = read_mask(pair.mask, self.binary)
            if (ids.shape[1], ids.shape[0]) != img.size:
                raise DecodeError("decoded image and mask sizes differ")
            x, y = self.transform(img, mask_image(ids), random.Random(seed))
            return x, y, True
        except DecodeError:
            crop = self.transform.spec.crop
            return torch.zeros(3, crop, crop, dtype=torch.uint8), torch.full((crop, crop), IGNORE), False


def split_pairs(source: MaskSource, val_split: float | None, seed: int) -> Splits:
    """Train / val pairs: the data's val split, else a seeded `val_split` fraction (0.2 by default) of the images."""
    train = [p for p in source.pairs if p.split not in ("val", "test")]
    val = [p for p in source.pairs if p.split == "val"]

    def held_out(fraction: float) -> list[bool]:
        held = set(np.random.default_rng(seed).permutation(len(train))[: int(round(fraction * len(train)))].tolist())
        return [i in held for i in range(len(train))]

    train, val, how = hold_out(train, val, val_split, held_out, "pairs")
    if not train:
        raise FeatxError(f"{source.description}: no training pairs")
    return Splits(train, val, source.classes, how)


class SegmentTrainer(Trainer):
    """Trainer that also writes predictions.png whenever model.pt is written."""

    def _save(self, epoch: int, write_config: bool) -> None:
        super()._save(epoch, write_config)
        if self.val_loader is not None and self.best["epoch"] == epoch:
            write_preview(self.model, self.val_loader.dataset, self.spec, self.runtime, self.run / PREVIEW)


@torch.inference_mode()
def write_preview(model: nn.Module, dataset: PairDataset, spec, runtime, path) -> None:
    """A PNG of the first val images (eval transform) with their true and predicted masks, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = [dataset[(i, 0)] for i in range(min(PREVIEW_IMAGES, len(dataset)))]
    images = torch.stack([x for x, _, _ in samples])
    was_training = model.training
    model.eval()
    with runtime.autocast():
        logits = model(normalize_batch(images, spec, runtime.device, runtime.channels_last))
    model.train(was_training)
    predicted = predicted_ids(logits.float()).cpu()
    fig = Figure(figsize=(7.5, 2.5 * len(samples)), dpi=80, layout="constrained")
    axes = fig.subplots(len(samples), 3, squeeze=False)
    vmax = max(2, int(logits.shape[1]))
    for row, ((x, y, _), pred) in enumerate(zip(samples, predicted)):
        shown = np.where(y.numpy() == IGNORE, np.nan, y.numpy())
        panels = (("image", x.permute(1, 2, 0).numpy()), ("true mask", shown), ("predicted", pred.numpy()))
        for ax, (title, value) in zip(axes[row], panels):
            ax.imshow(value, **({} if value.ndim == 3 else {"vmin": 0, "vmax": vmax - 1, "cmap": "viridis"}))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    atomic_write(path, FigureCanvasAgg(fig).print_png)


class SegmentTask(Task):
    """Segmentation: image + mask pairs, the backbone cut at `tap` (a name, or a list of them for an fpn decoder)
    with a `decoder`; `binary` masks train one logit with BCE, `num_classes` bounds the mask ids, `dice_weight`
    adds a soft Dice term; the best epoch is the one of highest val mean IoU."""

    name = "segment"
    unit = "pairs"
    trainer_class = SegmentTrainer

    def __init__(self, *, tap=None, decoder="conv:256", binary=False, num_classes=None, dice_weight=0.0):
        if isinstance(dice_weight, bool) or not (isinstance(dice_weight, (int, float)) and dice_weight >= 0):
            raise OptionError("{dice_weight=}: expected a number of 0 or more", dice_weight=dice_weight)
        self.decoder, self.binary = parse_decoder(decoder), binary
        self.taps = [tap] if isinstance(tap, str) else list(tap or [])
        if not all(isinstance(name, str) and name for name in self.taps):
            raise OptionError("{tap=}: expected a tap name, or a list of them", tap=tap)
        check_tap_count(self.taps, self.decoder)
        self.num_classes, self.dice_weight = num_classes, float(dice_weight)
        self.source = None

    def load(self, data, opts: TrainOptions, log) -> tuple[str, Splits]:
        self.source = load_mask_source(data, binary=self.binary, num_classes=self.num_classes)
        for relpath, reason in self.source.failed:
            log(f"featx: warning: pair left out: {relpath}: {reason}")
        return self.source.description, split_pairs(self.source, opts.val_split, opts.seed)

    def build_model(self, bb, splits: Splits, crop: int, opts: TrainOptions, log) -> tuple[nn.Module, str]:
        self.taps = segment_taps(bb.model, self.taps, self.decoder)
        model = build_segmenter(bb.model, self.taps, self.decoder, self.source.n_outputs, crop, bb.name)
        log(f"{'taps' if len(self.taps) > 1 else 'tap'} {', '.join(self.taps)}, decoder {self.decoder}, "
            f"{self.source.n_outputs} output channel(s)")
        return model, HEAD_NAME

    def loaders(self, splits: Splits, spec, opts: TrainOptions, loader_args: dict):
        train = loader_for(PairDataset(splits.train, JointTransform(spec, opts.augment), self.binary), train=True,
                           **loader_args)
        val = loader_for(PairDataset(splits.val, JointTransform(spec, "none"), self.binary), train=False,
                         **loader_args) if splits.val else None
        return train, val

    def head_name(self, opts: TrainOptions) -> str:
        return str(self.decoder)

    def record(self, splits: Splits) -> dict:
        tap = self.taps if len(self.taps) > 1 else self.taps[0]  # one tap: a name, as runs have always recorded it
        return {"task": "segment", "tap": tap, "decoder": str(self.decoder), "binary": bool(self.binary),
                "num_classes": self.source.num_classes, "dice_weight": self.dice_weight}

    def trainer_options(self, splits: Splits, opts: TrainOptions) -> dict:
        criterion = SegmentLoss(self.dice_weight)
        return {"criterion": criterion, "make_totals": functools.partial(SegmentTotals, classes=splits.classes),
                "val_criterion": SegmentLoss(self.dice_weight, reduction="sum"), "score_key": "val_miou",
                "loss_name": criterion.name(self.binary), "acc_name": "pixel accuracy"}
