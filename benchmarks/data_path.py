"""How close `featx extract` comes to the model's own speed, with the pipeline fitted to the machine and with the
fixed defaults, side by side in one run.

For each backbone, on the same JPEGs (224 px, -w none, the penultimate layer, featx's precision):
  tuned     featx.extract end to end with workers, threads and batch size chosen by featx.tuning; the costs are
            measured in this run (an empty cache folder), so the probe is part of the time
  defaults  the same call with the fixed defaults featx used before: one decode worker per spare core, torch's
            thread count, batch 64
  forward   the model alone on pre-made tensors at the same precision and memory format, batch 64, at one thread
            and at torch's thread count: the faster is the model's own speed (on a busy machine one thread can be)
  bound     the most end to end / forward the cores allow, from the tuner's measured costs (see `bound`): decoding
            takes core-seconds the model then lacks, so a target above it needs a cheaper decode, not a better split
Prints images per second, tuned/forward, defaults/forward, tuned/defaults and the bound, each pair run alternately --repeats
times (the best of each is kept), the CPU's model and capability flags, and the load (uptime) before each backbone:
on a machine shared with other work the figures are measured under load, and the table says so.
Target: end to end >= 0.85 of the forward.

    flock /tmp/featx-timing.lock python benchmarks/data_path.py [--data ../shared/data/dogs_vs_cats] [--limit 320]
        [--models resnet18,resnet50,mobilenet_v3_large,timm/tf_efficientnet_lite0] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from extract_throughput import DEFAULT_DATA, end_to_end, pure_forward, subset_list
from featx.cpu import cpu_fields, torch_threads
from featx.runtime import default_workers
from featx.tuning import DEFAULT_BATCH

MODELS = "resnet18,resnet50,mobilenet_v3_large,timm/tf_efficientnet_lite0"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def loaded(own: float) -> bool:
    """Whether the 1-minute load average says other work shares the cores, beyond `own` (this run's share)."""
    return os.getloadavg()[0] > own + 0.5


def compare(listing: Path, folder: Path, name: str, repeats: int) -> dict:
    """Tuned and default end-to-end runs (alternately, best of `repeats`) and the pure forward of one backbone."""
    n = len(listing.read_text().splitlines())
    tuned, fixed, choice = 0.0, 0.0, None
    for _ in range(repeats):
        os.environ["FEATX_CACHE_DIR"] = tempfile.mkdtemp(dir=folder)  # a first run on this machine: it measures
        run = end_to_end(listing, folder / "tuned.h5", name, None)
        tuned, choice = max(tuned, run.n_items / run.seconds), run.tuning
        run = end_to_end(listing, folder / "fixed.h5", name, DEFAULT_BATCH, workers=default_workers(),
                         threads=torch.get_num_threads())
        fixed = max(fixed, run.n_items / run.seconds)
    forward = max(forward_at(name, n, threads) for _ in range(repeats) for threads in {1, torch.get_num_threads()})
    return {"model": name, "images": n, "precision": run.config["precision"], "tuned": tuned, "defaults": fixed,
            "forward": forward, "choice": choice}


def bound(choice: dict) -> float:
    """The most end to end / forward that C cores allow, from the tuner's measured costs: each image takes d
    core-seconds to decode and at least m(1) core-seconds in the model (threads never make a forward cheaper in
    core-seconds), so no pipeline beats C / (d + m(1)) img/s, against the forward's 1 / m(C)."""
    model = {int(t): s for t, s in choice["model_seconds"].items()}
    cores = max(model)
    return min(1.0, cores * model[cores] / (choice["decode_seconds"] + model[min(model)]))


def forward_at(name: str, n: int, threads: int) -> float:
    """The pure forward's images per second with `threads` torch threads."""
    with torch_threads(threads):
        return pure_forward(name, n, DEFAULT_BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=160, help="the first N images of the data")
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cpu = cpu_fields()
    flags = set(cpu["flags"].split())
    cores = os.cpu_count() or 1
    print(f"CPU {cpu['model']}, {cores} cores, flags: "
          + " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in FLAGS)
          + f"; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; defaults: {default_workers()} workers, {torch.get_num_threads()} "
          f"threads, batch {DEFAULT_BATCH}", flush=True)
    rows, busy = [], False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        listing = subset_list(args.data, args.limit, folder)
        for name in args.models.split(","):
            print(f"{name}: {uptime()}", flush=True)
            busy |= loaded(0 if name == args.models.split(",")[0] else cores)
            row = compare(listing, folder, name, args.repeats)
            busy |= loaded(cores)
            rows.append(row)
            c = row["choice"]
            print(f"  tuned {row['tuned']:6.1f} img/s ({c['workers']} workers, {c['threads']} threads, batch "
                  f"{c['batch_size']}, probe {c.get('probe_seconds', 0):.2f} s)  defaults {row['defaults']:6.1f}  "
                  f"forward {row['forward']:6.1f} ({row['precision']})  tuned/forward "
                  f"{row['tuned'] / row['forward']:.2f}  defaults/forward {row['defaults'] / row['forward']:.2f}  "
                  f"tuned/defaults {row['tuned'] / row['defaults']:.2f}  bound {bound(c):.2f} (decode "
                  f"{c['decode_seconds'] * 1e3:.1f} ms/image on one core)", flush=True)
    print(f"after: {uptime()}")
    print(f"\n| backbone ({rows[0]['images']} JPEGs, 224 px) | tuned img/s | choice (workers, threads, batch) | "
          f"defaults img/s | forward img/s | tuned/forward | defaults/forward | tuned/defaults | bound |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        c = row["choice"]
        print(f"| {row['model']} ({row['precision']}) | {row['tuned']:.1f} | {c['workers']}, {c['threads']}, "
              f"{c['batch_size']} | {row['defaults']:.1f} | {row['forward']:.1f} | "
              f"{row['tuned'] / row['forward']:.2f} | {row['defaults'] / row['forward']:.2f} | "
              f"{row['tuned'] / row['defaults']:.2f} | {bound(c):.2f} |")
    print("\nmeasured under load (other processes shared the cores)" if busy else "\nmeasured on an idle machine")


if __name__ == "__main__":
    main()
