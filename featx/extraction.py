"""The extraction engine: images -> frozen backbone taps -> pooled rows in a crash-safe HDF5 store.

One forward pass serves every tap and stops at the deepest one (``create_feature_extractor``). Worker processes
decode and crop images into uint8 tensors while the main process runs the model under autocast with channels_last,
and a writer thread commits each batch as a segment, so decoding, compute and writing overlap.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import sharding
from .backbones import check_backbone, check_complete, load_backbone
from .choices import DEFAULT_DECODE
from .cpu import torch_threads
from .errors import FeatxError
from .extract_options import DEFAULT_MATCH, ExtractOptions
from .extract_request import Check, ExtractResult, check, record
from .gpu_decode import DeviceDecoder, check_decoder, read_encoded
from .keys import StatIndex, file_keys
from .memory import check_batch_memory, out_of_memory_as_error
from .options import OptionError
from .preprocess import TransformSpec
from .retention import data_root, data_rows
from .rowfiles import store_bytes
from .runner import build_config, identity_key, CpuDecoder, FeatureRunner
from .runtime import loader_workers, resolve_runtime
from .sources import Source, load_source, unreadable_reason
from .store import config_fingerprint, open_store
from .taps import check_taps, penultimate_node
from .tuning import DEFAULT_BATCH, PROBE_IMAGES, Choice, defaults, tune
from .writer import StoreWriter

MAX_PENDING_WRITES = 4


class _DecodeDataset(Dataset):
    """One item per path: (index, uint8 image, reason) decoded on the CPU, or (index, Encoded) for `--decode gpu`."""

    def __init__(self, paths: list[str], transform: TransformSpec, decode: str):
        self.paths, self.decode = paths, decode
        self.cpu_decode = CpuDecoder(transform, decode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.decode == "gpu":
            return index, read_encoded(self.paths[index], self.cpu_decode)
        return (index, *self.cpu_decode(self.paths[index]))


def _collate_encoded(items):
    return [index for index, _ in items], [encoded for _, encoded in items]


def _collate_pixels(items):
    """(indices, uint8 (B, 3, H, W) batch, reasons), see _stack_pixels."""
    indices, images, reasons = zip(*items)
    return list(indices), _stack_pixels(images), list(reasons)


def _stack_pixels(images) -> torch.Tensor:
    """uint8 (B, 3, H, W) batch in channels_last memory: the images' HWC memory is stacked as it is, so the model's
    layout costs no copy here and the float conversion reads pixels in order."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def _check_output(output: Path) -> None:
    if output.exists() and output.is_dir():
        raise OptionError("{output=}: is a folder, expected a .h5 file path", output=str(output))
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError("{output=}: cannot create folder {parent} ({reason})", output=str(output), parent=parent,
                          reason=err.strerror) from err
    try:  # a nameless file where the OS allows it (O_TMPFILE), so that a kill here leaves nothing behind
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise OptionError("{output=}: folder {parent} is not writable ({reason})", output=str(output), parent=parent,
                          reason=err.strerror) from err


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
    backbone: str | None = None,
    weights: str = "DEFAULT",
    weights_match: str = DEFAULT_MATCH,
    taps=None,
    pooling: str = "avg",
    token_pool: str = "cls",
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float32",
    decode: str = DEFAULT_DECODE,
    compile_model: bool = False,
    on_error: str = "skip",
    overwrite: bool = False,
    retention: str = "mirror",
    size_limit: int | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    rehash: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    num_gpus_per_worker: float | None = None,
    progress: bool = False,
    log=None,
    checked: Check | None = None,
) -> ExtractResult:
    """Extract embeddings of `data` (ImageFolder / CSV / list / 'digits') at `taps` into the store `output`.

    `backbone` None: the one a weights file written by `featx finetune` records, else resnet50. Only images whose
    content is not in the store yet are computed; rows of renamed files are reused. Rows of other data in the
    store are kept. `retention` decides the rest (featx.retention): 'mirror' drops the rows of files gone from
    `data` (at most a small share of the store, else a FeatxError before any work), 'prune' keeps `data`'s rows
    alone (`--prune`), 'add' keeps the rows of gone files too (a cache). `size_limit` (bytes of feature rows)
    bounds a private cache: the oldest rows of other data go first. `weights_match` pairs a weights file's tensors
    with the model's by key and shape ('name') or by position ('order'). `decode` is how images are decoded:
    'exact' (full size, the reference pipelines' pixels), 'fast' or 'reduced' (JPEGs at a reduced DCT scale, see
    featx.choices), 'gpu' (JPEGs on the CUDA device). `compile_model` runs the extractor
    through torch.compile (a warm-up of seconds to a minute, then faster batches: for large sets). Under torchrun (or with
    `num_shards`/`shard_index`) this process computes its shard of the missing images, and the last shard to finish
    seals. `engine='ray'` runs decoding and the model on a Ray cluster (`ray_address`, `num_gpus_per_worker`) while
    this process commits and seals. `log` (a callable taking one line) receives notes such as the weights load
    report. Content keys come from the store's stat index (featx/keys.py) where a file's stat is unchanged;
    `rehash` reads every file. A file whose content the store records as not decodable is not decoded again (it
    stays a failure until its content changes; `overwrite` retries it). `checked`: what featx.extract_request.check found for this very call, when the caller ran it
    first (the CLI does, before importing torch): its source and keys are reused. Returns an ExtractResult; an
    unchanged rerun (see featx.extract_request) returns before anything is built.
    """
    arguments = dict(locals())  # first statement: exactly the call's arguments
    if isinstance(taps, str):  # one tap by name, not a list of its letters
        taps = arguments["taps"] = [taps]
    started = time.perf_counter()
    ExtractOptions.of(arguments)  # an OptionError for a value the option does not take
    checked = checked or check(arguments)
    if checked.result is not None:
        return checked.result
    log = log or (lambda line: None)
    shard = sharding.discover(num_shards, shard_index)
    _check_engine(engine, shard, ray_address, num_gpus_per_worker, decode, device, overwrite, compile_model)
    if backbone is not None:
        check_backbone(backbone)
    output = Path(output)
    source = checked.source or load_source(data)
    root = data_root(data)
    _check_output(output)
    cluster = _ray_cluster(ray_address, num_gpus_per_worker, progress) if engine == "ray" else None
    with cluster or contextlib.nullcontext():
        runtime = None if cluster else resolve_runtime(shard.device(device), precision)
        if runtime is not None:
            check_decoder(decode, runtime.device)
        bb = load_backbone(backbone, weights, match=weights_match)
        check_complete(bb, weights)
        if bb.load_report is not None:
            log(bb.load_report.summary())
        taps = list(taps) if taps else [penultimate_node(bb.model)]
        check_taps(bb.model, taps)
        transform = bb.transform.with_sizes(image_size, resize)
        fits = None  # the largest batch that fits in memory, where known
        if runtime is not None:  # before the store's folder exists: a batch that cannot fit leaves nothing behind
            fits = check_batch_memory(bb.model, transform.crop, batch_size or 1, runtime.device,
                                      n_images=len(source.items), resize=transform.resize,
                                      resize_option="resize" if resize else None,
                                      batch_option="batch_size" if batch_size else None,
                                      decoders=loader_workers(workers, len(source.items), batch_size or DEFAULT_BATCH))
        resolved = cluster.precision(precision) if cluster else runtime.precision
        config = build_config(bb, taps, pooling, token_pool, transform, resolved, dtype, weights, decode)
        config["request"] = record(arguments, bb.weights_file)
        found = checked.keys or file_keys(source, root, None if rehash else _stat_index(output), rehash, progress)
        keys = found.keys
        if on_error == "fail":
            _check_all_readable(source, keys)
        if source.failed:
            log(_unread_note(source))
        job = {"config": identity_key(config), "retention": retention}
        if shard.is_split:  # what the shards must agree on
            job["data"] = _data_fingerprint(source, keys)
        subfolder = f"shard-{shard.index}-of-{shard.count}" if shard.is_split else None

        with StoreWriter(output, config, job["config"], overwrite=overwrite, subfolder=subfolder) as writer:
            sharding.start(shard, writer.parts, job)
            readable = {k for k in keys if k is not None}  # a refused drop is refused before any work
            writer.plan(data_rows(root, source, keys, readable, {}), retention, size_limit)
            n_known = sum(1 for k in keys if k is not None and k in writer.available)
            failures = {k: writer.failures[k] for k in keys if k in writer.failures and k not in writer.available}
            n_unchanged_failed = sum(1 for k in keys if k in failures)  # failed before, not decoded again
            to_compute = [i for i in _unique_missing(keys, writer.available) if shard.owns(keys[i])
                          and keys[i] not in failures]
            compute_seconds = 0.0
            choice = None
            if to_compute:
                paths = [source.items[i].path for i in to_compute]
                t0 = time.perf_counter()
                if cluster:
                    batch = min(batch_size or DEFAULT_BATCH, len(paths))  # no batch larger than the images there are
                    batches = _ray_batches(cluster, paths, config, weights, batch)
                    _commit_batches(batches, source, keys, to_compute, writer, on_error, failures, progress)
                else:
                    with out_of_memory_as_error("batch_size", batch_size or PROBE_IMAGES, runtime.device):
                        runner = FeatureRunner(bb, taps, pooling, token_pool, transform, runtime, dtype)
                        choice = _choose(paths, runner, shard, decode, fits, workers, threads, batch_size,
                                         log if progress else None)
                    config["tuning"] = choice.to_dict()  # sealed with the store
                    batch = min(choice.batch_size, len(paths))
                    with out_of_memory_as_error("batch_size", batch, runtime.device,
                                                decode_options=("resize", "image_size", "workers")), \
                            torch_threads(choice.threads):
                        if compile_model:
                            runner.compile(batch)
                        batches = _local_batches(paths, runner, batch, choice.workers, decode)
                        _commit_batches(batches, source, keys, to_compute, writer, on_error, failures, progress)
                compute_seconds = time.perf_counter() - t0
            note = _finish_shard(shard, writer, job, keys, failures) if shard.is_split else ""
            plan = None if note else writer.plan(
                data_rows(root, source, keys, writer.available, failures, found.stats), retention, size_limit)
            sealed = plan is not None and not writer.is_unchanged(plan)
            if sealed:
                try:
                    writer.seal(plan, taps)
                except OSError as err:
                    raise _commit_error(err, writer) from err
            elif plan is not None and found.worth_recording:  # no row changes: a new stat index spares later reads
                try:
                    writer.seal(plan, taps)
                except OSError:
                    writer.remove_parts()  # read-only or full: later runs read those files again, nothing is lost
            elif plan is not None:
                writer.remove_parts()  # a run that found nothing to add leaves no folder (nor the shards' markers)
    n_computed = len(to_compute) - sum(1 for i in to_compute if keys[i] in failures)
    ours = plan.data_rows if plan else np.empty(0, dtype=np.int64)
    failed = [f for f, r in zip(plan.failed, plan.failed_roots) if plan.roots[r] == root] if plan else []
    return ExtractResult(
        store_path=output,
        n_items=len(ours) if plan else len(source.items),
        n_computed=n_computed,
        n_reused=n_known,
        n_failed=len(failed) if plan else sum(1 for i in to_compute if keys[i] in failures),
        seconds=time.perf_counter() - started,
        images_per_second=n_computed / compute_seconds if compute_seconds > 0 else 0.0,
        store_bytes=store_bytes(output),
        sealed=sealed,
        config=config,
        failed=failed,
        note=note,
        n_dropped=plan.dropped if plan else 0,
        other=plan.other if plan else {},
        rows=ours,
        tuning=choice.to_dict() if choice else None,
        n_unchanged_failed=n_unchanged_failed,
    )


