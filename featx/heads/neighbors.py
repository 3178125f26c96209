"""`neighbors`: the rows of a store nearest to query images or rows, and `duplicates`: its near-identical pairs.

A query is a row of the store (its key or stored path) or images (a file, a folder, a CSV or list). An image whose
content is already in the store reads that row; the others are embedded with the store's own extractor (backbone,
weights, tap, pooling, transform: `featx predict`'s path) into a query cache store, so repeated queries compute
nothing. The search is exact (featx/heads/search.py): cosine similarity of L2-normalised rows, chunked.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..options import OptionError, OptionWarning
from ..store import Store, open_store
from . import search
from .neighbor_options import MAX_PAIRS, NeighborsOptions
from .prediction import HEAD_CACHE_BYTES, can_write_in, extract_images, extractor_options


@dataclass
class Query:
    """One query: a name for the output, its content key, its row in the store (or -1) and its vector."""

    name: str
    key: str | None
    row: int = -1
    vector: np.ndarray | None = None
    path: str | None = None  # the image file, when the store lacks its content


@dataclass
class NeighborResult:
    """The k nearest stored rows of each query (`records()` for JSON, `table()` for people); `note` says when k
    was more than the store could give."""

    store: str
    tap: str
    k: int
    records: list[dict]
    note: str = ""

    def table(self) -> str:
        lines = []
        for record in self.records:
            where = f" (row {record['row']})" if record["row"] is not None else ""
            lines.append(f"{record['query']}{where}")
            for hit in record["neighbors"]:
                label = f"  {hit['label']}" if hit["label"] is not None else ""
                lines.append(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['path']}{label}")
        return "\n".join(lines)


@dataclass
class DuplicateResult:
    """Pairs of stored rows at least `threshold` similar, most similar first."""

    store: str
    tap: str
    threshold: float
    pairs: list[dict] = field(default_factory=list)

    def table(self) -> str:
        if not self.pairs:
            return f"no pairs at cosine similarity >= {self.threshold} in {self.store} ({self.tap})"
        return "\n".join(f"{p['score']:.4f}  {p['a']}  {p['b']}" for p in self.pairs)


def neighbors(store, queries, *, k: int = 10, tap: str | None = None, query_store=None, weights=None,
              chunk_rows: int | None = None, batch_size: int = 64, device: str = "auto", workers: int | None = None,
              progress: bool = False, log=None) -> NeighborResult:
    """The `k` rows of the featx store `store` most similar (cosine) to each query, by exact search.

    queries: strings, each a key or stored path of a row of `store` (that row is left out of its own answer), or
    images: an image file, a folder, a CSV or list file (every image of it is a query). Images whose content the
    store holds use that row; the others are extracted with the store's extractor at `tap` into `query_store`
    (default: STORE's name with .queries.h5, beside it, kept to HEAD_CACHE_BYTES; a temporary store with a warning
    where that folder is read-only). `weights`, `batch_size`, `device`, `workers`, `progress`, `log`: as
    `featx.predict`. k above the rows a query can get is clamped, with a `note`; an image that cannot be decoded
    is a FeatxError naming it. `chunk_rows`: gallery rows read at a time (default: 64 MiB of them). Returns a
    NeighborResult (`.records`: per query its neighbours' rank, score, path, key, label, split and row)."""
    NeighborsOptions.of(locals())  # an OptionError for a value the option does not take
    queries = [str(q) for q in ([queries] if isinstance(queries, (str, os.PathLike)) else queries)]
    if not queries:
        raise FeatxError("QUERY: give at least one image, folder, or key or path of a stored row")
    with open_store(store) as gallery:
        tap = gallery_tap(gallery, tap)
        resolved, images = _resolve(gallery, queries)
        with ExitStack() as stack:
            if images:
                cache = _query_cache(gallery, query_store, stack)
                _embed(gallery, tap, images, cache, dict(weights=weights, batch_size=batch_size, device=device,
                                                         workers=workers, progress=progress, log=log))
            stored = [q for q in resolved if q.vector is None]
            if stored:
                vectors = gallery.features(tap, np.array([q.row for q in stored]))
                for q, vector in zip(stored, vectors):
                    q.vector = vector
        Q = search.normalized(np.stack([q.vector for q in resolved]))
        exclude = np.array([q.row for q in resolved], dtype=np.int64)
        hits = search.top_k(Q, gallery_blocks(gallery, tap, chunk_rows), len(gallery), k, exclude)
        got = hits.rows.shape[1]
        note = "" if got >= k else (f"{gallery.path} holds {len(gallery)} rows, so each query gets {got} of the {k} "
                                    "neighbours asked for (k clamped to what the store holds)")
        records = [_record(gallery, q, hits.rows[i], hits.scores[i]) for i, q in enumerate(resolved)]
        return NeighborResult(str(gallery.path), tap, k, records, note)


def duplicates(store, *, tap: str | None = None, threshold: float = 0.98, max_pairs: int = MAX_PAIRS,
               chunk_rows: int | None = None) -> DuplicateResult:
    """Every pair of rows of `store` whose cosine similarity is at least `threshold` (exact, chunked), most similar
    first. More than `max_pairs` pairs is a FeatxError (the threshold is too low to mean duplicates). Returns a
    DuplicateResult (`.pairs`: a, b, score, a_key, b_key)."""
    NeighborsOptions.of(locals())  # an OptionError for a value the option does not take
    with open_store(store) as gallery:
        tap = gallery_tap(gallery, tap)
        pairs, scores = search.duplicate_pairs(gallery_blocks(gallery, tap, chunk_rows), threshold, max_pairs)
        out = [{"a": str(gallery.paths[i]), "b": str(gallery.paths[j]), "score": float(s),
                "a_key": gallery.keys[i], "b_key": gallery.keys[j]} for (i, j), s in zip(pairs, scores)]
        return DuplicateResult(str(gallery.path), tap, threshold, out)


def gallery_tap(gallery: Store, tap: str | None) -> str:
    """The tap to search: `tap`, or the store's only one; pooled rows only."""
    if not len(gallery):
        raise FeatxError(f"{gallery.path}: the store holds no rows to search")
    if tap is None:
        if len(gallery.taps) != 1:
            raise OptionError("{path} holds taps {taps}: choose one with {tap}", path=gallery.path,
                              taps=", ".join(gallery.taps) or "(none)")
        tap = gallery.taps[0]
    shape = gallery.feature_shape(tap)  # a tap the store lacks is a FeatxError naming the ones it holds
    if len(shape) != 1:
        raise FeatxError(f"tap {tap!r} of {gallery.path} holds maps of shape {shape} (pooling 'none'): search needs "
                         "pooled rows; extract the tap with featx.extract(..., pooling='avg') / "
                         "`featx extract --pooling avg`")
    return tap


def gallery_blocks(gallery: Store, tap: str, chunk_rows: int | None = None) -> search.Blocks:
    """Normalised blocks of a store's tap, read chunk by chunk; a NaN or inf row is a FeatxError naming it."""
    step = chunk_rows or search.chunk_rows_for(gallery.feature_shape(tap)[0])

    def blocks():
        for start in range(0, len(gallery), step):
            block = gallery.features(tap, slice(start, start + step))
            bad = np.flatnonzero(~np.isfinite(np.einsum("ij,ij->i", block, block, dtype=np.float64)))
            if bad.size:
                row = start + int(bad[0])
                raise FeatxError(f"{gallery.path} ({tap}): row {row} ({gallery.paths[row]}) holds NaN or inf values: "
                                 "re-extract it")
            yield start, search.normalized(block, copy=False)  # a fresh array read from the file
            del block  # not held while the next chunk is read

    return blocks


def _resolve(gallery: Store, queries: list[str]) -> tuple[list[Query], list[Query]]:
    """(every query in order, those whose vector must be extracted). Rows are matched by stored path, then key."""
    from ..sources import content_key, load_source

    by_path: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for i, (path, key) in enumerate(zip(gallery.paths, gallery.keys)):  # the first row of a path or key
        by_path.setdefault(str(path), i)
        by_key.setdefault(key, i)
    resolved, images = [], []
    for text in queries:
        row = by_path.get(text, by_key.get(text.lower(), -1))
        if row >= 0:
            resolved.append(Query(text, gallery.keys[row], row))
            continue
        if not os.path.exists(text):
            raise FeatxError(f"QUERY {text}: no such file or folder, and no row of {gallery.path} has that key or path")
        for item in load_source(text).items:
            name = _display(item.path)
            try:
                key = content_key(item.path)
            except OSError as err:
                raise FeatxError(f"QUERY {name}: cannot read file ({err.strerror or err})") from None
            query = Query(name, key, by_key.get(key, -1))
            resolved.append(query)
            if query.row < 0:
                query.path = item.path
                images.append(query)
    return resolved, images


def _display(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _query_cache(gallery: Store, query_store, stack: ExitStack) -> tuple[Path, int | None]:
    """(cache store for the query images, its byte bound): `query_store`, else STORE.queries.h5 beside the store
    (bounded), else a temporary store removed afterwards, with a warning."""
    if query_store is not None:
        return Path(query_store), None
    default = gallery.path.with_name(f"{gallery.path.stem}.queries.h5")
    if can_write_in(default.parent) and (not default.exists() or os.access(default, os.W_OK)):
        return default, HEAD_CACHE_BYTES
    warnings.warn(OptionWarning("{folder} is read-only: the query images' features are not cached (pass "
                                "{query_store=$file} to keep them)", folder=default.parent, file="FILE.h5"),
                  stacklevel=3)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="featx-queries-"))
    return Path(folder) / "queries.h5", None


