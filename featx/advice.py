"""`featx advise`: probe, probe at a shallower tap, or finetune, decided by measuring the data instead of a rule.

Within a time budget the usual taps (two stage outputs and the pre-logits) are extracted once into a store (reused
by later `fit-head` / `extract` commands), and logistic probes are fitted on growing, class-balanced subsets at each
tap, with the rows standardised and unscaled (a learning curve per tap and normalisation, scored on held-out rows
and on the training rows' cross-validation folds together). Standardising is not always right: on a few images per
class it weighs a thousand feature dimensions equally from a handful of rows, and pretrained pre-logits, which the
source classifier read unscaled, lose several points to it. A tap's accuracy is its better normalisation's, and
standardising counts as better only by more than the measurement's standard error. The
distance from the backbone's pretraining is measured as the
**deep-vs-shallow gap**: the pre-logits probe's accuracy minus the best stage output's. Pretrained deep features that
fit the data beat generic shallow ones by a clear margin (a positive gap: the data is close to the pretraining); when
a stage output matches or beats them, the pretraining's top layers do not fit the data and adapting them (finetuning)
has room to pay, provided there is enough data to adapt them without overfitting. The curve's slope (accuracy gained
per doubling of the data) extrapolates the probe to the full data when only part of it was affordable.

Recommendation: finetune only with at least FT_MIN_PER_CLASS images per class, a gap below GAP_SIMILAR and a probe
error above MIN_HEADROOM; with `--freeze until:TAP` when a stage output is the best tap (its layers are kept, the
rest adapts), else in full. Otherwise the probe at the best tap (the pre-logits on a tie).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .advise_options import AdviseOptions
from .errors import FeatxError
from .options import OptionError

FT_MIN_PER_CLASS = 500
GAP_SIMILAR = 0.03
MIN_HEADROOM = 0.05
DEFAULT_BUDGET_SHARE = 0.05  # of one estimated full finetune (featx finetune's default 10 epochs)
FINETUNE_EPOCHS = 10
CURVE_GRID = (0.01, 0.1, 1.0, 10.0)  # C values of the curve's probes (no refinement: many small fits)
HOLDOUT = 0.25
MAX_CURVE_PER_CLASS = 256  # the curve stops here; beyond, its slope extrapolates (fits grow with the rows)
MAX_DOUBLINGS = 2  # the curve is extrapolated at most this many doublings of the data beyond its last point
DECODE_FACTOR = 1.3  # extraction = forward passes plus decoding, measured on the model alone
NORMALIZATIONS = ("standard", "none")  # fit-head --normalize of the curve's probes
SCHEMA = 2


@dataclass
class Choice:
    """One way to train: what, at which tap or freezing, its expected accuracy range, seconds and command."""

    method: str  # 'probe' | 'finetune-freeze' | 'finetune'
    tap: str | None
    freeze: str | None
    normalize: str | None  # the probe's fit-head --normalize
    expected_accuracy: tuple[float, float]
    seconds: float
    command: str


@dataclass
class Advice:
    data: str
    store: str
    backbone: str
    weights: str
    weights_match: str
    classes: int
    images: int
    per_class: int  # the smallest class's image count in the data
    extracted_per_class: int
    budget_seconds: float
    seconds: float
    costs: dict
    curves: dict  # curve_name(tap, normalize) -> [{"n": per class, "acc": accuracy on held-out rows and CV folds}]
    signal: dict
    recommendation: Choice
    alternatives: list[Choice] = field(default_factory=list)
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The short table `featx advise` prints."""
        s = self.signal
        lines = [f"{self.data}: {self.images} images, {self.classes} classes (smallest {self.per_class}); "
                 f"{self.backbone} ({self.weights}); {self.seconds:.0f} s of a {self.budget_seconds:.0f} s budget",
                 "", "learning curve (accuracy % on held-out rows and CV folds, probe per tap):"]
        taps = list(self.curves)
        sizes = sorted({p["n"] for c in self.curves.values() for p in c})
        width = max(8, *map(len, taps))
        lines.append("  n/class  " + "  ".join(f"{t:>{width}}" for t in taps))
        for n in sizes:
            cells = [next((f"{100 * p['acc']:{width}.1f}" for p in self.curves[t] if p["n"] == n), " " * width)
                     for t in taps]
            lines.append(f"  {n:>7}  " + "  ".join(cells))
        lines += ["", f"deep-vs-shallow gap {100 * s['gap']:+.1f} pts ({s['distance']}), slope "
                      f"{100 * s['slope']:+.1f} pts per doubling, best tap {s['best_tap']}", "",
                  f"{'':2}{'choice':<34}{'expected acc %':>16}{'seconds':>10}  command"]
        for mark, c in [("*", self.recommendation)] + [(" ", a) for a in self.alternatives]:
            what = {"probe": f"probe at {curve_name(c.tap, c.normalize)}", "finetune": "full finetune",
                    "finetune-freeze": f"finetune --freeze {c.freeze}"}[c.method]
            lo, hi = c.expected_accuracy
            lines.append(f"{mark} {what:<34}{f'{100 * lo:.1f}-{100 * hi:.1f}':>16}{c.seconds:>10.0f}  {c.command}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
def curve_name(tap: str, normalize: str | None) -> str:
    """A learning curve's name: the tap, with '/none' when its rows were not standardised."""
    return tap if normalize in (None, "standard") else f"{tap}/{normalize}"


def advice_taps(model) -> list[str]:
    """The usual taps worth a probe: the last two stage outputs before the final stage, and the pre-logits."""
    from .taps import penultimate_node, usual_taps

    penultimate = penultimate_node(model)
    stages = [t for t in usual_taps(model) if t != penultimate]
    return stages[:-1][-2:] + [penultimate]


def measure_costs(model, size: int, batch: int = 8) -> dict:
    """Seconds per image of a forward pass (extraction) and of a training step (forward + backward) on this
    machine, measured on a seeded random batch with featx's runtime settings (FeatxError naming --image-size when
    that batch cannot fit in memory)."""
    import torch

    from .memory import check_batch_memory
    from .runtime import prepare_model, resolve_runtime

    runtime = resolve_runtime("auto", "auto")
    check_batch_memory(model, size, batch, runtime.device, training=True, batch_option=None)
    model = prepare_model(model.eval(), runtime)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(runtime.device)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def timed(step) -> float:
        step()  # warm-up
        best = math.inf
        for _ in range(3):  # the fastest of three: other jobs on a shared machine only ever slow a step down
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
        return best / batch

    with torch.inference_mode():
        forward = timed(lambda: model(x))
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    train = timed(train_step)
    model.eval()
    return {"forward_seconds_per_image": forward, "train_seconds_per_image": max(train, forward),
            "trainable_params": sum(p.numel() for p in model.parameters())}


def _labelled_counts(source, data) -> dict[str, int]:
    if source.task != "classification":
        raise FeatxError(f"{data}: {'no labelled images' if source.task == 'unlabelled' else 'regression targets'}; "
                         "advise needs class labels (an ImageFolder DATA/<class>/<image> or a CSV with a label column)")
    counts = {c: 0 for c in source.classes}
    for item in source.items:
        if item.label >= 0:
            counts[source.classes[item.label]] += 1
    few = [f"{c} ({k})" for c, k in counts.items() if k < 2]
    if few or len(counts) < 2:
        raise FeatxError(f"{data}: advise needs at least 2 classes with at least 2 images each; "
                         f"too few: {', '.join(few) or f'{len(counts)} class'}")
    return counts


def check_request(data) -> tuple:
    """(source, images per class) of the labelled `data` (one-line FeatxErrors)."""
    from .sources import load_source

    source = load_source(data)
    return source, _labelled_counts(source, data)


def advise(data, *, backbone: str | None = None, weights: str = "DEFAULT", weights_match: str = "name",
           store=None, taps=None, image_size: int | None = None, budget_seconds: float | None = None, seed: int = 0,
           log=None) -> Advice:
    """`featx advise`: extract the `taps` (default: two stage outputs and the pre-logits) of the labelled images
    `data` with `backbone` (None: the one a weights file of featx finetune records, else resnet50) and `weights`
    into `store` (default: DATA-name.featx.h5 here) within `budget_seconds` (default: a few percent of one
    estimated full finetune), measure learning curves and the deep-vs-shallow gap, and recommend probe / finetune
    --freeze / full finetune. `log` receives progress lines. Returns the Advice (`.table()`, `.to_dict()`; the
    recommendation and the alternatives with their commands), also saved beside the store (.advice.json)."""
    from .backbones import load_backbone

    if isinstance(taps, str):  # one tap by name, not a list of its letters
        taps = [taps]
    started = time.perf_counter()
    specs = AdviseOptions.of(locals()).specs()  # an OptionError for a value the option does not take
    if len(specs) != 1:
        raise OptionError("{backbone=}: one backbone (featx.advise_backbones compares several)", backbone=backbone)
    (backbone, weights, weights_match), = specs
    log = log or (lambda line: None)
    source, counts = check_request(data)
    bb = load_backbone(backbone, weights, match=weights_match)
    taps = list(taps) if taps else advice_taps(bb.model)
    size = image_size or bb.transform.crop
    costs = measure_costs(bb.model, size)
    n_images = sum(counts.values())
    full_ft = costs["train_seconds_per_image"] * n_images * FINETUNE_EPOCHS
    budget = budget_seconds if budget_seconds is not None else DEFAULT_BUDGET_SHARE * full_ft
    per_image = costs["forward_seconds_per_image"] * DECODE_FACTOR
    k = len(counts)
    # Extraction gets 80 % of the budget, the probes the rest: the largest class-balanced part that fits.
    affordable = int(min(0.8 * budget / (per_image * k), max(counts.values())))  # a huge budget affords them all
    if affordable < 2:
        need = 2 * k * per_image / 0.8
        raise OptionError("{budget_seconds=}: too small to measure anything here; extracting the minimum (2 images "
                          "per class, %d images) takes about %.1f s on this machine: pass at least "
                          "{budget_seconds=%d}" % (2 * k, need, math.ceil(need)), budget_seconds=float(f"{budget:g}"))
    store = Path(store) if store is not None else Path(f"{Path(str(data)).name or 'data'}.featx.h5")
    per_class = min(counts.values())
    take = affordable
    result = extract_measured(data, source, counts, store, take, seed, budget, log, backbone=bb.name, weights=weights,
                              weights_match=weights_match, taps=taps, image_size=image_size)
    costs = {**costs, "extract_seconds": result.seconds, "full_finetune_seconds": full_ft}
    advice = recommend(store, per_class_full=per_class, costs=costs, budget_seconds=budget, seed=seed,
                       started=started, command_data=str(data), image_size=image_size)
    advice.images, advice.classes = n_images, k
    advice.extracted_per_class = min(take, per_class)
    advice.seconds = time.perf_counter() - started
    advice_path(store).write_text(json.dumps(advice.to_dict(), indent=2, default=str))
    return advice


def extract_measured(data, source, counts: dict, store: Path, take: int, seed: int, budget: float, log,
                     **options):
    """Extract at most `take` seeded images per class of `data` (all of it when that covers every class) into
    `store` with extract's `options` (backbone, weights, taps, ...); returns extract's result."""
    from .extraction import extract

    with tempfile.TemporaryDirectory(prefix="featx-advise-") as tmp:
        spec = str(data) if take >= max(counts.values()) else str(_subset_csv(source, take, seed, Path(tmp)))
        part = "all images" if take >= max(counts.values()) else \
            f"at most {take} images per class (what a budget of {budget:.0f} s affords)"
        log(f"extracting {part} at taps {', '.join(options['taps'])} into {store}")
        # the store holds exactly the images measured (the learning curves read all its rows): a subset's CSV is
        # another data each time, so earlier rows go (reported in the summary line)
        result = extract(spec, store, retention="prune", log=log, **options)
        log(result.summary())
    return result


def advice_path(store) -> Path:
    store = Path(store)
    return store.with_name(store.stem + ".advice.json")


def _subset_csv(source, per_class: int, seed: int, folder: Path) -> Path:
    """A CSV of at most `per_class` seeded images of every class (and their splits)."""
    import csv

    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for item in source.items:
        if item.label >= 0:
            by_class.setdefault(item.label, []).append(item)
    path = folder / "subset.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for label, items in by_class.items():
            for i in sorted(rng.permutation(len(items))[:per_class]):
                w.writerow([items[i].path, source.classes[label], items[i].split])
    return path


# --------------------------------------------------------------------------------------------------------------------
def learning_curves(store, taps=None, seed: int = 0, deadline: float | None = None) -> tuple[dict, dict]:
    """Probe accuracy (held-out rows and the training rows' CV folds pooled, see _pooled) per tap, normalisation
    (NORMALIZATIONS, curves named by curve_name) and class-balanced n per class (nested subsets; 3 seeds below 8
    per class; at most MAX_CURVE_PER_CLASS). Held out: the store's 'val' rows when they leave every class 2
    training rows, else a stratified quarter of its labelled rows. Past `deadline`
    (time.perf_counter()) the curve jumps to its last point (every training row). Returns (curves, info)."""
    from .heads import evaluate, fit_head
    from .store import open_store

    with open_store(store) as s:
        taps = list(taps or s.taps)
        labels, splits, classes = np.asarray(s.labels), np.asarray(s.splits, dtype=str), list(s.classes)
        x = {t: np.asarray(s.features(t), dtype=np.float32).reshape(len(s), -1) for t in taps}
    labelled = labels >= 0
    if not labelled.any():
        raise FeatxError(f"{store}: no labelled rows; advise needs class labels")
    val = labelled & (splits == "val")
    fit_rows = labelled & ~val & (splits != "test")
    if not val.any() or min(int((fit_rows & (labels == c)).sum()) for c in np.unique(labels[labelled])) < 2:
        # no val rows, or a class they leave with fewer than 2 training rows (a few images drawn across splits)
        val = np.zeros(len(labels), dtype=bool)
        rng = np.random.default_rng(seed)
        for c in np.unique(labels[labelled]):
            idx = rng.permutation(np.flatnonzero(labels == c))
            val[idx[: max(1, int(round(HOLDOUT * len(idx))))]] = True
    train = labelled & ~val & (splits != "test")
    pools = {c: np.random.default_rng(seed + 1).permutation(np.flatnonzero(train & (labels == c)))
             for c in np.unique(labels[labelled])}
    n_max = min(MAX_CURVE_PER_CLASS, min(len(p) for p in pools.values()))
    if n_max < 2:
        raise FeatxError(f"{store}: fewer than 2 training rows in a class after the hold-out; advise needs more images")
    sizes = sorted({*(2 ** i for i in range(1, int(math.log2(n_max)) + 1)), n_max})
    curves = {curve_name(t, m): [] for t in taps for m in NORMALIZATIONS}
    fit_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="featx-curve-") as tmp:
        held = np.flatnonzero(val)
        for t in taps:
            _npz(Path(tmp) / f"val-{t}.npz", x[t], labels, classes, held)
        cut = False
        for n in sizes:
            if deadline is not None and n != n_max and len(curves[taps[0]]) >= 1 and time.perf_counter() > deadline:
                cut = True
                continue
            reps = 3 if n < 8 else 1
            for t in taps:
                accs = {norm: [] for norm in NORMALIZATIONS}
                for r in range(reps):
                    rows = np.concatenate([np.roll(p, -r * n)[:n] for p in pools.values()])
                    cell = _npz(Path(tmp) / "cell.npz", x[t], labels, classes, rows)
                    for norm in NORMALIZATIONS:
                        t0 = time.perf_counter()
                        head = fit_head(cell, val_split=0.0, grid=list(CURVE_GRID), folds=min(5, n), seed=seed,
                                        n_jobs=1, plots=False, normalize=norm)
                        fit_seconds = time.perf_counter() - t0 if n == n_max else fit_seconds
                        held_acc = float(evaluate(head, Path(tmp) / f"val-{t}.npz")["accuracy"])
                        accs[norm].append(_pooled(held_acc, len(held), head.metrics.get("cv"), len(rows)))
                for norm, values in accs.items():
                    curves[curve_name(t, norm)].append({"n": int(n), "acc": float(np.mean(values))})
    return curves, {"n_max": n_max, "held_out": int(val.sum()), "last_fit_seconds": fit_seconds,
                    "curve_cut_by_budget": cut}


