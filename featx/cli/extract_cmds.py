"""CLI: `featx extract`, `featx info`, `featx layers`."""
from __future__ import annotations

import click

from ..choices import (DECODES, DEFAULT_DECODE, DEVICE_CHOICES, POOLINGS, PRECISIONS, TOKEN_POOLINGS, WEIGHTS_MATCHES,
                       recorded_decode)
from ..cpu import usable_cores
from ..tuning import max_workers
from .common import BACKBONE_HELP, echo_json


@click.command("extract")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(), help="Store to create or extend (.h5).")
@click.option("-b", "--backbone", help=BACKBONE_HELP)
@click.option("-w", "--weights", default="DEFAULT", show_default=True,
              help="torchvision weights name (DEFAULT, IMAGENET1K_V2, ...) or timm tag (DEFAULT, in1k, ...), a local .pth/.safetensors file, or 'none' (random init).")
@click.option("--weights-match", type=click.Choice(WEIGHTS_MATCHES), default="name", show_default=True,
              help="How a -w FILE's tensors pair with the model's: by key and shape, or by position (a file of the same architecture in another implementation's names).")
@click.option("-l", "--layer", "taps", multiple=True, help="Tap (graph node) to store; repeat for several. Default: the penultimate layer.")
@click.option("--pooling", type=click.Choice(POOLINGS), default="avg", show_default=True, help="How 4-D feature maps become rows.")
@click.option("--token-pool", type=click.Choice(TOKEN_POOLINGS), default="cls", show_default=True, help="Transformer token outputs: class token or mean of tokens.")
@click.option("--image-size", type=click.IntRange(min=8), help="Center-crop size (default: the weights' preset).")
@click.option("--resize", type=click.IntRange(min=8), help="Shorter-side resize before the crop (default: keeps the preset's ratio).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch (default: fitted to the machine, see docs/performance.md).")
@click.option("--workers", type=click.IntRange(0, max_workers()), help="Decode worker processes, 0 = decode in the main process (default: fitted to the machine).")
@click.option("--threads", type=click.IntRange(1, usable_cores()), help="torch threads of the model on the CPU (default: fitted to the machine).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_CHOICES)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto = bf16 on CPUs that support it, bf16/fp16 on CUDA.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage dtype of the rows.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True, help="Undecodable images: record in /failed and go on, or stop.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with another config (the old one stays until the new one is sealed).")
@click.option("--prune", is_flag=True, help="Mirror DATA exactly: drop the rows of other data, and the rows of files gone from DATA however many (without it other data's rows stay, and a run that would drop many rows is refused).")
@click.option("--decode", type=click.Choice(DECODES), default=DEFAULT_DECODE, show_default=True, help="exact: every image at full size, the reference pipelines' pixels; fast: large JPEGs decoded at a reduced scale (>= 2x the resize) first, faster, rows a little off; reduced: >= 1x the resize (stores made before exact); gpu: JPEGs in batches on the CUDA device (nvJPEG). Part of the store's identity.")
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile: a warm-up of seconds to a minute, then faster batches (for large sets; see benchmarks/extract_throughput.py).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="Run here, or decode and compute on a Ray cluster (pip install 'featx[ray]').")
@click.option("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance).")
@click.option("--num-gpus-per-worker", type=float, help="GPUs per Ray model actor (default 0: the model runs on the workers' CPUs).")
@click.option("--num-shards", type=int, help="Split the work into this many independent processes (Slurm arrays, several machines); torchrun needs none.")
@click.option("--shard-index", type=int, help="Which shard this process computes, 0..num-shards-1; the last shard to finish seals.")
@click.option("--rehash", is_flag=True, help="Read every image file to key it, instead of trusting the stat index for files whose size, mtime, ctime and inode are unchanged (see docs/scaling.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract_cmd(data, output, backbone, weights, weights_match, taps, pooling, token_pool, image_size, resize, batch_size, workers,
                threads, device, precision, dtype, on_error, overwrite, prune, decode, compile_model, engine, ray_address,
                num_gpus_per_worker, num_shards, shard_index, rehash, as_json, quiet):
    """Compute embeddings of DATA into an HDF5 store, reusing rows already there.

    DATA is an ImageFolder (root/<class>/<img>, optionally root/{train,val,test}/<class>/<img>), a CSV of
    path,label, a text list of image paths, or 'digits' (scikit-learn's bundled digits, offline).

    The store keeps the rows of other data it holds, and drops the rows of files gone from DATA (a few; more only
    with --prune). The summary says how many rows were computed, reused, dropped and failed.
    """
    from ..extract_request import check

    options = dict(
        data=data, output=output, backbone=backbone, weights=weights, weights_match=weights_match,
        taps=list(taps) or None, pooling=pooling, token_pool=token_pool, image_size=image_size, resize=resize,
        batch_size=batch_size, workers=workers, threads=threads, device=device, precision=precision, dtype=dtype, on_error=on_error,
        overwrite=overwrite, retention="prune" if prune else "mirror", decode=decode, compile_model=compile_model, engine=engine, ray_address=ray_address,
        num_gpus_per_worker=num_gpus_per_worker, num_shards=num_shards, shard_index=shard_index, rehash=rehash,
        progress=not quiet and not as_json,
    )
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
@click.option("-w", "--weights", default="none", show_default=True, help="Weights to load first (a file shows its load report); the shapes do not depend on them.")
@click.option("--weights-match", type=click.Choice(WEIGHTS_MATCHES), default="name", show_default=True,
              help="How a -w FILE's tensors pair with the model's: by key and shape, or by position (a file of the same architecture in another implementation's names).")
@click.option("--list", "list_models", is_flag=True, help="List every backbone name.")
@click.option("--all", "include_all", is_flag=True, help="Every graph node, not only the usual taps.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8))
@click.option("--pooling", type=click.Choice(POOLINGS), default="avg", show_default=True)
@click.option("-n", "--images", type=click.IntRange(min=1), help="Estimate the store size for this many images.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def layers_cmd(backbone, weights, weights_match, list_models, include_all, image_size, pooling, images, dtype, as_json):
    """Show the taps of BACKBONE (default: the one a -w file from featx finetune records) with output shapes and
    bytes per image after pooling."""
    from ..backbones import list_backbones
    from ..layer_table import format_layers_table, layers

    if list_models:
        names = list_backbones()
        echo_json(names) if as_json else click.echo("\n".join(names))
        return
    infos = layers(backbone, weights, weights_match=weights_match, image_size=image_size, pooling=pooling,
                   include_all=include_all, log=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json([{"name": i.name, "shape": list(i.shape), "pooled_dim": i.pooled_dim,
                    "bytes_per_image": i.bytes_per_image, "usual": i.usual} for i in infos])
        return
    click.echo(format_layers_table(infos, n_images=images, dtype=dtype))


COMMANDS = [extract_cmd, info_cmd, layers_cmd]
