"""Crash loop: a real `featx extract` SIGKILLed at 20 seeded random instants and resumed each time.

Instants: during start-up (imports, hashing, locking), after a random number of committed batches, while a batch's
segment file is being written, while the store is being sealed (`<store>.parts/sealing.tmp` exists) and right
after the sealed store was renamed into place (parts not yet removed). The data changes half-way (files added,
removed, renamed) and an old store exists for the second half, as when a user reruns after a crash.

After every kill the final path holds nothing or a complete, readable store and every committed segment is
complete; at the end the store holds every image exactly once with the embeddings of a clean run, nothing
temporary is left, and `featx info` reads it.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.extraction import extract
from featx.sources import load_source
from featx.store import open_store

from .helpers import FAST, Child, featx as run_featx, files_under, listing, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SEED = 6
TAPS = ("layer3", "avgpool")
ARGS = (*FAST, "--batch-size", "6", "-l", TAPS[0], "-l", TAPS[1])
API = dict(backbone="resnet18", weights="none", image_size=32, workers=0, batch_size=6, taps=list(TAPS))
# (phase, kinds): the first phase starts with no store; the second extends a complete store after the data changed.
PHASES = (
    ["startup", "startup", "batch", "batch", "segment", "batch", "seal"],
    ["startup", "batch", "startup", "batch", "segment", "batch", "startup", "batch", "batch", "segment", "seal", "seal",
     "seal", "publish"],
)
PUBLISH_IS_BEST_EFFORT = {"publish"}  # its window is a few ms; when it is missed the run simply completes
POLL = 0.001


class Parts:
    """What a run leaves in `<store>.parts/`."""

    def __init__(self, store: Path):
        self.store = store
        self.path = store.with_name(store.name + ".parts")

    def names(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except FileNotFoundError:
            return []

    def segments(self) -> set[str]:
        return {n for n in self.names() if n.startswith("seg-") and n.endswith(".h5")}


def _store_identity(store: Path):
    try:
        st = os.stat(store)
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def _kill_at(kind: str, rng: random.Random, store: Path) -> tuple[str, bool]:
    """Start a run and SIGKILL it at an instant of `kind`. Returns (what was observed at the kill, killed?)."""
    parts = Parts(store)
    before = parts.segments()
    identity = _store_identity(store)
    child = Child("extract", store.parent / "data", "-o", store, *ARGS)
    started = time.monotonic()
    startup_delay = rng.uniform(0.05, 2.0)
    batches = rng.randint(1, 3)
    jitter = rng.uniform(0, 0.01)
    observed = "startup"
    while child.poll() is None:
        names = parts.names()
        new_segments = {n for n in names if n.startswith("seg-") and n.endswith(".h5")} - before
        if "sealing.tmp" in names:
            observed = "seal"
        elif any(n.startswith("seg-") and n.endswith(".tmp") for n in names):
            observed = "segment"
        elif new_segments:
            observed = "batch"
        fire = {
            "startup": time.monotonic() - started >= startup_delay,
            "batch": len(new_segments) >= batches,
            "segment": observed == "segment",
            "seal": observed == "seal",
            "publish": _store_identity(store) != identity and parts.path.exists(),
        }[kind]
        if fire:
            if kind == "batch":
                time.sleep(jitter)
            if kind == "publish":
                observed = "publish"
            return observed, child.kill()
        time.sleep(POLL)
    result = child.wait()
    assert result.returncode == 0, result
    return "completed", False


def _check_after_kill(store: Path, complete_lengths: set[int]) -> None:
    """The invariants a kill at any instant must keep."""
    if store.exists():
        with open_store(store) as st:  # complete and readable: the old store or the new one
            assert len(st) in complete_lengths, (len(st), complete_lengths)
            assert len(set(st.keys)) == len(st)
            for tap in TAPS:
                assert st.features(tap).shape[0] == len(st)
    parts = Parts(store)
    leftovers = set(os.listdir(store.parent)) - {"data", store.name, parts.path.name, "clean.h5", store.name + ".rows"}
    assert not leftovers, leftovers
    for name in parts.names():
        assert name == "sealing.tmp" or (name.startswith("seg-") and name.endswith((".h5", ".tmp"))), name
    for name in parts.segments():  # renamed into place only when complete
        with h5py.File(parts.path / name, "r", locking=False) as seg:
            n = seg["key"].shape[0]
            assert n > 0 and all(seg[tap].shape[0] == n for tap in TAPS)


def _change_data(data: Path) -> None:
    """Between the phases: 90 new images, 6 removed, 6 renamed (same bytes, new name), one moved to another class."""
    write_pngs(data, 90, size=40, classes=3, seed=2, start=1000)
    files = sorted(data.rglob("*.png"))
    for path in files[:6]:
        path.unlink()
    for path in files[10:16]:
        path.rename(path.with_name("renamed-" + path.name))
    moved = files[20]
    moved.rename(data / "c2" / ("moved-" + moved.name))


def test_extract_survives_20_kills_at_random_instants(tmp_path):
    rng = random.Random(SEED)
    data = tmp_path / "data"
    write_pngs(data, 150, size=40, classes=3, seed=1)
    # a few odd sizes so that crops and batches are not all alike
    write_pngs(data, 6, size=64, classes=3, seed=9, start=500)
    store = tmp_path / "store.h5"
    observed: Counter = Counter()
    kills = 0
    complete_lengths: set[int] = set()

    for phase, kinds in enumerate(PHASES):
        if phase == 1:
            result = run_featx("extract", data, "-o", store, *ARGS)  # finish phase 0: an old store to extend
            assert result.returncode == 0, result
            with open_store(store) as st:
                complete_lengths = {len(st)}
            _change_data(data)
            complete_lengths.add(len(load_source(str(data)).items))
        for kind in kinds:
            what, killed = _kill_at(kind, rng, store)
            observed[what] += 1
            kills += killed
            assert killed or kind in PUBLISH_IS_BEST_EFFORT, f"the run ended before a {kind} kill"
            _check_after_kill(store, complete_lengths)
            if not killed:
                break

    assert kills >= 20, observed
    assert observed["seal"] >= 3 and observed["startup"] >= 2 and observed["batch"] >= 5, observed

    final = run_featx("extract", data, "-o", store, *ARGS, "--json")
    assert final.returncode == 0, final

    # every image exactly once, keyed by its bytes, with a clean run's embeddings
    source = load_source(str(data))
    clean = tmp_path / "clean.h5"
    extract(str(data), clean, **API)
    with open_store(store) as got, open_store(clean) as want:
        assert list(got.paths) == [item.relpath for item in source.items]
        assert len(set(got.paths)) == len(got) == len(source.items)
        assert list(got.keys) == [hashlib.sha256(Path(item.path).read_bytes()).hexdigest() for item in source.items]
        assert list(got.labels) == list(want.labels) and got.failed == []
        for tap in TAPS:
            np.testing.assert_allclose(got.features(tap), want.features(tap), rtol=1e-4, atol=1e-4)

    # nothing temporary left anywhere, and the data folder untouched
    assert listing(tmp_path) == ["clean.h5", "data", "store.h5"]
    assert {n for n in files_under(data) if not n.endswith(".png")} == {"c0", "c1", "c2"}

    info = run_featx("info", store)
    assert info.returncode == 0 and f"items      {len(source.items)}" in info.stdout, info
    print(f"\nextract crash loop: {kills} kills survived, instants {dict(observed)}")
    shutil.rmtree(data)
