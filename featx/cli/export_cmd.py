"""featx export: a store's rows as npy + parquet (clip-retrieval's layout) or one parquet file."""
from __future__ import annotations

import click

from ..export_options import ExportOptions
from .common import echo_json, on_interrupt


@click.command("export")
@click.argument("store", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write (made when missing; must be empty).")
@ExportOptions.click_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export_cmd(store, output, as_json, quiet, **params):
    """Export the rows of a tap of STORE with their paths, keys, labels, class names and splits, for numpy,
    pandas, polars, DuckDB, embedding-reader and faiss. Streams in chunks: memory holds one chunk."""
    from ..exporter import export

    options = ExportOptions.from_command_line(params)
    on_interrupt(f"featx: interrupted (no partial export is left in {output})")
    result = export(store, output, **options.to_dict(), progress=not quiet and not as_json)
    echo_json(result.to_dict()) if as_json else click.echo(result.summary())


COMMANDS = [export_cmd]
