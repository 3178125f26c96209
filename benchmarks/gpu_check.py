"""GPU check: ResNet-50 throughput of `featx extract` end to end (CPU decoding, and `--decode gpu`) against the pure
forward pass at batch 256, and how closely CUDA embeddings agree with CPU ones. Run by benchmarks/gpu_check.sh.

Makes --images synthetic photo-sized JPEGs (500 x 375, smooth colour fields plus noise), then prints, side by side:
  e2e cpu-decode  featx extract -b resnet50 -w none --batch-size 256 --device cuda: items / wall seconds of the call
  e2e gpu-decode  the same with --decode gpu
  forward         the model alone on a pre-made batch of 256 on the GPU, at featx's precision and memory format
  agreement       on --agree-images of the JPEGs, rows extracted on the GPU (fp32, and featx's default precision;
                  CPU and GPU JPEG decoding) against the CPU's fp32 rows: smallest cosine similarity and largest
                  absolute difference relative to the largest CPU value
Target on one H100/H200: >= 3,000 img/s end to end.

    python benchmarks/gpu_check.py [--images 4096] [--agree-images 128] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from featx import open_store
from featx.runtime import resolve_runtime

BATCH = 256
SIZE = (500, 375)


def make_jpeg(args) -> str:
    """One photo-like JPEG: a smooth random colour field plus mild noise, so that it decodes like a photo."""
    path, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize(SIZE, Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    return path


def make_images(folder: Path, n: int) -> Path:
    """A list file of n JPEGs in `folder`, written in parallel."""
    folder.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        paths = pool.map(make_jpeg, [(str(folder / f"{i:06d}.jpg"), i) for i in range(n)], chunksize=64)
    listing = folder.parent / f"{folder.name}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def extract(listing: Path, output: Path, *options: str) -> dict:
    """`featx extract` in a fresh process (as a user runs it); its --json result."""
    command = [sys.executable, "-m", "featx", "extract", str(listing), "-b", "resnet50", "-w", "none", "-l", "avgpool",
               "--batch-size", str(BATCH), "-o", str(output), "--json", "-q", *options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: {' '.join(command)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def forward_images_per_second(batches: int = 20) -> tuple[float, str]:
    """ResNet-50's forward alone on one pre-made CUDA batch of 256, timed between CUDA synchronisations."""
    runtime = resolve_runtime("cuda", "auto")
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model = torchvision.models.resnet50().eval().to(runtime.device, memory_format=layout)
    x = torch.randn(BATCH, 3, 224, 224, device=runtime.device).contiguous(memory_format=layout)
    with torch.inference_mode(), runtime.autocast():
        for _ in range(3):  # cuDNN picks its algorithms
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        torch.cuda.synchronize()
    return BATCH * batches / (time.perf_counter() - start), runtime.describe()


def rows(store: Path) -> np.ndarray:
    with open_store(store) as s:
        order = np.argsort(s.paths)
        return s.features("avgpool")[order]


def agreement(reference: np.ndarray, other: np.ndarray) -> str:
    cosine = np.sum(reference * other, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
    relative = np.abs(reference - other).max() / np.abs(reference).max()
    return f"min cosine {cosine.min():.6f}   max |diff| / max |cpu| {relative:.2e}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs timed end to end")
    parser.add_argument("--agree-images", type=int, default=128, help="JPEGs compared between CPU and GPU")
    parser.add_argument("--workers", type=int, default=None, help="featx extract --workers (default: featx's)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device")
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{os.cpu_count()} CPU cores, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory(prefix="featx-gpu-check-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        listing = make_images(tmp / "jpegs", args.images)
        print(f"{args.images} synthetic {SIZE[0]}x{SIZE[1]} JPEGs made in {time.perf_counter() - started:.1f} s")
        results = {}
        for decode in ("cpu", "gpu"):
            options = ["--device", "cuda", *workers] + (["--decode", "gpu"] if decode == "gpu" else [])
            result = extract(listing, tmp / f"e2e-{decode}.h5", *options)
            results[decode] = result["computed"] / result["seconds"]
            print(f"featx extract end to end, {decode} decode : {results[decode]:8.1f} img/s   "
                  f"({result['computed']} images in {result['seconds']:.2f} s; forward phase "
                  f"{result['images_per_second']:.1f} img/s)")
        forward, described = forward_images_per_second()
        print(f"pure forward, batch {BATCH}, {described:<17}: {forward:8.1f} img/s")
        for decode, ips in results.items():
            print(f"end to end / forward ({decode} decode) = {ips / forward:.2f}   "
                  f"(target: >= 3,000 img/s end to end on one H100/H200: {'met' if ips >= 3000 else 'not met'})")

        subset = tmp / "agree.txt"
        subset.write_text("".join(listing.read_text().splitlines(keepends=True)[: args.agree_images]))
        cpu = rows(Path(extract(subset, tmp / "cpu.h5", "--device", "cpu", "--precision", "fp32")["store"]))
        for name, options in (("cuda fp32, cpu decode", ["--precision", "fp32"]),
                              ("cuda auto precision, cpu decode", []),
                              ("cuda fp32, gpu decode", ["--precision", "fp32", "--decode", "gpu"])):
            other = rows(Path(extract(subset, tmp / f"{name.replace(' ', '-').replace(',', '')}.h5", "--device",
                                      "cuda", *options)["store"]))
            print(f"embeddings {name:<32} vs cpu fp32: {agreement(cpu, other)}")


if __name__ == "__main__":
    main()
