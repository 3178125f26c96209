"""Heads at scale: `featx fit-head` with default options on 10,000 and 100,000 rows x 1280, the default refusing in
one line on a 1,000,000-row store under an address-space cap, and the streamed `--head sgd` fitting it under that
cap; each a whole process timed from outside, with its peak RSS.

Rows are shaped like pooled CNN embeddings (see `embedding_rows`): non-negative, about half exact zeros, a few
strong shared directions, 10 classes that overlap. Stores have no splits, so fit-head holds out a stratified 20 %
for its metrics, as on a plain ImageFolder. The measurements are functions returning dicts (fit_head_defaults,
fit_head_full_search, fit_head_streamed, fit_head_in_memory_refused, on stores from write_embedding_store), so
that a benchmark gathering all scale figures can import and call them. Prints the CPU capability, then one line
per run and a Markdown summary with each size's time as a multiple of the previous size's.

    python benchmarks/scale_heads.py [--rows 10000,100000] [--features 1280] [--reference] [--five-folds]
        [--streamed-rows 1000000] [--streamed-options "--grid 0.01"] [--streamed-cv-rows 100000]
        [--memory-cap-mb 2048] [--keep DIR] [--fit-options="--solver torch --device cuda"]

--five-folds also runs the defaults with `--folds 5` (the fold count below 50,000 training rows) for the saving of
three folds, side by side. --reference also runs the previous default's C search (scikit-learn's lbfgs, every decade of the default grid on
5 folds, then refined) on the same store, for the chosen C and the accuracies side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = 10
FEATURES = 1280
BLOCK_ROWS = 10_000  # rows are generated (and written) this many at a time, each block from its own seed


def embedding_model(d: int = FEATURES, seed: int = 0, latent: int = 64, separation: float = 0.35):
    """(class centres in a `latent`-dim space, a random (latent, d) projection, per-channel biases): the fixed
    structure shared by every row of every store size."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, latent)).astype(np.float32) * separation
    projection = (rng.normal(size=(latent, d)) / np.sqrt(latent)).astype(np.float32)
    bias = rng.normal(-1.0, 0.5, size=d).astype(np.float32)
    return centres, projection, bias


def embedding_rows(n: int, model, seed: int, positions: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(n x d float32 rows, class indices): each row is a global average pool over `positions` spatial positions of
    ReLU(latent code @ projection + bias + unit noise), scaled by a per-image log-normal gain. The latent code is
    the class centre plus unit Gaussian noise, so classes overlap. Like efficientnet-lite0's pooled features of
    flower_photos, about half the values are exact zeros, the median is near 0 with a long right tail, and the top
    64 principal directions of the standardised rows hold about half of the variance."""
    centres, projection, bias = model
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    pre = (centres[y] + rng.standard_normal((n, projection.shape[0]), dtype=np.float32)) @ projection + bias
    rows = np.zeros((n, projection.shape[1]), dtype=np.float32)
    for _ in range(positions):
        activation = rng.standard_normal(rows.shape, dtype=np.float32)
        activation += pre
        rows += np.maximum(activation, 0, out=activation)
    rows *= (rng.lognormal(0.0, 0.25, n).astype(np.float32) / positions)[:, None]
    return rows, y


def write_embedding_store(path: Path, n: int, d: int = FEATURES, seed: int = 0) -> Path:
    """A featx store of n `embedding_rows` at tap 'avgpool', written BLOCK_ROWS rows at a time (a million rows never
    sit in memory). The first rows of a larger store are the rows of a smaller one."""
    from featx.store import create_features, create_h5, create_items, set_root_attrs

    model = embedding_model(d, seed)
    labels = np.empty(n, dtype=np.int64)
    with create_h5(path.with_name(f".{path.name}.tmp"), path) as h5:
        set_root_attrs(h5, {"backbone": "synthetic-embeddings"}, "synthetic")
        features = create_features(h5, "avgpool", (n, d), np.float32)
        for start in range(0, n, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, n)
            features[start:stop], labels[start:stop] = embedding_rows(stop - start, model, seed=(seed, start))
        create_items(h5, keys=[f"{i:064x}" for i in range(n)], paths=[f"{i}.jpg" for i in range(n)],
                     splits=[""] * n, labels=labels, classes=[f"class{k}" for k in range(CLASSES)])
    return path


def run_process(args, memory_cap_mb: float | None = None) -> dict:
    """Run `args` as a whole process: {seconds, peak_rss_mb, returncode, stdout, stderr}. peak_rss_mb is the
    largest resident set of the process and the children it waited for (os.wait4), not their sum. memory_cap_mb
    caps its address space (RLIMIT_AS), a limit the process cannot exceed."""

    def cap():
        limit = int(memory_cap_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, MALLOC_ARENA_MAX="2")  # glibc's per-thread arenas would make the address space noisy
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([str(arg) for arg in args], stdout=stdout, stderr=stderr, env=env,
                                   preexec_fn=cap if memory_cap_mb else None)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "returncode": process.returncode,
                "stdout": stdout.read(), "stderr": stderr.read()}


def featx_command() -> list[str]:
    return [sys.executable, "-m", "featx"]


def head_metrics(run: dict) -> dict:
    """The figures of a `fit-head --json` run: solver, C, CV accuracy at C, val accuracy, fit seconds."""
    if run["returncode"] != 0:
        raise RuntimeError(f"fit-head failed ({run['returncode']}): {run['stderr'][-2000:]}")
    metrics = json.loads(run["stdout"])
    cv = metrics["cv"]
    at_c = cv["mean"][cv["grid"].index(cv["best"])] if cv else None
    return {"solver": metrics["solver"], "C": metrics["C"], "cv_accuracy": at_c, "val_accuracy": metrics["accuracy"],
            "fit_seconds": metrics["fit_seconds"], "grid": len(cv["grid"]) if cv else 1,
            "skipped": len(cv.get("skipped", ())) if cv else 0}


def fit_head_defaults(store: Path, output: Path, *options: str) -> dict:
    """`featx fit-head STORE -o OUTPUT` with default options (and `options`), timed from outside."""
    run = run_process([*featx_command(), "fit-head", store, "-o", output, "--overwrite", "--json", *options])
    return {**head_metrics(run), "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


FULL_SEARCH = ("import sys, featx.heads.cv as cv; cv.PATIENCE = 10**9; from featx.cli import main; "
               "sys.argv[0] = 'featx'; main()")


def fit_head_full_search(store: Path, output: Path) -> dict:
    """The reference C search: scikit-learn's lbfgs, every (C, fold) from scratch, every decade of the default grid
    scored (the decade pass never stops early), then refined: fit-head's default before `--solver auto`."""
    run = run_process([sys.executable, "-c", FULL_SEARCH, "fit-head", store, "-o", output, "--overwrite",
                       "--solver", "sklearn", "--json"])
    return {**head_metrics(run), "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"]}