def _stat_index(output: Path) -> StatIndex | None:
    """The stat index of the store at `output`, when there is a readable one."""
    if not output.is_file():
        return None
    try:
        with open_store(output) as store:
            return StatIndex.of_store(store)
    except FeatxError:
        return None  # the writer says why


def _unread_note(source: Source) -> str:
    """The line that says which folders of the data could not be listed, and that their rows stay."""
    (folder, reason), more = source.failed[0], len(source.failed) - 1
    others = f" and {more} more folder{'s' if more > 1 else ''}" if more else ""
    return (f"{Path(source.root, folder)}: {reason}{others}: left out, the store keeps the rows it has of them "
            f"(on_error='fail' / --on-error fail stops instead)")


def _choose(paths, runner: FeatureRunner, shard, decode, fits, workers, threads, batch_size, log) -> Choice:
    """Workers, threads and batch size for computing `paths` with `runner` (featx.tuning): measured or cached where
    the model runs on this process's CPU alone, the fixed defaults elsewhere; a measurement is told to `log`."""
    device = runner.runtime.device
    if device.type != "cpu" or decode == "gpu":
        return defaults(workers, threads, batch_size, f"model on {device}" if device.type != "cpu" else "decode 'gpu'")
    if shard.is_split:
        return defaults(workers, threads, batch_size, f"{shard.name}: processes may share this machine")
    spec = runner.transform
    setting = {"backbone": runner.name, "taps": runner.taps, "crop": spec.crop, "resize": spec.resize,
               "interpolation": spec.interpolation, "precision": runner.runtime.precision,
               "device": str(device)}
    decoder = CpuDecoder(spec, decode)
    choice = tune(paths, lambda path: decoder(path)[0], lambda images: runner(_stack_pixels(images)), setting,
                  workers=workers, threads=threads, batch_size=batch_size, max_batch=fits)
    if choice.how == "measured" and log:
        log(f"tuned for this machine: {choice.describe()}")
    return choice


