"""Extraction at scale: what `featx extract` costs at N = 1,000, 10,000 and 100,000 images, for a first extract, an
unchanged rerun and 100 new images, each a whole process timed from outside with its peak RSS.

Images are synthetic 32 px JPEGs of random noise in 10 class folders (`make_images`), generated once under
--folder and reused; the command line is `featx extract DATA -o STORE -b resnet18 -w none -l avgpool --image-size 32
-q`. Each timed run holds /tmp/featx-timing.lock (flock), so that runs of other benchmarks on the machine do not
overlap it. Prints the CPU capability and load with every figure, one line per run, then a Markdown table with each
figure's ratio to the smallest N.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--folder /tmp/featx-scale] [--keep-stores] [--no-lock]
        [--out benchmarks/results/scale-2026-12-05.md]

With --out, the table is written there too, and a log-log plot beside it (.png) when matplotlib is installed.

A first extract of 100,000 images takes minutes on 2 cores: with --keep-stores the stores stay in FOLDER/stores,
and a later run copies a kept store instead of extracting again (its first extract is then reported as not
measured in that run).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
NEW_IMAGES = 100
COMMAND = ["-b", "resnet18", "-w", "none", "-l", "avgpool", "--image-size", "32", "-q"]
LOCK = "/tmp/featx-timing.lock"


def cpu_capability() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    have = [name for name in ("avx512_bf16", "amx_bf16", "avx2") if name in flags]
    return f"cpu flags {' '.join(have) or 'none of avx512_bf16 amx_bf16 avx2'}, {os.cpu_count()} cores"


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def make_images(folder: Path, n: int, seed: int, start: int = 0) -> None:
    """`n` 32 x 32 noise JPEGs, folder/c<i % 10>/<i>.jpg for i in start..start+n-1."""
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        target = folder / f"c{i % CLASSES}" / f"{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(target, quality=85)


def images(folder: Path, n: int) -> Path:
    """FOLDER/n<N>: N images, generated the first time."""
    data = folder / f"n{n}"
    done = folder / f"n{n}.done"
    if not done.exists():
        shutil.rmtree(data, ignore_errors=True)
        make_images(data, n, seed=n)
        done.touch()
    return data


USE_LOCK = True


def timed(*args) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, last output line) of `python -m featx ARGS`, under the timing lock (unless
    --no-lock)."""
    with open(LOCK, "w") as lock:
        if USE_LOCK:
            fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "featx", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"featx {' '.join(map(str, args))} failed: {err.strip()}")
    return seconds, usage.ru_maxrss / 1024, (out.strip().splitlines() or [""])[-1]


def measure(folder: Path, n: int, keep: bool) -> dict[str, tuple[float, float] | None]:
    """{operation: (seconds, peak RSS MB) or None when not measured} for N images."""
    data = images(folder, n)
    work = Path(tempfile.mkdtemp(prefix=f"featx-scale-{n}-", dir=folder))
    store = work / "s.h5"
    kept = folder / "stores" / f"n{n}.h5"
    figures: dict[str, tuple[float, float] | None] = {}
    try:
        if keep and kept.is_file():
            shutil.copy(kept, store)
            figures["first extract"] = None
        else:
            seconds, rss, line = timed("extract", data, "-o", store, *COMMAND)
            figures["first extract"] = (seconds, rss)
            print(f"N={n:>7,} first extract   {seconds:8.2f} s {rss:7.0f} MB  {load()}  {line}", flush=True)
            if keep:
                kept.parent.mkdir(exist_ok=True)
                shutil.copy(store, kept)
        for attempt in (1, 2):
            seconds, rss, line = timed("extract", data, "-o", store, *COMMAND)
            print(f"N={n:>7,} unchanged rerun {seconds:8.2f} s {rss:7.0f} MB  {load()}  {line}", flush=True)
            figures["unchanged rerun"] = min(figures.get("unchanged rerun") or (seconds, rss), (seconds, rss))
        make_images(data, NEW_IMAGES, seed=7, start=9_000_000)
        try:
            seconds, rss, line = timed("extract", data, "-o", store, *COMMAND)
        finally:
            for path in data.glob("c*/9*.jpg"):
                path.unlink()
        figures[f"+{NEW_IMAGES} new images"] = (seconds, rss)
        print(f"N={n:>7,} +{NEW_IMAGES} new images {seconds:8.2f} s {rss:7.0f} MB  {load()}  {line}", flush=True)
    finally:
        shutil.rmtree(work)
    return figures


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    operations = list(results[sizes[0]])
    head = "| operation | " + " | ".join(f"N = {n:,}" for n in sizes) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    for op in operations:
        cells = []
        base = results[sizes[0]].get(op)
        for n in sizes:
            figure = results[n].get(op)
            if figure is None:
                cells.append("not measured")
                continue
            ratio = f", {figure[0] / base[0]:.2f}x" if base and n != sizes[0] else ""
            cells.append(f"{figure[0]:.2f} s ({figure[1]:.0f} MB{ratio})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[int, dict]) -> str:
    """The scaling targets, where this run measured them: an unchanged rerun over 100,000 files in at most 1.0 s,
    and 100 new images into a 100,000-row store in at most 1.5 times what they take into a 1,000-row store."""
    lines = []
    rerun = results.get(100_000, {}).get("unchanged rerun")
    if rerun:
        lines.append(f"unchanged rerun over 100,000 files: {rerun[0]:.2f} s (target <= 1.0 s)")
    small, large = (results.get(n, {}).get(f"+{NEW_IMAGES} new images") for n in (1_000, 100_000))
    if small and large:
        lines.append(f"+{NEW_IMAGES} new images into 100,000 rows / into 1,000 rows: {large[0] / small[0]:.2f}x "
                     f"(target <= 1.5x)")
    return "\n".join(lines)


def plot(results: dict[int, dict], path: Path) -> bool:
    """A log-log plot of each operation's seconds against N at `path`; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for op in results[sizes[0]]:
        points = [(n, results[n][op][0]) for n in sizes if results[n].get(op)]
        if points:
            ax.plot(*zip(*points), marker="o", label=op)
    ax.set(xscale="log", yscale="log", xlabel="images in the store", ylabel="seconds (whole process)",
           title="featx extract as the store grows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/featx-scale"))
    parser.add_argument("--keep-stores", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-lock", action="store_true",
                        help="do not wait for the timing lock (the figures then overlap other jobs: the header says so)")
    args = parser.parse_args()
    global USE_LOCK
    USE_LOCK = not args.no_lock
    args.folder.mkdir(parents=True, exist_ok=True)
    header = f"{cpu_capability()}, {load()} at start{'' if USE_LOCK else ', without the timing lock'}"
    print(header, flush=True)
    results = {n: measure(args.folder, n, args.keep_stores) for n in map(int, args.sizes.split(","))}
    summary = "\n\n".join(filter(None, [table(results), targets(results)]))
    footer = f"{cpu_capability()}, {load()} at end"
    print(summary + "\n" + footer)
    if args.out:
        args.out.write_text(f"{header}\n\n{summary}\n\n{footer}\n")
        drawn = plot(results, args.out.with_suffix(".png"))
        print(f"plot {args.out.with_suffix('.png')}" if drawn else "no plot: matplotlib is not installed")


if __name__ == "__main__":
    main()