def _embed(gallery: Store, tap: str, images: list[Query], cache: tuple[Path, int | None], options: dict) -> None:
    """Vectors of the query images the store lacks, through the cache store (the store's extractor at `tap`)."""
    path, size_limit = cache
    owner = f"{gallery.path} was made with"
    extract_options = extractor_options(gallery.config, tap, options.pop("weights"))
    files = list(dict.fromkeys(q.path for q in images))
    result = extract_images(extract_options, files[0] if len(files) == 1 else files, path, gallery.config, owner,
                            size_limit, **options)
    if result.failed:
        name, reason = result.failed[0]
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise FeatxError(f"QUERY {name}: {reason}{more}")
    with open_store(result.store_path) as cached:
        rows = {key: i for i, key in enumerate(cached.keys)}
        vectors = cached.features(tap, np.array([rows[q.key] for q in images]))
    for q, vector in zip(images, vectors):
        q.vector = vector


def _record(gallery: Store, query: Query, rows: np.ndarray, scores: np.ndarray) -> dict:
    hits = []
    for rank, (row, score) in enumerate(zip(rows, scores), 1):
        label = int(gallery.labels[row])
        hits.append({"rank": rank, "score": float(score), "path": str(gallery.paths[row]), "key": gallery.keys[row],
                     "label": gallery.classes[label] if label >= 0 else None, "split": str(gallery.splits[row]),
                     "row": int(row)})
    return {"query": query.name, "key": query.key, "row": query.row if query.row >= 0 else None, "neighbors": hits}
