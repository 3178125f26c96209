"""The options of `featx export` and `featx.export`, spelled once (featx.options)."""
from __future__ import annotations

from dataclasses import dataclass

from .choices import EXPORT_FORMATS
from .options import Options, option

SHARD_ROWS = 1_000_000  # rows per npy shard: clip-retrieval's default write batch
ROWS = "a whole number of rows >= 1"


@dataclass(frozen=True)
class ExportOptions(Options):
    """Everything an export call takes besides the store, the output folder and the progress bar."""

    format: str = option(
        "npy", "--format", choices=EXPORT_FORMATS,
        help="npy: img_emb/img_emb_N.npy + metadata/metadata_N.parquet (clip-retrieval, embedding-reader, "
             "autofaiss); parquet: one embeddings.parquet with the embedding as a fixed-size list column.")
    tap: str | None = option(None, "-l", "--layer", kind=str, help="Tap to export (default: the store's only tap).")
    shard_rows: int = option(SHARD_ROWS, "--shard-rows", low=1, expected=ROWS,
                             help="npy: rows per img_emb / metadata file pair.")
    chunk_rows: int | None = option(
        None, "--chunk-rows", kind=int, low=1, expected=ROWS,
        help="Rows read and written at a time (and per parquet row group). Default: about 64 MiB of rows.")
    overwrite: bool = option(False, "--overwrite",
                             help="Write into a folder that is not empty, replacing an earlier export there.")
