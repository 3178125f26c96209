"""CLI: `featx advise` (a thin wrapper over featx.advise)."""
from __future__ import annotations

import click

from ..choices import BACKBONE_HELP, WEIGHTS_MATCHES
from ..errors import FeatxError
from .common import echo_json


@click.command("advise")
@click.argument("data")
@click.option("-b", "--backbone", "backbones", multiple=True, help=BACKBONE_HELP + " Repeat to compare backbones (-b A -w WA -b B -w WB: the i-th -w goes with the i-th -b).")
@click.option("-w", "--weights", multiple=True, help="Weights name or tag, a local weights file, or 'none'  [default: DEFAULT]; one per -b.")
@click.option("--weights-match", type=click.Choice(WEIGHTS_MATCHES), multiple=True, help="How a -w FILE's tensors pair with the model's  [default: name]; once for every -w FILE, or one per -b.")
@click.option("-o", "--store", type=click.Path(dir_okay=False), help="Store to extract into (reused by later commands; default DATA-name.featx.h5 here): it holds exactly the images measured, rows of other data go. The advice is saved beside it.")
@click.option("-l", "--layer", "taps", multiple=True, help="Taps to compare (default: two stage outputs and the pre-logits).")
@click.option("--image-size", type=click.IntRange(min=8), help="Center-crop size (default: the weights' preset).")
@click.option("--budget-seconds", type=float, help="Time allowed for extraction and the probes (default: 5 % of one estimated full finetune).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
def advise_cmd(data, backbones, weights, weights_match, store, taps, image_size, budget_seconds, seed, as_json):
    """Measure DATA against a backbone and recommend: probe at a tap, finetune --freeze until:TAP, or full finetune.

    Extracts the taps once (within the budget), fits probes on growing class-balanced subsets at each tap, and
    compares the pre-logits with the stage outputs (how far DATA is from the pretraining). Prints a table with
    the expected accuracy, the seconds on this machine and the exact command of each choice. With several -b,
    every backbone x tap is measured on the same images within the one budget and ranked: the most accurate, and
    the cheapest to extract within a point of it.
    """
    from ..advice import advice_path, advise

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    specs = backbone_specs(backbones, weights, weights_match)
    if len(specs) > 1:
        from ..advise_backbones import advise_backbones

        if taps:
            raise FeatxError("-l: tap names differ between backbones; with several -b each one's usual taps are "
                             "compared (give -l with a single -b)")
        comparison = advise_backbones(data, specs, store=store, image_size=image_size,
                                      budget_seconds=budget_seconds, seed=seed, log=log)
        if as_json:
            echo_json(comparison.to_dict())
            return
        click.echo(comparison.table())
        click.echo(f"advice saved to {comparison.saved}")
        return
    (backbone, weight, match), = specs
    advice = advise(data, backbone=backbone, weights=weight, weights_match=match, store=store,
                    taps=taps or None, image_size=image_size, budget_seconds=budget_seconds, seed=seed, log=log)
    if as_json:
        echo_json(advice.to_dict())
        return
    click.echo(advice.table())
    click.echo(f"advice saved to {advice_path(advice.store)}")


def backbone_specs(backbones, weights, matches) -> list[tuple]:
    """(backbone, weights, weights_match) per -b (one, backbone None, without -b): the i-th -w and --weights-match
    go with the i-th -b; a single --weights-match applies to every -w FILE."""
    from ..backbones.weights import looks_like_path

    names = list(backbones) or [None]
    weights = list(weights) or ["DEFAULT"] * len(names)
    if len(weights) != len(names):
        raise FeatxError(f"-w given {len(weights)} times for {len(names)} backbone(s): give one -w per -b, in order "
                         "(-b A -w WA -b B -w WB), or none for every backbone's DEFAULT weights")
    if len(matches) == 1 and len(names) > 1:
        matches = [matches[0] if w.lower() != "none" and looks_like_path(w) else "name" for w in weights]
    matches = list(matches) or ["name"] * len(names)
    if len(matches) != len(names):
        raise FeatxError(f"--weights-match given {len(matches)} times for {len(names)} backbones: give it once (for "
                         "every -w FILE) or once per -b")
    return list(zip(names, weights, matches))


COMMANDS = [advise_cmd]
