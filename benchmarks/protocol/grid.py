"""The real-weight grid: six methods x four datasets x n per class, within a wall-clock budget, one record per cell.

Each dataset is extracted once at the weights' preset (train pool + val, every tap in one pass); every probe cell
fits a head on that cell's rows of the one store (featx.fit_head on an NPZ of those rows), and is charged the
store's measured seconds per image times its own images plus its own fit. Finetuning cells run featx.finetune on
the cell's images with a budget (images through the backbone per run) tuned per dataset and method on a split of
the training pool (never the scoring set). Cells run in priority order (probes, then (c), (d), (b), (e), (f)); a cell
whose estimated cost would pass the deadline is recorded as skipped, with its reason, and never silently dropped.
Every finished cell is appended to the journal at once, so an interrupted grid is still a usable partial grid.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.advice import curve_name

from . import data as D
from .methods import Budget, Methods, remove_store


@dataclass
class GridConfig:
    """Backbone settings shared by every cell, and the finetuning recipe of each method."""

    backbone: str
    weights: str
    weights_match: str
    taps: list[str]
    main_tap: str
    sizes: list[int | str]
    seeds: int = 3
    multi_seed_max: int = 50
    ft_seeds: int = 1
    fixed_seeds: int = 3  # (b) is forward-only and cheap: at small n it gets the probe's seeds (same subsets)
    fixed_seed_max: int = 20
    batch: int = 16
    lr: dict = field(default_factory=lambda: {"fixed": 1e-3, "finetune": 1e-4, "probe+ft": 1e-4, "scratch": 1e-3,
                                              "partial": 1e-4})
    image_size: dict = field(default_factory=dict)  # dataset -> resolution of every method where the preset is too dear
    tune_n: int = 30
    tune_holdout: int = 15
    tune_epochs: int = 8
    min_images: int = 320  # budget bounds at the preset's 224 px, scaled by (224 / size)^2 at a smaller size
    max_images: int = 1280
    full_passes: int = 2  # the upper bound never cuts a cell below this many passes over its images
    ft_order: tuple = (5, "all", 20, 100, 10, 50)  # finetuning cells, spread over n first (the deadline may cut)
    scratch_sizes: tuple = ("all",)
    partial_sizes: tuple = ("all",)  # (f) where the advisor can recommend it (enough images to adapt the backbone)
    partial_tap: str | None = None  # (f) freezes up to this tap; default the deepest stage tap (taps[-2])
    probe_grid: str = "1e-4:1e2"  # C range of the probes (per decade, then refined by featx)
    probe_normalizations: tuple = ("standard", "none")  # fit-head --normalize of the probes (each a probe cell)
    torch_solver_rows: int = 2000  # probes on more rows use `--solver torch` (same objective, several times faster)

    def __post_init__(self):
        self.partial_tap = self.partial_tap or (self.taps[-2] if len(self.taps) > 1 else None)

    def load_options(self) -> dict:
        """How featx loads the weights file (extract, finetune): the match mode, when one is set."""
        return {"weights_match": self.weights_match} if self.weights_match else {}

    def seeds_of(self, method: str, n: int) -> int:
        """Seeds of a finetuning cell: the probe's subsets for (b) at small n, where it competes with the probe
        within the seed spread; one seed otherwise (the CPU budget)."""
        return self.fixed_seeds if method == "fixed" and n <= self.fixed_seed_max else self.ft_seeds

    def bounds(self, name: str) -> tuple[int, int]:
        """(min, max) images through the backbone per finetuning run on dataset `name`."""
        scale = (224 / self.image_size[name]) ** 2 if name in self.image_size else 1.0
        return int(self.min_images * scale), int(self.max_images * scale)


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (decode workers) so far."""
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, cpu_seconds() - self.c0


