"""CLI: `featx advise` (a thin wrapper over featx.advise)."""
from __future__ import annotations

import click

from ..advise_options import AdviseOptions
from .common import echo_json


@click.command("advise")
@click.argument("data")
@AdviseOptions.click_options(store=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
def advise_cmd(data, as_json, **params):
    """Measure DATA against a backbone and recommend: probe at a tap, finetune --freeze until:TAP, or full finetune.

    Extracts the taps once (within the budget), fits probes on growing class-balanced subsets at each tap, and
    compares the pre-logits with the stage outputs (how far DATA is from the pretraining). Prints a table with
    the expected accuracy, the seconds on this machine and the exact command of each choice. With several -b,
    every backbone x tap is measured on the same images within the one budget and ranked: the most accurate, and
    the cheapest to extract within a point of it.
    """
    from ..advice import advice_path, advise

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    options = AdviseOptions.from_command_line(params)
    specs = options.specs()
    if len(specs) > 1:
        from ..advise_backbones import advise_backbones

        comparison = advise_backbones(data, specs, store=options.store, image_size=options.image_size,
                                      budget_seconds=options.budget_seconds, seed=options.seed, log=log)
        if as_json:
            echo_json(comparison.to_dict())
            return
        click.echo(comparison.table())
        click.echo(f"advice saved to {comparison.saved}")
        return
    (backbone, weights, match), = specs
    advice = advise(data, **{**options.to_dict(), "backbone": backbone, "weights": weights, "weights_match": match},
                    log=log)
    if as_json:
        echo_json(advice.to_dict())
        return
    click.echo(advice.table())
    click.echo(f"advice saved to {advice_path(advice.store)}")


COMMANDS = [advise_cmd]
