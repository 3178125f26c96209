"""Memory bounds: extraction streams (peak RSS does not grow with the number of images), finetuning reads its
decoded-image cache from disk (likewise), and the streamed `sgd` head trains on a store larger than the memory it
is allowed.

Extraction: 2,000 and 20,000 tiny PNGs through resnet18's layer1 flattened (16 kB per row at 32 px), so that
keeping the rows in memory would add ~290 MB at 20,000 images; the allowance is half of that, for the per-image
metadata (paths, keys: about 2 kB per image).

fit-head: the limit is an address-space cap (RLIMIT_AS) on the child, set to the VmPeak the same command reached
on the 2,000-row store plus 160 MB, while the 20,000-row store holds 312 MB of rows. Address space, unlike RSS,
is what a cap can enforce deterministically; MALLOC_ARENA_MAX=2 keeps glibc's per-thread arenas from making it
noisy, and measuring the baseline on this machine, with this torch, keeps the cap honest everywhere. As a
control, the in-memory `logistic` head must fail under the same cap.
"""
from __future__ import annotations

import json
import os
import resource

import pytest

from featx.store import open_store

from .helpers import featx, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SMALL, LARGE = 2_000, 20_000
ROW_BYTES = 64 * 8 * 8 * 4  # resnet18 layer1 at 32 px, flattened, float32
ARGS = ("-b", "resnet18", "-w", "none", "--image-size", "32", "-l", "layer1", "--pooling", "flatten",
        "--workers", "0", "--batch-size", "256", "-q", "--json")
HEAD_ARGS = ("--head", "sgd", "--grid", "1", "--epochs", "1", "--chunk-rows", "1024", "--no-plots", "--json")
CAP_MARGIN_MB = 160


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    write_pngs(tmp / "small", SMALL, size=8)
    write_pngs(tmp / "large", LARGE, size=8, seed=1)
    runs = {}
    for name, count in (("small", SMALL), ("large", LARGE)):
        result = featx("extract", tmp / name, "-o", tmp / f"{name}.h5", *ARGS, timeout=300)
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["computed"] == count
        runs[name] = result
    return tmp, runs


