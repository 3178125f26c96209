"""`POST /v1/search`: the stored images nearest to uploaded images or to given embeddings, in a store served with
`featx serve --search STORE`.

Each search store is named by its file's stem. Its rows of a tap are read once, L2-normalised, and held in memory
(refused at the first search when they do not fit); queries are embedded with the store's own extractor through
the service's cache and batcher, then searched exactly as `featx neighbors` does (featx/heads/search.py). An image
whose content the store holds is left out of its own answer (`row` says which it is).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Query, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..errors import FeatxError
from ..options import OptionError
from ..heads import search
from ..heads.data import available_memory
from ..heads.neighbors import gallery_blocks
from ..store import open_store
from .contract import IMAGES, Answer, Embeddings, json_body, request_body
from .errors import ServiceError, embeddings_json

class Hit(Answer):
    rank: int
    score: float = Field(description="cosine similarity")
    path: str = Field(description="the stored image's path")
    key: str = Field(description="the stored image's content key")
    label: str | None = Field(description="its class, None when unlabelled")


class QueryHits(Answer):
    sha256: str | None = Field(description="the uploaded image's content key (images only)")
    row: str | None = Field(description="the stored path of the uploaded image, when the store holds it")
    neighbors: list[Hit]


class SearchAnswer(Answer):
    store: str
    tap: str
    k: int
    note: str | None = Field(description="why fewer than k neighbours came back")
    results: list[QueryHits]


@dataclass
class SearchStore:
    """A store served for search: its path, config, row metadata, and normalised rows by tap (read on first use)."""

    name: str
    path: Path
    config: dict
    taps: list[str]
    keys: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]
    widths: dict  # tap -> row width
    rows: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, path) -> "SearchStore":
        """Read a store's metadata (FeatxError: not a featx store, no rows, or no pooled tap)."""
        path = Path(path)
        with open_store(path) as store:
            widths = {tap: store.feature_shape(tap)[0] for tap in store.taps if len(store.feature_shape(tap)) == 1}
            if not len(store):
                raise OptionError("{search=}: the store holds no rows to search", search=str(path))
            if not widths:
                raise OptionError("{search=}: no tap of pooled rows (extract one with featx.extract(..., pooling='avg') "
                                  "/ `featx extract --pooling avg`)", search=str(path))
            return cls(path.stem, path, store.config, list(widths), store.keys, store.paths, store.labels,
                       store.classes, widths)

    def normalized_rows(self, tap: str) -> np.ndarray:
        """All rows of `tap`, normalised, read once; a ServiceError 503 when they do not fit in memory."""
        with self.lock:
            if tap not in self.rows:
                with open_store(self.path) as store:
                    width = store.feature_shape(tap)[0]
                    need, free = len(store) * width * 4, available_memory()
                    if free is not None and need > free:
                        raise ServiceError(503, f"search store {self.name}: {tap} rows need {need:,} bytes, "
                                                f"{free:,} are available")
                    blocks = [block for _, block in gallery_blocks(store, tap)()]
                self.rows[tap] = np.concatenate(blocks)
            return self.rows[tap]

    def hits(self, queries: np.ndarray, tap: str, k: int, exclude: np.ndarray) -> list[list[dict]]:
        rows = self.normalized_rows(tap)
        found = search.top_k(search.normalized(queries), search.array_blocks(rows), len(rows), k, exclude)
        return [[{"rank": rank, "score": float(score), "path": str(self.paths[row]), "key": self.keys[row],
                  "label": self.classes[self.labels[row]] if self.labels[row] >= 0 else None}
                 for rank, (row, score) in enumerate(zip(found.rows[i], found.scores[i]), 1)]
                for i in range(len(queries))]


def open_search_stores(paths) -> dict[str, SearchStore]:
    """The --search stores by name (a file's stem); two stores of one name are refused."""
    stores: dict[str, SearchStore] = {}
    for path in paths:
        opened = SearchStore.open(path)
        if opened.name in stores:
            raise OptionError("{search=}: another search store is named {name!r} too; rename one", search=str(path),
                              name=opened.name)
        stores[opened.name] = opened
    return stores


def add_search_route(app, service, auth, refusals, uploads, read_json, content_type) -> None:
    """POST /v1/search on `app` (auth: the API-key dependencies; refusals: the app's declared error answers;
    uploads, read_json, content_type: its request readers)."""

    @app.post("/v1/search", dependencies=auth, summary="The stored images nearest to images or embeddings",
              openapi_extra=request_body(*IMAGES, json_body(Embeddings)), response_model=SearchAnswer,
              responses=refusals(404, 413, 415, 422, 503))
    async def search_route(request: Request, k: int = Query(10, ge=1, le=10_000),
                           store: str | None = Query(None, description="a --search store's name (its file's stem)"),
                           tap: str | None = Query(None, description="default: the store's only pooled tap")):
        """Images as multipart `file` fields or a raw image body, or JSON {"embeddings": [[...], ...]}: for each,
        the k most similar stored rows (cosine), with path, key, label and score. k above the rows is clamped."""
        if not service.ready:
            raise ServiceError(503, service.failure or "the models are still loading: retry when /healthz answers 200")
        chosen = _store(service.search_stores, store)
        tap = tap or (chosen.taps[0] if len(chosen.taps) == 1 else None)
        if tap not in chosen.taps:
            raise ServiceError(422, f"tap {tap!r}: search store {chosen.name} has the pooled taps "
                                    f"{', '.join(chosen.taps)}" + ("; choose one with ?tap=" if tap is None else ""))
        keys = None
        if content_type(request) == "application/json":
            queries = embeddings_json(await read_json(request), chosen.widths[tap], "the search store's rows are")
        else:
            extractor = await run_in_threadpool(service.engine.extractor, chosen.config)  # built at start-up
            embedded = await service.embed(extractor, await uploads(request))
            queries = np.stack([np.asarray(e.rows[tap], dtype=np.float32) for e in embedded])
            keys = [e.key for e in embedded]
        by_key = {key: row for row, key in enumerate(chosen.keys)}
        own = np.array([by_key.get(key, -1) for key in keys] if keys else [-1] * len(queries), dtype=np.int64)
        found = await run_in_threadpool(chosen.hits, queries, tap, k, own)
        results = [{"sha256": keys[i] if keys else None, "row": str(chosen.paths[own[i]]) if own[i] >= 0 else None,
                    "neighbors": hits} for i, hits in enumerate(found)]
        got = len(found[0]) if found else 0
        note = f"k {k} clamped to the {got} rows each query can get" if got < k else None
        return {"store": chosen.name, "tap": tap, "k": k, "note": note, "results": results}


def _store(stores: dict, name: str | None):
    if not stores:
        raise ServiceError(404, "no search store: start featx serve with --search STORE")
    if name is None:
        if len(stores) > 1:
            raise ServiceError(422, f"store: name one of the search stores ({', '.join(stores)}) with ?store=")
        return next(iter(stores.values()))
    if name not in stores:
        raise ServiceError(404, f"no search store named {name!r} (served: {', '.join(stores)})")
    return stores[name]
