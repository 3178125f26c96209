"""Extraction throughput on real JPEGs: featx extract vs the tutorial's loop vs the model's pure forward.

Prints, measured side by side in one run:
  a/b  featx extract end to end (decode, resize, forward, pool, crash-safe store)  /  the loop the PyTorch
       transfer-learning tutorial writes (PIL + transforms.Resize + ToTensor, fp32, batch 16, no workers, model called on each batch)
  a/c  featx end to end  /  the model's pure forward on pre-made tensors at featx's precision (upper bound)
  rerun/first  an unchanged rerun of `featx extract` on the same output  /  the first run, both as whole
       processes (`python -m featx extract ...` from a subprocess, the rerun's median of --reruns)
  predict rerun  `featx predict HEAD DATA` on images already in the head's cache, as whole processes (median)
  --compile      (a) with `compile_model=True`: end to end including torch.compile's warm-up, and the forward phase
  --threads      (a) for decode workers x torch intra-op threads on this machine's cores
Targets on a 2-core CPU: a/b >= 2.5, a/c >= 0.8, reruns <= 1.0 s and <= 0.05.

    python benchmarks/extract_throughput.py [--data ../shared/data/dogs_vs_cats] [--limit 400]
    python benchmarks/extract_throughput.py --models resnet50,mobilenet_v3_large,timm/tf_efficientnet_lite0 --limit 320
    python benchmarks/extract_throughput.py --rerun-only     # only the whole-process rerun timings
    python benchmarks/extract_throughput.py --compile --threads --limit 400    # the two levers
"""
from __future__ import annotations

import argparse
import os
import shutil
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
from featx.extract_request import ExtractResult
from featx.runtime import default_workers, resolve_runtime
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


def plain_model(name: str) -> torch.nn.Module:
    """The backbone `name` with seeded random weights, as the tutorial's loop would build it."""
    torch.manual_seed(0)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=0).eval()
    model = getattr(torchvision.models, name)()
    if hasattr(model, "fc"):
        model.fc = torch.nn.Identity()
    return model.eval()


def tutorial_loop(paths: list[str], name: str, batch_size: int = 16) -> float:
    """The PyTorch transfer-learning tutorial's feature loop; returns images per second."""
    model = plain_model(name)
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


def pure_forward(name: str, n_images: int, batch_size: int) -> float:
    """The model alone on pre-made tensors at featx's precision and memory format; images per second."""
    runtime = resolve_runtime("auto", "auto")
    model = plain_model(name)
    dtype = None if runtime.precision == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    return images_per_second(model.eval(), batch_size, n_images, runtime.channels_last, dtype, runtime.device)