def _check_all_readable(source: Source, keys: list[str | None]) -> None:
    """on_error 'fail': an OptionError for the first folder or file that cannot be read, before anything is
    written."""
    files = [item.path for item, key in zip(source.items, keys) if key is None]
    count = len(source.failed) + len(files)
    if not count:
        return
    if source.failed:
        path, reason = Path(source.root, source.failed[0][0]), source.failed[0][1]
    else:
        path, reason = files[0], unreadable_reason(files[0])
    more = f" (and {count - 1} more)" if count > 1 else ""
    raise OptionError("{path}: {reason}{more} ({on_error=fail})", path=path, reason=reason, more=more)


def _check_engine(engine, shard, ray_address, num_gpus_per_worker, decode, device, overwrite, compile_model) -> None:
    """One-line OptionErrors for options that do not go together."""
    if shard.is_split and overwrite:
        raise OptionError(
            "{overwrite}: not with several shards ({shards}), each would discard the others' work: run one process "
            "with {overwrite}, or remove the old store first", shards=shard.name)
    if engine == "local":
        for name, value in (("ray_address", ray_address), ("num_gpus_per_worker", num_gpus_per_worker)):
            if value is not None:
                raise OptionError("{%s}: only with {engine=ray}" % name)
        return
    if shard.is_split:
        raise OptionError("{engine=}: not with torchrun or {num_shards} ({shards}): Ray spreads the work itself",
                          engine=engine, shards=shard.name)
    if decode == "gpu":
        raise OptionError("{decode=}: only with {engine=local} (Ray workers decode on their CPUs)", decode=decode)
    if compile_model:
        raise OptionError("{compile_model}: only with {engine=local}")
    if (device or "auto") != "auto":
        raise OptionError("{device=}: not with {engine=} (workers use GPUs when {num_gpus_per_worker} > 0)",
                          device=device, engine=engine)