def _pooled(held_acc: float, n_held: int, cv: dict | None, n_train: int) -> float:
    """One accuracy from every labelled row: the held-out rows' accuracy and the cross-validated accuracy (at the
    chosen C) of the training rows, weighted by their counts. At a few images per class one small hold-out swings by
    many points; counting every row's out-of-fold prediction as well steadies the comparison between taps."""
    if not cv:
        return held_acc
    cv_acc = float(cv["mean"][cv["grid"].index(cv["best"])])
    return (held_acc * n_held + cv_acc * n_train) / (n_held + n_train)


def project(curve: list[dict], per_class_full: int) -> tuple[float, float]:
    """(accuracy projected to `per_class_full` images per class, slope in accuracy per doubling) of a learning
    curve: its last point plus the slope over its last doubling or more, extrapolated at most MAX_DOUBLINGS."""
    earlier = [p for p in curve[:-1] if p["n"] <= curve[-1]["n"] / 2] or curve[:-1]
    span = math.log2(curve[-1]["n"] / earlier[-1]["n"]) if earlier else 0.0
    # Over more than MAX_DOUBLINGS (a curve the budget cut short) the early steep part would overstate the slope.
    slope = (curve[-1]["acc"] - earlier[-1]["acc"]) / max(1e-9, span) if earlier and span <= MAX_DOUBLINGS else 0.0
    doublings = math.log2(max(1.0, per_class_full / curve[-1]["n"]))
    return min(1.0, curve[-1]["acc"] + max(0.0, slope) * min(doublings, MAX_DOUBLINGS)), slope


