"""`featx advise` checked against the measured grid: per dataset x n, the advice (from that cell's own training rows
only) vs the method that won the cell in `probe_vs_finetune.py --part grid`.

The advice counts as right when the advised method's measured accuracy is within 1 point of the cell's best. A
`--freeze until:TAP` advice has no grid counterpart, so it counts as wrong. The advisor sees the seed-0 training
subset of the cell (a featx store of those rows, cut from the grid's extraction) and never the scoring set.

    python benchmarks/advise_grid.py --work /tmp/featx-grid/grid --results benchmarks/results/grid-2026-12-02.json
"""
from __future__ import annotations

import argparse
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


def advised_label(choice) -> str | None:
    """The grid's name for an advised method (None: the grid did not measure it)."""
    return {"probe": f"probe@{choice.tap}", "finetune": "finetune"}.get(choice.method)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the grid's work folder (its stores and journal)")
    p.add_argument("--results", type=Path, required=True, help="the grid's results .json")
    p.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--tag", default=f"advise-{time.strftime('%Y-%m-%d')}")
    args = p.parse_args(argv)
    from featx.advise import Choice, measure_costs, recommend
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
    cache_file = args.work / "advice-cache.json"  # advice per cell, kept so that a rerun only re-joins the grid
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows_out, costs_by_size = [], {}
    for name in extracts:
        ds = D.image_folder(args.shared_data / name)
        size = cfg["image_size"].get(name) or bb.transform.crop
        rows = Rows(args.work / name / "all.h5", cfg["taps"])
        per_image = extracts[name]["seconds"] / max(1, extracts[name].get("computed", extracts[name]["images"]))
        for n in cfg["sizes"]:
            nv = n_value(ds, n)
            key = f"{name}/{nv}"
            if (name, nv) not in winners:
                continue
            if key not in cache:
                files = cell_files(ds, n, 0)
                store = rows.store(args.work / name / "advise-cell.h5", files, "train")
                if size not in costs_by_size:
                    costs_by_size[size] = measure_costs(bb.model, size)
                costs = {**costs_by_size[size], "extract_seconds": per_image * D.count(files)}
                t0 = time.perf_counter()
                advice = recommend(store, per_class_full=nv, costs=costs)
                cache[key] = {"choice": asdict(advice.recommendation), "signal": advice.signal,
                              "curves": advice.curves, "seconds": time.perf_counter() - t0}
                cache_file.write_text(json.dumps(cache, default=str))
            cached = cache[key]
            choice, signal, seconds = Choice(**cached["choice"]), cached["signal"], cached["seconds"]
            w = winners[(name, nv)]
            label = advised_label(choice)
            acc = w["acc"].get(label) if label else None
            right = acc is not None and acc >= w["acc"][w["best"]] - 0.01
            rows_out.append({"target": name, "n": nv, "advice": label or choice.method,
                             "advised_acc": acc, "best": w["best"], "best_acc": w["acc"][w["best"]],
                             "within": w["within"], "right": right, "signal": signal,
                             "expected_accuracy": choice.expected_accuracy,
                             "advise_seconds": seconds, "methods_measured": sorted(w["acc"])})
            print(f"{name} n={nv}: advice {rows_out[-1]['advice']} ({'right' if right else 'WRONG'}; best "
                  f"{w['best']} {100 * w['acc'][w['best']]:.1f} %), gap {100 * signal['gap']:+.1f}", flush=True)
    agree = sum(r["right"] for r in rows_out) / max(1, len(rows_out))
    args.out.mkdir(parents=True, exist_ok=True)
    info = R.machine_info()
    (args.out / f"{args.tag}.json").write_text(json.dumps({"agreement": agree, "cells": rows_out, "machine": info},
                                                          indent=1, default=str))
    lines = ["# `featx advise` vs the measured grid", "", f"Machine: {R.machine_line(info)}.", "",
             f"Grid: `{args.results.name}`. Advice from each cell's seed-0 training rows only (a store cut from the "
             "grid's extraction; learning curves scored on a hold-out of those rows and their CV folds), compared with the cell's measured "
             "accuracies (mean over seeds). Right = the advised method is within 1 point of the cell's best; a "
             "`--freeze until` advice has no grid counterpart and counts as wrong.", "",
             f"**Agreement: {sum(r['right'] for r in rows_out)} / {len(rows_out)} cells = {100 * agree:.0f} %** "
             "(target >= 90 %).", "",
             "| dataset | n | advice | its accuracy % | best (measured) | best % | deep-vs-shallow gap | right |",
             "|---|---:|---|---:|---|---:|---:|---|"]
    for r in rows_out:
        acc = f"{100 * r['advised_acc']:.1f}" if r["advised_acc"] is not None else "not measured"
        lines.append(f"| {r['target']} | {r['n']} | {r['advice']} | {acc} | {r['best']} | {100 * r['best_acc']:.1f} | "
                     f"{100 * r['signal']['gap']:+.1f} | {'yes' if r['right'] else 'no'} |")
    missing = sorted({m for r in rows_out for m in ("finetune", "probe+ft", "fixed") if m not in r["methods_measured"]})
    if missing:
        lines += ["", "Cells where some finetuning methods were not run (the grid's budget) are judged only among the "
                  "methods that were measured there; see the grid's results for which."]
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"agreement {100 * agree:.0f} % over {len(rows_out)} cells; wrote {args.out / args.tag}.md")


if __name__ == "__main__":
    main()
