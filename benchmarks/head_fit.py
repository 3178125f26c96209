"""Fit time of the logistic head (standardized, C searched over 1e-6..1e5 per decade until two decades past the peak,
then refined, 5-fold CV, refit), with scikit-learn's lbfgs and with the torch L-BFGS solver (`--solver torch`) side
by side on the same store. benchmarks/scale_heads.py times fit-head's defaults at scale.

Stores, each with a 'train' / 'val' split (every fifth row in val):
  synthetic  10,000 x 512 and 50,000 x 2048 float32 rows in 10 Gaussian classes (accuracy around 0.9, not 1)
  real       a store extracted with featx from ../shared/data (default flower_photos, resnet18 -w none, 64 px)
Prints the CPU capability and torch's threads, then per store and solver: rows, features, seconds to read the
rows, seconds for the sweep + refit (and the CPU seconds of this process: with --jobs 1 all of the work, a figure
that holds on a shared machine), chosen C, grid size, CV accuracy at C and accuracy on the val split; then the
sklearn / torch fit-time ratio and the largest difference between the two heads' coefficients at the torch head's C.
Target: the 10,000 x 512 fit well under a minute on 2 cores.

    python benchmarks/head_fit.py [--data ../shared/data/flower_photos | --no-real] [--skip-small] [--skip-large]
                                  [--jobs -1] [--device auto] [--grid LO:HI]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import featx
from featx.runtime import resolve_device
from featx.store import write_store

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "flower_photos"
CLASSES = 10


def synthetic_store(path: Path, n: int, d: int, seed: int = 0) -> Path:
    """n x d float32 rows of CLASSES Gaussian classes whose means are about 3.5 noise SDs apart."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    centers = rng.normal(size=(CLASSES, d)).astype(np.float32) * (2.5 / np.sqrt(d))
    X = rng.standard_normal((n, d), dtype=np.float32)
    X += centers[y]
    write_store(
        path, config={"backbone": "synthetic"}, keys=[f"{i:064x}" for i in range(n)],
        paths=[f"{i}.png" for i in range(n)], labels=y, splits=np.where(np.arange(n) % 5 == 4, "val", "train"),
        classes=[f"class{k}" for k in range(CLASSES)], features={"avgpool": X},
    )
    return path


def real_store(path: Path, data: Path) -> Path:
    started = time.perf_counter()
    result = featx.extract(str(data), path, backbone="resnet18", weights="none", taps=["avgpool"], image_size=64)
    print(f"  extracted {result.n_items} images of {data.name} in {time.perf_counter() - started:.1f} s")
    return path


def report(name: str, store: Path, jobs: int, device: str, grid: str | None) -> None:
    """Fit with both solvers, print a row each, their time ratio and the coefficient difference at one C."""
    heads = {}
    for solver in ("sklearn", "torch"):
        options = {"device": device} if solver == "torch" else {}
        cpu = time.process_time()
        head = heads[solver] = featx.fit_head(store, "avgpool", n_jobs=jobs, solver=solver, grid=grid, **options)
        cpu = time.process_time() - cpu
        m = head.metrics
        cv = m["cv"]
        best = cv["grid"].index(cv["best"])
        read = m["total_seconds"] - m["fit_seconds"]
        print(
            f"{name:<22} {solver:<7} {m['rows']['train'] + m['rows']['eval']:>7} x {m['n_features']:<5} "
            f"read {read:6.2f} s   fit {m['fit_seconds']:7.2f} s (CPU {cpu:7.1f} s in this process)   "
            f"C {head.C:<9.3g} grid {len(cv['grid']):>2}   "
            f"cv acc {cv['mean'][best]:.4f}   val acc {m['accuracy']:.4f}", flush=True,
        )
    sk, tc = heads["sklearn"], heads["torch"]
    same_c = sk if sk.C == tc.C else featx.fit_head(store, "avgpool", grid=tc.C)
    a, b = (h.estimator.named_steps["head"].coef_ for h in (same_c, tc))
    print(
        f"{name:<22} sklearn / torch fit time {sk.metrics['fit_seconds'] / tc.metrics['fit_seconds']:.2f}x   "
        f"val acc difference {tc.metrics['accuracy'] - sk.metrics['accuracy']:+.4f}   at C {tc.C:.3g}: "
        f"max |coef difference| / max |coef| {np.abs(a - b).max() / np.abs(a).max():.2e}", flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder for the real store")
    parser.add_argument("--no-real", action="store_true", help="skip the real store")
    parser.add_argument("--device", default="auto", help="device of the torch solver")
    parser.add_argument("--grid", help="C grid of both solvers (default: the logistic head's, 1e-6:1e5)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 50,000 x 2048 store")
    parser.add_argument("--skip-small", action="store_true", help="skip the 10,000 x 512 store")
    parser.add_argument("--jobs", type=int, default=-1, help="parallel CV jobs")
    args = parser.parse_args()
    sizes = ([] if args.skip_small else [(10_000, 512)]) + ([] if args.skip_large else [(50_000, 2048)])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"torch solver device {resolve_device(args.device)}")
    with tempfile.TemporaryDirectory(prefix="featx-head-bench-") as tmp:
        for n, d in sizes:
            report(f"synthetic {n} x {d}", synthetic_store(Path(tmp) / f"syn-{n}x{d}.h5", n, d), args.jobs,
                   args.device, args.grid)
        if args.no_real:
            return
        if args.data.exists():
            report(f"{args.data.name} resnet18", real_store(Path(tmp) / "real.h5", args.data), args.jobs, args.device,
                   args.grid)
        else:
            print(f"{args.data}: not found, real store skipped")


if __name__ == "__main__":
    main()