def _ray_cluster(address, num_gpus_per_worker, progress):
    from .engines.ray import Cluster

    return Cluster(address, float(num_gpus_per_worker or 0), progress)


def _data_fingerprint(source: Source, keys: list[str | None]) -> str:
    """What the sealed store holds besides features (files, contents, labels, splits), for shards to agree on."""
    rows = [(item.relpath, key, item.label, item.target, item.split) for item, key in zip(source.items, keys)]
    return config_fingerprint({"rows": rows, "classes": list(source.classes), "task": source.task})


def _finish_shard(shard, writer: StoreWriter, job: dict, keys, failures: dict[str, str]) -> str:
    """Leave this shard's marker; when every shard is done, take the store for sealing and gather every shard's
    rows and failures into `writer` and `failures`. Returns why this process does not seal, or ''."""
    reports, waiting = sharding.finish(shard, writer.parts, job, {"failed": failures})
    if waiting:
        others = f"shard {waiting[0]} is" if len(waiting) == 1 else f"shards {', '.join(map(str, waiting))} are"
        return f"{shard.name} of {writer.output} committed, the store is sealed once {others} done"
    if not writer.exclusive():
        return f"{shard.name} of {writer.output} committed, sealed by another shard"
    writer.refresh()
    for report in reports:
        failures.update(report["failed"])
    lost = {shard.owner(k) for k in keys if k is not None and k not in writer.available and k not in failures}
    if lost:
        raise FeatxError(
            f"{writer.parts}: the rows that shards {', '.join(map(str, sorted(lost)))} reported done are not there: "
            f"the store folder must be one folder that every shard shares (nothing was sealed)"
        )
    return ""


