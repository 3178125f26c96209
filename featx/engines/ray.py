"""The Ray Data engine (`featx extract --engine ray`, the optional extra `featx[ray]`).

The missing files flow as paths through a CPU decode stage (Ray tasks) into a model stage run by an actor pool
(`map_batches` with a class that loads the backbone once per actor), and every result comes back to the driver,
which commits segments and seals exactly like a local run. Workers read the files and the weights at the same
paths as the driver: on a cluster, a filesystem that every node mounts. Tested with Ray 2.60 (constraints.txt).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..choices import DEFAULT_DECODE
from ..errors import FeatxError
from ..options import OptionError

FEATURE_PREFIX = "tap:"


@dataclass(frozen=True)
class ModelSpec:
    """What a model actor needs to rebuild the driver's extractor (plain values: it travels to the workers)."""

    backbone: str
    weights: str
    weights_match: str
    taps: tuple[str, ...]
    pooling: str
    token_pool: str
    transform: dict
    precision: str
    dtype: str
    decode: str = DEFAULT_DECODE  # the --decode mode of the CPU stage


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the ray[data] extra)
    except ImportError:
        raise OptionError("{engine=ray}: Ray Data is not installed here: pip install 'featx[ray]'") from None
    return ray


class Cluster:
    """Ray for one run: joins the cluster at `address` (or starts a local one, or uses the one already started in
    this process) and leaves it again at the end only if it started it."""

    def __init__(self, address: str | None, num_gpus: float, progress: bool):
        self.ray = import_ray()
        self.address, self.num_gpus = address, num_gpus
        self._started = False
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=address, logging_level=logging.WARNING, log_to_driver=progress)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = "{ray_address=}" if address else "a local Ray instance"
                raise OptionError(where + ": cannot start or join Ray ({reason})", ray_address=address,
                                  reason=str(err).splitlines()[0][:150]) from None
            self._started = True
        self.ray.data.DataContext.get_current().enable_progress_bars = progress
        self.ray.data.DataContext.get_current().print_on_execution_start = progress
        resources = self.ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if num_gpus < 0:
            raise OptionError("{num_gpus_per_worker=}: expected 0 or more", num_gpus_per_worker=num_gpus)
        if num_gpus > self.gpus:
            raise OptionError("{num_gpus_per_worker=}: the Ray cluster has {gpus:g} GPUs (use 0 to run the model on "
                              "the workers' CPUs)", num_gpus_per_worker=num_gpus, gpus=self.gpus)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self.ray.shutdown()

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def precision(self, precision: str) -> str:
        """--precision resolved where the model runs (a worker with this run's resources), not on the driver."""
        probe = self.ray.remote(num_cpus=1, num_gpus=self.num_gpus)(_resolve_precision)
        ok, value = self.ray.get(probe.remote(self.device, precision))
        if not ok:
            raise value
        return value

    def pool_size(self) -> int:
        """Model actors: one per `num_gpus` GPUs, or on CPUs all but one core, which decode tasks need (an actor
        pool holding every CPU starves the decode stage and the run hangs)."""
        if self.num_gpus > 0:
            return max(1, int(self.gpus // self.num_gpus))
        return max(1, self.cpus - 1)

    def run(self, paths: list[str], spec: ModelSpec, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        """(positions in `paths`, reasons ('' = decoded), {tap: rows}) for every batch, in completion order."""
        ray = self.ray
        items = [{"index": i, "path": p} for i, p in enumerate(paths)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / batch_size), 10_000)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"transform": spec.transform, "decode": spec.decode}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=1)
        ds = ds.map_batches(
            Embedder, fn_constructor_kwargs={"spec": spec, "device": self.device}, batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.pool_size()),
            num_cpus=1, num_gpus=self.num_gpus,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = {tap: batch[FEATURE_PREFIX + tap] for tap in spec.taps}
            yield batch["index"].astype(np.int64), batch["error"].astype(str), rows


def _resolve_precision(device: str, precision: str) -> tuple[bool, str | FeatxError]:
    from ..runtime import resolve_runtime

    try:
        return True, resolve_runtime(device, precision).precision
    except FeatxError as err:  # raised again on the driver, an OptionError with its fields
        return False, err


def decode_batch(batch: dict, transform: dict, decode: str = DEFAULT_DECODE) -> dict:
    """The CPU stage: decode and crop each path to uint8 (3, crop, crop); a broken file gets a zero image and
    its reason, and fails alone."""
    from ..runner import CpuDecoder
    from ..preprocess import TransformSpec

    decoder = CpuDecoder(TransformSpec.from_dict(transform), decode)
    images, errors = [], []
    for path in batch["path"]:
        image, reason = decoder(str(path))
        images.append(image.numpy())
        errors.append(reason)
    return {"index": batch["index"], "image": np.stack(images), "error": np.array(errors, dtype=object)}


class Embedder:
    """The model stage: one actor loads the backbone once and turns decoded batches into pooled rows."""

    def __init__(self, spec: ModelSpec, device: str):
        import torch

        from ..backbones import load_backbone
        from ..runner import FeatureRunner
        from ..preprocess import TransformSpec
        from ..runtime import Runtime

        bb = load_backbone(spec.backbone, spec.weights, match=spec.weights_match)
        runtime = Runtime(torch.device(device), spec.precision)
        self.runner = FeatureRunner(bb, list(spec.taps), spec.pooling, spec.token_pool,
                                    TransformSpec.from_dict(spec.transform), runtime, spec.dtype)

    def __call__(self, batch: dict) -> dict:
        import torch

        images = torch.from_numpy(np.ascontiguousarray(batch["image"]).copy())  # Ray's batches are read-only views
        rows = self.runner(images)  # failed rows are zero images: computed, then ignored by the driver
        return {"index": batch["index"], "error": batch["error"], **{FEATURE_PREFIX + t: r for t, r in rows.items()}}
