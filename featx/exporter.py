"""featx export: the rows of one tap of a store as files that other tools read, written in bounded chunks.

Two layouts in an output folder:

* ``npy`` (clip-retrieval's): ``img_emb/img_emb_<i>.npy`` (2-D, little-endian, the store's float dtype) and
  ``metadata/metadata_<i>.parquet``; shard i of both holds the same rows in the same order. Shard numbers are
  zero-padded to the digits of the shard count, as clip-retrieval does, because embedding-reader, autofaiss and
  clip-retrieval's back end pair the two folders' files by sorted name.
* ``parquet``: ``embeddings.parquet``, the metadata columns and ``embedding`` as a fixed-size list of float32
  (pandas, polars, DuckDB), one row group per chunk.

Rows of an unpooled tap are flattened in C order; the row shape is recorded in each parquet file's ``featx``
metadata (JSON, with the store, tap and config). Every file is written inside a hidden staging folder and moved
into place only once all are complete, so an interrupted or failed export leaves no file under a final name.

The npy files are written by hand (numpy's own header writer, then the rows chunk by chunk) because ``np.save``
needs the whole array in memory; pyarrow's ParquetWriter writes the parquet files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import FeatxError
from .options import OptionError
from .export_options import SHARD_ROWS, ExportOptions
from .store import Store, fsync_path, open_store

STAGING = ".featx-export.partial"
PARQUET_FILE = "embeddings.parquet"
OUTPUTS = ("img_emb", "metadata", PARQUET_FILE)  # what an export puts in its folder, and --overwrite replaces


@dataclass
class ExportResult:
    output: str
    format: str
    tap: str
    rows: int
    dim: int
    dtype: str
    files: list[str]  # relative to output

    def summary(self) -> str:
        folders: dict[str, int] = {}
        for name in self.files:
            top = name.split("/")[0] + ("/" if "/" in name else "")
            folders[top] = folders.get(top, 0) + 1
        written = ", ".join(f"{top} ({n} file{'s' if n > 1 else ''})" if top.endswith("/") else top
                            for top, n in folders.items())
        return f"exported {self.rows} rows of {self.tap} ({self.dim} {self.dtype}) to {self.output}: {written}"

    def to_dict(self) -> dict:
        return asdict(self)


def export(store, output, format: str = "npy", tap: str | None = None, shard_rows: int = SHARD_ROWS,
           chunk_rows: int | None = None, overwrite: bool = False, progress: bool = False) -> ExportResult:
    """Write the rows of `tap` (default: the store's only tap) of `store` with their metadata (path, image_path,
    key, split, label, class_name or target) into the folder `output`: format 'npy' (clip-retrieval's layout,
    `shard_rows` rows per file) or 'parquet' (one file). Reads `chunk_rows` rows at a time (default: about 64 MiB).
    A non-empty `output` is refused unless `overwrite` (which replaces only an export's own files there).
    Returns an ExportResult (the files written, rows, dimension, dtype)."""
    ExportOptions.of(locals())  # an OptionError for a value the option does not take
    output = Path(output)
    if output.suffix.lower() in (".parquet", ".npy"):
        raise OptionError("{output=}: expected a folder (featx export writes files inside it), not a file name",
                          output=str(output))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise FeatxError("featx export needs pyarrow: pip install 'featx[export]'") from None
    with open_store(store) as st:
        tap = st.resolve_tap(tap)
        if not len(st):
            raise FeatxError(f"{st.path} holds no rows: nothing to export")
        with _export_folder(output, overwrite) as staging:
            writer = _write_npy_shards if format == "npy" else _write_parquet
            files = writer(st, tap, staging, shard_rows, chunk_rows, progress)
            for name in files:
                fsync_path(staging / name)
            _publish(staging, output)
        dtype = np.dtype(np.float32 if format == "parquet" else st.feature_dtype(tap))
        dim = int(np.prod(st.feature_shape(tap), dtype=np.int64))
        return ExportResult(str(output), format, tap, len(st), dim, dtype.name, files)


@contextlib.contextmanager
def _export_folder(output: Path, overwrite: bool):
    """The staging folder inside `output` (made with its parents when missing), under an exclusive lock on
    `output`; removed whatever happens, with the folders this call made when they stay empty."""
    made = [p for p in [output, *output.parents] if not p.exists()][::-1]
    if output.exists() and not output.is_dir():
        raise OptionError("{output=}: is a file, expected a folder for the exported files", output=str(output))
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output, os.O_RDONLY)
    except OSError as err:
        raise OptionError("{output=}: cannot create the folder ({reason})", output=str(output),
                          reason=err.strerror) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OptionError("{output=}: another featx export is writing there; wait for it to finish",
                              output=str(output)) from None
        try:
            held = sorted(p.name for p in output.iterdir() if p.name != STAGING)
        except OSError as err:
            raise OptionError("{output=}: cannot list the folder ({reason})", output=str(output),
                              reason=err.strerror) from None
        if held and not overwrite:
            raise OptionError("{output=}: the folder is not empty ({held}): choose a new or empty folder, or pass "
                              "{overwrite=True} to replace an earlier export there", output=str(output),
                              held=", ".join(held[:3]) + (", ..." if len(held) > 3 else ""))
        staging = output / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
        try:
            staging.mkdir()
        except OSError as err:
            raise OptionError("{output=}: cannot write in the folder ({reason})", output=str(output),
                              reason=err.strerror) from None
        try:
            yield staging
        except OSError as err:
            raise OptionError("{output=}: cannot write {what} ({reason}); nothing was exported", output=str(output),
                              what=err.filename or "the export", reason=err.strerror) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(fd)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one: a folder made for a failed export


def _shard_bounds(n: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_rows, n)) for lo in range(0, n, shard_rows)]


def _write_npy_shards(st: Store, tap: str, staging: Path, shard_rows: int, chunk_rows, progress: bool) -> list[str]:
    """img_emb/img_emb_<i>.npy and metadata/metadata_<i>.parquet for each shard of rows."""
    import pyarrow.parquet as pq

    dtype = np.dtype(st.feature_dtype(tap)).newbyteorder("<")
    dim = int(np.prod(st.feature_shape(tap), dtype=np.int64))
    bounds = _shard_bounds(len(st), shard_rows)
    digits = len(str(len(bounds)))
    columns, schema = _metadata(st, tap)
    (staging / "img_emb").mkdir()
    (staging / "metadata").mkdir()
    files = []
    with _progress(len(st), progress) as bar:
        for i, (lo, hi) in enumerate(bounds):
            emb = f"img_emb/img_emb_{i:0{digits}d}.npy"
            meta = f"metadata/metadata_{i:0{digits}d}.parquet"
            with open(staging / emb, "wb") as f, pq.ParquetWriter(staging / meta, schema) as parquet:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": (hi - lo, dim)})
                for rows, block in st.batches(tap, rows=slice(lo, hi), size=chunk_rows):
                    f.write(np.ascontiguousarray(block.reshape(len(rows), dim), dtype=dtype).tobytes())
                    parquet.write_table(_table(columns, schema, rows))
                    bar.update(len(rows))
            files += [emb, meta]
    return files


def _write_parquet(st: Store, tap: str, staging: Path, shard_rows: int, chunk_rows, progress: bool) -> list[str]:
    """embeddings.parquet: the metadata columns and `embedding`, a fixed-size list of float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = int(np.prod(st.feature_shape(tap), dtype=np.int64))
    columns, schema = _metadata(st, tap)
    schema = schema.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
    with _progress(len(st), progress) as bar, pq.ParquetWriter(staging / PARQUET_FILE, schema) as parquet:
        for rows, block in st.batches(tap, size=chunk_rows):
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
            parquet.write_table(_table(columns, schema, rows, embedding))
            bar.update(len(rows))
    return [PARQUET_FILE]


def _metadata(st: Store, tap: str):
    """The store's metadata columns and their arrow schema, which carries the export's provenance as `featx`."""
    import pyarrow as pa

    from . import __version__

    columns = st.metadata()
    types = {"label": pa.int64(), "target": pa.float64()}
    fields = [pa.field(name, types.get(name, pa.string())) for name in columns]
    provenance = {"store": str(st.path), "tap": tap, "row_shape": list(st.feature_shape(tap)),
                  "store_dtype": str(st.feature_dtype(tap)), "rows": len(st), "config_key": st.config_key,
                  "config": st.config, "featx_version": __version__}
    return columns, pa.schema(fields, metadata={"featx": json.dumps(provenance, default=str)})


def _table(columns: dict, schema, rows: np.ndarray, embedding=None):
    import pyarrow as pa

    arrays = [pa.array(columns[field.name][rows], type=field.type) for field in schema if field.name in columns]
    return pa.Table.from_arrays(arrays + ([embedding] if embedding is not None else []), schema=schema)


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    with tqdm(total=total, unit="rows", disable=not enabled, file=sys.stderr, desc="export") as bar:
        yield bar


def _publish(staging: Path, output: Path) -> None:
    """Move the staged files to their final names (an earlier export's, which only --overwrite lets stay this far,
    go first), with Ctrl-C held back meanwhile so that the folder never holds half of each."""
    replaced = staging / "replaced"
    replaced.mkdir()
    with _sigint_held():
        for name in OUTPUTS:
            if (output / name).is_symlink() or (output / name).exists():
                os.replace(output / name, replaced / name)
            if (staging / name).exists():
                os.replace(staging / name, output / name)
        fsync_path(output)


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C waits until the block is done (main thread only, where Python handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
