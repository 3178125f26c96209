"""The extraction engine: images -> frozen backbone taps -> pooled rows in a crash-safe HDF5 store.

One forward pass serves every tap and stops at the deepest one (``create_feature_extractor``). Worker processes
decode and crop images into uint8 tensors while the main process runs the model under autocast with channels_last,
and a writer thread commits each batch as a segment, so decoding, compute and writing overlap.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .backbones import Backbone, check_backbone, load_backbone
from .errors import FeatxError
from .layers import channels_last_taps, check_taps, feature_extractor, penultimate_node
from .pooling import POOLINGS, TOKEN_POOLINGS, pool
from .preprocess import EvalTransform, TransformSpec, normalize_batch
from .runtime import Runtime, default_workers, prepare_model, resolve_runtime
from .sources import DecodeError, Source, content_key, decode_image, load_source
from .store import config_fingerprint
from .writer import SealPlan, StoreWriter

DTYPES = {"float32": np.float32, "float16": np.float16}
ON_ERROR = ("skip", "fail")
# Config fields that decide the numbers in a row; versions and timestamps are recorded but do not invalidate a cache.
IDENTITY_FIELDS = ("backbone", "weights", "weights_sha256", "weights_match", "taps", "pooling", "token_pool", "transform",
                   "precision", "dtype")
DEFAULT_MATCH = "name"  # left out of the identity key, so stores made before --weights-match keep their key
MAX_PENDING_WRITES = 4


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    store_path: Path
    n_items: int
    n_computed: int
    n_reused: int
    n_failed: int
    seconds: float
    images_per_second: float
    store_bytes: int
    sealed: bool
    config: dict = field(repr=False)
    failed: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        size = self.store_bytes / 1e6
        speed = f", {self.images_per_second:.1f} img/s" if self.n_computed else ""
        state = "" if self.sealed else " (already up to date)"
        return (
            f"{self.n_items} images in {self.store_path} ({size:.1f} MB){state}: {self.n_computed} computed, "
            f"{self.n_reused} reused, {self.n_failed} failed, {self.seconds:.1f} s{speed}"
        )


def build_config(bb: Backbone, taps, pooling, token_pool, transform: TransformSpec, precision, dtype, weights_arg) -> dict:
    """The store's config: how its rows were computed (identity fields) plus provenance."""
    return {
        "backbone": bb.name,
        "weights": bb.weights_id,
        "weights_sha256": bb.weights_sha256,
        "weights_path": str(Path(weights_arg).resolve()) if bb.weights_id.startswith("file:") else None,
        "weights_match": bb.weights_match,
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
    fields = {name: config.get(name) for name in IDENTITY_FIELDS}
    if fields["weights_match"] in (None, DEFAULT_MATCH):
        del fields["weights_match"]
    return config_fingerprint(fields)


def extract_options_from_config(config: dict) -> dict:
    """Keyword arguments of `extract` that rebuild the extractor a store (or a head) was made with."""
    transform = config["transform"]
    return {
        "backbone": config["backbone"],
        "weights": config.get("weights_path") or config["weights"],
        "weights_match": config.get("weights_match", DEFAULT_MATCH),
        "taps": list(config["taps"]),
        "pooling": config["pooling"],
        "token_pool": config.get("token_pool", "cls"),
        "image_size": transform["crop"],
        "resize": transform["resize"],
        "precision": config["precision"],
        "dtype": config["dtype"],
    }


class _DecodeDataset(Dataset):
    """Decodes and crops one image per index into uint8 HWC pixels (contiguous, so the collated batch is a
    channels_last NCHW tensor after a free permute); a broken file yields a zero image and its reason instead of
    raising."""

    def __init__(self, paths: list[str], transform: TransformSpec):
        self.paths = paths
        self.transform = EvalTransform(transform)
        self.min_size = transform.resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            img = decode_image(self.paths[index], min_size=self.min_size)
            return index, self.transform(img).permute(1, 2, 0), ""
        except DecodeError as err:
            crop = self.transform.spec.crop
            return index, torch.zeros(crop, crop, 3, dtype=torch.uint8), str(err) or "undecodable image"


def _hash_items(source: Source, progress: bool) -> list[str | None]:
    """Content keys of all items (threads: hashing releases the GIL); None where the file cannot be read."""

    def safe_key(path: str):
        try:
            return content_key(path)
        except OSError:
            return None

    with cf.ThreadPoolExecutor(max_workers=4) as pool_:
        it = pool_.map(safe_key, [item.path for item in source.items], chunksize=64)
        return list(tqdm(it, total=len(source.items), desc="hashing", unit="file", disable=None if progress else True, leave=False))


def _validate(pooling, token_pool, dtype, batch_size, on_error, workers) -> None:
    if pooling not in POOLINGS:
        raise FeatxError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    if token_pool not in TOKEN_POOLINGS:
        raise FeatxError(f"--token-pool {token_pool!r}: expected one of {', '.join(TOKEN_POOLINGS)}")
    if dtype not in DTYPES:
        raise FeatxError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FeatxError(f"--batch-size {batch_size!r}: expected a positive integer")
    if on_error not in ON_ERROR:
        raise FeatxError(f"--on-error {on_error!r}: expected one of {', '.join(ON_ERROR)}")
    if workers is not None and workers < 0:
        raise FeatxError(f"--workers {workers}: expected 0 or more")


def _check_output(output: Path) -> None:
    if output.exists() and output.is_dir():
        raise FeatxError(f"-o {output}: is a folder, expected a .h5 file path")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FeatxError(f"-o {output}: cannot create folder {parent} ({err.strerror})") from err
    try:  # a nameless file where the OS allows it (O_TMPFILE), so that a kill here leaves nothing behind
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise FeatxError(f"-o {output}: folder {parent} is not writable ({err.strerror})") from err


class _FeatureRunner:
    """The model side: a traced extractor for the taps, run under the runtime's precision, pooled to rows."""

    def __init__(self, bb: Backbone, taps, pooling, token_pool, transform, runtime: Runtime, dtype):
        self.runtime = runtime
        self.transform = transform
        self.pooling, self.token_pool, self.dtype = pooling, token_pool, DTYPES[dtype]
        self.taps = list(taps)
        self.nhwc = channels_last_taps(bb.model, self.taps)
        extractor = feature_extractor(bb.model, {tap: tap for tap in self.taps})
        self.model = prepare_model(extractor.eval(), runtime)
        self._dry_run(bb.name)

    def _dry_run(self, name: str) -> None:
        """Fail fast, before any I/O, when the model cannot take this input size."""
        x = torch.zeros(1, 3, self.transform.crop, self.transform.crop, dtype=torch.uint8)
        try:
            self(x)
        except RuntimeError as err:
            raise FeatxError(
                f"backbone {name} cannot run on {self.transform.crop}x{self.transform.crop} inputs "
                f"({str(err).splitlines()[0][:150]}): check --image-size"
            ) from err

    @torch.inference_mode()
    def __call__(self, batch_uint8: torch.Tensor) -> dict[str, np.ndarray]:
        x = normalize_batch(batch_uint8, self.transform, self.runtime.device, self.runtime.channels_last)
        with self.runtime.autocast():
            outputs = self.model(x)
        return {
            tap: pool(outputs[tap], self.pooling, self.token_pool, self.nhwc[tap]).cpu().numpy().astype(self.dtype)
            for tap in self.taps
        }


def _commit_error(err: OSError, writer: StoreWriter) -> FeatxError:
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit reached"}.get(err.errno, err.strerror or str(err))
    return FeatxError(
        f"cannot write to {writer.parts} ({what}): the batches committed so far are kept; free space and run the "
        f"same command again to resume"
    )


def extract(
    data,
    output,
    *,
    backbone: str = "resnet50",
    weights: str = "DEFAULT",
    weights_match: str = DEFAULT_MATCH,
    taps=None,
    pooling: str = "avg",
    token_pool: str = "cls",
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float32",
    on_error: str = "skip",
    overwrite: bool = False,
    progress: bool = False,
    log=None,
) -> ExtractResult:
    """Extract embeddings of `data` (ImageFolder / CSV / list / 'digits') at `taps` into the store `output`.

    Only images whose content is not in the store yet are computed; rows of renamed files are reused and rows of
    removed files dropped. `weights_match` pairs a weights file's tensors with the model's by key and shape ('name')
    or by position ('order'). `log` (a callable taking one line) receives notes such as the weights load report.
    Returns an ExtractResult.
    """
    started = time.perf_counter()
    log = log or (lambda line: None)
    _validate(pooling, token_pool, dtype, batch_size, on_error, workers)
    check_backbone(backbone)
    output = Path(output)
    source = load_source(data)
    _check_output(output)
    runtime = resolve_runtime(device, precision)
    bb = load_backbone(backbone, weights, match=weights_match)
    if bb.load_report is not None:
        log(bb.load_report.summary())
    taps = list(taps) if taps else [penultimate_node(bb.model)]
    check_taps(bb.model, taps)
    transform = bb.transform.with_sizes(image_size, resize)
    config = build_config(bb, taps, pooling, token_pool, transform, runtime.precision, dtype, weights)
    keys = _hash_items(source, progress)

    with StoreWriter(output, config, identity_key(config), overwrite=overwrite) as writer:
        n_known = sum(1 for k in keys if k is not None and k in writer.available)
        todo = _unique_missing(keys, writer.available)
        failures: dict[str, str] = {}
        compute_seconds = 0.0
        if todo:
            runner = _FeatureRunner(bb, taps, pooling, token_pool, transform, runtime, dtype)
            t0 = time.perf_counter()
            _run(source, keys, todo, runner, writer, batch_size, workers, on_error, failures, progress)
            compute_seconds = time.perf_counter() - t0
        plan = _seal_plan(source, keys, writer.available, failures)
        sealed = not writer.is_unchanged(plan)
        if sealed:
            try:
                writer.seal(plan, taps)
            except OSError as err:
                raise _commit_error(err, writer) from err
    n_computed = len(todo) - sum(1 for i in todo if keys[i] in failures)
    return ExtractResult(
        store_path=output,
        n_items=len(plan.keys),
        n_computed=n_computed,
        n_reused=n_known,
        n_failed=len(plan.failed),
        seconds=time.perf_counter() - started,
        images_per_second=n_computed / compute_seconds if compute_seconds > 0 else 0.0,
        store_bytes=output.stat().st_size if output.exists() else 0,
        sealed=sealed,
        config=config,
        failed=plan.failed,
    )


def _unique_missing(keys: list[str | None], available) -> list[int]:
    """Item indices to compute: the first item of each readable content key that no store or segment holds."""
    seen: set[str] = set()
    todo = []
    for i, key in enumerate(keys):
        if key is not None and key not in available and key not in seen:
            seen.add(key)
            todo.append(i)
    return todo


def _run(source, keys, todo, runner, writer, batch_size, workers, on_error, failures, progress) -> None:
    """Decode, compute and commit every item in `todo`, batch by batch."""
    workers = default_workers() if workers is None else workers
    dataset = _DecodeDataset([source.items[i].path for i in todo], runner.transform)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=runner.runtime.is_cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=None if progress else True, smoothing=0.1)
    pending: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=1) as io:
        try:
            for indices, batch, reasons in loader:
                ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
                for j, reason in zip(indices.tolist(), reasons):
                    if reason:
                        item = source.items[todo[j]]
                        if on_error == "fail":
                            raise FeatxError(f"{item.path}: {reason} (--on-error fail; rerun resumes after the last batch)")
                        failures[keys[todo[j]]] = reason
                if ok.any():
                    rows = runner((batch if ok.all() else batch[ok]).permute(0, 3, 1, 2))
                    batch_keys = [keys[todo[j]] for j in indices[ok].tolist()]
                    pending.append(io.submit(writer.commit, batch_keys, rows))
                pending = _drain(pending, writer, MAX_PENDING_WRITES)
                bar.update(len(indices))
            _drain(pending, writer, 0)
        finally:
            bar.close()