def fit_head_streamed(store: Path, output: Path, memory_cap_mb: float, *options: str) -> dict:
    """`featx fit-head STORE --head sgd OPTIONS` under an address-space cap of memory_cap_mb, timed from outside."""
    run = run_process([*featx_command(), "fit-head", store, "-o", output, "--overwrite", "--head", "sgd", "--json",
                       *options], memory_cap_mb=memory_cap_mb)
    return {**head_metrics(run), "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
            "memory_cap_mb": memory_cap_mb}


def fit_head_in_memory_refused(store: Path, output: Path, memory_cap_mb: float) -> dict:
    """fit-head's default on a store whose rows exceed the cap: {returncode, seconds, message} (expected: exit 2,
    one line pointing to --head sgd)."""
    run = run_process([*featx_command(), "fit-head", store, "-o", output, "--overwrite"], memory_cap_mb=memory_cap_mb)
    return {"returncode": run["returncode"], "seconds": run["seconds"], "message": run["stderr"].strip()}


def same_c(a: float, b: float) -> bool:
    """Within one step of the refined grid (a quarter decade)."""
    return abs(np.log10(a) - np.log10(b)) <= 0.25 + 1e-9


def store_of(folder: Path, n: int, d: int = FEATURES) -> Path:
    """The n-row, d-column embedding store in folder, written once and reused."""
    path = folder / f"embeddings-{n}x{d}.h5"
    if not path.exists():
        started = time.perf_counter()
        write_embedding_store(path, n, d)
        print(f"  wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s",
              flush=True)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000", help="store sizes for fit-head's defaults")
    parser.add_argument("--features", type=int, default=FEATURES, help="columns of every store")
    parser.add_argument("--fit-options", default="", help="fit-head options added to the defaults' runs, e.g. "
                        "\"--solver torch --device cuda\"")
    parser.add_argument("--reference", action="store_true", help="also run the full scikit-learn C search")
    parser.add_argument("--five-folds", action="store_true", help="also run the defaults with --folds 5")
    parser.add_argument("--streamed-rows", type=int, default=1_000_000, help="store size for --head sgd (0: skip)")
    parser.add_argument("--streamed-options", default="--grid 0.01",
                        help="fit-head options of that streamed fit besides --head sgd (one C: a bounded run time)")
    parser.add_argument("--streamed-cv-rows", type=int, default=100_000,
                        help="store size for a streamed fit with cross-validation (0: skip)")
    parser.add_argument("--streamed-cv-options", default="--epochs 1", help="its options besides --head sgd")
    parser.add_argument("--memory-cap-mb", type=float, default=2048, help="address-space cap of the streamed fits")
    parser.add_argument("--keep", type=Path, help="folder for the stores (kept and reused); default: a temporary one")
    return parser.parse_args(argv)