def test_extraction_peak_rss_does_not_grow_with_the_image_count(extracted):
    tmp, runs = extracted
    with open_store(tmp / "large.h5") as st:
        assert len(st) == LARGE and st.feature_shape("layer1") == (ROW_BYTES // 4,)
    accumulated_mb = (LARGE - SMALL) * ROW_BYTES / 2**20
    growth = runs["large"].peak_rss_mb - runs["small"].peak_rss_mb
    print(f"\nextract peak RSS: {SMALL} images {runs['small'].peak_rss_mb:.0f} MB, {LARGE} images "
          f"{runs['large'].peak_rss_mb:.0f} MB (+{growth:.0f} MB; keeping the rows would add {accumulated_mb:.0f} MB)")
    assert growth < accumulated_mb / 2


def _cap(limit_mb: float):
    def apply():
        limit = int(limit_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def test_sgd_head_trains_on_a_store_larger_than_its_memory_cap(extracted):
    tmp, _ = extracted
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    baseline = featx("fit-head", tmp / "small.h5", "-o", tmp / "head-small", *HEAD_ARGS, env=env)
    assert baseline.returncode == 0 and baseline.vm_peak_mb > 0, baseline
    cap = baseline.vm_peak_mb + CAP_MARGIN_MB
    store_mb = LARGE * ROW_BYTES / 2**20
    assert store_mb > 1.5 * CAP_MARGIN_MB  # the rows could not all be held under the cap

    streamed = featx("fit-head", tmp / "large.h5", "-o", tmp / "head-large", *HEAD_ARGS, env=env, preexec_fn=_cap(cap))
    assert streamed.returncode == 0, streamed
    metrics = json.loads(streamed.stdout)
    assert metrics["rows"]["train"] + metrics["rows"]["eval"] == LARGE and metrics["accuracy"] > 0.6

    # control: the same cap stops a head that loads every row (so the cap is real)
    in_memory = featx("fit-head", tmp / "large.h5", "-o", tmp / "head-logistic", "--head", "logistic", "--grid", "1",
                      "--chunk-rows", "1024", "--no-plots", env=env, preexec_fn=_cap(cap))
    assert in_memory.returncode != 0, in_memory
    print(f"\nfit-head sgd under a {cap:.0f} MB address-space cap (baseline {baseline.vm_peak_mb:.0f} MB) on "
          f"{store_mb:.0f} MB of rows: ok; logistic under the same cap: exit {in_memory.returncode}")


def test_resealing_a_store_of_large_rows_copies_them_in_bounded_memory(tmp_path):
    """Extending a store rewrites every old row into the new file; rows of unpooled maps are large (here 32 kB,
    often megabytes), so they must be copied a bounded number of bytes at a time, not 4096 rows at a time."""
    import tracemalloc

    import numpy as np

    from featx.store import write_store
    from featx.retention import DataRows
    from featx.writer import StoreWriter

    n, shape = 4400, (8, 32, 32)
    features = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    keys = [f"{i:064x}" for i in range(n)]
    store = tmp_path / "s.h5"
    write_store(store, config={}, config_key="k", keys=keys, paths=[f"{i}.png" for i in range(n)],
                features={"layer1": features})
    store_mb = features.nbytes / 2**20
    last = features[-1].copy()
    del features
    order = keys[::-1]  # every row moves
    rows = DataRows(root="/data", keys=order, paths=[f"{i}.png" for i in range(n)][::-1], splits=[""] * n,
                    classes=[], labels=[-1] * n, targets=None, failed=[])
    with StoreWriter(store, {}, "k") as writer:
        plan = writer.plan(rows)
        tracemalloc.start()
        writer.seal(plan, ["layer1"])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    with open_store(store) as st:
        assert list(st.keys) == order
        np.testing.assert_array_equal(st.features("layer1", [0])[0], last)
    print(f"\nresealing {store_mb:.0f} MB of rows: peak {peak / 2**20:.0f} MB of Python/numpy memory")
    assert peak / 2**20 < 64 < store_mb / 2


def test_finetune_peak_rss_does_not_grow_with_the_image_count(tmp_path):
    """Training reads its decoded-image cache from disk image by image: 200 and 2,000 images (192 px PNGs, kept at
    the 183 px working size of a 160 px crop, 100 kB each: about 180 MB more in the larger cache) reach about the
    same peak RSS. The backbone is frozen (the cache works the same; the epochs are faster). glibc's mmap threshold
    is fixed at 64 kB, as in the sgd test's MALLOC_ARENA_MAX: each entry's buffer then goes back to the system when
    freed, so the figure counts what featx keeps, not what the allocator caches between batches."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="65536")
    peaks, cached = {}, {}
    for name, count, seed in (("small", 200, 0), ("large", 2000, 1)):
        write_pngs(tmp_path / name, count, size=192, seed=seed)
        cache = tmp_path / f"{name}-cache"
        result = featx("finetune", tmp_path / name, "-o", tmp_path / f"{name}-run", "-b", "mobilenet_v3_small",
                       "-w", "none", "--image-size", "160", "--freeze", "backbone", "--epochs", "2",
                       "--batch-size", "32", "--workers", "0", "--val-split", "0", "--precision", "fp32",
                       "--decode-cache", cache, "-q", "--json", env=env, timeout=600)
        assert result.returncode == 0, result
        files = list(cache.glob("*.npy"))
        assert len(files) == count
        peaks[name], cached[name] = result.peak_rss_mb, sum(f.stat().st_size for f in files) / 2**20
    growth, more = peaks["large"] - peaks["small"], cached["large"] - cached["small"]
    print(f"\nfinetune peak RSS: 200 images {peaks['small']:.0f} MB, 2000 images {peaks['large']:.0f} MB "
          f"(+{growth:.0f} MB; the larger cache holds {more:.0f} MB more)")
    assert more > 160 and growth < more / 2
