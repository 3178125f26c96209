"""Retrieval: queries per second of featx's exact chunked cosine search (`featx neighbors`, POST /v1/search, the knn
head) on a 100,000-row store, side by side with the brute-force answers it must equal.

The store holds `scale_heads.embedding_rows` (rows shaped like pooled CNN embeddings, 1280 wide). Measured, each for
1, 16, 256 and 1024 queries at k=10:
- streamed: `featx.heads.search.top_k` over the store read chunk by chunk (`neighbors.gallery_blocks`: what
  `featx neighbors` does), with the peak of memory allocated during the search (tracemalloc sees numpy's arrays);
- in memory: the same search over normalised rows held in memory (what the service and the knn head do);
- scikit-learn: NearestNeighbors(metric="cosine", algorithm="brute") fitted on the rows in memory (its kneighbors
  computes the whole queries x rows distance matrix), as the reference.
Every answer is compared with an exact numpy brute force (recall@10 = 1 expected). No approximate index (faiss,
hnswlib) is a featx dependency; one that is installed is reported, none is measured here.

    python benchmarks/retrieval.py [--rows 100000] [--queries 1,16,256,1024] [--keep DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_heads import write_embedding_store  # noqa: E402

K = 10


def cpu_flags() -> str:
    """Which of avx512_bf16, amx_bf16 and avx2 /proc/cpuinfo lists, and the model name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    shown = [f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx512_bf16", "amx_bf16", "avx2")]
    return f"{model}; {', '.join(shown)}; {os.cpu_count()} cores"


def timed(function, repeat_until: float = 1.0):
    """(seconds per call, last result): calls repeated until `repeat_until` seconds have passed (at least once)."""
    calls, started = 0, time.perf_counter()
    while True:
        result = function()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= repeat_until:
            return elapsed / calls, result


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def main() -> None:
    from sklearn.neighbors import NearestNeighbors

    from featx.heads import search
    from featx.heads.neighbors import gallery_blocks
    from featx.store import open_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", default="1,16,256,1024")
    parser.add_argument("--keep", type=Path, help="folder for the store (kept and reused); default: a temporary one")
    args = parser.parse_args()
    approximate = [name for name in ("faiss", "hnswlib") if importlib.util.find_spec(name)]
    print(f"CPU: {cpu_flags()}; load average {os.getloadavg()[0]:.2f} at start; approximate indexes installed: "
          f"{', '.join(approximate) or 'none'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="featx-retrieval-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rows-{args.rows}.h5"
        if not path.exists():
            write_embedding_store(path, args.rows)
        with open_store(path) as store:
            X = store.features("avgpool")
            Xn = search.normalized(X)
            blocks = gallery_blocks(store, "avgpool")
            nn = NearestNeighbors(n_neighbors=K, metric="cosine", algorithm="brute").fit(X)
            rng = np.random.default_rng(1)
            lines = [f"{args.rows:,} rows x {X.shape[1]} float32 ({path.stat().st_size / 1e9:.2f} GB store), k={K}; "
                     "queries/s (higher is better), ratios to scikit-learn's brute-force NearestNeighbors",
                     "", "| queries | streamed from the store | in memory | scikit-learn brute | streamed / sklearn | "
                     "in memory / sklearn | streamed peak MiB | recall@10 (streamed, in memory) |",
                     "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            for n_queries in [int(q) for q in args.queries.split(",")]:
                Q = X[rng.choice(len(X), n_queries, replace=False)] * 1.01 + 0.01
                Qn = search.normalized(Q)
                truth = np.argsort(-(Qn @ Xn.T), axis=1, kind="stable")[:, :K]
                tracemalloc.start()
                streamed_s, streamed = timed(lambda: search.top_k(Qn, blocks, len(X), K))
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                memory_s, in_memory = timed(lambda: search.top_k(Qn, search.array_blocks(Xn), len(X), K))
                sklearn_s, _ = timed(lambda: nn.kneighbors(Q, return_distance=True))
                row = (f"| {n_queries} | {n_queries / streamed_s:,.1f} | {n_queries / memory_s:,.1f} | "
                       f"{n_queries / sklearn_s:,.1f} | {sklearn_s / streamed_s:.2f} | {sklearn_s / memory_s:.2f} | "
                       f"{peak:.0f} | {recall(streamed.rows, truth):.4f}, {recall(in_memory.rows, truth):.4f} |")
                print(row, flush=True)
                lines.append(row)
    print("\n".join(["", *lines, "", f"load average {os.getloadavg()[0]:.2f} at end"]))


if __name__ == "__main__":
    main()