def accuracy_range(projected: float, held_out: int) -> tuple[float, float]:
    """The 95 % interval of an accuracy measured on `held_out` rows."""
    se = math.sqrt(max(projected * (1 - projected), 1e-4) / max(1, held_out))
    return max(0.0, projected - 1.96 * se), min(1.0, projected + 1.96 * se)


def recent_mean(curve: list[dict]) -> float:
    """Mean accuracy of a curve's points within a doubling of its last."""
    return float(np.mean([p["acc"] for p in curve if p["n"] >= curve[-1]["n"] / 2]))


def _normalization(standard: float, unscaled: float, rows_scored: int) -> str:
    """'standard' only when it beats the unscaled rows by more than the standard error of the measurement: the
    unscaled probe estimates nothing from the rows, standardising estimates two statistics per feature dimension
    from what may be a handful of them, so a difference within the noise goes to the unscaled rows."""
    noise = math.sqrt(max(unscaled * (1 - unscaled), 1e-4) / max(1, rows_scored))
    return "standard" if standard > unscaled + noise else "none"


def _npz(path: Path, x: np.ndarray, labels: np.ndarray, classes: list[str], rows: np.ndarray) -> Path:
    np.savez(path, x=x[rows], y=np.asarray(classes, dtype=str)[labels[rows]])
    return path


