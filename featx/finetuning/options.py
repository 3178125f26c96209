"""The options of `featx finetune` and `featx.finetune`, spelled once (featx.options): flags, help, ranges, defaults.

TrainOptions are the options that decide the numbers of a run besides the data, the backbone and the weights: a
run records them in its config.json, and `resolved()` fills in the optimizer's defaults. FinetuneOptions adds the
rest of the command's options; `fits="segment"` marks those of the segmentation task alone. Nothing here imports
torch: the command line builds its option table from these classes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import click

from ..choices import (BACKBONE_HELP, DECODE_HELP, DECODER_HELP, DEFAULT_DECODE, DEVICE_CHOICES, MAX_SEED, PRECISIONS,
                       TRAIN_DECODES, WEIGHTS_MATCH_HELP, WEIGHTS_MATCHES)
from ..options import SEGMENT, OptionError, Options, binary_mask_option, num_classes_option, option
from .choices import (AUGMENT_HELP, AUGMENTS, DEFAULT_LIMIT_MB, FREEZE_HELP, HEAD_HELP, OPTIMIZERS, SCHEDULES, TASKS,
                      WARMUP_HELP)



@dataclass(frozen=True)
class TrainOptions(Options):
    """Everything that decides the numbers of a run besides the data, the backbone and the weights."""

    head: str = option("linear", "--head", help=f"New head: {HEAD_HELP}.")
    freeze: tuple[str, ...] = option(("none",), "--freeze", multiple=True,
                                     help=f"What stays fixed: {FREEZE_HELP}. Default: none.")
    unfreeze_at: int | None = option(None, "--unfreeze-at", kind=int, low=2,
                                     help="Epoch from which every parameter trains.")
    train_bn: bool = option(
        False, "--train-bn",
        help="BatchNorm layers always normalise with the batch and update their running statistics: frozen layers "
             "too, and at batches under 16 images (where they keep them fixed by default).")
    optimizer: str = option("sgd", "--optimizer", choices=OPTIMIZERS)
    lr: float | None = option(None, "--lr", kind=float, low=0, low_open=True,
                              help="Learning rate of the head (default: 0.01 sgd, 1e-3 adam/adamw).")
    backbone_lr: float | None = option(None, "--backbone-lr", kind=float, low=0, low_open=True,
                                       help="Learning rate of the backbone (default: --lr).")
    momentum: float | None = option(None, "--momentum", kind=float, low=0, high=1, high_open=True,
                                    help="SGD momentum or Adam beta1 (default 0.9).")
    weight_decay: float | None = option(None, "--weight-decay", kind=float, low=0,
                                        help="Default: 1e-4 sgd, 0 adam, 1e-2 adamw.")
    schedule: str = option("cosine", "--schedule", choices=SCHEDULES, help="Per-step learning-rate schedule.")
    warmup: str = option("0", "--warmup", help=f"Linear warmup: {WARMUP_HELP}.")
    label_smoothing: float = option(0.0, "--label-smoothing", low=0, high=1, high_open=True)
    epochs: int = option(10, "--epochs", low=1)
    batch_size: int = option(32, "--batch-size", low=1)
    augment: str = option("default", "--augment", choices=AUGMENTS, help=AUGMENT_HELP + ".")
    decode: str = option(DEFAULT_DECODE, "--decode", choices=TRAIN_DECODES,
                         help=f"How training and val images are decoded: {DECODE_HELP}. Recorded by the run.")
    image_size: int | None = option(None, "--image-size", kind=int, low=8,
                                    help="Training crop and eval center crop (default: the weights' preset).")
    val_split: float | None = option(
        None, "--val-split", kind=float, low=0, high=1, high_open=True,
        help="Held-out fraction when DATA has no val split (default 0.2; 0: no validation).")
    early_stop: int | None = option(None, "--early-stop", kind=int, low=1, metavar="PATIENCE",
                                    help="Stop after this many epochs without a val accuracy gain.")
    seed: int = option(0, "--seed", low=0, high=MAX_SEED)

    def resolved(self) -> "TrainOptions":
        """The options with the optimizer's defaults filled in; an OptionError for options that do not go
        together, a FeatxError for a head or warmup that does not parse."""
        from .heads import parse_head
        from .optim import DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_WEIGHT_DECAY, parse_warmup

        head = str(parse_head(self.head))
        freeze = (self.freeze,) if isinstance(self.freeze, str) else tuple(str(f) for f in self.freeze)
        freeze = freeze or ("none",)
        parse_warmup(self.warmup)
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        if self.unfreeze_at is not None:
            if self.unfreeze_at > self.epochs:
                raise OptionError("{unfreeze_at=}: the run has only {n} epochs", unfreeze_at=self.unfreeze_at,
                                  n=self.epochs)
            if freeze == ("none",):
                raise OptionError("{unfreeze_at} needs a {freeze} strategy: nothing is frozen to unfreeze")
        return replace(
            self, head=head, freeze=freeze, lr=float(lr),
            backbone_lr=float(lr if self.backbone_lr is None else self.backbone_lr),
            momentum=float(DEFAULT_MOMENTUM if self.momentum is None else self.momentum),
            weight_decay=float(DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None
                               else self.weight_decay),
            warmup=str(self.warmup))


@dataclass(frozen=True)
class FinetuneOptions(TrainOptions):
    """Every option of a finetune call besides the data, the run folder and the call's plumbing: the training
    options, then the model, the machine and the segmentation task's."""

    backbone: str | None = option(None, "-b", "--backbone", kind=str, help=BACKBONE_HELP)
    weights: str = option(
        "DEFAULT", "-w", "--weights",
        help="torchvision weights name or timm tag, a local .pth/.safetensors (partial loading, with a report), a "
             "finetuned RUN/model.pt, or 'none'.")
    weights_match: str = option("name", "--weights-match", choices=WEIGHTS_MATCHES, help=WEIGHTS_MATCH_HELP)
    init_head: str | None = option(
        None, "--init-head", click_type=click.Path(exists=True, file_okay=False),
        help="Start the head from a linear head folder of `featx fit-head` (probe, then finetune).")
    precision: str = option("auto", "--precision", choices=PRECISIONS,
                            help="auto = bf16 on CPUs that support it, bf16/fp16 on CUDA.")
    device: str = option("auto", "--device", help=DEVICE_CHOICES)
    workers: int | None = option(None, "--workers", kind=int, low=0,
                                 help="DataLoader decode workers (default: cores - 1).")
    decode_cache: str | None = option(
        "auto", "--decode-cache", optional=True, metavar="auto|DIR|none",
        help="Where each training image's decoded pixels are kept so later epochs skip decoding (auto: "
             "RUN/decoded/, removed when the call ends; a folder is kept and shared by runs).")
    decode_cache_mb: float = option(
        DEFAULT_LIMIT_MB, "--decode-cache-mb", kind=float, low=0,
        help="Size limit of the decoded-image cache; images beyond it are decoded every epoch.")
    overwrite: bool = option(
        False, "--overwrite",
        help="Start a new run in a folder that holds one (its files are replaced when the first epoch completes).")
    task: str = option(
        "classify", "--task", choices=TASKS,
        help="segment: DATA holds image + mask pairs ({train,val}/{images,masks}/<name>, or a CSV "
             "image,mask[,split]).")
    tap: tuple[str, ...] | None = option(
        None, "--tap", multiple=True, metadata=SEGMENT,
        help="segment: where the backbone is cut (default: layer4 for ResNets, else the last stage map); give it "
             "once per map for --decoder fpn (default: the stage maps of stride 4, 8, 16 and 32).")
    decoder: str = option("conv:256", "--decoder", metadata=SEGMENT, help=f"segment: {DECODER_HELP}.")
    binary: bool = binary_mask_option("segment: every non-zero mask pixel is foreground (one logit, BCE).")
    num_classes: int | None = num_classes_option()
    dice_weight: float = option(0.0, "--dice-weight", low=0, metadata=SEGMENT,
                                help="segment: weight of a soft Dice term added to the loss.")

    def train_options(self) -> TrainOptions:
        """The training options, resolved (see TrainOptions.resolved)."""
        return TrainOptions.of(self.to_dict()).resolved()
