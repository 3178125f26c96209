"""CLI: `featx advise` (a thin wrapper over featx.advise)."""
from __future__ import annotations

import click

from ..choices import WEIGHTS_MATCHES
from .common import BACKBONE_HELP, echo_json


@click.command("advise")
@click.argument("data")
@click.option("-b", "--backbone", help=BACKBONE_HELP)
@click.option("-w", "--weights", default="DEFAULT", show_default=True, help="Weights name or tag, a local weights file, or 'none'.")
@click.option("--weights-match", type=click.Choice(WEIGHTS_MATCHES), default="name", show_default=True, help="How a -w FILE's tensors pair with the model's.")
@click.option("-o", "--store", type=click.Path(dir_okay=False), help="Store to extract into (reused by later commands; default DATA-name.featx.h5 here): it holds exactly the images measured, rows of other data go. The advice is saved beside it.")
@click.option("-l", "--layer", "taps", multiple=True, help="Taps to compare (default: two stage outputs and the pre-logits).")
@click.option("--image-size", type=click.IntRange(min=8), help="Center-crop size (default: the weights' preset).")
@click.option("--budget-seconds", type=float, help="Time allowed for extraction and the probes (default: 5 % of one estimated full finetune).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
def advise_cmd(data, backbone, weights, weights_match, store, taps, image_size, budget_seconds, seed, as_json):
    """Measure DATA against a backbone and recommend: probe at a tap, finetune --freeze until:TAP, or full finetune.

    Extracts the taps once (within the budget), fits probes on growing class-balanced subsets at each tap, and
    compares the pre-logits with the stage outputs (how far DATA is from the pretraining). Prints a table with
    the expected accuracy, the seconds on this machine and the exact command of each choice.
    """
    from ..advise import advice_path, advise

    advice = advise(data, backbone=backbone, weights=weights, weights_match=weights_match, store=store,
                    taps=taps or None, image_size=image_size, budget_seconds=budget_seconds, seed=seed,
                    log=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(advice.to_dict())
        return
    click.echo(advice.table())
    click.echo(f"advice saved to {advice_path(advice.store)}")


COMMANDS = [advise_cmd]
