"""Seed time-to-accuracy: the PyTorch transfer-learning tutorial's fixed-feature-extractor loop vs `featx extract` + `featx fit-head`.

The loop is written the way the PyTorch transfer-learning tutorial writes it: torchvision ImageFolder + transforms (RandomResizedCrop + flip for
train, Resize + CenterCrop for val, with the weights' preset size, interpolation, mean and std), the classifier
replaced by a new Linear, every other parameter frozen, Adam lr 1e-3, batch 16, 5 epochs, fp32 eager, validation
after every epoch. featx runs the two commands a user types. Each side is one whole command (a new Python process,
start-up and imports included) timed around it, with the CPU seconds of the process tree; both use the same weights
file (matched by position when the file comes from another implementation, as `--weights-match order` does).

    python benchmarks/protocol/seed.py loop DATA BACKBONE WEIGHTS MATCH OUT.json     # the loop alone (run_seed runs it)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model(backbone: str, weights: str, match: str):
    """The PyTorch transfer-learning tutorial's model: the constructor, then the weights file (by key, or by position for another
    implementation's file: the i-th tensor of the file into the i-th of the model, BatchNorm counters aside)."""
    import torch
    import torchvision

    if backbone.startswith("timm/"):
        import timm

        model = timm.create_model(backbone[5:])
    else:
        model = getattr(torchvision.models, backbone)()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    if match == "order":
        ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        theirs = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
        state = dict(zip(ours, theirs, strict=True))
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state)
    return model