def main() -> None:
    import torch

    args = parse_args()

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="featx-scale-heads-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        lines = defaults_table(folder, [int(part) for part in args.rows.split(",")], args.reference, args.five_folds,
                               args.features, args.fit_options.split())
        cap = args.memory_cap_mb
        if args.streamed_rows:
            store = store_of(folder, args.streamed_rows, args.features)
            refused = fit_head_in_memory_refused(store, folder / "head-refused", cap)
            print(f"{args.streamed_rows} rows, defaults under {cap:.0f} MB: {json.dumps(refused)}", flush=True)
            streamed = fit_head_streamed(store, folder / "head-sgd", cap, *args.streamed_options.split())
            print(f"{args.streamed_rows} rows, --head sgd {args.streamed_options}: {json.dumps(streamed)}", flush=True)
            size = store.stat().st_size / 1e9
            lines += ["", f"{args.streamed_rows:,} rows x {args.features} ({size:.1f} GB), address "
                      f"space capped at {cap:.0f} MB:",
                      f"- `fit-head` defaults: exit {refused['returncode']} in {refused['seconds']:.1f} s: "
                      f"`{refused['message']}`",
                      f"- `fit-head --head sgd {args.streamed_options}`: {streamed['seconds']:.1f} s, peak RSS "
                      f"{streamed['peak_rss_mb']:.0f} MB, val acc {streamed['val_accuracy']:.4f}"]
        if args.streamed_cv_rows:
            store = store_of(folder, args.streamed_cv_rows, args.features)
            streamed = fit_head_streamed(store, folder / "head-sgd-cv", cap, *args.streamed_cv_options.split())
            print(f"{args.streamed_cv_rows} rows, --head sgd {args.streamed_cv_options}: {json.dumps(streamed)}",
                  flush=True)
            lines.append(f"- {args.streamed_cv_rows:,} rows, `fit-head --head sgd {args.streamed_cv_options}` (C by "
                         f"cross-validation, {streamed['grid']} values): {streamed['seconds']:.1f} s, peak RSS "
                         f"{streamed['peak_rss_mb']:.0f} MB, C {streamed['C']:.3g}, val acc "
                         f"{streamed['val_accuracy']:.4f}")
    print("\n".join(["", *lines, "", f"load average {os.getloadavg()[0]:.2f} at end"]))


def defaults_table(folder: Path, sizes: list[int], reference: bool, five_folds: bool = False, d: int = FEATURES,
                   options: list[str] = ()) -> list[str]:
    """Markdown rows of fit-head's defaults (plus `options`) per store size of d columns (with `five_folds`, also at
    --folds 5; with `reference`, also the full search)."""
    given = f" {' '.join(options)}" if options else ""
    lines = [f"| rows x {d} | fit-head (defaults{given}) s | x previous size | peak RSS MB | solver | C | CV acc "
             "| val acc |"
             + (" --folds 5 s | defaults / --folds 5 | its C |" if five_folds else "")
             + (" full search s | its C | CV acc | val acc | same C |" if reference else ""),
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if five_folds else "")
             + (" ---: | ---: | ---: | ---: | --- |" if reference else "")]
    previous = None
    for n in sizes:
        store = store_of(folder, n, d)
        run = fit_head_defaults(store, folder / "head", *options)
        print(f"{n} rows: fit-head defaults {json.dumps(run)}", flush=True)
        growth = f"{run['seconds'] / previous:.2f}" if previous else ""
        previous = run["seconds"]
        line = (f"| {n:,} | {run['seconds']:.1f} | {growth} | {run['peak_rss_mb']:.0f} | {run['solver']} | "
                f"{run['C']:.3g} | {run['cv_accuracy']:.4f} | {run['val_accuracy']:.4f} |")
        if five_folds:
            five = fit_head_defaults(store, folder / "head-5", "--folds", "5")
            print(f"{n} rows: fit-head --folds 5 {json.dumps(five)}", flush=True)
            line += f" {five['seconds']:.1f} | {run['seconds'] / five['seconds']:.2f} | {five['C']:.3g} |"
        if reference:
            ref = fit_head_full_search(store, folder / "head-reference")
            print(f"{n} rows: full search {json.dumps(ref)}", flush=True)
            line += (f" {ref['seconds']:.1f} | {ref['C']:.3g} | {ref['cv_accuracy']:.4f} | {ref['val_accuracy']:.4f} | "
                     f"{'yes' if same_c(run['C'], ref['C']) else 'NO'} |")
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
