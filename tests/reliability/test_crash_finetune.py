"""Crash loop: a real `featx finetune` SIGKILLed during start-up, during training, and while it writes
checkpoint.pt or last.pt/model.pt, then continued with --resume each time.

After every kill each file of the run folder is complete (checkpoint.pt, model.pt and last.pt load with
torch.load(weights_only=True), metrics.jsonl and config.json parse); at the end the per-epoch metrics equal those
of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from featx.finetuning import finetune
from featx.finetuning.checkpoint import load_checkpoint

from .helpers import Child, featx as run_featx, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SEED = 11
EPOCHS = 4
OPTIONS = dict(backbone="mobilenet_v3_small", weights="none", epochs=EPOCHS, batch_size=8, image_size=32, workers=0,
               precision="fp32")
ARGS = ("-b", "mobilenet_v3_small", "-w", "none", "--epochs", str(EPOCHS), "--batch-size", "8", "--image-size", "32",
        "--workers", "0", "--precision", "fp32", "-q")
KINDS = ["training", "checkpoint", "startup", "last", "training"]
COMPARED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def _epochs_done(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_at(kind: str, rng: random.Random, data: Path, run: Path) -> tuple[str, bool]:
    args = ("--resume", run) if (run / "config.json").exists() else ("-o", run)
    child = Child("finetune", data, *args, *ARGS)
    started = time.monotonic()
    delay = rng.uniform(0.05, 2.0)
    done = _epochs_done(run)
    pause = rng.uniform(0.0, 0.15)
    while child.poll() is None:
        names = os.listdir(run) if run.exists() else []
        fire = {
            "startup": time.monotonic() - started >= delay,
            "training": _epochs_done(run) > done,  # an epoch was saved: the next one is training now
            "checkpoint": any(n.startswith(".checkpoint.pt.tmp-") for n in names),
            "last": any(n.startswith((".last.pt.tmp-", ".model.pt.tmp-")) for n in names),
        }[kind]
        if fire:
            if kind == "training":
                time.sleep(pause)
            return kind, child.kill()
        time.sleep(0.001)
    result = child.wait()
    assert result.returncode == 0, result
    return "completed", False


def _check_complete_files(run: Path) -> None:
    """Whatever the instant of the kill, every file in place is whole."""
    if (run / "checkpoint.pt").exists():
        checkpoint = load_checkpoint(run / "checkpoint.pt")
        assert 1 <= checkpoint["epoch"] <= EPOCHS
    for name in ("model.pt", "last.pt"):
        if (run / name).exists():
            weights = torch.load(run / name, map_location="cpu", weights_only=True)
            assert weights["model"] and weights["featx"]["epoch"] >= 1
    if (run / "metrics.jsonl").exists():
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if (run / "config.json").exists():
        json.loads((run / "config.json").read_text())


def test_finetune_resumes_after_kills_to_the_uninterrupted_metrics(tmp_path):
    rng = random.Random(SEED)
    data = tmp_path / "data"
    write_pngs(data, 40, size=40, classes=2)
    clean = finetune(str(data), tmp_path / "clean", **OPTIONS)
    assert clean.epochs == EPOCHS

    run = tmp_path / "run"
    kills, seen = 0, []
    for kind in KINDS:
        what, killed = _kill_at(kind, rng, data, run)
        seen.append(what)
        kills += killed
        _check_complete_files(run)
        if not killed:
            break
    assert kills >= 5 and {"training", "checkpoint", "last", "startup"} <= set(seen), seen
    if _epochs_done(run) < EPOCHS:
        final = run_featx("finetune", data, "--resume", run, *ARGS, "--json")
        assert final.returncode == 0, final
    _check_complete_files(run)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    for got, want in zip(history, clean.history):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (key, got, want)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == EPOCHS
    leftovers = sorted(name for name in os.listdir(run) if ".tmp-" in name)
    assert not leftovers, leftovers  # the temporary files of killed writes are deleted by the next run
    print(f"\nfinetune crash loop: {kills} kills survived ({', '.join(seen)}); no temporary files left")