class Journal:
    """Finished and skipped cells, one JSON line each; reopening the same file resumes after them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()] \
            if self.path.exists() else []

    def find(self, **key) -> list[dict]:
        return [r for r in self.records if all(r.get(k) == v for k, v in key.items())]

    def add(self, record: dict) -> dict:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        self.records.append(record)
        return record


def n_value(ds: D.Dataset, n) -> int:
    """n per class of a size ('all' = every training image: the mean per class, rounded)."""
    return math.ceil(sum(len(v) for v in ds.train.values()) / len(ds.classes)) if n == "all" else int(n)


def cell_files(ds: D.Dataset, n, seed: int) -> dict[str, list[str]]:
    return {c: list(v) for c, v in ds.train.items()} if n == "all" else D.subset(ds, int(n), seed)


class Rows:
    """A dataset's store held in memory, and stores of any subset of its rows (featx stores, same config)."""

    def __init__(self, store: Path, taps: list[str]):
        from featx import open_store

        with open_store(store) as s:
            self.config, self.config_key = dict(s.config), s.config_key
            self.keys, self.paths = np.asarray(s.keys), np.asarray(s.paths)
            self.index = {p: i for i, p in enumerate(s.paths)}
            self.classes = list(s.classes)
            self.labels = np.asarray(s.labels)
            self.x = {t: np.asarray(s.features(t)) for t in taps}

    def store(self, path: Path, files: dict[str, list[str]], split: str) -> Path:
        """A featx store of the rows of `files` (class -> paths), every row in `split`."""
        from featx.store import write_store

        remove_store(path)
        idx = np.array([self.index[f] for fs in files.values() for f in fs])
        return write_store(path, config=self.config, config_key=self.config_key, keys=list(self.keys[idx]),
                           paths=list(self.paths[idx]), labels=self.labels[idx], splits=[split] * len(idx),
                           classes=self.classes, features={t: x[idx] for t, x in self.x.items()})


