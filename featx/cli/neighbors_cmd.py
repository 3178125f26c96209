"""CLI: `featx neighbors` (a thin wrapper over featx.heads.neighbors)."""
from __future__ import annotations

import click

from ..errors import FeatxError
from ..heads.neighbor_options import NeighborsOptions
from .common import PathParam, echo_json, warn
from .head_cmds import _warnings_as_lines

STORE = PathParam("input", "a featx store (.h5)")
QUERY_STORE = PathParam("output", "the .h5 store that caches the query images' features")


@click.command("neighbors")
@click.argument("store", type=STORE)
@click.argument("queries", nargs=-1, metavar="[QUERY...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--duplicates", is_flag=True, help="Instead of queries: every pair of stored rows at least "
                                                 "--threshold similar.")
@NeighborsOptions.click_options(query_store=QUERY_STORE)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def neighbors_cmd(store, queries, as_json, duplicates, quiet, **params):
    """The rows of STORE most similar to each QUERY (exact cosine search, memory bounded), or with --duplicates
    its near-identical pairs.

    A QUERY is the key or stored path of a row of STORE (left out of its own answer), or images: a file, a
    folder, a CSV or list. Images whose content STORE holds use that row; the others are embedded with STORE's
    own backbone, weights and transform through a cache store (--query-store).

    \b
    featx neighbors pets.h5 new/cat.jpg -k 5
    featx neighbors pets.h5 --duplicates --threshold 0.98 --json
    """
    from ..heads.neighbors import duplicates as find_duplicates
    from ..heads.neighbors import neighbors

    options = NeighborsOptions.from_command_line(params)
    if duplicates:
        if queries:
            raise FeatxError("--duplicates compares the rows of STORE with each other: give no QUERY")
        result = find_duplicates(store, **options.keywords("duplicates"))
        if as_json:
            echo_json({"store": result.store, "tap": result.tap, "threshold": options.threshold,
                       "pairs": result.pairs})
        else:
            click.echo(result.table())
        return
    if not queries:
        raise FeatxError("featx neighbors: give at least one QUERY (an image, a folder, or a stored row's key or "
                         "path), or --duplicates")
    with _warnings_as_lines():
        result = neighbors(store, list(queries), **options.keywords("neighbors"), progress=not quiet and not as_json,
                           log=None if as_json else lambda line: click.echo(line, err=True))
    if result.note:
        warn(result.note)
    if as_json:
        echo_json({"store": result.store, "tap": result.tap, "k": result.k, "results": result.records})
    else:
        click.echo(result.table())


COMMANDS = [neighbors_cmd]
