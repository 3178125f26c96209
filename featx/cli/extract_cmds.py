"""CLI: `featx extract`, `featx info`, `featx layers`."""
from __future__ import annotations

import click

from ..choices import recorded_decode
from ..extract_options import ExtractOptions
from ..layers_options import LayersOptions
from .common import echo_json


@click.command("extract")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(), help="Store to create or extend (.h5).")
@ExtractOptions.click_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_cmd(data, output, as_json, quiet, **params):
    """Compute embeddings of DATA into an HDF5 store, reusing rows already there.

    DATA is an ImageFolder (root/<class>/<img>, optionally root/{train,val,test}/<class>/<img>), a CSV of
    path,label, a text list of image paths, or 'digits' (scikit-learn's bundled digits, offline).

    The store keeps the rows of other data it holds, and drops the rows of files gone from DATA (a few; more only
    with --prune). The summary says how many rows were computed, reused, dropped and failed.
    """
    from ..extract_request import check

    options = dict(data=data, output=output, **ExtractOptions.from_command_line(params).to_dict(),
                   progress=not quiet and not as_json)
    checked = check(options)  # an unchanged rerun answers here, before torch is imported
    result = checked.result
    if result is None:
        from ..extraction import extract

        result = extract(**options, log=lambda line: click.echo(line, err=True), checked=checked)
    if as_json:
        echo_json(result.to_dict())
        return
    for path, reason in result.failed[:10]:
        click.echo(f"failed: {path}: {reason}", err=True)
    if len(result.failed) > 10:
        click.echo(f"... and {len(result.failed) - 10} more (featx info {result.store_path} --failed)", err=True)
    click.echo(result.summary())


@click.command("info")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--failed", "show_failed", is_flag=True, help="List every file that could not be decoded.")
def info_cmd(store, as_json, show_failed):
    """Show what is inside STORE and how it was made."""
    from ..store import open_store, parts_folder, unfinished_run

    with open_store(store) as st:
        summary = st.summary()
        failed = st.failed
    unfinished = unfinished_run(store)
    if as_json:
        summary["failures"] = [{"path": p, "reason": r} for p, r in failed]
        summary["unfinished"] = {"batches": unfinished[0], "rows": unfinished[1]} if unfinished else None
        echo_json(summary)
        return
    cfg = summary["config"]
    transform = cfg.get("transform", {})
    click.echo(f"store      {summary['path']}  ({summary['bytes'] / 1e6:.1f} MB, schema {summary['schema']}, featx {summary['featx_version']}, created {summary['created']})")
    click.echo(f"backbone   {cfg.get('backbone')}  weights {cfg.get('weights')}  sha256 {str(cfg.get('weights_sha256'))[:16]}")
    click.echo(f"transform  resize {transform.get('resize')} crop {transform.get('crop')} {transform.get('interpolation')}  "
               f"decode {recorded_decode(cfg)}  pooling {cfg.get('pooling')}  precision {cfg.get('precision')}  torch {cfg.get('torch')}")
    click.echo(f"items      {summary['items']} ({summary['task']}), failed {summary['failed']}")
    click.echo("data       " + ", ".join(f"{root} ({n} rows)" for root, n in summary["roots"].items()))
    if unfinished:
        click.echo(f"unfinished {unfinished[0]} committed batches ({unfinished[1]} rows) in {parts_folder(store)}: "
                   f"run the same command again to finish")
    click.echo("splits     " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    if summary["classes"]:
        click.echo("classes    " + ", ".join(f"{k} {v}" for k, v in summary["classes"].items()))
    for tap, meta in summary["taps"].items():
        click.echo(f"tap        {tap}  {tuple(meta['shape'])}  {meta['dtype']}")
    if show_failed:
        for path, reason in failed:
            click.echo(f"failed     {path}: {reason}")


@click.command("layers")
@click.argument("backbone", required=False)
@click.option("--list", "list_models", is_flag=True, help="List every backbone name.")
@LayersOptions.click_options
@click.option("--json", "as_json", is_flag=True)
def layers_cmd(backbone, list_models, as_json, **params):
    """Show the taps of BACKBONE (default: the one a -w file from featx finetune records) with output shapes and
    bytes per image after pooling."""
    from ..backbones import list_backbones
    from ..layer_table import format_layers_table, layers

    options = LayersOptions.from_command_line(params)
    if list_models:
        names = list_backbones()
        echo_json(names) if as_json else click.echo("\n".join(names))
        return
    infos = layers(backbone, **options.keywords(), log=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json([{"name": i.name, "shape": list(i.shape), "pooled_dim": i.pooled_dim,
                    "bytes_per_image": i.bytes_per_image, "usual": i.usual} for i in infos])
        return
    click.echo(format_layers_table(infos, **options.keywords(table=True)))


COMMANDS = [extract_cmd, info_cmd, layers_cmd]
