"""featx serve throughput on real JPEGs: images/s and latency at concurrency 1, 8 and 32, batching on and off,
cache hits, and the ratio to `featx extract` on the same backbone, measured side by side in one run.

Every image request in the compute runs is a cache miss (`--cache-items 1` and distinct images, checked against
the server's own images counter), so the figures are decode + forward + head. The clients (asyncio + httpx, one
process) share the machine's cores with the server. Targets on a 2-core CPU: batched throughput at concurrency 32
>= 0.8x featx extract's img/s, cache hits >= 500 answers/s.

    python benchmarks/serve_throughput.py [--data ../shared/data/dogs_vs_cats] [--out results.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

import featx
from featx.serve.server import start_process
from featx.sources import load_source

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs_vs_cats"
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 60, 8: 160, 32: 320}
CACHE_REQUESTS = 3000
JPEG = {"content-type": "image/jpeg"}


def split_data(data: Path, per_class: int, folder: Path) -> tuple[Path, list[bytes]]:
    """A CSV of `per_class` train images per class (for extract and the head), and the other images' bytes."""
    source = load_source(str(data))
    items = source.items
    chosen, rest = [], []
    for label in range(len(source.classes)):
        of_class = [it for it in items if it.label == label and it.split == "train"]
        chosen += of_class[:per_class]
        rest += of_class[per_class:]
    rest += [it for it in items if it.split != "train"]
    listing = folder / "train.csv"
    listing.write_text("\n".join(f"{it.path},{source.classes[it.label]}" for it in chosen))
    return listing, [Path(it.path).read_bytes() for it in rest]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def counters(url: str) -> dict[str, float]:
    """The server's images total and batch-size histogram sum/count."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in ("featx_serve_images_total", "featx_serve_batch_size_sum", "featx_serve_batch_size_count"):
                out[sample.name] = sample.value
            elif sample.name in ("featx_serve_request_seconds_sum", "featx_serve_request_seconds_count") \
                    and sample.labels.get("endpoint") == "/v1/heads/{name}/predict":
                out[sample.name] = sample.value
    return out


async def load(url: str, bodies: list[bytes], n: int, concurrency: int) -> tuple[float, np.ndarray]:
    """Send `n` predict requests (body i % len) from `concurrency` clients; (wall seconds, latencies in s)."""
    latencies = np.zeros(n)
    next_index = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            for i in next_index:
                t0 = time.perf_counter()
                r = await client.post("/v1/heads/head/predict", content=bodies[i % len(bodies)], headers=JPEG)
                latencies[i] = time.perf_counter() - t0
                r.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def measure(url: str, bodies: list[bytes], n: int, concurrency: int) -> dict:
    asyncio.run(load(url, bodies[-2 * concurrency:], 2 * concurrency, concurrency))  # warm-up: batch shapes
    before = counters(url)
    wall, lat = asyncio.run(load(url, bodies, n, concurrency))
    after = counters(url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = delta.get("featx_serve_batch_size_count", 0.0)
    served = delta.get("featx_serve_request_seconds_count", 0.0)
    server_ms = 1000 * delta.get("featx_serve_request_seconds_sum", 0.0) / served if served else 0.0
    return {"rps": n / wall, "p50": 1000 * np.percentile(lat, 50), "p99": 1000 * np.percentile(lat, 99),
            "computed": int(delta.get("featx_serve_images_total", 0)), "n": n, "server_ms": server_ms,
            "mean_batch": delta.get("featx_serve_batch_size_sum", 0.0) / batches if batches else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, help="write the results as Markdown here too")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: pass --data (an ImageFolder of JPEGs)")
    load_start = os.getloadavg()[0]
    lines = [f"featx serve throughput, {args.data.name}, resnet18 -w none at 224 px, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing, bodies = split_data(args.data, 128, tmp)
        result = featx.extract(str(listing), tmp / "train.h5", backbone="resnet18", weights="none",
                               taps=["avgpool"])
        extract_ips = result.images_per_second
        print(f"featx extract: {result.n_computed} images, {extract_ips:.1f} img/s", flush=True)
        featx.fit_head(tmp / "train.h5", "avgpool", tmp / "head", grid="1", plots=False, n_jobs=1)
        lines += ["EXTRACT_LINE", "",
                  f"{len(bodies)} distinct JPEGs served, each request one image (raw image/jpeg body)", "",
                  "| batching | concurrency | img/s | p50 ms | p99 ms | mean batch | computed/requests |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        runs = {}
        for label, max_batch in (("on", args.max_batch), ("off", 1)):
            proc, url = start_process([str(tmp / "head"), "--max-batch", str(max_batch), "--max-wait-ms",
                                       str(args.max_wait_ms), "--cache-items", "1"])
            try:
                for c in CONCURRENCY:
                    r = runs[label, c] = measure(url, bodies, REQUESTS[c], c)
                    lines.append(f"| {label} (--max-batch {max_batch}) | {c} | {r['rps']:.1f} | {r['p50']:.0f} | "
                                 f"{r['p99']:.0f} | {r['mean_batch']:.1f} | {r['computed']}/{r['n']} |")
                    print(lines[-1], flush=True)
            finally:
                stop_server(proc)
        proc, url = start_process([str(tmp / "head")])
        try:
            hot = bodies[:64]
            asyncio.run(load(url, hot, len(hot), 8))
            cache = {c: measure(url, hot, CACHE_REQUESTS, c) for c in (8, 32)}
        finally:
            stop_server(proc)
        again = featx.extract(str(listing), tmp / "again.h5", backbone="resnet18", weights="none",
                              taps=["avgpool"]).images_per_second  # before and after the serve runs: same load
        extract_ips = max(extract_ips, again)
    lines[lines.index("EXTRACT_LINE")] = (f"featx extract: {result.n_computed} images, {result.images_per_second:.1f} "
                                          f"img/s before the serve runs, {again:.1f} img/s after; the ratio uses the "
                                          f"faster, {extract_ips:.1f}")
    lines += ["", "| cache hits | concurrency | answers/s | p50 ms | p99 ms | server ms (mean) | computed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, r in cache.items():
        lines.append(f"| 64 images already embedded | {c} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['server_ms']:.2f} | {r['computed']} |")
    best_cache = max(r["rps"] for r in cache.values())
    lines += ["", "Ratios (same run):",
              f"- batched serve at concurrency 32 / featx extract: {runs['on', 32]['rps'] / extract_ips:.2f} "
              f"(target >= 0.8)",
              *[f"- batching on / off at concurrency {c}: {runs['on', c]['rps'] / runs['off', c]['rps']:.2f}"
                for c in CONCURRENCY],
              f"- cache hits: {best_cache:.0f} answers/s (target >= 500), "
              f"{best_cache / runs['on', 32]['rps']:.1f}x the batched compute rate"]
    lines += ["", f"load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
