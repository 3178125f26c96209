"""The model runner: a backbone traced to its taps, run at the runtime's precision, pooled to rows.

`FeatureRunner` is the model side of every path that turns images into rows: `featx extract` (local and
Ray workers), predict, and the service. `CpuDecoder` decodes and crops one image for it; `build_config` and
`identity_key` describe the rows it computes (the store's config and the fields that decide its numbers);
`runner_from_config` rebuilds the runner a store's or a head's config describes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import Backbone, load_backbone
from .choices import DEFAULT_DECODE, LEGACY_DECODE, recorded_decode
from .errors import FeatxError
from .options import OptionError
from .extract_request import DEFAULT_MATCH, extract_options_from_config
from .memory import check_batch_memory
from .pooling import pool
from .preprocess import EvalTransform, TransformSpec, draft_size, normalize_batch
from .runtime import Runtime, prepare_model, resolve_runtime
from .sources import DecodeError, decode_image
from .store import config_fingerprint
from .taps import channels_last_taps, feature_extractor

DTYPES = {"float32": np.float32, "float16": np.float16}

# Config fields that decide the numbers in a row; versions and timestamps are recorded but do not invalidate a cache.
IDENTITY_FIELDS = ("backbone", "weights", "weights_sha256", "weights_match", "decode", "taps", "pooling", "token_pool",
                   "transform", "precision", "dtype")


def build_config(bb: Backbone, taps, pooling, token_pool, transform: TransformSpec, precision, dtype, weights_arg,
                 decode: str = DEFAULT_DECODE) -> dict:
    """The store's config: how its rows were computed (identity fields) plus provenance."""
    return {
        "backbone": bb.name,
        "weights": bb.weights_id,
        "weights_sha256": bb.weights_sha256,
        "weights_path": str(Path(weights_arg).resolve()) if bb.weights_id.startswith("file:") else None,
        "weights_match": bb.weights_match,
        "decode": decode,
        "taps": list(taps),
        "pooling": pooling,
        "token_pool": token_pool,
        "transform": transform.to_dict(),
        "precision": precision,
        "dtype": dtype,
        "featx_version": __version__,
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        **bb.versions,
    }


def identity_key(config: dict) -> str:
    """The fingerprint of a config's identity fields; stores made before a field existed keep their key (the field
    is left out at the value those stores hold)."""
    fields = {name: config.get(name) for name in IDENTITY_FIELDS}
    if fields["weights_match"] in (None, DEFAULT_MATCH):
        del fields["weights_match"]
    fields["decode"] = recorded_decode(config)
    if fields["decode"] == LEGACY_DECODE:
        del fields["decode"]
    return config_fingerprint(fields)


class CpuDecoder:
    """Decodes and crops one image: (uint8 (3, crop, crop), ''), or a zero image and the reason of a broken file.
    `decode` is the --decode mode (the CPU side of 'gpu', for the files the device does not take, is 'exact')."""

    def __init__(self, transform: TransformSpec, decode: str = DEFAULT_DECODE):
        self.transform = EvalTransform(transform)
        self.min_size = draft_size(transform, decode)

    def __call__(self, path: str) -> tuple[torch.Tensor, str]:
        spec = self.transform.spec
        try:
            return self.transform(decode_image(path, min_size=self.min_size)), ""
        except DecodeError as err:
            return torch.zeros(3, spec.crop, spec.crop, dtype=torch.uint8), str(err) or "undecodable image"


class FeatureRunner:
    """The model side: a traced extractor for the taps, run under the runtime's precision, pooled to rows."""

    def __init__(self, bb: Backbone, taps, pooling, token_pool, transform, runtime: Runtime, dtype):
        self.runtime = runtime
        self.transform = transform
        self.pooling, self.token_pool, self.dtype = pooling, token_pool, DTYPES[dtype]
        self.taps = list(taps)
        self.name = bb.name
        self.nhwc = channels_last_taps(bb.model, self.taps)
        extractor = feature_extractor(bb.model, {tap: tap for tap in self.taps})
        self.model = prepare_model(extractor.eval(), runtime)
        self.compiled_batch = None
        self._dry_run(bb.name)

    def _dry_run(self, name: str) -> None:
        """Fail fast, before any I/O, when the model cannot take this input size."""
        x = torch.zeros(1, 3, self.transform.crop, self.transform.crop, dtype=torch.uint8)
        try:
            self(x)
        except Exception as err:  # noqa: BLE001 - shape errors, traced asserts (ViT), too-small maps: all say the size
            raise OptionError("backbone {name} cannot run on {crop}x{crop} inputs ({reason}): check {image_size}",
                              name=name, crop=self.transform.crop, reason=str(err).splitlines()[0][:150]) from err

    def compile(self, batch_size: int) -> None:
        """torch.compile the extractor (inductor, weights frozen as constants) and warm it up on one full batch of
        `batch_size`; every later batch is padded to that size, so it compiles once."""
        self.compiled_batch = batch_size
        self.model = torch.compile(self.model, dynamic=False, options={"freezing": True})
        try:
            self(torch.zeros(1, 3, self.transform.crop, self.transform.crop, dtype=torch.uint8))
        except Exception as err:  # noqa: BLE001 - inductor fails in many ways (no C++ compiler, unsupported ops)
            raise OptionError("{compile_model=True}: torch.compile failed ({reason}); run without {compile_model}",
                              reason=str(err).splitlines()[0][:150]) from err

    @torch.inference_mode()
    def __call__(self, batch_uint8: torch.Tensor) -> dict[str, np.ndarray]:
        n = len(batch_uint8)
        if self.compiled_batch and n < self.compiled_batch:
            pad = batch_uint8.new_zeros((self.compiled_batch - n, *batch_uint8.shape[1:]))
            batch_uint8 = torch.cat([batch_uint8, pad])
        x = normalize_batch(batch_uint8, self.transform, self.runtime.device, self.runtime.channels_last)
        with self.runtime.autocast():
            outputs = self.model(x)
        return {
            tap: pool(outputs[tap][:n], self.pooling, self.token_pool, self.nhwc[tap]).cpu().numpy().astype(self.dtype)
            for tap in self.taps
        }


def runner_from_config(config: dict, device: str = "auto", weights=(), max_batch: int = 1) -> FeatureRunner:
    """The extractor that a store's (or a head's) `config` describes, for callers that decode images themselves
    (the service): `runner.transform` is the eval transform, `runner(uint8_batch)` gives {tap: rows} for batches
    of up to `max_batch` images (--max-batch: FeatxError when such a batch cannot fit in memory). `weights`: the
    weights files the user gave (-w), for a recorded file that moved (featx.extract_request.weights_for)."""
    options = extract_options_from_config(config, weights)
    bb = load_backbone(options["backbone"], options["weights"], match=options["weights_match"])
    if bb.weights_sha256 != config.get("weights_sha256"):
        raise FeatxError(
            f"weights {options['weights']} have sha256 {str(bb.weights_sha256)[:16]}..., but the rows were computed "
            f"with weights of sha256 {str(config.get('weights_sha256'))[:16]}...: use the weights file they were made with"
        )
    runtime = resolve_runtime(device, options["precision"])
    transform = TransformSpec.from_dict(config["transform"])
    check_batch_memory(bb.model, transform.crop, max_batch, runtime.device, resize=transform.resize,
                       size_option=None, batch_option="max_batch")
    return FeatureRunner(bb, options["taps"], options["pooling"], options["token_pool"], transform, runtime,
                         options["dtype"])
