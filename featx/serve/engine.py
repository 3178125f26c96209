"""One extractor per distinct head config, and the micro-batcher that coalesces concurrent images into one pass.

Heads trained on the same backbone, weights, tap set, pooling, transform, precision and dtype (the store's
identity key) share one `Extractor`. Requests decode their images in a thread pool (a bad image fails there, in
its own request) and queue the crops; the extractor's model thread takes what is queued, up to `max_batch` images
and waiting at most `max_wait_ms` for more, and answers every request of the batch from one forward pass.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
import time

import torch

from ..choices import recorded_decode
from ..errors import FeatxError
from ..runner import CpuDecoder, identity_key, runner_from_config
from ..sources import DecodeError, sha256_file
from .cache import EmbeddingCache, Rows

_STOP = object()


class Extractor:
    """The runner of one config, its queue and model thread; `embed` gives an image's rows and whether cached."""

    def __init__(self, config: dict, device: str, max_batch: int, max_wait_ms: float, cache: EmbeddingCache,
                 metrics, decode_pool: cf.Executor, weights=()):
        self.config = config
        self.key = identity_key(config)
        self.taps = list(config["taps"])
        decode = recorded_decode(config)
        if decode == "gpu":
            raise FeatxError("a head on rows decoded on the GPU: featx serve decodes images on the CPU, whose pixels "
                             "differ; fit the head on a store made with featx.extract(..., decode='exact') / "
                             "`featx extract --decode exact`")
        self.runner = runner_from_config(config, device, weights, max_batch)
        self.decoder = CpuDecoder(self.runner.transform, decode)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.cache, self.metrics, self.decode_pool = cache, metrics, decode_pool
        self._queue: queue.Queue = queue.Queue()
        self._inflight: dict[str, cf.Future] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"featx-extractor-{self.key[:8]}", daemon=True)
        self._thread.start()

    def crop(self, data: bytes) -> torch.Tensor:
        """Decode and crop one upload as `featx extract` does (DecodeError with the reason for a bad one)."""
        tensor, reason = self.decoder(data)
        if reason:
            raise DecodeError(reason)
        return tensor

    async def embed(self, key: str, data: bytes) -> tuple[Rows, bool]:
        """(rows by tap, came from the cache) of the image `data` whose sha256 is `key`."""
        rows = self.cache.get(self.key, key)
        if rows is not None:
            return rows, True
        with self._lock:
            future = self._inflight.get(key)
        if future is None:
            tensor = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.crop, data)
            with self._lock:
                future = self._inflight.get(key)
                if future is None:
                    future = self._inflight[key] = cf.Future()
                    self._queue.put((key, tensor, future))
        return await asyncio.wrap_future(future), False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list) -> None:
        keys = [key for key, _, _ in batch]
        try:
            out = self.runner(torch.stack([tensor for _, tensor, _ in batch]))
            self.metrics.observe_batch(len(batch))
            self.cache.put_batch(self.key, keys, out)
            results = [{tap: rows[i] for tap, rows in out.items()} for i in range(len(batch))]
        except Exception as err:  # a fault of the server, not of any one image: every request of the batch gets it
            results = [err] * len(batch)
        with self._lock:
            for key in keys:
                self._inflight.pop(key, None)
        for (_, _, future), result in zip(batch, results):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Finish what is queued, then stop the model thread."""
        self._queue.put(_STOP)
        self._thread.join()


def weights_of(config: dict, files) -> list[str]:
    """The weights files among `files` (-w) that hold the weights `config` records (same sha256)."""
    return [file for file in files if sha256_file(file) == config.get("weights_sha256")]


class Engine:
    """The extractors of the served heads, built once per distinct config."""

    def __init__(self, device: str, max_batch: int, max_wait_ms: float, cache: EmbeddingCache, metrics,
                 decode_threads: int = 2, weights=()):
        self.device, self.max_batch, self.max_wait_ms = device, max_batch, max_wait_ms
        self.weights = list(weights)  # -w files: each extractor takes those of its config's sha256
        self.cache, self.metrics = cache, metrics
        self.decode_pool = cf.ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="featx-decode")
        self.extractors: dict[str, Extractor] = {}
        self._lock = threading.Lock()

    def extractor(self, config: dict) -> Extractor:
        """The extractor of `config`, built on first use (seconds: it loads the backbone)."""
        key = identity_key(config)
        with self._lock:
            if key not in self.extractors:
                self.extractors[key] = Extractor(config, self.device, self.max_batch, self.max_wait_ms, self.cache,
                                                 self.metrics, self.decode_pool, weights_of(config, self.weights))
            return self.extractors[key]

    def close(self) -> None:
        for extractor in self.extractors.values():
            extractor.close()
        self.decode_pool.shutdown(wait=True)

