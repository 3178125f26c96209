"""A stateful model of one store under real operations: the store rule checked after every step.

`StoreMachine` (a hypothesis RuleBasedStateMachine) keeps three data folders (two ImageFolders and one flat folder
of unlabelled images) and one store. Its rules change the files (add, remove many, rename or move, rewrite) and run
real featx operations on the store: `extract` in this process (mirroring, `--prune` or `--overwrite`), `predict
--store` with a fitted head, and a `featx extract` subprocess SIGKILLed at a drawn instant. The model holds what
the store must hold: {root: {path: content key}}. After every step:

* the store holds exactly the model's rows: no row whose file still exists is lost unless a flag asked for it,
  rows of files gone from mirrored data are dropped only up to the limit, and a run beyond it is refused;
* (root, path) pairs and content keys are unique (every file the machine writes has its own content);
* every row's features equal a clean computation of its file's bytes (fp32, within float tolerance), and its
  label is its class folder's (-1 in the flat folder);
* no `STORE.parts/` is left without a committed file in it.

tests/reliability/test_store_rules.py runs a few short examples; benchmarks/store_rules.py runs 500+ steps.
"""
from __future__ import annotations

import io
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from PIL import Image

from featx.errors import FeatxError
from featx.retention import data_root, drop_limit
from featx.sources import content_key
from featx.store import open_store, parts_folder

from .helpers import Child

TAP = "flatten"
OPTIONS = dict(backbone="resnet18", weights="none", image_size=32, precision="fp32", taps=[TAP], workers=0,
               batch_size=2)
CLI = ("-b", "resnet18", "-w", "none", "--image-size", "32", "--precision", "fp32", "-l", TAP, "--workers", "0",
       "--batch-size", "2", "-q")
CLASSES = ("c0", "c1")
FOLDERS = ("a", "b", "flat")  # two ImageFolders and a flat folder of unlabelled images
RTOL, ATOL = 1e-4, 1e-5  # fp32 rows computed in batches of other sizes and thread counts
MAX_KILLS = 2  # per example (the benchmark allows more): each costs a featx subprocess

_shared: dict = {}  # built once per process: the fitted head and the reference extractor


def _head_and_runner():
    """A head fitted on a small store made with OPTIONS (for `predict --store`), and the extractor those rows come
    from (featx.runner.runner_from_config, fed one file at a time: the clean computation rows are compared with)."""
    if not _shared:
        from featx.extraction import extract
        from featx.runner import CpuDecoder, runner_from_config
        from featx.heads import fit_head

        folder = Path(tempfile.mkdtemp(prefix="featx-machine-head-"))
        for i in range(8):
            _write_png(folder / "data" / CLASSES[i % 2] / f"{i}.png", 10_000 + i)
        extract(folder / "data", folder / "s.h5", **OPTIONS)
        head = fit_head(folder / "s.h5", TAP, folder / "head", grid=1.0, val_split=0, plots=False, n_jobs=1)
        with open_store(folder / "s.h5") as store:
            runner = runner_from_config(store.config, device="cpu")
        _shared.update(folder=folder, head=head, runner=runner, decode=CpuDecoder(runner.transform))
    return _shared


