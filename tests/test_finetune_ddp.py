"""Finetuning under torchrun (DDP on CPU with gloo): the ranks share every global batch and every validation image
exactly once, BatchNorm sees the global batch, one epoch's metrics agree with one process, only rank 0 writes the
run folder, a kill of one rank resumes, and bad launches are one line each."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from featx.finetuning.data import EpochSampler
from featx.finetuning.ddp import RankSampler
from imagegen import make_image_folder

# One process on one thread against 2 ranks on one thread each (torchrun sets OMP_NUM_THREADS=1): random-init
# training at these sizes is chaotic in float32, so even one process on 2 threads instead of 1 moves one epoch's
# losses by about 0.013. The stated tolerance of DDP against one process: losses within LOSS_TOL, accuracies
# within one image; with BatchNorm frozen (no batch statistics) they agree to FROZEN_TOL.
LOSS_TOL = 0.02
FROZEN_TOL = 1e-5
COMMON = ["-b", "resnet18", "-w", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
          "--device", "cpu", "--precision", "fp32", "--lr", "0.001", "-q"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "FEATX_OFFLINE": "1", **extra}


def _featx(args, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
        if torchrun else [sys.executable]
    return launcher + ["-m", "featx", "finetune", *map(str, args)]


def _run(args, torchrun=False, timeout=300):
    return subprocess.run(_featx(args, torchrun), env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", classes=("a", "b", "c"),
                             splits={"train": 12, "val": 5}, size=(40, 40))


# ---- the samplers: every global batch and every validation image, once -------------------------------------------
@pytest.mark.parametrize("n,batch,world", [(37, 8, 2), (36, 12, 3), (10, 4, 4)])
def test_ranks_split_every_global_batch_of_one_process(n, batch, world):
    base = EpochSampler(n, seed=3, shuffle=True)
    base.set_epoch(2)
    pairs = list(base)
    full = [pairs[i : i + batch] for i in range(0, n - batch + 1, batch)]  # one process, drop_last
    shares = []
    for rank in range(world):
        sampler = RankSampler(EpochSampler(n, seed=3, shuffle=True), rank, world, batch)
        sampler.set_epoch(2)
        share = list(sampler)
        assert len(share) == len(sampler) == len(full) * (batch // world)
        shares.append([share[i : i + batch // world] for i in range(0, len(share), batch // world)])
    for step, global_batch in enumerate(full):
        assert [pair for rank in range(world) for pair in shares[rank][step]] == global_batch


@pytest.mark.parametrize("n,world", [(15, 2), (7, 3), (2, 4)])
def test_validation_images_are_neither_dropped_nor_repeated(n, world):
    shares = [list(RankSampler(EpochSampler(n, 0, shuffle=False), rank, world, None)) for rank in range(world)]
    assert [len(s) for s in shares] == [len(RankSampler(EpochSampler(n, 0, False), r, world, None))
                                        for r in range(world)]
    assert sorted(index for share in shares for index, _ in share) == list(range(n))


# ---- BatchNorm over the global batch ------------------------------------------------------------------------------
def _batch_norm_worker(rank, port, results):
    import torch.distributed as dist

    from featx.finetuning.ddp import use_global_batch_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3),
                              nn.BatchNorm2d(2)).double()
        reference = copy.deepcopy(model)
        x = torch.randn(6, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        w = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        use_global_batch_norm(model)
        part = slice(3 * rank, 3 * rank + 3)
        (model(x[part]) * w[part]).sum().backward()
        (reference(x) * w).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for g in grads:
            dist.all_reduce(g)
        results[rank] = max(
            [(g - p.grad).abs().max().item() for g, p in zip(grads, reference.parameters())]
            + [(a - b).abs().max().item() for a, b in zip(model.state_dict().values(), reference.state_dict().values())
               if a.is_floating_point()]
        )
    finally:
        dist.destroy_process_group()


def test_global_batch_norm_equals_batch_norm_on_the_whole_batch():
    """Two gloo ranks with half a batch each: gradients (summed over the ranks) and running statistics are those of
    BatchNorm2d on the whole batch, to float64 rounding."""
    results = mp.Manager().dict()
    mp.spawn(_batch_norm_worker, args=(_free_port(), results), nprocs=2)
    assert max(results.values()) < 1e-12


# ---- end to end under torchrun ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_epoch_on_two_ranks_agrees_with_one_process(data, tmp_path):
    args = ["--epochs", "1", "--train-bn", *COMMON]  # batch 8 keeps BatchNorm statistics fixed without --train-bn
    one = _run([data, "-o", tmp_path / "one", *args])
    assert one.returncode == 0, one.stderr
    two = _run([data, "-o", tmp_path / "two", *args], torchrun=True)
    assert two.returncode == 0, two.stderr
    [a], [b] = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_TOL and abs(a["val_loss"] - b["val_loss"]) <= LOSS_TOL
    assert abs(a["train_acc"] - b["train_acc"]) <= 1 / 32 + 1e-9 and abs(a["val_acc"] - b["val_acc"]) <= 1 / 15 + 1e-9
    assert a["lr"] == b["lr"]  # the same schedule: 4 steps of the global batch 8 in both runs
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["ranks"] == 2 and config["batch_size"] == 8
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert two.stdout.count("best val acc") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_frozen_batch_norm_makes_two_ranks_equal_one_process(data, tmp_path):
    """Without batch statistics (the fixed-feature-extractor recipe) DDP computes what one process computes."""
    args = ["--epochs", "1", "--freeze", "backbone", *COMMON]
    assert _run([data, "-o", tmp_path / "one", *args]).returncode == 0
    assert _run([data, "-o", tmp_path / "two", *args], torchrun=True).returncode == 0
    [a], [b] = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert a[key] == pytest.approx(b[key], abs=FROZEN_TOL), key


@pytest.mark.slow
def test_unfreezing_under_ddp_agrees_with_one_process(data, tmp_path):
    """--unfreeze-at makes more parameters trainable: the DDP module is rebuilt so that their gradients are
    averaged too (one process and two ranks still agree in the unfrozen epoch)."""
    args = ["--epochs", "2", "--freeze", "until:layer3", "--unfreeze-at", "2", *COMMON]
    assert _run([data, "-o", tmp_path / "one", *args]).returncode == 0
    two = _run([data, "-o", tmp_path / "two", *args], torchrun=True)
    assert two.returncode == 0, two.stderr
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"), strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_TOL and abs(a["val_loss"] - b["val_loss"]) <= LOSS_TOL


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` among the launcher's children."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_kill_of_one_rank_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    args = ["--epochs", "3", *COMMON]
    whole = _run([data, "-o", tmp_path / "whole", *args], torchrun=True)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    launcher = subprocess.Popen(_featx([data, "-o", run, *args], torchrun=True), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch"
            time.sleep(0.05)
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and 1 <= len(_metrics(run)) < 3
    resumed = _run([data, "--resume", run, *args], torchrun=True)
    assert resumed.returncode == 0, resumed.stderr
    got, expected = _metrics(run), _metrics(tmp_path / "whole")
    assert [row["epoch"] for row in got] == [1, 2, 3]
    for row, ref in zip(got, expected):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert row[key] == pytest.approx(ref[key], abs=1e-6), (row["epoch"], key)


# ---- bad launches: one line each, exit code 2 ---------------------------------------------------------------------
def _two_ranks(args_of_rank, timeout=180):
    """Start the two ranks by hand, as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), and wait for both."""
    port = str(_free_port())
    procs = [subprocess.Popen(_featx(args_of_rank(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, FEATX_RENDEZVOUS_TIMEOUT="60"))
             for rank in range(2)]
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_ranks_disagreeing_on_the_run_is_one_line(data, tmp_path):
    results = _two_ranks(lambda rank: [data, "-o", tmp_path / "run", "--epochs", "1",
                                       *COMMON[:-3], "--lr", "0.001" if rank == 0 else "0.01", "-q"])
    for code, stderr in results:
        assert code == 2
        line = _one_line(stderr)
        assert line.startswith("featx: error: rank 1 disagrees with rank 0 on the run (backbone_lr, lr differ)")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_batch_size_not_divisible_by_the_ranks_is_one_line(data, tmp_path):
    args = [data, "-o", tmp_path / "run", "--epochs", "1", *COMMON, "--batch-size", "7"]
    for code, stderr in _two_ranks(lambda rank: args):
        assert code == 2
        assert _one_line(stderr) == ("featx: error: --batch-size 7: not divisible by the 2 ranks (WORLD_SIZE); "
                                     "the global batch is split evenly between them")


def test_world_size_without_a_reachable_rendezvous_is_one_line(data, tmp_path):
    env = _env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               FEATX_RENDEZVOUS_TIMEOUT="2")
    done = subprocess.run(_featx([data, "-o", tmp_path / "run", *COMMON]), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert _one_line(done.stderr).startswith("featx: error: rank 1/2: no rendezvous with the other ranks at 127.0.0.1:")
    assert not (tmp_path / "run").exists()


def test_world_size_without_master_address_is_one_line(data, tmp_path):
    done = subprocess.run(_featx([data, "-o", tmp_path / "run", *COMMON]), capture_output=True, text=True,
                          env=_env(RANK="0", WORLD_SIZE="2"), timeout=120)
    assert done.returncode == 2
    assert "MASTER_ADDR/MASTER_PORT are not" in _one_line(done.stderr)
    assert not (tmp_path / "run").exists()
