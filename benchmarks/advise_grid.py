"""`featx advise` checked against the measured grid: per dataset x n, the advice (from that cell's own training rows
only) vs the method that won the cell in `probe_vs_finetune.py --part grid`, from the seed-0 subset of every cell and
from the seed-1 and seed-2 subsets where the grid drew them.

The advice counts as right when the advised method's measured accuracy is within 1 point of the cell's best. A
`--freeze until:TAP` advice is judged by the grid's (f) partial finetune where (f) froze at the same TAP; elsewhere
it has no grid counterpart, so it counts as wrong. The advisor sees one training
subset of the cell (a featx store of those rows, cut from the grid's extraction) and never the scoring set.

    python benchmarks/advise_grid.py --work /tmp/featx-grid/grid --results benchmarks/results/grid-2026-12-02.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import data as D  # noqa: E402
from protocol import report as R  # noqa: E402
from protocol.grid import Rows, cell_files, n_value  # noqa: E402


def advised_label(choice, partial_tap: str | None) -> str | None:
    """The grid's name for an advised method (None: the grid did not measure it); (f) froze up to `partial_tap`."""
    from featx.advice import curve_name

    if choice.method == "finetune-freeze":
        return "partial" if partial_tap and choice.freeze == f"until:{partial_tap}" else None
    return {"probe": f"probe@{curve_name(choice.tap, choice.normalize)}", "finetune": "finetune"}.get(choice.method)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the grid's work folder (its stores and journal)")
    p.add_argument("--results", type=Path, required=True, help="the grid's results .json")
    p.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default=f"advise-{time.strftime('%Y-%m-%d')}")
    p.add_argument("--seeds", type=int, default=3, help="advise from the subsets of seeds 0..SEEDS-1 (default 3)")
    args = p.parse_args(argv)
    from featx.advice import measure_costs, recommend
    from featx.backbones import load_backbone

    warnings.filterwarnings("ignore")
    grid = json.loads(args.results.read_text())
    cfg = grid["config"]
    winners = {(w["target"], w["n"]): w for w in grid["winners"]}
    extracts = {e["target"]: e for e in grid["extract"]}
    if len(extracts) < 4:
        extracts = {r["target"]: r for r in map(json.loads, (args.work / "journal.jsonl").read_text().splitlines())
                    if r["kind"] == "extract"}
    bb = load_backbone(cfg["backbone"], cfg["weights"], match=cfg["weights_match"] or "name")
    advise_version = hashlib.sha256(Path(sys.modules["featx.advice"].__file__).read_bytes()).hexdigest()
    cache_file = args.work / "advice-cache.json"  # advice per cell, kept so that a rerun only re-joins the grid
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows_out, costs_by_size = [], {}
    for name in extracts:
        ds = D.image_folder(args.shared_data / name)
        size = cfg["image_size"].get(name) or bb.transform.crop
        rows = Rows(args.work / name / "all.h5", cfg["taps"])
        per_image = extracts[name]["seconds"] / max(1, extracts[name].get("computed", extracts[name]["images"]))
        for seed in range(args.seeds):
            for n in cfg["sizes"]:
                nv = n_value(ds, n)
                if (name, nv) not in winners or (seed and (n == "all" or nv > cfg["multi_seed_max"])):
                    continue  # seeds > 0 only where the grid drew other subsets
                key = f"{name}/{nv}/seed{seed}"
                if cache.get(key, {}).get("advise") != advise_version:  # advice of another advise is computed again
                    files = cell_files(ds, n, seed)
                    store = rows.store(args.work / name / "advise-cell.h5", files, "train")
                    if size not in costs_by_size:
                        costs_by_size[size] = measure_costs(bb.model, size)
                    costs = {**costs_by_size[size], "extract_seconds": per_image * D.count(files)}
                    t0 = time.perf_counter()
                    advice = recommend(store, per_class_full=nv, costs=costs, seed=seed)
                    cache[key] = {"advise": advise_version, "choice": asdict(advice.recommendation),
                                  "signal": advice.signal, "curves": advice.curves,
                                  "seconds": time.perf_counter() - t0}
                    cache_file.write_text(json.dumps(cache, default=str))
                rows_out.append(judge(cache[key], winners[(name, nv)], name, nv, seed, cfg.get("partial_tap")))
                r = rows_out[-1]
                print(f"{name} n={nv} seed {seed}: advice {r['advice']} ({'right' if r['right'] else 'WRONG'}; best "
                      f"{r['best']} {100 * r['best_acc']:.1f} %), gap {100 * r['signal']['gap']:+.1f}", flush=True)
    write_report(args, rows_out)


