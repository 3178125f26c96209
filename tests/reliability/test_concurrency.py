"""Concurrency: two writers on one store, and readers of a store while it is being extended.

The second writer is refused with one line while the first completes intact. Readers (`featx info`,
`featx fit-head`, the Python API, and a handle opened before the extension) see the last complete version, even
while the writer is frozen half-way through sealing the new one.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from featx.extraction import extract
from featx.store import open_store

from .helpers import FAST, Child, assert_one_line_error, listing, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ARGS = (*FAST, "--batch-size", "8")
REFUSED = "is being written by another featx process"


def test_two_writers_started_at_once(tmp_path):
    data = tmp_path / "data"
    write_pngs(data, 240, size=24, classes=3)
    store = tmp_path / "s.h5"
    first, second = (Child("extract", data, "-o", store, *ARGS, "--json") for _ in range(2))
    results = (first.wait(), second.wait())
    finished = [r for r in results if r.returncode == 0]
    for refused in (r for r in results if r.returncode != 0):
        assert_one_line_error(refused, REFUSED)
    # Usually one is refused; on a loaded machine one may start only after the other sealed, and then reuses it all.
    assert sorted(json.loads(r.stdout)["computed"] for r in finished) in ([240], [0, 240]), results
    with open_store(store) as st:
        assert len(st) == 240 and len(set(st.paths)) == 240 and st.failed == []
        assert np.isfinite(st.features(st.taps[0])).all()
    assert listing(tmp_path) == ["data", "s.h5"]


def _wait_for(predicate, child: Child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert child.poll() is None, child.wait()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_readers_see_the_last_complete_version_while_a_writer_extends(tmp_path):
    data = tmp_path / "data"
    write_pngs(data, 120, size=24, classes=2)
    store = tmp_path / "s.h5"
    extract(str(data), store, backbone="resnet18", weights="none", image_size=32, workers=0, batch_size=8)
    with open_store(store) as st:
        old_paths, tap = list(st.paths), st.taps[0]
        old_features = st.features(tap)
    held = open_store(store)  # a reader that keeps the old version open across the swap

    write_pngs(data, 240, size=24, classes=2, seed=5, start=5000)
    writer = Child("extract", data, "-o", store, *ARGS, "--json")
    sealing = store.with_name("s.h5.parts") / "sealing.tmp"
    _wait_for(sealing.exists, writer)
    os.kill(writer.pid, signal.SIGSTOP)  # frozen half-way through writing the new store
    try:
        info = Child("info", store, "--json")
        head = Child("fit-head", store, "-o", tmp_path / "head", "--head", "sgd", "--grid", "1", "--no-plots", "--json")
        intruder = Child("extract", data, "-o", store, *ARGS)
        with open_store(store) as st:
            assert list(st.paths) == old_paths
            np.testing.assert_array_equal(st.features(tap), old_features)
        info, head, intruder = info.wait(), head.wait(), intruder.wait()
        assert info.returncode == 0 and json.loads(info.stdout)["items"] == 120, info
        assert head.returncode == 0, head
        rows = json.loads(head.stdout)["rows"]
        assert rows["train"] + rows["eval"] == 120
        assert_one_line_error(intruder, REFUSED)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    done = writer.wait()
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["computed"] == 240

    with open_store(store) as st:
        assert len(st) == 360
        index = {p: i for i, p in enumerate(st.paths)}
        np.testing.assert_array_equal(st.features(tap, [index[p] for p in old_paths]), old_features)
    assert list(held.paths) == old_paths  # the handle opened before still reads the old, complete file
    np.testing.assert_array_equal(held.features(tap), old_features)
    held.close()
    assert listing(tmp_path) == ["data", "head", "s.h5"]