def whole_process_runs(command: list[str], reruns: int) -> tuple[float, list[float]]:
    """Wall seconds of a first `featx ...` process and of `reruns` unchanged reruns, launched as a user would."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}

    def timed() -> float:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "featx", *command], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"featx {command[0]} failed: {done.stderr.strip()}")
        return time.perf_counter() - start

    first = timed()
    return first, [timed() for _ in range(reruns)]


def print_reruns(data: Path, listing: Path, folder: Path, reruns: int) -> None:
    """The unchanged `featx extract` rerun, then `featx predict` on images already in a head's cache (a head fitted
    on 8 images per class of `data`)."""
    store = folder / "cli.h5"
    extract = ["extract", str(listing), "-o", str(store), "-b", "resnet18", "-w", "none", "-l", "avgpool", "-q"]
    report("featx extract", *whole_process_runs(extract, reruns))
    source = load_source(str(data))
    few = [item for c in range(len(source.classes)) for item in [i for i in source.items if i.label == c][:8]]
    labelled = folder / "labelled.csv"
    labelled.write_text("path,label\n" + "".join(f"{item.path},{source.classes[item.label]}\n" for item in few))
    featx.extract(str(labelled), folder / "labelled.h5", backbone="resnet18", weights="none", taps=["avgpool"])
    featx.fit_head(folder / "labelled.h5", "avgpool", folder / "head", grid=1.0, val_split=0.0, plots=False)
    predict = ["predict", str(folder / "head"), str(listing), "-o", str(folder / "predictions.csv"), "-q"]
    report("featx predict (head's cache)", *whole_process_runs(predict, reruns))


def report(what: str, first: float, times: list[float]) -> None:
    median = statistics.median(times)
    print(f"{what}, whole processes: first {first:.2f} s, unchanged rerun median {median:.3f} s of {len(times)} "
          f"({', '.join(f'{t:.3f}' for t in times)}), rerun/first = {median / first:.3f}   (target <= 1.0 s, <= 0.05)")


def end_to_end(listing: Path, out: Path, name: str, batch_size: int, **options) -> ExtractResult:
    """One in-process featx.extract of the listing into a fresh store."""
    for old in (out, out.with_name(out.name + ".parts")):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return featx.extract(str(listing), out, backbone=name, weights="none", batch_size=batch_size, **options)


def compare_model(listing: Path, folder: Path, name: str, batch_size: int) -> None:
    """(a), (b), (c) side by side for one backbone, and their ratios."""
    paths = listing.read_text().splitlines()
    first = end_to_end(listing, folder / "bench.h5", name, batch_size)
    a = first.n_items / first.seconds
    b = tutorial_loop(paths, name)
    c = pure_forward(name, len(paths), batch_size)
    print(f"{name}: {len(paths)} JPEGs, 224 px, -w none, featx precision {first.config['precision']}, "
          f"taps {first.config['taps']}")
    print(f"  (a) featx extract end to end : {a:7.1f} img/s  ({first.seconds:.2f} s, forward-only phase "
          f"{first.images_per_second:.1f} img/s)")
    print(f"  (b) tutorial's loop (fp32)     : {b:7.1f} img/s")
    print(f"  (c) pure forward, featx prec. : {c:7.1f} img/s")
    print(f"  a/b = {a / b:.2f}   (target >= 2.5)   a/c = {a / c:.2f}   (target >= 0.8)   c/b = {c / b:.2f} "
          f"(the most a/b can be without a faster model)", flush=True)


def compile_lever(listing: Path, folder: Path, name: str, batch_size: int) -> None:
    """(a) eager vs compiled, end to end (warm-up included) and in the forward phase, same images, one process."""
    eager = end_to_end(listing, folder / "eager.h5", name, batch_size)
    compiled = end_to_end(listing, folder / "compiled.h5", name, batch_size, compile_model=True)
    warm = end_to_end(listing, folder / "compiled.h5", name, batch_size, compile_model=True)
    n = eager.n_items
    print(f"--compile, {name}, {n} images: eager {eager.seconds:.1f} s ({n / eager.seconds:.1f} img/s end to end, "
          f"forward phase {eager.images_per_second:.1f}); compiled, first in this process {compiled.seconds:.1f} s "
          f"({n / compiled.seconds:.1f} img/s), again {warm.seconds:.1f} s ({n / warm.seconds:.1f} img/s, "
          f"forward phase {warm.images_per_second:.1f}); compiled/eager forward phase "
          f"{warm.images_per_second / eager.images_per_second:.2f}", flush=True)
    saved = 1 / eager.images_per_second - 1 / warm.images_per_second
    if saved > 0:
        print(f"  warm-up {compiled.seconds - warm.seconds:.1f} s is repaid after about "
              f"{(compiled.seconds - warm.seconds) / saved:.0f} images", flush=True)


def thread_study(listing: Path, folder: Path, name: str, batch_size: int) -> None:
    """(a) for each decode-worker count x torch intra-op thread count."""
    default = torch.get_num_threads()
    cores = os.cpu_count() or 1
    for threads in sorted({1, max(1, cores - 1), cores}):
        for workers in sorted({0, 1, cores - 1, cores}):
            torch.set_num_threads(threads)
            run = end_to_end(listing, folder / "threads.h5", name, batch_size, workers=workers)
            print(f"threads: {workers} decode workers, {threads} torch threads: {run.n_items / run.seconds:6.1f} img/s "
                  f"end to end", flush=True)
    torch.set_num_threads(default)
    print(f"featx's default here: {default_workers()} decode workers, {default} torch threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default="resnet18", help="comma-separated backbones compared side by side")
    parser.add_argument("--reruns", type=int, default=5, help="unchanged whole-process reruns timed (median; 0: none)")
    parser.add_argument("--rerun-only", action="store_true", help="only the whole-process rerun timings")
    parser.add_argument("--compile", action="store_true", help="the torch.compile lever (first model)")
    parser.add_argument("--threads", action="store_true", help="the decode-worker x torch-thread study (first model)")
    args = parser.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, data {args.data}")
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        listing = subset_list(args.data, args.limit, folder)
        if not args.rerun_only:
            levers = args.compile or args.threads
            for name in [] if levers else models:
                compare_model(listing, folder, name, args.batch_size)
            if args.compile:
                compile_lever(listing, folder, models[0], args.batch_size)
            if args.threads:
                thread_study(listing, folder, models[0], args.batch_size)
            if levers:
                return
        if args.reruns:
            print_reruns(args.data, listing, folder, args.reruns)


if __name__ == "__main__":
    main()
