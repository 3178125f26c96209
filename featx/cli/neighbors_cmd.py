"""CLI: `featx neighbors` (a thin wrapper over featx.heads.neighbors)."""
from __future__ import annotations

import click

from ..errors import FeatxError
from .common import PathParam, echo_json, warn
from .head_cmds import _warnings_as_lines

STORE = PathParam("input", "a featx store (.h5)")


@click.command("neighbors")
@click.argument("store", type=STORE)
@click.argument("queries", nargs=-1, metavar="[QUERY...]")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Neighbours per query (clamped to the rows the store holds, with a note).")
@click.option("-l", "--layer", "--tap", "tap", help="Tap to search (default: the store's only tap).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--duplicates", is_flag=True, help="Instead of queries: every pair of stored rows at least "
                                                 "--threshold similar.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.98, show_default=True,
              help="--duplicates: the least cosine similarity of a pair.")
@click.option("--max-pairs", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="--duplicates: refuse (one line) when more pairs than this are found.")
@click.option("--query-store", type=PathParam("output", "the .h5 store that caches the query images' features"),
              help="Store for the query images' features (default: STORE's name with .queries.h5, beside it).")
@click.option("-w", "--weights", metavar="FILE", help="STORE's weights file, when it is no longer where STORE "
                                                             "recorded it (its sha256 must be the recorded one).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|cuda:N|mps")
@click.option("--workers", type=click.IntRange(min=0), help="Image decoding workers (default: cores - 1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def neighbors_cmd(store, queries, k, tap, as_json, duplicates, threshold, max_pairs, query_store, weights,
                  batch_size, device, workers, quiet):
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

    if duplicates:
        if queries:
            raise FeatxError("--duplicates compares the rows of STORE with each other: give no QUERY")
        result = find_duplicates(store, tap=tap, threshold=threshold, max_pairs=max_pairs)
        if as_json:
            echo_json({"store": result.store, "tap": result.tap, "threshold": threshold, "pairs": result.pairs})
        else:
            click.echo(result.table())
        return
    if not queries:
        raise FeatxError("featx neighbors: give at least one QUERY (an image, a folder, or a stored row's key or "
                         "path), or --duplicates")
    with _warnings_as_lines():
        result = neighbors(store, list(queries), k=k, tap=tap, query_store=query_store, weights=weights,
                           batch_size=batch_size, device=device, workers=workers, progress=not quiet and not as_json,
                           log=None if as_json else lambda line: click.echo(line, err=True))
    if result.note:
        warn(result.note)
    if as_json:
        echo_json({"store": result.store, "tap": result.tap, "k": result.k, "results": result.records})
    else:
        click.echo(result.table())


COMMANDS = [neighbors_cmd]
