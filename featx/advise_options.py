"""The options of `featx advise`, `featx.advise` and `featx.advise_backbones`, spelled once (featx.options).

The command takes several backbones (`-b A -w WA -b B -w WB`): `backbone`, `weights` and `weights_match` are a name
or a list of names, paired in order, and `specs()` gives the pairs; `featx.advise` takes one of each.
"""
from __future__ import annotations

from dataclasses import dataclass

from .choices import BACKBONE_HELP, MAX_SEED, WEIGHTS_MATCHES
from .options import OptionError, Options, option


def _names(value) -> list:
    """A repeatable option's values as a list (None: none given)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class AdviseOptions(Options):
    """Everything an advise call takes besides the data and the call's log."""

    backbone: object = option(
        None, "-b", "--backbone", multiple=True,
        help=BACKBONE_HELP + " Repeat to compare backbones (-b A -w WA -b B -w WB: the i-th -w goes with the i-th -b).")
    weights: object = option(
        "DEFAULT", "-w", "--weights", multiple=True,
        help="Weights name or tag, a local weights file, or 'none'  [default: DEFAULT]; one per -b.")
    weights_match: object = option(
        "name", "--weights-match", choices=WEIGHTS_MATCHES, multiple=True,
        help="How a -w FILE's tensors pair with the model's  [default: name]; once for every -w FILE, or one per -b.")
    store: str | None = option(
        None, "-o", "--store", kind=str,
        help="Store to extract into (reused by later commands; default DATA-name.featx.h5 here): it holds exactly "
             "the images measured, rows of other data go. The advice is saved beside it.")
    taps: object = option(None, "-l", "--layer", multiple=True,
                          help="Taps to compare (default: two stage outputs and the pre-logits).")
    image_size: int | None = option(None, "--image-size", kind=int, low=8,
                                    help="Center-crop size (default: the weights' preset).")
    budget_seconds: float | None = option(
        None, "--budget-seconds", kind=float, low=0, low_open=True,
        expected="a positive, finite number of seconds",
        help="Time allowed for extraction and the probes (default: 5 % of one estimated full finetune).")
    seed: int = option(0, "--seed", low=0, high=MAX_SEED)

    def __post_init__(self):
        super().__post_init__()
        backbones, weights = _names(self.backbone) or [None], _names(self.weights)
        if len(weights) != len(backbones):
            raise OptionError("{weights} given {given} times for {count} backbone(s): give one {weights} per "
                              "{backbone}, in the same order, or none for every backbone's DEFAULT weights",
                              given=len(weights), count=len(backbones))
        matches = _names(self.weights_match)
        if len(matches) not in (1, len(backbones)):
            raise OptionError("{weights_match} given {given} times for {count} backbones: give it once (for every "
                              "{weights} FILE) or once per {backbone}", given=len(matches), count=len(backbones))
        if len(backbones) > 1 and self.taps:
            raise OptionError("{taps}: tap names differ between backbones; with several {backbone} each one's usual "
                              "taps are compared (give {taps} with a single {backbone})")

    def specs(self) -> list[tuple]:
        """(backbone, weights, weights_match) per backbone (one, backbone None, when none is named); a single
        weights_match applies to every weights file."""
        from .backbones.weights import looks_like_path

        backbones, weights, matches = _names(self.backbone) or [None], _names(self.weights), _names(self.weights_match)
        if len(matches) == 1 and len(backbones) > 1:
            matches = [matches[0] if w.lower() != "none" and looks_like_path(w) else "name" for w in weights]
        return list(zip(backbones, weights, matches * len(backbones) if len(matches) == 1 else matches))