def judge(cached: dict, w: dict, name: str, nv: int, seed: int, partial_tap: str | None) -> dict:
    """One cell's advice against the grid's measured accuracies of the cell (means over the grid's seeds)."""
    from featx.advice import Choice

    choice = Choice(**cached["choice"])
    label = advised_label(choice, partial_tap)
    acc = w["acc"].get(label) if label else None
    return {"target": name, "n": nv, "seed": seed, "advice": label or choice.method, "advised_acc": acc,
            "best": w["best"], "best_acc": w["acc"][w["best"]], "within": w["within"],
            "right": acc is not None and acc >= w["acc"][w["best"]] - 0.01, "signal": cached["signal"],
            "expected_accuracy": choice.expected_accuracy, "advise_seconds": cached["seconds"],
            "methods_measured": sorted(w["acc"])}


def agreement_line(rows: list[dict], what: str) -> str:
    right = sum(r["right"] for r in rows)
    return f"- {what}: **{right} / {len(rows)} cells = {100 * right / max(1, len(rows)):.0f} %**"


def write_report(args, rows_out: list[dict]) -> None:
    first = [r for r in rows_out if r["seed"] == 0]
    others = [r for r in rows_out if r["seed"] > 0]
    args.out.mkdir(parents=True, exist_ok=True)
    info = R.machine_info()
    agree = sum(r["right"] for r in first) / max(1, len(first))
    (args.out / f"{args.tag}.json").write_text(json.dumps(
        {"agreement": agree, "agreement_other_seeds": sum(r["right"] for r in others) / max(1, len(others)),
         "cells": rows_out, "machine": info}, indent=1, default=str))
    lines = ["# `featx advise` vs the measured grid", "", f"Machine: {R.machine_line(info)}.", "",
             f"Grid: `{args.results.name}`. Advice from one cell's training rows only (a store cut from the grid's "
             "extraction; learning curves scored on a hold-out of those rows and their CV folds), compared with the "
             "cell's measured accuracies (mean over the grid's seeds). Right = the advised method is within 1 point "
             "of the cell's best; a `--freeze until` advice is judged by the grid's (f) partial finetune where it froze "
             "at the same tap, and counts as wrong elsewhere.", "",
             "Agreement (target >= 90 %):", "",
             agreement_line(first, "advice from the seed-0 subset of every cell (the subsets the rule was "
                                   "adjusted on: ties in normalisation go to unscaled rows, the best tap wins "
                                   "without a margin)"),
             agreement_line(others, "advice from the seed-1 and seed-2 subsets (other images of the same cells, "
                                    "n <= 50; not used to adjust the rule)"), "",
             "| dataset | n | seed | advice | its accuracy % | best (measured) | best % | deep-vs-shallow gap | right |",
             "|---|---:|---:|---|---:|---|---:|---:|---|"]
    for r in sorted(rows_out, key=lambda r: (r["target"], r["n"], r["seed"])):
        acc = f"{100 * r['advised_acc']:.1f}" if r["advised_acc"] is not None else "not measured"
        lines.append(f"| {r['target']} | {r['n']} | {r['seed']} | {r['advice']} | {acc} | {r['best']} | "
                     f"{100 * r['best_acc']:.1f} | {100 * r['signal']['gap']:+.1f} | {'yes' if r['right'] else 'no'} |")
    missing = sorted({m for r in rows_out for m in ("finetune", "probe+ft", "fixed") if m not in r["methods_measured"]})
    if missing:
        lines += ["", "Cells where some finetuning methods were not run (the grid's budget) are judged only among the "
                  "methods that were measured there; see the grid's results for which."]
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"agreement {100 * agree:.0f} % over {len(first)} seed-0 cells; wrote {args.out / args.tag}.md")


if __name__ == "__main__":
    main()
