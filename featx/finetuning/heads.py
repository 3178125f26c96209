"""The new head: `--head linear` or `--head mlp:HIDDEN[,DROPOUT]`, put where the architecture's classifier is.

One mechanism for every family: `classifier_path(model)` names the final Linear ('fc', 'classifier.1',
'heads.head', ...) and the new head replaces that submodule by its dotted name.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..options import OptionError
from .choices import HEAD_HELP


@dataclass(frozen=True)
class HeadSpec:
    """A parsed --head: kind 'linear' or 'mlp' with its hidden width and dropout."""

    kind: str = "linear"
    hidden: int = 0
    dropout: float = 0.0

    def __str__(self) -> str:
        return "linear" if self.kind == "linear" else f"mlp:{self.hidden},{self.dropout:g}"

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(in_features, num_classes)
        return nn.Sequential(
            nn.Linear(in_features, self.hidden), nn.ReLU(inplace=True), nn.Dropout(self.dropout),
            nn.Linear(self.hidden, num_classes),
        )


def parse_head(spec: str) -> HeadSpec:
    """'linear' | 'mlp:HIDDEN[,DROPOUT]' -> HeadSpec (OptionError otherwise)."""
    text = str(spec).strip().lower()
    if text == "linear":
        return HeadSpec()
    kind, _, args = text.partition(":")
    if kind == "mlp" and args:
        parts = args.split(",")
        try:
            hidden = int(parts[0])
            dropout = float(parts[1]) if len(parts) > 1 else 0.5
        except ValueError:
            parts = []
        if len(parts) in (1, 2) and hidden >= 1 and 0 <= dropout < 1:
            return HeadSpec("mlp", hidden, dropout)
    raise OptionError("{head=}: expected {help}, e.g. mlp:512,0.2", head=spec, help=HEAD_HELP)


def replace_classifier(model: nn.Module, path: str, spec: HeadSpec, num_classes: int) -> nn.Module:
    """Put a new head for `num_classes` where the Linear at dotted `path` is (from backbones.classifier_path, which
    checks that it is a Linear); returns the new head."""
    old = model.get_submodule(path)
    head = spec.build(old.in_features, num_classes)
    model.set_submodule(path, head)
    return head

