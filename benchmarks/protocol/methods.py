"""The six methods, each run through featx's own API, timed, and scored on the same held-out images.

(a) probe       featx.extract (the subset's training images, every tap in one pass) + featx.fit_head (logistic, C by
                5-fold CV on the training rows); scored by featx.evaluate on a store of the val images.
(b) fixed       featx.finetune --freeze backbone: the frozen backbone runs on every batch of every epoch, only the new
                head trains (the PyTorch transfer-learning tutorial's "fixed feature extractor").
(c) finetune    featx.finetune --freeze none.
(d) probe+ft    (a), then featx.finetune --freeze none --init-head <the probe's head>; its cost is (a)'s plus its own.
(e) scratch     featx.finetune -w none --freeze none (same architecture, seeded random init), for reference.
(f) partial     featx.finetune --freeze until:TAP (TAP = the deepest stage tap: the layers up to it are kept, the rest
                adapts; what `featx advise` recommends when a stage output beats the pre-logits).

The cost of a run is its wall time (model loading, decoding, training, writing the head or model.pt) and the number
of images that went through the backbone (forward passes, with a backward pass for (c)-(f)). Scoring on the val
images is not part of any method's cost: it is the referee, the same for every run.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featx.extraction import extract
from featx.finetuning import finetune
from featx.heads import evaluate, fit_head


@dataclass
class Budget:
    """How much training a finetuning run gets: passes = clamp(ceil(images / N), min_epochs, max_epochs) over the
    N training images, batch `batch` (about images / batch optimizer steps at small N, at least `min_epochs` passes
    at large N).

    featx finetune writes model.pt, last.pt and checkpoint.pt and redraws curves.png after every epoch (about
    0.7 s for resnet18 on a 2-core CPU), which would dominate runs of 25 images x 160 epochs. So the passes are given
    to featx as at most `max_featx_epochs` epochs over a CSV that lists each training image `repeat` times: the same
    number of passes and optimizer steps (each repeat gets its own augmentation draw), a few checkpoints per run.
    """

    images: int = 3000
    min_epochs: int = 2
    max_epochs: int = 200
    batch: int = 32
    max_featx_epochs: int = 2

    def passes(self, n_train: int) -> int:
        return int(min(self.max_epochs, max(self.min_epochs, math.ceil(self.images / n_train))))

    def plan(self, n_train: int) -> tuple[int, int, int]:
        """(passes, featx epochs, repeat) with passes = featx epochs x repeat."""
        passes = self.passes(n_train)
        repeat = math.ceil(passes / self.max_featx_epochs)
        epochs = math.ceil(passes / repeat)
        return epochs * repeat, epochs, repeat

    def batch_size(self, n_rows: int) -> int:
        return int(min(self.batch, n_rows))


def repeat_csv(src: Path, repeat: int) -> Path:
    """A copy of a `path,label,split` CSV with every row listed `repeat` times (the same file, not a copy of it)."""
    if repeat == 1:
        return src
    lines = src.read_text().splitlines()
    dst = src.with_name(f"{src.stem}-x{repeat}.csv")
    dst.write_text("\n".join([lines[0]] + [line for line in lines[1:] for _ in range(repeat)]) + "\n")
    return dst


def remove_store(path: Path) -> None:
    """Remove a store and its in-progress parts folder, if any."""
    for p in (path, path.with_name(path.name + ".parts")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class Methods:
    """Runs methods for one target with fixed backbone settings. `weights` is the source model (or torchvision name)."""

    def __init__(self, work: Path, backbone: str, weights: str, taps: list[str], main_tap: str,
                 image_size: int | None, log=print, extract_batch: int = 128, load_options: dict | None = None,
                 partial_tap: str | None = None):
        self.work = Path(work)
        self.partial_tap = partial_tap  # (f) freezes the backbone up to and including this module
        self.load_options = dict(load_options or {})  # e.g. weights_match, for extract and finetune
        self.backbone, self.weights = backbone, weights
        self.taps, self.main_tap = list(taps), main_tap
        self.image_size = image_size
        self.log = log
        self.extract_batch = extract_batch
        self._referee = None

    # ----- the scoring set -------------------------------------------------------------------------------------
    def prepare_val_images(self, val_csv: Path) -> None:
        """Score finetuned models on the images of `val_csv` (decoded once per transform, on first use)."""
        self.val_csv = val_csv

    def prepare_val(self, val_csv: Path) -> dict:
        """Extract the val images once (all taps) for scoring the probes; decode them once for scoring models."""
        self.val_csv = val_csv
        self.val_store = self.work / "val.h5"
        remove_store(self.val_store)
        t0 = time.perf_counter()
        res = extract(str(val_csv), self.val_store, backbone=self.backbone, weights=self.weights,
                      taps=self.taps, image_size=self.image_size, batch_size=self.extract_batch, **self.load_options)
        return {"seconds": time.perf_counter() - t0, "n": res.n_items}

    # ----- (a) -------------------------------------------------------------------------------------------------
    def probe(self, train_csv: Path, tag: str, seed: int) -> tuple[list[dict], Path]:
        """Extract the subset once (all taps), fit a logistic head per tap; returns records and the main tap's head."""
        store = self.work / f"{tag}.h5"
        remove_store(store)
        t0 = time.perf_counter()
        res = extract(str(train_csv), store, backbone=self.backbone, weights=self.weights, taps=self.taps,
                      image_size=self.image_size, batch_size=self.extract_batch, **self.load_options)
        t_extract = time.perf_counter() - t0
        records, main_head = [], None
        for tap in self.taps:
            head_dir = self.work / f"{tag}-head-{tap}"
            t1 = time.perf_counter()
            head = fit_head(store, tap, head_dir, head="logistic", seed=seed, val_split=0.0, overwrite=True)
            t_fit = time.perf_counter() - t1
            metrics = evaluate(head, self.val_store, split="val")
            records.append({
                "method": "probe", "tap": tap, "acc": float(metrics["accuracy"]),
                "seconds": t_extract + t_fit, "images": res.n_items, "backward": False,
                "detail": {"extract_seconds": round(t_extract, 3), "fit_seconds": round(t_fit, 3), "C": head.C,
                           "cv_folds": (head.metrics.get("cv") or {}).get("folds")},
            })
            if tap == self.main_tap:
                main_head = head_dir
        return records, main_head

    # ----- (b) - (f) -------------------------------------------------------------------------------------------
    def finetune(self, method: str, train_csv: Path, tag: str, seed: int, lr: float, budget: Budget, n_train: int,
                 augment: str, optimizer: str, init_head: Path | None = None) -> dict:
        run_dir = self.work / f"{tag}-{method}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        freeze = {"fixed": "backbone", "partial": f"until:{self.partial_tap}"}.get(method, "none")
        weights = "none" if method == "scratch" else self.weights
        load = {} if method == "scratch" else self.load_options
        passes, epochs, repeat = budget.plan(n_train)
        batch = budget.batch_size(n_train * repeat)
        t0 = time.perf_counter()
        result = run_finetune(repeat_csv(train_csv, repeat), run_dir, backbone=self.backbone, weights=weights, freeze=freeze, lr=lr,
                              epochs=epochs, batch_size=batch, augment=augment, optimizer=optimizer, seed=seed,
                              image_size=self.image_size, init_head=init_head, **load)
        seconds = time.perf_counter() - t0
        acc = self.score_model(run_dir / "model.pt")
        return {"method": method, "tap": "", "acc": acc, "seconds": seconds, "images": passes * n_train,
                "backward": method != "fixed", "epochs": passes, "lr": lr, "batch_size": batch, "augment": augment,
                "freeze": freeze, "detail": {**result, "featx_epochs": epochs, "repeat": repeat}}

    def score_model(self, model_path: Path) -> float:
        """Accuracy of a finetuned model.pt on the val images: featx's backbone loader and eval transform, argmax."""
        from featx.backbones import load_backbone
        from featx.preprocess import normalize_batch
        from featx.runtime import prepare_model, resolve_runtime

        bb = load_backbone(self.backbone, str(model_path))
        classes = list(bb.meta.get("classes") or [])
        spec = bb.transform.with_sizes(self.image_size) if self.image_size else bb.transform
        images, labels = self._val_tensors(spec)
        runtime = resolve_runtime("auto", "auto")
        model = prepare_model(bb.model.eval(), runtime)
        preds = []
        with torch.inference_mode():
            for i in range(0, len(images), 256):
                x = normalize_batch(images[i:i + 256], spec, runtime.device, runtime.channels_last)
                with runtime.autocast():
                    preds.append(model(x).float().argmax(1).cpu())
        pred = torch.cat(preds).numpy()
        names = np.asarray(classes, dtype=object)[pred]
        return float(np.mean(names == np.asarray(labels, dtype=object)))

    def _val_tensors(self, spec):
        """The val images decoded and cropped once per transform (uint8), with their class names."""
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if self._referee is None or self._referee[0] != key:
            from featx.preprocess import EvalTransform
            from featx.sources import decode_image, load_source

            source = load_source(str(self.val_csv))
            tf = EvalTransform(spec)
            images = torch.stack([tf(decode_image(item.path, min_size=spec.resize)) for item in source.items])
            labels = [source.classes[item.label] for item in source.items]
            self._referee = (key, images, labels)
        return self._referee[1], self._referee[2]


def run_finetune(data, output, **kw) -> dict:
    """featx.finetune with the benchmark's options; returns a small JSON-able summary of the run."""
    kw = {k: v for k, v in kw.items() if v is not None}
    result = finetune(str(data), output, val_split=0.0, **kw)
    return summarize_finetune(result)


def run_finetune_history(data, output, **kw) -> list[dict]:
    """featx.finetune on a CSV with train and val rows; the per-epoch metrics (val_acc on the val rows)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    return finetune(str(data), output, overwrite=True, **kw).history


def summarize_finetune(result) -> dict:
    out = {}
    for name in ("seconds", "epochs", "best_epoch", "train_acc", "train_loss"):
        value = getattr(result, name, None)
        if isinstance(value, (int, float)):
            out[name] = round(float(value), 4)
    return out