def _unique_missing(keys: list[str | None], available) -> list[int]:
    """Item indices to compute: the first item of each readable content key that no store or segment holds."""
    seen: set[str] = set()
    to_compute = []
    for i, key in enumerate(keys):
        if key is not None and key not in available and key not in seen:
            seen.add(key)
            to_compute.append(i)
    return to_compute


def _local_batches(paths, runner: FeatureRunner, batch_size, workers, decode):
    """(positions in `paths`, reasons ('' = decoded), {tap: rows of the decoded ones}) batch by batch: decode
    workers feed this process's model."""
    workers = loader_workers(workers, len(paths), batch_size)
    dataset = _DecodeDataset(paths, runner.transform, decode)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=runner.runtime.is_cuda and decode != "gpu",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        collate_fn=_collate_encoded if decode == "gpu" else _collate_pixels,
    )
    device_decode = DeviceDecoder(runner.transform, runner.runtime.device, dataset.cpu_decode) if decode == "gpu" else None
    for indices, *batch in loader:
        images, reasons = device_decode(batch[0]) if device_decode else batch
        indices = list(map(int, indices))
        ok = torch.tensor([not r for r in reasons], dtype=torch.bool, device=images.device)
        yield indices, list(reasons), runner(images if ok.all() else images[ok]) if ok.any() else {}


def _ray_batches(cluster, paths, config: dict, weights_arg, batch_size):
    """Like _local_batches, computed by the Ray cluster's decode tasks and model actors."""
    from .engines.ray import ModelSpec

    spec = ModelSpec(
        backbone=config["backbone"], weights=weights_arg, weights_match=config["weights_match"],
        taps=tuple(config["taps"]), pooling=config["pooling"], token_pool=config["token_pool"],
        transform=config["transform"], precision=config["precision"], dtype=config["dtype"],
        decode=config["decode"],
    )
    for indices, reasons, rows in cluster.run(paths, spec, batch_size):
        ok = reasons == ""
        yield indices.tolist(), reasons.tolist(), {tap: values[ok] for tap, values in rows.items()}


def _commit_batches(batches, source, keys, to_compute, writer, on_error, failures, progress) -> None:
    """Record the failures of each batch and commit its rows as a segment (in a writer thread, so that writing
    overlaps with computing the next batch)."""
    bar = tqdm(total=len(to_compute), desc="extract", unit="img", disable=None if progress else True, smoothing=0.1)
    pending: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=1) as io:
        try:
            for indices, reasons, rows in batches:
                for j, reason in zip(indices, reasons):
                    if reason:
                        item = source.items[to_compute[j]]
                        if on_error == "fail":
                            raise OptionError("{path}: {reason} ({on_error=fail}; rerun resumes after the last batch)",
                                              path=item.path, reason=reason)
                        failures[keys[to_compute[j]]] = reason
                batch_keys = [keys[to_compute[j]] for j, reason in zip(indices, reasons) if not reason]
                if batch_keys:
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


