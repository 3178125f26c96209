"""The options of `featx extract` and `featx.extract`, spelled once (featx.options): flags, help, ranges, defaults.

Field metadata says which options are part of a call's identity (featx.extract_request): `identity=False` for those
that cannot change a row, `forcing=True` for those that make every call run for real.
"""
from __future__ import annotations

from dataclasses import dataclass

from .choices import (BACKBONE_HELP, DECODE_HELP, DECODES, DEFAULT_DECODE, DEVICE_CHOICES, DTYPES, ENGINES, ON_ERROR,
                      POOLINGS, PRECISIONS, RETENTIONS, TOKEN_POOLINGS, WEIGHTS_MATCH_HELP, WEIGHTS_MATCHES)
from .cpu import usable_cores
from .options import Options, option
from .tuning import max_workers

DEFAULT_MATCH = "name"  # left out of the identity key, so stores made before --weights-match keep their key
NO_ROW_CHANGE = {"identity": False}  # cannot change a row
ALWAYS_RUNS = {"forcing": True}  # when given, the call always runs for real


def _worker_note() -> str:
    return f"4 per core; {usable_cores()} cores here"


@dataclass(frozen=True)
class ExtractOptions(Options):
    """Everything an extract call takes besides the data, the store and the call's plumbing (progress, log)."""

    backbone: str | None = option(None, "-b", "--backbone", kind=str, help=BACKBONE_HELP)
    weights: str = option(
        "DEFAULT", "-w", "--weights",
        help="torchvision weights name (DEFAULT, IMAGENET1K_V2, ...) or timm tag (DEFAULT, in1k, ...), a local "
             ".pth/.safetensors file, or 'none' (random init).")
    weights_match: str = option(DEFAULT_MATCH, "--weights-match", choices=WEIGHTS_MATCHES, help=WEIGHTS_MATCH_HELP)
    taps: tuple[str, ...] | None = option(
        None, "-l", "--layer", multiple=True,
        help="Tap (graph node) to store; repeat for several. Default: the penultimate layer.")
    pooling: str = option("avg", "--pooling", choices=POOLINGS, help="How 4-D feature maps become rows.")
    token_pool: str = option("cls", "--token-pool", choices=TOKEN_POOLINGS,
                             help="Transformer token outputs: class token or mean of tokens.")
    image_size: int | None = option(None, "--image-size", kind=int, low=8,
                                    help="Center-crop size (default: the weights' preset).")
    resize: int | None = option(None, "--resize", kind=int, low=8,
                                help="Shorter-side resize before the crop (default: keeps the preset's ratio).")
    batch_size: int | None = option(
        None, "--batch-size", kind=int, low=1, metadata=NO_ROW_CHANGE,
        help="Images per batch (default: fitted to the machine, see docs/performance.md).")
    workers: int | None = option(
        None, "--workers", kind=int, low=0, high=max_workers, note=_worker_note, metadata=NO_ROW_CHANGE,
        help="Decode worker processes, 0 = decode in the main process (default: fitted to the machine).")
    threads: int | None = option(
        None, "--threads", kind=int, low=1, high=usable_cores, note="the cores this process may use", metadata=NO_ROW_CHANGE,
        help="torch threads of the model on the CPU (default: fitted to the machine).")
    device: str = option("auto", "--device", help=DEVICE_CHOICES)
    precision: str = option("auto", "--precision", choices=PRECISIONS,
                            help="auto = bf16 on CPUs that support it, bf16/fp16 on CUDA.")
    dtype: str = option("float32", "--dtype", choices=DTYPES, help="Storage dtype of the rows.")
    decode: str = option(
        DEFAULT_DECODE, "--decode", choices=DECODES,
        help=f"{DECODE_HELP}; reduced: >= 1x the resize (stores made before exact); gpu: JPEGs in batches on the "
             "CUDA device (nvJPEG). Part of the store's identity.")
    compile_model: bool = option(
        False, "--compile", metadata=NO_ROW_CHANGE,
        help="Run the model through torch.compile: a warm-up of seconds to a minute, then faster batches (for large "
             "sets; see benchmarks/extract_throughput.py).")
    on_error: str = option("skip", "--on-error", choices=ON_ERROR, metadata=NO_ROW_CHANGE,
                           help="Undecodable images: record in /failed and go on, or stop.")
    overwrite: bool = option(
        False, "--overwrite", metadata=ALWAYS_RUNS,
        help="Replace a store made with another config (the old one stays until the new one is sealed).")
    retention: str = option(
        "mirror", "--prune", choices=RETENTIONS, flag_value="prune", metadata=NO_ROW_CHANGE,
        help="Mirror DATA exactly: drop the rows of other data, and the rows of files gone from DATA however many "
             "(without it other data's rows stay, and a run that would drop many rows is refused).")
    size_limit: int | None = option(None, kind=int, low=0, metadata=NO_ROW_CHANGE)  # bytes of feature rows: a private cache
    num_shards: int | None = option(
        None, "--num-shards", kind=int, low=1, metadata=ALWAYS_RUNS,
        help="Split the work into this many independent processes (Slurm arrays, several machines); torchrun "
             "needs none.")
    shard_index: int | None = option(
        None, "--shard-index", kind=int, low=0, metadata=ALWAYS_RUNS,
        help="Which shard this process computes, 0..num-shards-1; the last shard to finish seals.")
    rehash: bool = option(
        False, "--rehash", metadata=NO_ROW_CHANGE,
        help="Read every image file to key it, instead of trusting the stat index for files whose size, mtime, "
             "ctime and inode are unchanged (see docs/scaling.md).")
    engine: str = option("local", "--engine", choices=ENGINES,
                         help="Run here, or decode and compute on a Ray cluster (pip install 'featx[ray]').")
    ray_address: str | None = option(
        None, "--ray-address", kind=str,
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance).")
    num_gpus_per_worker: float | None = option(
        None, "--num-gpus-per-worker", kind=float, low=0,
        help="GPUs per Ray model actor (default 0: the model runs on the workers' CPUs).")
