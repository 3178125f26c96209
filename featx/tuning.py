"""Decode workers, torch threads and batch size for a local `featx extract`, from what one image costs here.

The model of the choice. A run is a pipeline: W worker processes decode and crop images, each image costing d
seconds of one core, while this process runs the model with T torch threads at m(T) seconds per image. With W >= 1
the two overlap and the run goes at the slowest of

    decoding    W / d               the images the workers deliver per second
    the model   1 / m(T)
    the cores   C / (d + T m(T))    each image takes d + T m(T) core-seconds, and C cores are there to give them

With W = 0 this process decodes too, one after the other: 1 / (d + m(T)). C is the cores other processes leave
idle (featx.cpu.idle_cores). The choice is the (W, T), 0 <= W <= C and 1 <= T <= C (and T at most torch's thread
count, which OMP_NUM_THREADS or torch.set_num_threads may have lowered), of the highest rate, and among
those within TIE of it the one with the fewest processes and threads. Workers and threads may add up to more than
C: a worker that decodes faster than the model needs sleeps most of the time, and its core serves the model.

m(T) is measured at T = 1 and T = C (or torch's count) and follows a straight speed-up line in between
(s(T) = 1 + (T - 1) (m(1) / m(C) - 1) / (C - 1), m(T) = m(1) / s(T)), so that threads that do not pay (a busy
machine, where each OpenMP thread waits for a core) are not chosen.

The batch: the one whose model time is BATCH_SECONDS, so that the costs paid per batch (a worker's hand-over, a
segment written per batch) stay small beside it, within MIN_BATCH..MAX_BATCH and what fits in memory; and small
enough that each worker has PIPELINE_BATCHES batches to decode, since the pipeline fills (a batch decoded before
the model starts) and drains (a batch computed after the last decode) once per run.

Measuring costs PROBE_IMAGES images, decoded in this process (d), then run through the model as one batch at T = C
and at T = 1, each after a warm-up call (oneDNN builds its kernels per shape and thread count). The costs are kept
in the user's cache folder (`cache_folder()`), one file per machine, idle cores, torch version and model setting
(`probe_key`); a file whose recorded key is not the present one, or that cannot be read, is measured again and
rewritten. Options the user gives (--workers, --threads, --batch-size) are kept, and the rest is chosen around them.
No library fits the pipeline to a machine this way (DataLoader and torch leave both counts to the caller), hence
this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .cpu import cpu_fields, idle_cores, torch_threads, usable_cores

PROBE_IMAGES = 4
PROBE_RUN = 4 * PROBE_IMAGES  # images through the model when measuring (a warm-up and a timed call at two counts)
BATCH_SECONDS = 0.25
MIN_BATCH, MAX_BATCH = 8, 256
PIPELINE_BATCHES = 4
TIE = 0.03
DEFAULT_BATCH = 64
CACHE_ENV = "FEATX_CACHE_DIR"


def max_workers() -> int:
    """The most decode workers --workers accepts: 4 per usable core (workers waiting on a network file system may
    pay beyond one per core; more only spends memory)."""
    return 4 * usable_cores()


@dataclass(frozen=True)
class Costs:
    """Seconds of one core to decode one image (`decode`), and seconds per image in the model with T threads
    (`model`: T -> seconds, measured at T = 1 and T = cores)."""

    decode: float
    model: dict[int, float]

    def model_at(self, threads: int) -> float:
        """m(threads) on the straight speed-up line between the measured thread counts (outside them: the nearest)."""
        low, high = min(self.model), max(self.model)
        threads = min(max(threads, low), high)
        if threads in self.model:
            return self.model[threads]
        speedup = 1 + (threads - low) * (self.model[low] / self.model[high] - 1) / (high - low)
        return self.model[low] / speedup

    def to_dict(self) -> dict:
        return {"decode_seconds": self.decode, "model_seconds": {str(t): s for t, s in sorted(self.model.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "Costs":
        """The costs a cache file holds; ValueError when they are not positive numbers for at least one thread count."""
        decode = float(data["decode_seconds"])
        model = {int(t): float(s) for t, s in data["model_seconds"].items()}
        values = [decode, *model.values()]
        if not model or not all(math.isfinite(v) and v > 0 for v in values) or min(model) < 1:
            raise ValueError("costs must be positive")
        return cls(decode, model)


def rate(costs: Costs, workers: int, threads: int, cores: int) -> float:
    """Images per second of the pipeline with `workers` decoders and `threads` model threads on `cores` idle cores."""
    model = costs.model_at(threads)
    if workers == 0:
        return 1 / (costs.decode + model)
    return min(workers / costs.decode, 1 / model, cores / (costs.decode + threads * model))


@dataclass(frozen=True)
class Choice:
    """What a run uses, and why: `how` is 'measured', 'cached' or 'defaults (<reason>)'; `given` names the options
    the user set; `costs` and `images_per_second` (the model's prediction) when measured or cached."""

    workers: int
    threads: int
    batch_size: int
    how: str
    given: tuple[str, ...] = ()
    cores: int = 0
    costs: Costs | None = None
    images_per_second: float | None = None
    seconds: float = 0.0  # spent measuring
    cache: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The --json form and the store record."""
        out = {"workers": self.workers, "threads": self.threads, "batch_size": self.batch_size, "how": self.how,
               "given": list(self.given), "idle_cores": self.cores}
        if self.costs is not None:
            out.update(self.costs.to_dict(), predicted_images_per_second=round(self.images_per_second, 2),
                       probe_seconds=round(self.seconds, 3), cache=self.cache)
        return out

    def describe(self) -> str:
        """One line for the log."""
        line = f"{self.workers} decode workers, {self.threads} torch threads, batch {self.batch_size} ({self.how}"
        if self.costs is not None:
            model = ", ".join(f"{s * 1e3:.1f} ms at {t} threads" for t, s in sorted(self.costs.model.items()))
            line += (f": decode {self.costs.decode * 1e3:.1f} ms/image, model {model}, about "
                     f"{self.images_per_second:.0f} img/s on {self.cores} idle cores")
        return line + ")"


def decide(costs: Costs, cores: int, n_images: int, *, workers: int | None = None, threads: int | None = None,
           batch_size: int | None = None, max_batch: int | None = None,
           max_threads: int | None = None) -> tuple[int, int, int, float]:
    """(workers, threads, batch size, images per second) for `n_images` on `cores` idle cores, with at most
    `max_threads` threads (default: `cores`), keeping the given ones."""
    worker_range = [workers] if workers is not None else range(cores + 1)
    thread_range = [threads] if threads is not None else range(1, min(cores, max_threads or cores) + 1)
    options = [(rate(costs, w, t, cores), w, t) for w in worker_range for t in thread_range]
    best = max(r for r, _, _ in options)
    fast, w, t = min((o for o in options if o[0] >= (1 - TIE) * best), key=lambda o: (o[1] + o[2], o[1], -o[0]))
    if batch_size is None:
        batch_size = math.ceil(BATCH_SECONDS / costs.model_at(t))
        batch_size = min(max(batch_size, MIN_BATCH), MAX_BATCH, max_batch or MAX_BATCH)
        batch_size = max(1, min(batch_size, math.ceil(n_images / (PIPELINE_BATCHES * max(w, 1)))))
    return w, t, batch_size, fast


def defaults(workers: int | None, threads: int | None, batch_size: int | None, why: str) -> Choice:
    """The fixed defaults (one worker per spare core, torch's threads, batch DEFAULT_BATCH), where nothing is
    measured."""
    import torch

    from .runtime import default_workers

    given = _given(workers, threads, batch_size)
    return Choice(
        workers=default_workers() if workers is None else workers,
        threads=torch.get_num_threads() if threads is None else threads,
        batch_size=DEFAULT_BATCH if batch_size is None else batch_size,
        how=f"defaults ({why})", given=given, cores=idle_cores(),
    )


def tune(paths: Sequence[str], decode: Callable[[str], object], forward: Callable[[list], object], setting: dict, *,
         workers: int | None = None, threads: int | None = None, batch_size: int | None = None,
         max_batch: int | None = None) -> Choice:
    """The choice for a run of `paths`: costs from the cache when it holds them for this machine and `setting` (the
    model's description: backbone, taps, sizes, precision, device, decode), else measured with `decode` (a path ->
    an image) and `forward` (a list of images -> the model's rows) when the run has at least the PROBE_RUN images
    that measuring pushes through the model, else the defaults. Nothing is measured when the user gave every option."""
    given = _given(workers, threads, batch_size)
    if len(given) == 3:
        return defaults(workers, threads, batch_size, "all given")
    import torch

    cores = idle_cores()
    max_threads = min(cores, torch.get_num_threads())
    key = probe_key(setting, cores, max_threads)
    file = cache_file(key)
    costs, how, seconds = read_costs(file, key), "cached", 0.0
    if costs is None:
        if len(paths) < PROBE_RUN:
            return defaults(workers, threads, batch_size, f"fewer than {PROBE_RUN} images: not worth measuring")
        started = time.perf_counter()
        costs = measure(paths, decode, forward, max_threads)
        seconds, how = time.perf_counter() - started, "measured"
        write_costs(file, key, costs)
    w, t, b, fast = decide(costs, cores, len(paths), workers=workers, threads=threads, batch_size=batch_size,
                           max_batch=max_batch, max_threads=max_threads)
    return Choice(w, t, b, how, given, cores, costs, fast, seconds, str(file))


def measure(paths: Sequence[str], decode: Callable[[str], object], forward: Callable[[list], object],
            max_threads: int) -> Costs:
    """Costs measured on PROBE_IMAGES of `paths`, spread over the list: decoding here, then the model at
    `max_threads` threads and at one thread."""
    step = len(paths) / PROBE_IMAGES
    sample = [paths[int(i * step)] for i in range(PROBE_IMAGES)]
    started = time.perf_counter()
    images = [decode(path) for path in sample]
    decode_seconds = (time.perf_counter() - started) / len(images)
    model = {}
    for threads in sorted({max_threads, 1}, reverse=True):
        with torch_threads(threads):
            forward(images)  # warm-up
            started = time.perf_counter()
            forward(images)
            model[threads] = (time.perf_counter() - started) / len(images)
    return Costs(max(decode_seconds, 1e-6), {t: max(s, 1e-6) for t, s in model.items()})


def probe_key(setting: dict, cores: int, max_threads: int) -> dict:
    """What the costs depend on: the CPU (model, flags digest, cores usable and idle), the thread counts measured,
    torch's version, the model `setting`."""
    import torch

    cpu = cpu_fields()
    return {
        "cpu": cpu["model"], "cpu_flags": hashlib.sha256(cpu["flags"].encode()).hexdigest()[:16],
        "cores": usable_cores(), "idle_cores": cores, "max_threads": max_threads,
        "torch": torch.__version__,
        **json.loads(json.dumps(setting, sort_keys=True, default=str)),
    }


def cache_folder() -> Path:
    """Where measured costs are kept: $FEATX_CACHE_DIR, else $XDG_CACHE_HOME/featx, else ~/.cache/featx; under
    tuning/."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "featx")
    return Path(base) / "tuning"


def cache_file(key: dict) -> Path:
    """The cache file of `key`: named after the backbone and a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("backbone", "model")))[:60]
    return cache_folder() / f"{name}-{digest}.json"


def read_costs(file: Path, key: dict) -> Costs | None:
    """The costs `file` holds for exactly `key`; None when it is missing, unreadable, corrupt or of another key."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        return Costs.from_dict(data["costs"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def write_costs(file: Path, key: dict, costs: Costs) -> None:
    """Keep `costs` under `file`, atomically; a cache folder that cannot be written is passed over (the run goes on,
    and the next one measures again)."""
    text = json.dumps({"key": key, "costs": costs.to_dict(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      indent=1, sort_keys=True)
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, file)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _given(workers, threads, batch_size) -> tuple[str, ...]:
    return tuple(name for name, value in (("--workers", workers), ("--threads", threads),
                                          ("--batch-size", batch_size)) if value is not None)
