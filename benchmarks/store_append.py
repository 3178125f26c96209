"""How a store can take k new rows without rewriting its N old ones: three ways of committing measured side by side.

* rewrite: today's seal: a new file with every old row copied and the new ones, renamed into place;
* virtual: the new rows in one immutable row file, and a new store file (every row's metadata, and /features/<tap>
  as an HDF5 virtual dataset mapping the store's row order onto the row files), renamed into place;
* in place: the rows appended (at the end of the row order, which `featx extract` does not keep) at the end of resizable (chunked, maxshape=None) datasets of the open store.

Each commit adds k rows of D float32 (keys and paths with them) to a store of N rows, and inserts them at
`INSERTIONS` places in the row order (new files sort among the old ones), as `featx extract` does. Prints the CPU
capability, then one line per (N, way) with seconds and the ratio to the smallest N.

    python benchmarks/store_append.py [--rows 1000,100000] [--new 100] [--dim 512]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from featx.store import fsync_path  # as featx.store.publish does before every rename into place

INSERTIONS = 10


def cpu_capability() -> str:
    flags = ""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    have = [name for name in ("avx512_bf16", "amx_bf16", "avx2") if name in flags]
    return f"cpu flags: {' '.join(have) or 'none of avx512_bf16 amx_bf16 avx2'}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}"


def metadata(h5: h5py.File, n: int) -> None:
    keys = np.array([f"{i:064x}" for i in range(n)], dtype="S64")
    h5.create_dataset("items/key", data=keys)
    h5.create_dataset("items/path", data=np.array([f"c{i % 10}/{i:07d}.jpg" for i in range(n)], dtype=object),
                      dtype=h5py.string_dtype())


def order(n: int, k: int) -> np.ndarray:
    """Where each row of the new order comes from: old rows 0..n-1, new rows n..n+k-1 inserted at INSERTIONS places."""
    places = np.linspace(0, n, INSERTIONS, endpoint=False).astype(int)
    parts, start = [], 0
    for place, block in zip(places, np.array_split(np.arange(n, n + k), INSERTIONS)):
        parts += [np.arange(start, place), block]
        start = place
    parts.append(np.arange(start, n))
    return np.concatenate(parts)


def rewrite(folder: Path, n: int, new: np.ndarray) -> None:
    rows = order(n, len(new))
    with h5py.File(folder / "store.h5", "r") as old, h5py.File(folder / "next.h5", "w") as out:
        metadata(out, n + len(new))
        src = old["features/t"]
        dst = out.create_dataset("features/t", shape=(n + len(new), new.shape[1]), dtype=np.float32,
                                 chunks=(512, new.shape[1]))
        for start in range(0, n + len(new), 4096):
            part = rows[start:start + 4096]
            old_part = part[part < n]
            block = np.empty((len(part), new.shape[1]), np.float32)
            block[part < n] = src[old_part[0]:old_part[-1] + 1][old_part - old_part[0]] if len(old_part) else 0
            block[part >= n] = new[part[part >= n] - n]
            dst[start:start + len(part)] = block
    fsync_path(folder / "next.h5")
    os.replace(folder / "next.h5", folder / "store.h5")


def virtual(folder: Path, n: int, new: np.ndarray) -> None:
    rows_dir = folder / "store.h5.rows"
    with h5py.File(rows_dir / "new.h5", "w") as f:
        f.create_dataset("features/t", data=new)
    fsync_path(rows_dir / "new.h5")
    rows = order(n, len(new))
    layout = h5py.VirtualLayout((n + len(new), new.shape[1]), np.float32)
    base = h5py.VirtualSource("store.h5.rows/base.h5", "features/t", (n, new.shape[1]))
    added = h5py.VirtualSource("store.h5.rows/new.h5", "features/t", new.shape)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        lo, hi = rows[run[0]], rows[run[-1]] + 1
        layout[run[0]:run[-1] + 1] = base[lo:hi] if lo < n else added[lo - n:hi - n]
    with h5py.File(folder / "next.h5", "w") as out:
        metadata(out, n + len(new))
        out.create_virtual_dataset("features/t", layout, fillvalue=np.nan)
    fsync_path(folder / "next.h5")
    os.replace(folder / "next.h5", folder / "store.h5")


def in_place(folder: Path, n: int, new: np.ndarray) -> None:
    with h5py.File(folder / "store.h5", "r+") as h5:
        ds = h5["features/t"]
        ds.resize(n + len(new), axis=0)
        ds[n:] = new
        for name in ("items/key", "items/path"):
            h5[name].resize(n + len(new), axis=0)
        h5["items/key"][n:] = np.array([f"{i:064x}" for i in range(n, n + len(new))], dtype="S64")
        h5["items/path"][n:] = np.array([f"new/{i}.jpg" for i in range(len(new))], dtype=object)
    fsync_path(folder / "store.h5")


def prepare(folder: Path, n: int, dim: int, way: str) -> None:
    rng = np.random.default_rng(0)
    path = folder / ("store.h5.rows/base.h5" if way == "virtual" else "store.h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    resizable = way == "in place"
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features/t", shape=(n, dim), dtype=np.float32, chunks=(512, dim),
                               maxshape=(None, dim) if resizable else None)
        for start in range(0, n, 10_000):
            ds[start:start + 10_000] = rng.random((min(10_000, n - start), dim), dtype=np.float32)
        if resizable:
            h5.create_dataset("items/key", data=np.array([f"{i:064x}" for i in range(n)], dtype="S64"),
                              maxshape=(None,), chunks=(4096,))
            h5.create_dataset("items/path", data=np.array([f"c{i % 10}/{i:07d}.jpg" for i in range(n)], dtype=object),
                              dtype=h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
        elif way == "rewrite":
            metadata(h5, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000,100000")
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    print(cpu_capability())
    sizes = [int(n) for n in args.rows.split(",")]
    new = np.random.default_rng(1).random((args.new, args.dim), dtype=np.float32)
    ways = {"rewrite": rewrite, "virtual": virtual, "in place": in_place}
    first: dict[str, float] = {}
    for n in sizes:
        for way, commit in ways.items():
            folder = Path(tempfile.mkdtemp(prefix="featx-append-"))
            try:
                prepare(folder, n, args.dim, way)
                os.sync()
                started = time.perf_counter()
                commit(folder, n, new)
                seconds = time.perf_counter() - started
            finally:
                shutil.rmtree(folder)
            first.setdefault(way, seconds)
            print(f"N={n:>9,}  {way:<9} +{args.new} rows x {args.dim}: {seconds * 1000:8.1f} ms  "
                  f"({seconds / first[way]:.1f}x N={sizes[0]:,})")


if __name__ == "__main__":
    main()