def _drain(pending: list[cf.Future], writer: StoreWriter, keep: int) -> list[cf.Future]:
    """Wait until at most `keep` segment writes are in flight; surface write errors as one-line FeatxErrors."""
    while len(pending) > keep:
        try:
            pending.pop(0).result()
        except OSError as err:
            raise _commit_error(err, writer) from err
    return pending


def _seal_plan(source: Source, keys, available, failures: dict[str, str]) -> SealPlan:
    """Rows of the sealed store in source order: every item whose content is computed; the rest are failures."""
    rows, failed = [], []
    for item, key in zip(source.items, keys):
        if key is None:
            failed.append((item.relpath, "cannot read file"))
        elif key in available:
            rows.append((item, key))
        else:
            failed.append((item.relpath, failures.get(key, "not computed")))
    regression = source.task == "regression"
    return SealPlan(
        keys=[key for _, key in rows],
        paths=[item.relpath for item, _ in rows],
        splits=[item.split for item, _ in rows],
        classes=list(source.classes),
        labels=None if regression else np.array([item.label for item, _ in rows], dtype=np.int64),
        targets=np.array([item.target for item, _ in rows], dtype=np.float64) if regression else None,
        failed=failed,
    )


def runner_from_config(config: dict, device: str = "auto") -> _FeatureRunner:
    """The extractor that a store's (or a head's) `config` describes, for callers that decode images themselves
    (the service): `runner.transform` is the eval transform, `runner(uint8_batch)` gives {tap: rows}."""
    options = extract_options_from_config(config)
    bb = load_backbone(options["backbone"], options["weights"], match=options["weights_match"])
    if bb.weights_sha256 != config.get("weights_sha256"):
        raise FeatxError(
            f"weights {options['weights']} have sha256 {str(bb.weights_sha256)[:16]}..., but the rows were computed "
            f"with weights of sha256 {str(config.get('weights_sha256'))[:16]}...: use the weights file they were made with"
        )
    runtime = resolve_runtime(device, options["precision"])
    transform = TransformSpec.from_dict(config["transform"])
    return _FeatureRunner(bb, options["taps"], options["pooling"], options["token_pool"], transform, runtime,
                          options["dtype"])
