"""Extraction throughput on real JPEGs: featx extract vs the documents' loop vs the model's pure forward.

Prints, measured side by side in one run:
  a/b  featx extract end to end (decode, resize, forward, pool, crash-safe store)  /  the loop the source documents
       write (PIL + transforms.Resize + ToTensor, fp32, batch 16, no workers, model called on each batch)
  a/c  featx end to end  /  the model's pure forward on pre-made tensors at featx's precision (upper bound)
  rerun/first  an unchanged rerun of `featx extract` on the same output  /  the first run, both as whole
       processes (`python -m featx extract ...` from a subprocess, the rerun's median of --reruns)
Targets on a 2-core CPU: a/b >= 2.5, a/c >= 0.8, rerun <= 1.0 s and <= 0.05.

    python benchmarks/extract_throughput.py [--data ../shared/data/dogs_vs_cats] [--limit 400]
    python benchmarks/extract_throughput.py --rerun-only     # only the whole-process rerun timing
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms

import featx
from featx.runtime import resolve_runtime
from featx.sources import load_source
from precision_layouts import images_per_second

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs_vs_cats"


def subset_list(data: Path, limit: int | None, folder: Path) -> Path:
    """A text list of the dataset's images (all, or the first `limit` in source order)."""
    items = load_source(str(data)).items[:limit]
    listing = folder / "images.txt"
    listing.write_text("\n".join(item.path for item in items))
    return listing


def documents_loop(paths: list[str], batch_size: int = 16) -> float:
    """The source documents' feature loop; returns images per second."""
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval()
    tf = transforms.Compose([
        transforms.Resize((224, 224)), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    start = time.perf_counter()
    feats = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            feats.append(model(batch))
    return len(paths) / (time.perf_counter() - start)


def pure_forward(n_images: int, batch_size: int) -> float:
    """The model alone on pre-made tensors at featx's precision and memory format; images per second."""
    runtime = resolve_runtime("auto", "auto")
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    dtype = None if runtime.precision == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    return images_per_second(model.eval(), batch_size, n_images, runtime.channels_last, dtype, runtime.device)


def whole_process_runs(listing: Path, out: Path, reruns: int) -> tuple[float, list[float]]:
    """Wall seconds of a first `featx extract` process and of `reruns` unchanged reruns, launched as a user would."""
    command = [sys.executable, "-m", "featx", "extract", str(listing), "-o", str(out), "-b", "resnet18", "-w", "none",
               "-l", "avgpool", "-q"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

    def timed() -> float:
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    first = timed()
    return first, [timed() for _ in range(reruns)]


def print_reruns(listing: Path, out: Path, reruns: int) -> None:
    first, times = whole_process_runs(listing, out, reruns)
    median = statistics.median(times)
    print(f"whole processes: first {first:.2f} s, unchanged rerun median {median:.3f} s of {reruns} "
          f"({', '.join(f'{t:.3f}' for t in times)}), rerun/first = {median / first:.3f}   (target <= 1.0 s, <= 0.05)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reruns", type=int, default=5, help="unchanged whole-process reruns timed (median)")
    parser.add_argument("--rerun-only", action="store_true", help="only the whole-process rerun timing")
    args = parser.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores")
    if args.rerun_only:
        with tempfile.TemporaryDirectory() as tmp:
            print_reruns(subset_list(args.data, args.limit, Path(tmp)), Path(tmp) / "cli.h5", args.reruns)
        return

    with tempfile.TemporaryDirectory() as tmp:
        listing = subset_list(args.data, args.limit, Path(tmp))
        paths = listing.read_text().splitlines()
        out = Path(tmp) / "bench.h5"
        opts = dict(backbone="resnet18", weights="none", taps=["avgpool"], batch_size=args.batch_size)
        first = featx.extract(str(listing), out, **opts)
        rerun = featx.extract(str(listing), out, **opts)
        a = first.n_items / first.seconds
        b = documents_loop(paths)
        c = pure_forward(len(paths), args.batch_size)

    print(f"data: {args.data} ({len(paths)} JPEGs), resnet18, 224 px, -w none, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, featx precision {first.config['precision']}")
    print(f"(a) featx extract end to end : {a:7.1f} img/s  ({first.seconds:.2f} s, forward-only phase {first.images_per_second:.1f} img/s)")
    print(f"(b) documents' loop (fp32)    : {b:7.1f} img/s")
    print(f"(c) pure forward, featx prec. : {c:7.1f} img/s")
    print(f"a/b = {a / b:.2f}   (target >= 2.5)")
    print(f"a/c = {a / c:.2f}   (target >= 0.8)")
    print(f"in-process rerun/first = {rerun.seconds:.3f} s / {first.seconds:.2f} s = {rerun.seconds / first.seconds:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        print_reruns(subset_list(args.data, args.limit, Path(tmp)), Path(tmp) / "cli.h5", args.reruns)


if __name__ == "__main__":
    main()