def preset(backbone: str):
    """(size, resize, interpolation, mean, std) of the model's eval preset."""
    from torchvision.transforms import InterpolationMode

    if backbone.startswith("timm/"):
        import timm

        cfg = timm.data.resolve_data_config({}, model=timm.create_model(backbone[5:], pretrained=False))
        size = cfg["input_size"][-1]
        return (size, int(round(size / cfg["crop_pct"])), InterpolationMode(cfg["interpolation"]), list(cfg["mean"]),
                list(cfg["std"]))
    return 224, 256, InterpolationMode.BILINEAR, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tutorial_loop(data_dir: str, backbone: str, weights: str, match: str, epochs: int = 5, batch_size: int = 16,
                   lr: float = 1e-3, seed: int = 0) -> dict:
    """The fixed-feature-extractor recipe of the PyTorch transfer-learning tutorial, on CUDA when there is a GPU (as
    the tutorial writes it); returns per-epoch times and val accuracies."""
    import torch
    from torch import nn, optim
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    started = time.perf_counter()
    size, resize, interpolation, mean, std = preset(backbone)
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(size, interpolation=interpolation), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std),
        ]),
        "val": transforms.Compose([
            transforms.Resize(resize, interpolation=interpolation), transforms.CenterCrop(size),
            transforms.ToTensor(), transforms.Normalize(mean, std),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x]) for x in ["train", "val"]}
    dataloaders = {x: DataLoader(image_datasets[x], batch_size=batch_size, shuffle=(x == "train"), num_workers=1)
                   for x in ["train", "val"]}
    sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model = build_model(backbone, weights, match)
    for param in model.parameters():
        param.requires_grad = False
    name = "fc" if hasattr(model, "fc") else "classifier"
    setattr(model, name, nn.Linear(getattr(model, name).in_features, len(image_datasets["train"].classes)))
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(getattr(model, name).parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in dataloaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
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
                history.append({"epoch": epoch + 1, "val_acc": acc, "val_loss": running_loss / sizes["val"],
                                "elapsed": time.perf_counter() - started})
                print(f"  loop epoch {epoch + 1}/{epochs}: val acc {100 * acc:.1f} %, "
                      f"{history[-1]['elapsed']:.0f} s", flush=True)
    return {"history": history, "final_acc": history[-1]["val_acc"], "epochs": epochs,
            "images": epochs * (sizes["train"] + sizes["val"]), "n_train": sizes["train"], "n_val": sizes["val"],
            "size": size, "resize": resize, "interpolation": interpolation.value, "mean": mean, "std": std}


def timed(cmd: list[str], log=print) -> dict:
    """Run one whole command; its wall seconds (start-up included) and its process tree's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log(f"  {wall:.1f} s wall, {cpu:.1f} s CPU: {' '.join(cmd)}")
    return {"command": " ".join(cmd), "seconds": wall, "cpu_seconds": cpu, "stdout": proc.stdout}


def run_seed(data_dir: Path, backbone: str, weights: str, match: str, work: Path, log=print) -> dict:
    """featx's two commands, then the loop (so featx pays for the cold page cache)."""
    featx = [sys.executable, "-m", "featx"]
    store, head = work / "seed-store.h5", work / "seed-head"
    for p in (store, head):
        subprocess.run(["rm", "-rf", str(p), str(p) + ".parts"], check=True)
    log(f"seed: {data_dir} with {backbone}, weights {weights} (--weights-match {match})")
    ext = timed(featx + ["extract", str(data_dir), "-o", str(store), "-b", backbone, "-w", weights,
                         "--weights-match", match, "-q", "--json"], log)
    fit = timed(featx + ["fit-head", str(store), "-o", str(head), "--json"], log)
    fit_metrics = json.loads(fit["stdout"])
    from featx import open_store

    with open_store(store) as s:
        precision, n_items = s.config.get("precision"), len(s)
    acc = float(fit_metrics["accuracy"])
    out_json = work / "seed-loop.json"
    loop_cmd = timed([sys.executable, str(HERE / "seed.py"), "loop", str(data_dir), backbone, weights, match,
                      str(out_json)], log)
    loop = json.loads(out_json.read_text())
    fx_seconds = ext["seconds"] + fit["seconds"]
    final = loop["final_acc"]
    # The loop's time to its own epochs: the epoch's in-process elapsed time plus the process start-up (the
    # command's wall time minus the last epoch's elapsed time).
    startup = loop_cmd["seconds"] - loop["history"][-1]["elapsed"]
    loop_to_featx = next((h["elapsed"] + startup for h in loop["history"] if h["val_acc"] >= acc), None)
    reach = fx_seconds if acc >= final else None
    return {
        "data": str(data_dir), "backbone": backbone, "weights": weights, "weights_match": match,
        "loop": {**loop, "seconds": loop_cmd["seconds"], "cpu_seconds": loop_cmd["cpu_seconds"],
                 "command": loop_cmd["command"], "startup_seconds": startup},
        "featx": {"extract": {k: ext[k] for k in ("command", "seconds", "cpu_seconds")},
                  "fit_head": {k: fit[k] for k in ("command", "seconds", "cpu_seconds")},
                  "seconds": fx_seconds, "cpu_seconds": ext["cpu_seconds"] + fit["cpu_seconds"], "acc": acc,
                  "precision": precision, "images": n_items, "C": fit_metrics.get("C")},
        "ratio_wall": loop_cmd["seconds"] / fx_seconds,
        "ratio_cpu": loop_cmd["cpu_seconds"] / max(1e-9, ext["cpu_seconds"] + fit["cpu_seconds"]),
        "featx_seconds_to_loop_acc": reach,
        "ratio_time_to_loop_acc": loop_cmd["seconds"] / reach if reach else None,
        "loop_seconds_to_featx_acc": loop_to_featx,
    }


def seed_markdown(res: dict, machine: str) -> str:
    loop, fx = res["loop"], res["featx"]
    lines = [
        "# Seed time-to-accuracy: the PyTorch transfer-learning tutorial's fixed-extractor loop vs featx",
        "",
        f"Machine: {machine}. Measured alone (an exclusive lock held every other job on this machine off).",
        "",
        f"Data `{res['data']}` ({loop['n_train']} train / {loop['n_val']} val images), `{res['backbone']}` at its "
        f"preset ({loop['size']} px crop of a {loop['resize']} px {loop['interpolation']} resize, mean {loop['mean']}, "
        f"std {loop['std']}), weights `{Path(res['weights']).name}` loaded by {'position' if res['weights_match'] == 'order' else 'key'} "
        "on both sides (the same tensors).",
        "",
        "| | whole command, wall s | CPU s | images through the backbone | val accuracy |",
        "|---|---:|---:|---:|---:|",
        f"| the tutorial's loop (fp32 eager, Adam 1e-3, batch 16, {loop['epochs']} epochs, val every epoch) | "
        f"{loop['seconds']:.1f} | {loop['cpu_seconds']:.1f} | {loop['images']:,} | {100 * loop['final_acc']:.1f} % |",
        f"| `featx extract` ({fx['precision']}) + `featx fit-head` (logistic, C by CV) | {fx['seconds']:.1f} "
        f"({fx['extract']['seconds']:.1f} + {fx['fit_head']['seconds']:.1f}) | {fx['cpu_seconds']:.1f} | "
        f"{fx['images']:,} | {100 * fx['acc']:.1f} % |",
        "",
        "Commands: `" + fx["extract"]["command"].split(" -m ", 1)[-1] + "`, `" + fx["fit_head"]["command"].split(" -m ", 1)[-1]
        + "`, `" + loop["command"].split(" ", 1)[-1] + "` (times include Python start-up and imports: "
        f"the loop's start-up was {loop['startup_seconds']:.1f} s).",
        "",
        "The loop after each epoch (seconds since its start-up): " + ", ".join(
            f"{h['epoch']}: {100 * h['val_acc']:.1f} % at {h['elapsed']:.0f} s" for h in loop["history"]) + ".",
        "",
        f"**Wall-time ratio loop / featx: {res['ratio_wall']:.1f}x** (CPU-seconds ratio {res['ratio_cpu']:.1f}x; "
        "target >= 20x).",
    ]
    if res["featx_seconds_to_loop_acc"] is not None:
        lines.append(f"**Time to the loop's final val accuracy ({100 * loop['final_acc']:.1f} %): featx "
                     f"{res['featx_seconds_to_loop_acc']:.1f} s vs the loop's {loop['seconds']:.1f} s = "
                     f"{res['ratio_time_to_loop_acc']:.1f}x.**")
    else:
        lines.append(f"featx ({100 * fx['acc']:.1f} %) does not reach the loop's final val accuracy "
                     f"({100 * loop['final_acc']:.1f} %): no time-to-accuracy ratio.")
    if res["loop_seconds_to_featx_acc"] is not None:
        lines.append(f"The loop first reaches featx's accuracy ({100 * fx['acc']:.1f} %) after "
                     f"{res['loop_seconds_to_featx_acc']:.1f} s.")
    else:
        lines.append(f"The loop never reaches featx's accuracy ({100 * fx['acc']:.1f} %) within its "
                     f"{loop['epochs']} epochs.")
    return "\n".join(lines).replace(res["weights"], "$WEIGHTS") + f"\n\n`$WEIGHTS` = `{res['weights']}`.\n"


if __name__ == "__main__" and sys.argv[1:2] == ["loop"]:
    _, _, data, bb, w, m, out = sys.argv
    Path(out).write_text(json.dumps(tutorial_loop(data, bb, w, m)))