class Grid:
    """Runs the cells of the grid for a set of datasets into one journal, within `deadline` (time.time())."""

    def __init__(self, cfg: GridConfig, datasets: dict[str, D.Dataset], work: Path, journal: Journal, deadline: float,
                 log=print):
        self.cfg, self.datasets, self.work, self.journal = cfg, datasets, Path(work), journal
        self.deadline, self.log = deadline, log
        self.rows: dict[str, Rows] = {}
        self.per_image: dict[str, float] = {}
        self.per_image_cpu: dict[str, float] = {}
        self.val_store: dict[str, Path] = {}
        self.step_seconds: dict[tuple, float] = {}  # (dataset, method) -> measured wall seconds per training image
        self.tuned: dict[str, dict] = {}
        self.methods: dict[str, Methods] = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def _methods(self, name: str) -> Methods:
        if name not in self.methods:
            wdir = self.work / name
            m = Methods(wdir, self.cfg.backbone, self.cfg.weights, self.cfg.taps, self.cfg.main_tap,
                        self.cfg.image_size.get(name), self.log, load_options=self.cfg.load_options(),
                        partial_tap=self.cfg.partial_tap)
            m.prepare_val_images(D.write_csv(wdir / "val.csv", {"val": self.datasets[name].val}))
            self.methods[name] = m
        return self.methods[name]

    # ----- extraction and probes ----------------------------------------------------------------------------------
    def extract(self, name: str) -> None:
        """One featx extract of the dataset's train pool and val images (every tap), reused by every probe cell."""
        from featx import extract

        ds = self.datasets[name]
        wdir = self.work / name
        wdir.mkdir(parents=True, exist_ok=True)
        store = wdir / "all.h5"
        done = self.journal.find(kind="extract", target=name)
        if not done or not store.exists():  # featx extract resumes an interrupted extraction from its parts
            csv = D.write_csv(wdir / "all.csv", {"train": ds.train, "val": ds.val})
            with Clock() as c:
                res = extract(str(csv), store, backbone=self.cfg.backbone, weights=self.cfg.weights,
                              taps=self.cfg.taps, batch_size=64, **self.cfg.load_options(),
                              image_size=self.cfg.image_size.get(name))
            self.log(f"{name}: extracted {res.n_items} images in {c.wall:.0f} s wall / {c.cpu:.0f} s CPU")
            if not done:  # a journalled extraction stays the cost basis of the probe cells charged with it
                done = [self.journal.add({"kind": "extract", "target": name, "images": res.n_items,
                                          "computed": res.n_computed, "seconds": c.wall,
                                          "cpu_seconds": c.cpu, "precision": res.config["precision"],
                                          "transform": res.config.get("transform")})]
        # Seconds per image of the images this run computed (an interrupted extraction resumes from its parts).
        computed = max(1, done[-1].get("computed", done[-1]["images"]))
        self.per_image[name] = done[-1]["seconds"] / computed
        self.per_image_cpu[name] = done[-1]["cpu_seconds"] / computed
        self.rows[name] = Rows(store, self.cfg.taps)
        self.val_store[name] = self.rows[name].store(wdir / "val.h5", ds.val, "val")

    def probe_cells(self, name: str) -> None:
        from featx import evaluate, fit_head

        ds, rows, cfg = self.datasets[name], self.rows[name], self.cfg
        wdir = self.work / name
        for n in cfg.sizes:
            for seed in range(cfg.seeds if n != "all" and int(n) <= cfg.multi_seed_max else 1):
                files = cell_files(ds, n, seed)
                n_train = D.count(files)
                missing = [(t, norm) for norm in cfg.probe_normalizations for t in cfg.taps
                           if not self.probe_record(name, n_value(ds, n), seed, t, norm)]
                if not missing:
                    continue
                store = rows.store(wdir / "cell.h5", files, "train")
                for tap, norm in missing:
                    solver = "torch" if n_train > cfg.torch_solver_rows else "sklearn"
                    head_dir = wdir / f"head-n{n}-s{seed}-{curve_name(tap, norm).replace('/', '-')}"
                    with Clock() as c:
                        head = fit_head(store, tap, head_dir, seed=seed, val_split=0.0, grid=cfg.probe_grid, n_jobs=1,
                                        plots=False, overwrite=True, solver=solver, normalize=norm)
                    acc = float(evaluate(head, self.val_store[name], split="val")["accuracy"])
                    self.journal.add({
                        "kind": "cell", "target": name, "method": "probe", "tap": tap, "normalize": norm,
                        "n": n_value(ds, n), "all": n == "all", "seed": seed, "n_train": n_train, "acc": acc,
                        "seconds": self.per_image[name] * n_train + c.wall,
                        "cpu_seconds": self.per_image_cpu[name] * n_train + c.cpu, "images": n_train,
                        "backward": False,
                        "detail": {"fit_seconds": round(c.wall, 3), "fit_cpu_seconds": round(c.cpu, 3),
                                   "extract_seconds_charged": round(self.per_image[name] * n_train, 3),
                                   "C": head.C, "converged": (head.metrics.get("cv") or {}).get("converged"),
                                   "solver": solver},
                    })
                self.log(f"{name} n={n} seed={seed}: probe " + ", ".join(
                    f"{curve_name(t, norm)} {100 * self.probe_record(name, n_value(ds, n), seed, t, norm)['acc']:.1f}"
                    for t, norm in missing))

    def probe_record(self, name: str, n: int, seed: int, tap: str, normalize: str) -> dict | None:
        """The journalled probe cell, if any (cells from before the normalisation was recorded are 'standard')."""
        found = [r for r in self.journal.find(kind="cell", target=name, method="probe", n=n, seed=seed, tap=tap)
                 if r.get("normalize", "standard") == normalize]
        return found[-1] if found else None

    # ----- finetuning -----------------------------------------------------------------------------------------------
    def tune(self, name: str, method: str) -> dict:
        """Budget of `method` on `name`: one run on a tuning subset of the training pool with validation after every
        epoch on other pool images; the budget is the epoch count with the best hold-out accuracy (the earliest of
        ties), which `cell_images` turns into each cell's images."""
        key = "finetune"  # (b), (d), (e) and (f) share (c)'s budget: one tuning run per dataset is what the CPU affords
        found = self.journal.find(kind="tune", target=name, method=key)
        if found:
            return found[-1]
        ds, cfg = self.datasets[name], self.cfg
        n = min(cfg.tune_n, ds.pool_size() // 2)
        train, held = D.tune_split(ds, n, min(cfg.tune_holdout, ds.pool_size() - n), seed=0)
        wdir = self.work / name / f"tune-{key}"
        csv = D.write_csv(self.work / name / f"tune-{key}.csv", {"train": train, "val": held})
        from .methods import run_finetune_history

        with Clock() as c:
            hist = run_finetune_history(csv, wdir, backbone=cfg.backbone, weights=cfg.weights,
                                        **cfg.load_options(), freeze="backbone" if key == "fixed" else "none",
                                        lr=cfg.lr[key], epochs=cfg.tune_epochs, batch_size=cfg.batch, optimizer="adam",
                                        augment="flip", image_size=cfg.image_size.get(name), seed=0)
        accs = [h["val_acc"] for h in hist]
        best_epoch = 1 + int(np.argmax(accs))
        n_tune = D.count(train)
        low, high = cfg.bounds(name)
        images = int(min(high, max(low, best_epoch * n_tune)))
        rec = self.journal.add({"kind": "tune", "target": name, "method": key, "n_per_class": n, "n_train": n_tune,
                                "n_holdout": D.count(held), "val_acc_per_epoch": accs, "best_epoch": best_epoch,
                                "budget_images": images, "seconds": c.wall, "cpu_seconds": c.cpu,
                                "lr": cfg.lr[key]})
        self.log(f"{name} tune {key}: hold-out acc per epoch {[round(100 * a, 1) for a in accs]} -> best epoch "
                 f"{best_epoch}, budget {images} images ({c.wall:.0f} s)")
        return rec

    def cell_images(self, name: str, tuned: dict, n_train: int) -> int:
        """Images through the backbone of a finetuning cell with `n_train` images: the tuned epoch count's worth,
        clamped to the dataset's bounds (so small cells still get some optimizer steps and large ones fit the CPU),
        but never less than min(E, full_passes) passes over every image (a large set is not cut to a partial epoch)."""
        low, high = self.cfg.bounds(name)
        high = max(high, min(tuned["best_epoch"], self.cfg.full_passes) * n_train)
        return int(min(high, max(low, tuned["best_epoch"] * n_train)))

    def estimate(self, name: str, method: str, n_train: int, budget_images: int) -> float:
        """Wall seconds a finetuning cell is expected to take, from the dataset's measured throughput."""
        rate = self.step_seconds.get((name, method)) or self.step_seconds.get((name, "finetune"))
        if rate is None:
            rate = 3 * self.per_image[name]  # forward + backward, before any run of this dataset measured it
        return rate * budget_images + 10

    def finetune_cells(self, name: str, method: str, sizes=None) -> None:
        ds, cfg = self.datasets[name], self.cfg
        sizes = [n for n in cfg.ft_order if n in cfg.sizes] if sizes is None else sizes
        for n in sizes:
            nv = n_value(ds, n)
            for seed in range(cfg.seeds_of(method, nv)):
                if self.journal.find(kind="cell", target=name, method=method, n=nv, seed=seed):
                    continue  # (a cell skipped by an earlier run's budget is tried again)
                files = cell_files(ds, n, seed)
                n_train = D.count(files)
                if self.left() < 60:
                    self._skip(name, method, nv, seed, n_train, "the grid's wall-clock budget ran out")
                    continue
                tuned = self.tune(name, method)
                expected = self.estimate(name, method, n_train, self.cell_images(name, tuned, n_train))
                if expected > self.left():
                    self._skip(name, method, nv, seed, n_train,
                               f"expected {expected:.0f} s, {self.left():.0f} s of the budget left")
                    continue
                self._finetune_cell(name, method, n, seed, files, tuned)

    def _skip(self, name, method, nv, seed, n_train, why) -> None:
        self.journal.add({"kind": "skipped", "target": name, "method": method, "n": nv, "seed": seed,
                          "n_train": n_train, "why": why})
        self.log(f"{name} {method} n={nv} seed={seed}: skipped ({why})")

    def _finetune_cell(self, name, method, n, seed, files, tuned) -> None:
        ds, cfg = self.datasets[name], self.cfg
        M = self._methods(name)
        wdir = self.work / name
        tag = f"n{n}-s{seed}"
        n_train = D.count(files)
        budget_images = self.cell_images(name, tuned, n_train)
        seen = files
        if n_train > budget_images:  # the cap: less than one pass = one pass over a seeded, class-balanced part
            share = budget_images / n_train
            seen = {c: D.permutation(f, 7919 + seed)[: max(1, int(share * len(f)))] for c, f in files.items()}
        csv = D.write_csv(wdir / f"{tag}.csv", {"train": seen})
        init_head = None
        extra = {}
        if method == "probe+ft":
            probe = self.probe_record(name, n_value(ds, n), seed, cfg.main_tap, "standard")
            init_head = wdir / f"head-n{n}-s{seed}-{cfg.main_tap}"
            extra = {"probe_seconds": probe["seconds"], "probe_cpu_seconds": probe["cpu_seconds"]}
        budget = Budget(budget_images, 1, batch=cfg.batch)
        c0 = cpu_seconds()
        r = M.finetune(method, csv, tag, seed, cfg.lr[method], budget, D.count(seen), "flip", "adam",
                       init_head=init_head)
        r["detail"]["trained_on"] = D.count(seen)
        cpu = cpu_seconds() - c0
        self.step_seconds[(name, method)] = r["seconds"] / max(1, r["images"])
        rec = {"kind": "cell", "target": name, "all": n == "all", "n": n_value(ds, n), "seed": seed,
               "n_train": n_train, "cpu_seconds": cpu, "image_size": cfg.image_size.get(name), **r}
        if extra:
            rec["seconds"] += extra["probe_seconds"]
            rec["cpu_seconds"] += extra["probe_cpu_seconds"]
            rec["images"] += n_train
            rec["detail"] = {**rec["detail"], **extra}
        self.journal.add(rec)
        self.log(f"{name} n={n} seed={seed}: {method} {100 * rec['acc']:.1f} % in {rec['seconds']:.0f} s "
                 f"({r['epochs']} passes, {r['images']} images)")
