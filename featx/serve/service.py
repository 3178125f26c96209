"""The service's state, shared by the routes: heads, cache, extractors, metrics, training jobs, readiness."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from ..errors import FeatxError
from ..options import OptionError
from ..runner import identity_key
from ..extract_request import weights_for
from ..sources import DecodeError, content_key, sha256_file
from .cache import EmbeddingCache, match_store
from .engine import Engine, Extractor, weights_of
from .errors import ServiceError
from .metrics import Metrics
from .options import ServeOptions
from .registry import HeadRegistry, ServedHead
from .search import open_search_stores
from .training import Trainer

log = logging.getLogger("featx.serve")


@dataclass
class Upload:
    """One uploaded image: a name for messages (its multipart filename, or its position) and its bytes."""

    name: str
    data: bytes


@dataclass
class Embedded:
    """One image's rows (by tap), its sha256 and whether they came from the cache."""

    key: str
    rows: dict
    cached: bool


class Service:
    """Everything `featx serve` holds. Built before the port is served (bad heads, a locked cache: FeatxError);
    `start` then loads the extractors while /healthz answers 503."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.metrics = Metrics()
        self.registry = HeadRegistry(options.heads, options.trust, options.heads_dir)
        self.search_stores = open_search_stores(options.search)
        self.cache = EmbeddingCache(options.cache_items, self.metrics)
        self.engine = Engine(options.device, options.max_batch, options.max_wait_ms, self.cache, self.metrics,
                             weights=options.weights)
        self._check_weights()
        self.trainer = Trainer(self.registry, options.heads_dir) if options.allow_training else None
        self.ready = False
        self.failure: str | None = None
        if options.cache:
            key, config = match_store(options.cache, self.configs())
            self.cache.attach_store(options.cache, key, config)

    def configs(self) -> dict[str, dict]:
        """The distinct extractor configs of the served heads, by identity key."""
        return {identity_key(s.head.config): s.head.config for s in self.registry.all() if s.head.config}

    def _check_weights(self) -> None:
        """Before the port is served: every -w file holds some served head's weights, and every head's weights
        file is where it was recorded or given with -w (one OptionError line otherwise)."""
        configs = self.configs().values()
        for file in self.options.weights:
            if not any(weights_of(config, [file]) for config in configs):
                raise OptionError("{weights=}: sha256 {sha}... is the weights of none of the served heads",
                                  weights=file, sha=sha256_file(file)[:16])
        for config in configs:
            weights_for(config, weights_of(config, self.options.weights))

    def start(self) -> None:
        """Build every extractor once (heads and search stores sharing a config share it); then the service is
        ready."""
        try:
            for config in [*self.configs().values(), *(s.config for s in self.search_stores.values())]:
                self.engine.extractor(config)
        except FeatxError as err:
            self.failure = str(err)
            return
        self.ready = True

    def close(self) -> None:
        self.engine.close()
        self.cache.close()

    def head(self, name: str) -> ServedHead:
        served = self.registry.get(name)
        if served is None:
            raise ServiceError(404, f"no head named {name!r} (served: {', '.join(self.registry.names()) or 'none'})")
        return served

    async def extractor_for(self, served: ServedHead) -> Extractor:
        """The extractor of a head (built now if the head was rewritten with another config)."""
        if not served.head.config:
            raise ServiceError(422, f"head {served.name!r} was fitted on foreign features: send JSON "
                                    '{"embeddings": [[...]]} instead of images')
        key = identity_key(served.head.config)
        extractor = self.engine.extractors.get(key)
        return extractor or await run_in_threadpool(self.engine.extractor, served.head.config)

    def only_extractor(self, what: str) -> Extractor:
        extractors = list(self.engine.extractors.values())
        if len(extractors) != 1:
            raise ServiceError(422, f"{what}: the heads use {len(extractors)} extractors; name a head "
                                    "(?head=NAME) to choose its extractor")
        return extractors[0]

    async def embed(self, extractor: Extractor, uploads: list[Upload]) -> list[Embedded]:
        """Rows of every upload (through the cache and the batcher); one bad image: ServiceError 422 naming it."""
        keys = [content_key(u.data) for u in uploads]
        results = await asyncio.gather(*(extractor.embed(k, u.data) for k, u in zip(keys, uploads)),
                                       return_exceptions=True)
        for upload, result in zip(uploads, results):
            if isinstance(result, DecodeError):
                raise ServiceError(422, f"{upload.name}: {result}")
            if isinstance(result, BaseException):
                raise result
        return [Embedded(key, rows, cached) for key, (rows, cached) in zip(keys, results)]
