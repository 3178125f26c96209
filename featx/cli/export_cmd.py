"""featx export: a store's rows as npy + parquet (clip-retrieval's layout) or one parquet file."""
from __future__ import annotations

import click

from ..choices import EXPORT_FORMATS
from .common import echo_json, on_interrupt


@click.command("export")
@click.argument("store", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write (made when missing; must be empty).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="npy", show_default=True,
              help="npy: img_emb/img_emb_N.npy + metadata/metadata_N.parquet (clip-retrieval, embedding-reader, "
                   "autofaiss); parquet: one embeddings.parquet with the embedding as a fixed-size list column.")
@click.option("-l", "--layer", "tap", help="Tap to export (default: the store's only tap).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="npy: rows per img_emb / metadata file pair.")
@click.option("--chunk-rows", type=click.IntRange(min=1),
              help="Rows read and written at a time (and per parquet row group). Default: about 64 MiB of rows.")
@click.option("--overwrite", is_flag=True, help="Write into a folder that is not empty, replacing an earlier export there.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export_cmd(store, output, fmt, tap, shard_rows, chunk_rows, overwrite, as_json, quiet):
    """Export the rows of a tap of STORE with their paths, keys, labels, class names and splits, for numpy,
    pandas, polars, DuckDB, embedding-reader and faiss. Streams in chunks: memory holds one chunk."""
    from ..exporter import export

    on_interrupt(f"featx: interrupted (no partial export is left in {output})")
    result = export(store, output, format=fmt, tap=tap, shard_rows=shard_rows, chunk_rows=chunk_rows,
                    overwrite=overwrite, progress=not quiet and not as_json)
    echo_json(result.to_dict()) if as_json else click.echo(result.summary())


COMMANDS = [export_cmd]
