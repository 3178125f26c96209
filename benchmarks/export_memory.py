"""featx export at two store sizes: seconds and peak resident memory of each whole `featx export` process, npy and
parquet, and each figure at the larger size as a multiple of the smaller's. Memory should stay flat (one chunk of
rows at a time) while the store grows; time should grow with the rows.

    python benchmarks/export_memory.py [--rows 10000,100000] [--dim 1280] [--keep DIR]

Stores are scale_heads.py's synthetic embeddings (float32, tap avgpool). Prints the CPU flags and load, one line per
run, then a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from scale_heads import featx_command, run_process, write_embedding_store


def cpu_flags() -> str:
    """Which of avx512_bf16, amx_bf16, avx2 this CPU has (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in ("avx512_bf16", "amx_bf16", "avx2"))


def export_run(store: Path, output: Path, fmt: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    run = run_process([*featx_command(), "export", store, "-o", output, "--format", fmt, "-q"])
    if run["returncode"] != 0:
        raise RuntimeError(f"featx export failed ({run['returncode']}): {run['stderr'][-2000:]}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000", help="two store sizes")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--keep", type=Path, help="folder for the stores (kept and reused); default: a temporary one")
    args = parser.parse_args()
    small, large = (int(n) for n in args.rows.split(","))
    print(f"CPU {cpu_flags()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="featx-export-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        for n in (small, large):
            store = folder / f"rows-{n}x{args.dim}.h5"
            if not store.exists():
                write_embedding_store(store, n, args.dim)
            for fmt in ("npy", "parquet"):
                run = export_run(store, folder / f"out-{n}-{fmt}", fmt)
                results[n, fmt] = run
                print(f"{n} rows x {args.dim} ({store.stat().st_size / 2**20:.0f} MiB store), {fmt}: "
                      f"{run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MiB", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.2f} at end\n")
        print(f"| format | seconds {small} | seconds {large} | ratio | peak RSS MiB {small} | peak RSS MiB {large} "
              f"| ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for fmt in ("npy", "parquet"):
            a, b = results[small, fmt], results[large, fmt]
            print(f"| {fmt} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.1f}x "
                  f"| {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x |")
        print(f"\nrows ratio {large / small:.0f}x")


if __name__ == "__main__":
    sys.exit(main())
