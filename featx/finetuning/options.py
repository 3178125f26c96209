"""The training options of a run, checked up front and with their defaults filled in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..choices import check_seed
from ..errors import FeatxError
from .choices import AUGMENTS, OPTIMIZERS, SCHEDULES
from .heads import parse_head
from .optim import DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_WEIGHT_DECAY, parse_warmup


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides the numbers of a run besides the data, the backbone and the weights."""

    head: str = "linear"
    freeze: tuple[str, ...] = ("none",)
    unfreeze_at: int | None = None
    train_bn: bool = False
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.01 for sgd, 1e-3 for adam / adamw
    backbone_lr: float | None = None  # default: lr
    momentum: float | None = None  # SGD momentum or Adam's beta1, default 0.9
    weight_decay: float | None = None  # default: 1e-4 sgd, 0 adam, 1e-2 adamw
    schedule: str = "cosine"
    warmup: str = "0"
    label_smoothing: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    augment: str = "default"
    image_size: int | None = None
    val_split: float | None = None
    early_stop: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self) | {"freeze": list(self.freeze)}

    def resolved(self) -> "TrainOptions":
        """Check every option (FeatxError naming the first bad one) and fill in the optimizer's defaults."""
        head = str(parse_head(self.head))
        freeze = (self.freeze,) if isinstance(self.freeze, str) else tuple(str(f) for f in self.freeze)
        freeze = freeze or ("none",)
        parse_warmup(self.warmup)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--augment", self.augment, AUGMENTS)
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        backbone_lr = lr if self.backbone_lr is None else self.backbone_lr
        _positive("--lr", lr)
        _positive("--backbone-lr", backbone_lr)
        momentum = DEFAULT_MOMENTUM if self.momentum is None else self.momentum
        weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
        _within("--momentum", momentum, 0, 1)
        _within("--label-smoothing", self.label_smoothing, 0, 1)
        if not weight_decay >= 0:
            raise FeatxError(f"--weight-decay {weight_decay}: expected 0 or more")
        for name, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1)):
            _integer(name, value, low, required=True)
        check_seed(self.seed)
        for name, value, low in (("--image-size", self.image_size, 8), ("--early-stop", self.early_stop, 1),
                                 ("--unfreeze-at", self.unfreeze_at, 2)):
            _integer(name, value, low)
        if self.unfreeze_at is not None:
            if self.unfreeze_at > self.epochs:
                raise FeatxError(f"--unfreeze-at {self.unfreeze_at}: the run has only {self.epochs} epochs")
            if freeze == ("none",):
                raise FeatxError("--unfreeze-at needs a --freeze strategy: nothing is frozen to unfreeze")
        return replace(self, head=head, freeze=freeze, lr=float(lr), backbone_lr=float(backbone_lr),
                       momentum=float(momentum), weight_decay=float(weight_decay), warmup=str(self.warmup))


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise FeatxError(f"{name} {value!r}: expected one of {', '.join(choices)}")


def _positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        raise FeatxError(f"{name} {value!r}: expected a number greater than 0")


def _within(name: str, value, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or not low <= value < high:
        raise FeatxError(f"{name} {value!r}: expected a number in [{low:g}, {high:g})")


def _integer(name: str, value, low: int, required: bool = False) -> None:
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FeatxError(f"{name} {value!r}: expected an integer >= {low}")