def recommend(store, *, per_class_full: int | None = None, costs: dict, budget_seconds: float = 0.0, seed: int = 0,
              started: float | None = None, command_data: str | None = None,
              image_size: int | None = None) -> Advice:
    """The advice from the rows of an extracted store (see the module docstring for the rule). `per_class_full` is
    the smallest class of the whole data when the store holds only part of it; `costs` are measure_costs' figures
    with 'extract_seconds'; `image_size`, the --image-size the store was extracted with, goes into the finetune
    commands."""
    import warnings

    from .store import open_store

    started = time.perf_counter() if started is None else started
    with open_store(store) as s:
        config, n_rows, k = dict(s.config), len(s), len(s.classes)
        per_class_store = int(np.bincount(np.asarray(s.labels)[np.asarray(s.labels) >= 0]).min())
        taps = [t for t in config.get("taps") or [] if t in s.taps] or list(s.taps)  # forward order
    deadline = None if not budget_seconds else started + budget_seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer folds than asked" at 2 per class: expected on a learning curve
        curves, info = learning_curves(store, taps, seed, deadline)
    penultimate = taps[-1]
    # Each tap's accuracy over the curve's points within a doubling of its last (the last two of a full curve; the
    # last alone when the budget cut the curve short): one point alone swings by several points.
    scored = {(t, m): recent_mean(curves[curve_name(t, m)]) for t in taps for m in NORMALIZATIONS}
    rows_scored = info["held_out"] + curves[taps[0]][-1]["n"] * k
    normalize = {t: _normalization(scored[(t, "standard")], scored[(t, "none")], rows_scored) for t in taps}
    final = {t: scored[(t, normalize[t])] for t in taps}
    shallow = {t: a for t, a in final.items() if t != penultimate}
    best_shallow = max(shallow, key=shallow.get) if shallow else None
    gap = final[penultimate] - (shallow[best_shallow] if shallow else 0.0)
    best_tap = penultimate if gap >= 0 or not shallow else best_shallow
    per_class_full = per_class_full or per_class_store
    projected, slope = project(curves[curve_name(best_tap, normalize[best_tap])], per_class_full)
    se = math.sqrt(max(projected * (1 - projected), 1e-4) / max(1, info["held_out"]))
    n_full = per_class_full * k
    fwd, train = costs["forward_seconds_per_image"], costs["train_seconds_per_image"]
    extract_full = costs.get("extract_seconds", fwd * DECODE_FACTOR * n_rows) * n_full / max(1, n_rows)
    probe_s = extract_full + info["last_fit_seconds"] * 5 * max(1.0, n_full / max(1, info["n_max"] * k))
    ft_s = train * n_full * FINETUNE_EPOCHS
    freeze_s = (fwd + 0.5 * (train - fwd)) * n_full * FINETUNE_EPOCHS
    data = command_data or "DATA"
    base = f"featx finetune {data} -b {config.get('backbone')} -w {config.get('weights_path') or config.get('weights')}"
    if config.get("weights_match", "name") != "name":
        base += f" --weights-match {config['weights_match']}"
    if image_size is not None:
        base += f" --image-size {image_size}"
    hp = f"--optimizer adam --lr 1e-4 --epochs {FINETUNE_EPOCHS}"
    head_dir = Path(store).with_name(Path(store).stem + "-head")
    scaling = "" if normalize[best_tap] == "standard" else f" --normalize {normalize[best_tap]}"
    probe = Choice("probe", best_tap, None, normalize[best_tap], accuracy_range(projected, info["held_out"]), probe_s,
                   f"featx fit-head {store} -l {best_tap}{scaling} -o {head_dir}")
    ft_range = (max(0.0, projected - 1.96 * se), min(1.0, projected + (1 - projected) / 2))
    full = Choice("finetune", None, "none", None, ft_range, ft_s, f"{base} --freeze none {hp} -o runs/finetune")
    partial = Choice("finetune-freeze", best_tap, f"until:{best_tap}", None, ft_range, freeze_s,
                     f"{base} --freeze until:{best_tap} {hp} -o runs/finetune-freeze") if best_tap != penultimate \
        else None
    dissimilar = gap < GAP_SIMILAR
    finetune = per_class_full >= FT_MIN_PER_CLASS and dissimilar and 1 - projected > MIN_HEADROOM
    if finetune:
        chosen = partial or full
        reason = (f"{per_class_full} images per class (>= {FT_MIN_PER_CLASS}), far from the pretraining (gap "
                  f"{100 * gap:+.1f} < {100 * GAP_SIMILAR:.0f} pts) and {100 * (1 - projected):.1f} % probe error left")
    else:
        chosen = probe
        why = []
        if per_class_full < FT_MIN_PER_CLASS:
            why.append(f"{per_class_full} images per class (< {FT_MIN_PER_CLASS}: too few to adapt the backbone)")
        if not dissimilar:
            why.append(f"close to the pretraining (gap {100 * gap:+.1f} >= {100 * GAP_SIMILAR:.0f} pts)")
        if 1 - projected <= MIN_HEADROOM:
            why.append(f"probe error only {100 * (1 - projected):.1f} %")
        reason = "; ".join(why)
    others = [c for c in (probe, partial, full) if c is not None and c is not chosen]
    if min(final.values()) >= 0.99:
        distance = "not measurable: every tap separates the data"
    else:
        distance = "far from the pretraining" if dissimilar else "close to the pretraining"
    signal = {"gap": gap, "distance": distance, "normalize": normalize,
              "curve_cut_by_budget": info["curve_cut_by_budget"],
              "slope": slope, "best_tap": best_tap, "best_shallow_tap": best_shallow, "projected_probe": projected,
              "held_out": info["held_out"], "reason": reason}
    return Advice(data=command_data or str(store), store=str(store), backbone=str(config.get("backbone")),
                  weights=str(config.get("weights")), weights_match=str(config.get("weights_match", "name")),
                  classes=k, images=n_rows, per_class=per_class_full, extracted_per_class=per_class_store,
                  budget_seconds=float(budget_seconds), seconds=time.perf_counter() - started, costs=costs,
                  curves=curves, signal=signal, recommendation=chosen, alternatives=others)
