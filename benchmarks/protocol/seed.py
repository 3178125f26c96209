"""Seed time-to-accuracy: the source documents' fixed-feature-extractor loop vs featx (extract + fit-head).

The loop is written the way the documents write it: torchvision ImageFolder + transforms (RandomResizedCrop + flip for
train, Resize + CenterCrop for val), `model.fc` replaced by a new Linear, every other parameter frozen, Adam lr 1e-3,
batch 16, 5 epochs, fp32, validation after every epoch. featx runs `extract` (the weights' eval transform, its
default precision) once on train + val and `fit-head` (logistic, C by 5-fold CV on train) on the cached rows.
Both sides use the very same weights: a file written once and given to both (or the same torchvision weights name).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torchvision
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from featx.extract import extract
from featx.heads import fit_head
from featx.runtime import default_workers

from . import data as D
from .methods import remove_store

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_model(backbone: str, weights: str):
    """The documents' model: torchvision constructor + weights (a torchvision name or a state-dict file)."""
    ctor = getattr(torchvision.models, backbone)
    if weights and Path(weights).is_file():
        model = ctor()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
        return model
    return ctor(weights=weights)


def documents_loop(data_dir: Path, backbone: str, weights: str, epochs: int = 5, batch_size: int = 16,
                   lr: float = 1e-3, workers: int = 1, seed: int = 0, log=print) -> dict:
    """The fixed-feature-extractor recipe of the documents; returns per-epoch times and val accuracies."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]),
        "val": transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x]) for x in ["train", "val"]}
    dataloaders = {x: DataLoader(image_datasets[x], batch_size=batch_size, shuffle=(x == "train"), num_workers=workers)
                   for x in ["train", "val"]}
    sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    model = build_model(backbone, weights)
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(image_datasets["train"].classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.fc.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in dataloaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += torch.sum(preds == labels.data).item()
            if phase == "val":
                acc = running_corrects / sizes["val"]
                elapsed = time.perf_counter() - started
                history.append({"epoch": epoch + 1, "val_acc": acc, "val_loss": running_loss / sizes["val"],
                                "elapsed": elapsed})
                log(f"  loop epoch {epoch + 1}/{epochs}: val acc {100 * acc:.1f} %, {elapsed:.0f} s")
    return {"seconds": time.perf_counter() - started, "history": history, "final_acc": history[-1]["val_acc"],
            "images": epochs * (sizes["train"] + sizes["val"]), "n_train": sizes["train"], "n_val": sizes["val"]}


def featx_side(data_dir: Path, backbone: str, weights: str, work: Path, batch_size: int = 64, log=print) -> dict:
    """featx extract (train + val, once) and fit-head; the seconds of each step and the val accuracy."""
    store = work / "seed-store.h5"
    remove_store(store)
    t0 = time.perf_counter()
    result = extract(str(data_dir), store, backbone=backbone, weights=weights, batch_size=batch_size)
    t_extract = time.perf_counter() - t0
    log(f"  featx extract: {result.n_items} images, {t_extract:.1f} s ({result.config['precision']})")
    t1 = time.perf_counter()
    head = fit_head(store, output=work / "seed-head", overwrite=True)
    t_fit = time.perf_counter() - t1
    acc = float(head.metrics["accuracy"])
    log(f"  featx fit-head: {t_fit:.1f} s, val acc {100 * acc:.1f} %")
    return {"extract_seconds": t_extract, "fit_seconds": t_fit, "seconds": t_extract + t_fit, "acc": acc,
            "images": result.n_items, "precision": result.config["precision"], "tap": head.tap, "C": head.C}


def featx_anytime(data_dir: Path, backbone: str, weights: str, work: Path, fractions=(0.25, 0.5, 1.0),
                  batch_size: int = 64, log=print) -> list[dict]:
    """featx as an anytime method: the val images plus a growing, nested share of the training images are extracted
    into one store (the cache computes only the new images at each step) and a head is fitted after each step.
    Returns the cumulative seconds and the val accuracy after each step."""
    ds = D.image_folder(data_dir)
    store = work / "seed-anytime.h5"
    remove_store(store)
    steps, elapsed = [], 0.0
    for frac in fractions:
        train = {c: D.permutation(files, 0)[: max(2, int(round(frac * len(files))))] for c, files in ds.train.items()}
        csv_path = D.write_csv(work / f"seed-anytime-{frac:g}.csv", {"train": train, "val": ds.val})
        t0 = time.perf_counter()
        res = extract(str(csv_path), store, backbone=backbone, weights=weights, batch_size=batch_size)
        head = fit_head(store)
        elapsed += time.perf_counter() - t0
        steps.append({"fraction": frac, "n_train": D.count(train), "computed": res.n_computed,
                      "acc": float(head.metrics["accuracy"]), "elapsed": elapsed})
        log(f"  featx anytime {frac:g} of train: +{res.n_computed} images, val acc "
            f"{100 * steps[-1]['acc']:.1f} %, {elapsed:.1f} s cumulative")
    return steps


def run_seed(data_dir: Path, backbone: str, weights: str, work: Path, workers: int | None, log=print) -> dict:
    """Both sides with the same weights. featx runs first, so that it pays for the cold page cache."""
    workers = default_workers() if workers is None else workers
    weights_arg = weights
    if weights.lower() == "none":
        # One seeded random init written to a file that both sides load: the same weights, by construction.
        torch.manual_seed(0)
        weights_arg = str(work / f"{backbone}-seed0.pth")
        torch.save(getattr(torchvision.models, backbone)().state_dict(), weights_arg)
    log(f"seed: {data_dir} with {backbone}, weights {weights} ({weights_arg}), {workers} decode worker(s) on both sides")
    fx = featx_side(data_dir, backbone, weights_arg, work, log=log)
    anytime = featx_anytime(data_dir, backbone, weights_arg, work, log=log)
    loop = documents_loop(data_dir, backbone, weights_arg, workers=workers, log=log)
    final = loop["final_acc"]
    # featx's time to the loop's final accuracy: the single full run when it gets there, else the first anytime
    # step that does (None when none does).
    reach = fx["seconds"] if fx["acc"] >= final else None
    reach_step = next((st for st in anytime if st["acc"] >= final), None)
    if reach_step is not None and (reach is None or reach_step["elapsed"] < reach):
        reach = reach_step["elapsed"]
    loop_to_featx_acc = next((h["elapsed"] for h in loop["history"] if h["val_acc"] >= fx["acc"]), None)
    return {
        "data": str(data_dir), "backbone": backbone, "weights": weights, "workers": workers,
        "loop": loop, "featx": fx, "anytime": anytime,
        "ratio_wall": loop["seconds"] / fx["seconds"],
        "featx_seconds_to_loop_acc": reach,
        "ratio_time_to_loop_acc": loop["seconds"] / reach if reach else None,
        "loop_seconds_to_featx_acc": loop_to_featx_acc,
    }


def seed_markdown(res: dict, machine: str) -> str:
    loop, fx = res["loop"], res["featx"]
    lines = [
        "# Seed time-to-accuracy: the documents' fixed-extractor loop vs featx",
        "",
        f"Machine: {machine}.",
        "",
        f"Data `{res['data']}` ({loop['n_train']} train / {loop['n_val']} val images), {res['backbone']} at 224 px, "
        f"weights `{res['weights']}` (the same tensors on both sides), {res['workers']} decode worker(s) on both sides.",
        "",
        "| | wall seconds | images through the backbone | val accuracy |",
        "|---|---:|---:|---:|",
        f"| documents' loop (fp32, Adam 1e-3, batch 16, 5 epochs, val every epoch) | {loop['seconds']:.1f} | "
        f"{loop['images']:,} | {100 * loop['final_acc']:.1f} % |",
        f"| featx extract ({fx['precision']}) + fit-head (logistic, C by CV) | {fx['seconds']:.1f} "
        f"(extract {fx['extract_seconds']:.1f} + fit {fx['fit_seconds']:.1f}) | {fx['images']:,} | {100 * fx['acc']:.1f} % |",
        "",
        "The loop after each epoch: " + ", ".join(f"{h['epoch']}: {100 * h['val_acc']:.1f} % at {h['elapsed']:.0f} s"
                                                  for h in loop["history"]) + ".",
        "featx anytime (val + a growing share of train extracted into one store, a head fitted after each step): "
        + ", ".join(f"{st['fraction']:g} of train: {100 * st['acc']:.1f} % at {st['elapsed']:.1f} s"
                    for st in res["anytime"]) + ".",
        "",
        f"**Wall-time ratio loop / featx (extract + fit-head): {res['ratio_wall']:.1f}x** (target >= 20x).",
    ]
    if res["featx_seconds_to_loop_acc"] is not None:
        lines.append(f"**Time to the loop's final val accuracy ({100 * loop['final_acc']:.1f} %): featx "
                     f"{res['featx_seconds_to_loop_acc']:.1f} s vs the loop's {loop['seconds']:.1f} s = "
                     f"{res['ratio_time_to_loop_acc']:.1f}x.**")
    else:
        lines.append(f"featx does not reach the loop's final val accuracy ({100 * loop['final_acc']:.1f} %): "
                     "no time-to-accuracy ratio.")
    if res["loop_seconds_to_featx_acc"] is not None:
        lines.append(f"The loop first reaches featx's accuracy ({100 * fx['acc']:.1f} %) after "
                     f"{res['loop_seconds_to_featx_acc']:.1f} s ({res['loop_seconds_to_featx_acc'] / fx['seconds']:.1f}x "
                     "featx's time).")
    else:
        lines.append(f"The loop never reaches featx's accuracy ({100 * fx['acc']:.1f} %) within its 5 epochs.")
    if str(res["weights"]).lower() == "none":
        lines += ["", "The weights are a seeded random initialisation (no pretrained weights can be downloaded on "
                  "this machine): random-init features are weak, so the accuracies say little; the time comparison "
                  "is the point. Rerun with `--weights IMAGENET1K_V1` where those weights are cached."]
    return "\n".join(lines) + "\n"