def _write_png(path: Path, seed: int) -> bytes:
    """An 8x8 noise PNG of its own content; returns its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


class StoreMachine(RuleBasedStateMachine):
    max_kills = MAX_KILLS
    totals: Counter = Counter()  # every example's counts, for benchmarks/store_rules.py

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="featx-machine-"))
        self.store = self.tmp / "s.h5"
        self.roots = {name: self.tmp / name for name in FOLDERS}
        self.files: dict[str, dict[str, str]] = {name: {} for name in FOLDERS}  # folder -> {relpath: key}
        self.contents: dict[str, bytes] = {}  # key -> bytes of every file ever written
        self.expected: dict[str, dict[str, str]] | None = None  # root -> {relpath: key}; None: no store yet
        self.reference: dict[str, np.ndarray] = {}
        self.seed = 0
        self.kills = 0
        self.just_killed = False  # a SIGKILL may leave an empty parts folder; the next run removes it
        self.counts = Counter()
        for name, n in zip(FOLDERS, (4, 3, 2)):
            for _ in range(n):
                self._new_file(name, self._relpath(name, self.seed % 2))

    # -- files --------------------------------------------------------------------------------------------------
    def _relpath(self, name: str, cls: int) -> str:
        self.seed += 1
        return f"{self.seed:05d}.png" if name == "flat" else f"{CLASSES[cls]}/{self.seed:05d}.png"

    def _new_file(self, name: str, relpath: str) -> None:
        self.seed += 1
        data = _write_png(self.roots[name] / relpath, self.seed)
        key = content_key(data)
        self.files[name][relpath] = key
        self.contents[key] = data

    def _pick(self, name: str, index: int) -> str:
        paths = sorted(self.files[name])
        return paths[index % len(paths)]

    @rule(name=st.sampled_from(FOLDERS), cls=st.integers(0, 1), count=st.integers(1, 6))
    def add_files(self, name, cls, count):
        for _ in range(count):
            self._new_file(name, self._relpath(name, cls))
        self._step("add files")

    @precondition(lambda self: any(len(files) > 1 for files in self.files.values()))
    @rule(name=st.sampled_from(FOLDERS), count=st.integers(1, 10), index=st.integers(0, 999))
    def remove_files(self, name, count, index):
        for _ in range(min(count, len(self.files[name]) - 1)):  # a folder keeps one image, so it stays a data
            relpath = self._pick(name, index)
            (self.roots[name] / relpath).unlink()
            del self.files[name][relpath]
        self._step("remove files")

    @rule(name=st.sampled_from(FOLDERS), index=st.integers(0, 999), cls=st.integers(0, 1))
    def rename_or_move(self, name, index, cls):
        relpath = self._pick(name, index)
        target = self._relpath(name, cls)
        (self.roots[name] / target).parent.mkdir(parents=True, exist_ok=True)
        (self.roots[name] / relpath).rename(self.roots[name] / target)
        self.files[name][target] = self.files[name].pop(relpath)
        self._step("rename")

    @rule(name=st.sampled_from(FOLDERS), index=st.integers(0, 999))
    def rewrite(self, name, index):
        self._new_file(name, self._pick(name, index))
        self._step("rewrite")

    # -- what the store must hold after a run ---------------------------------------------------------------------
    def _after(self, name: str, retention: str) -> dict[str, dict[str, str]] | None:
        """The model's rows after a run on folder `name` ('mirror', 'prune', 'overwrite' or 'add'); None when the
        run must be refused."""
        root, now = data_root(self.roots[name]), dict(self.files[name])
        old = self.expected or {}
        if retention in ("prune", "overwrite") or not old:
            return {root: now}
        present, computed = set(now), set(now.values())
        gone = {p: k for p, k in old.get(root, {}).items() if p not in present and k not in computed}
        others = {r: rows for r, rows in old.items() if r != root}
        if retention == "add":
            return {**others, root: {**now, **gone}}
        kept = computed | {k for rows in others.values() for k in rows.values()}
        lost = [k for k in gone.values() if k not in kept]
        if len(lost) > drop_limit(sum(len(rows) for rows in old.values())):
            return None
        return {**others, root: now}

    def _apply(self, after, refused: FeatxError | None) -> None:
        if after is None:
            assert refused is not None and "--prune" in str(refused), refused
            self.counts["refused"] += 1
        else:
            assert refused is None, refused
            self.expected = after

    # -- runs ------------------------------------------------------------------------------------------------------
    @rule(name=st.sampled_from(FOLDERS), flag=st.sampled_from(["", "", "prune", "overwrite"]))
    def extract(self, name, flag):
        from featx.extraction import extract

        after = self._after(name, flag or "mirror")
        try:
            result = extract(self.roots[name], self.store, **OPTIONS, overwrite=flag == "overwrite",
                             retention="prune" if flag == "prune" else "mirror")
        except FeatxError as err:
            self._apply(after, err)
        else:
            self._apply(after, None)
            self.just_killed = False
            assert result.n_items == len(self.files[name])
            assert result.n_dropped >= 0 and set(result.other) == set(after) - {data_root(self.roots[name])}
        self._step(f"extract {flag or 'mirror'}")

    @rule(name=st.sampled_from(FOLDERS))
    def predict(self, name):
        from featx.heads import predict

        shared = _head_and_runner()
        after = self._after(name, "add")
        predictions = predict(shared["head"], self.roots[name], store=self.store, workers=0)
        self._apply(after, None)
        self.just_killed = False
        assert sorted(predictions.names) == sorted(self.files[name])  # this data's rows, no other
        self._step("predict --store")

    @precondition(lambda self: self.kills < self.max_kills)
    @rule(name=st.sampled_from(FOLDERS), delay=st.floats(0.2, 6.0))
    def kill_extract(self, name, delay):
        """A `featx extract` subprocess SIGKILLed after `delay` seconds (or finished before)."""
        self.kills += 1
        before, after = self.expected, self._after(name, "mirror")
        child = Child("extract", self.roots[name], "-o", self.store, *CLI)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        killed = child.kill()
        result = child.wait()
        self.just_killed = killed
        if killed:
            assert result.returncode == -signal.SIGKILL
            rows = self._rows()
            self.expected = after if after is not None and rows == self._flat(after) else before
            assert rows == self._flat(self.expected)
            self._step("killed")
        else:
            refused = FeatxError(result.stderr) if result.returncode == 2 else None
            assert result.returncode in (0, 2), result
            self._apply(after, refused)
            self._step("kill too late: finished")

    # -- checks ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _flat(model) -> dict[tuple[str, str], str] | None:
        return None if model is None else {(root, p): k for root, rows in model.items() for p, k in rows.items()}

    def _rows(self) -> dict[tuple[str, str], str] | None:
        if not self.store.exists():
            return None
        with open_store(self.store) as store:
            return {(store.roots[r], p): k for r, p, k in zip(store.row_roots, store.paths, store.keys)}

    @invariant()
    def store_holds_what_the_rule_says(self):
        if self.expected is None:
            assert not self.store.exists()
            return
        with open_store(self.store) as store:
            pairs = list(zip((store.roots[r] for r in store.row_roots), store.paths))
            assert len(set(pairs)) == len(pairs), "a (root, path) twice"
            assert len(set(store.keys)) == len(store.keys), "a content key twice"
            assert self._flat(self.expected) == dict(zip(pairs, store.keys))
            flat = data_root(self.roots["flat"])
            for (root, path), label in zip(pairs, store.labels):
                name = store.classes[label] if label >= 0 else None
                assert name == (None if root == flat else path.split("/")[0]), (root, path, name)
            self._check_features(store)

    def _check_features(self, store) -> None:
        shared = _head_and_runner()
        missing = [k for k in store.keys if k not in self.reference]
        for key in missing:
            path = self.tmp / "reference.png"
            path.write_bytes(self.contents[key])
            pixels, reason = shared["decode"](str(path))
            assert not reason
            self.reference[key] = shared["runner"](pixels[None])[TAP][0]
        expected = np.stack([self.reference[k] for k in store.keys]) if len(store) else np.empty((0, 512))
        np.testing.assert_allclose(store.features(TAP), expected, rtol=RTOL, atol=ATOL)

    @invariant()
    def no_parts_folder_without_a_committed_file(self):
        parts = parts_folder(self.store)
        if parts.exists() and not self.just_killed:
            assert any(p.is_file() for p in parts.rglob("*")), "an empty parts folder"

    def _step(self, what: str) -> None:
        self.counts[what] += 1
        self.counts["steps"] += 1

    def teardown(self):
        StoreMachine.totals.update(self.counts)
        StoreMachine.totals["examples"] += 1
        shutil.rmtree(self.tmp, ignore_errors=True)
