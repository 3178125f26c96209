"""Finetuning under torchrun: DistributedDataParallel over the ranks, with the run the user asked for.

`join(device)` reads the torchrun environment (featx.sharding.discover) and, with more than one rank, joins a
process group: nccl when this rank trains on its GPU (cuda:LOCAL_RANK), gloo on the CPU. The `Session` it returns
is what the trainer asks about distribution; in a single process every method is a no-op.

- The global batch stays --batch-size: of every global batch that one process would draw (the same (seed, epoch)
  order and the same per-image augmentation seeds), each rank takes its contiguous slice of batch/world images, and
  DDP averages the gradients, so the steps, the schedule and the data per step are those of one process.
  BatchNorm2d layers normalise with the statistics of the global batch (GlobalBatchNorm2d: torch's SyncBatchNorm
  runs on GPUs only, this one on every device), so the numbers are one process's up to float rounding. The
  floating buffers are averaged over the ranks after every epoch, so the saved and evaluated model is the same on
  every rank whatever other layers keep per-rank statistics.
- Validation images are dealt out one by one (rank r takes images r, r + world, ...): none dropped, none repeated;
  the loss and accuracy sums are added over the ranks, so the metrics are those of the whole validation set.
- Only rank 0 touches the run folder: it locks and prepares it, writes every file (atomically), and hands the
  checkpoint of a --resume to the other ranks, so a run killed on any rank resumes from rank 0's last checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .. import sharding
from ..errors import FeatxError
from ..options import OptionError
from .data import EpochSampler


class RankSampler(Sampler):
    """This rank's share of an EpochSampler's (index, seed) pairs.

    batch given (training): of every full global batch of `batch` pairs, the rank's contiguous slice of
    batch // world; None (validation): every world-th pair from the rank's own, so the ranks share every pair once.
    """

    def __init__(self, base: EpochSampler, rank: int, world: int, batch: int | None):
        self.base, self.rank, self.world, self.batch = base, rank, world, batch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        if self.batch is None:
            return len(range(self.rank, len(self.base), self.world))
        return len(self.base) // self.batch * (self.batch // self.world)

    def __iter__(self):
        pairs = list(self.base)
        if self.batch is None:
            return iter(pairs[self.rank :: self.world])
        share = self.batch // self.world
        mine = []
        for start in range(0, len(pairs) - self.batch + 1, self.batch):
            mine.extend(pairs[start + self.rank * share : start + (self.rank + 1) * share])
        return iter(mine)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the batch of every rank together (differentiable
    all-reduces of the per-channel sums, then of the centred squares), with BatchNorm's arithmetic: biased variance
    to normalise, unbiased for the running estimate. In eval mode, or outside a process group, it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        sums = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:channels] / n
        centred = xf - mean.view(1, channels, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n  # two passes: no cancellation in E[x²] - E[x]²
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def use_global_batch_norm(model: nn.Module) -> None:
    """Turn every BatchNorm2d of `model` into a GlobalBatchNorm2d in place (same parameters, buffers and names)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d


@dataclass
class Session:
    """This process's place in the run: rank `rank` of `world`, the device it trains on, and the process group."""

    rank: int = 0
    world: int = 1
    device: str = "auto"
    _wrapped: tuple | None = field(default=None, repr=False)  # (trainable parameter names, DDP module)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise OptionError("{batch_size=}: not divisible by the {world} ranks (WORLD_SIZE); the global batch is "
                              "split evenly between them", batch_size=batch_size, world=self.world)

    def _broadcast(self, value):
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def prepare_run(self, run, resume: bool, overwrite: bool) -> dict | None:
        """RunDir.prepare on rank 0; its checkpoint (or its error, raised on every rank) goes to every rank."""
        if not self.is_distributed:
            return run.prepare(resume, overwrite)
        outcome = None
        if self.is_main:
            try:
                outcome = ("checkpoint", run.prepare(resume, overwrite))
            except FeatxError as err:
                outcome = ("error", str(err))
        kind, value = self._broadcast(outcome)
        if kind == "error":
            raise FeatxError(value)
        return value

    def check_same(self, config: dict, ignored) -> None:
        """FeatxError on every rank when a rank's run config differs from rank 0's (fields in `ignored` aside)."""
        if not self.is_distributed:
            return
        mine = {key: value for key, value in config.items() if key not in ignored}
        configs: list = [None] * self.world
        torch.distributed.all_gather_object(configs, mine)
        for rank, theirs in enumerate(configs):
            if theirs != configs[0]:
                raise FeatxError(
                    f"rank {rank} disagrees with rank 0 on the run ({sharding.disagreement(configs[0], theirs)} "
                    f"differ): start every rank with the same options and data"
                )

    def attach(self, trainer) -> None:
        """Give `trainer` this session and its ranks' shares of the training and validation loaders."""
        trainer.session = self
        if not self.is_distributed:
            return
        trainer.train_loader = self._shard(trainer.train_loader, train=True)
        if trainer.val_loader is not None:
            trainer.val_loader = self._shard(trainer.val_loader, train=False)

    def _shard(self, loader: DataLoader, train: bool) -> DataLoader:
        sampler = RankSampler(loader.sampler, self.rank, self.world, loader.batch_size if train else None)
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size // self.world if train else loader.batch_size,
            sampler=sampler, drop_last=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that trains: `model` itself, or its DDP wrapper (rebuilt when the trainable set changes,
        since DDP reduces the gradients of the parameters that required them when it was built)."""
        if not self.is_distributed:
            return model
        trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
        if self._wrapped is None or self._wrapped[0] != trainable:
            from torch.nn.parallel import DistributedDataParallel

            use_global_batch_norm(model)
            device = next(model.parameters()).device
            self._wrapped = (trainable, DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=bool(getattr(model, "aux_logits", False)),
            ))
        return self._wrapped[1]

    def reduce(self, totals) -> None:
        """Sum a pass's totals (its tensors, images and skipped counts) over the ranks, in place."""
        if not self.is_distributed:
            return
        for value in vars(totals).values():
            if isinstance(value, torch.Tensor):
                torch.distributed.all_reduce(value)
        device = next(v for v in vars(totals).values() if isinstance(v, torch.Tensor)).device
        counts = torch.tensor([totals.images, totals.skipped], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(counts)
        totals.images, totals.skipped = (int(c) for c in counts.tolist())

    def sync_buffers(self, model: nn.Module) -> None:
        """Average the floating buffers (BatchNorm running statistics) over the ranks."""
        if not self.is_distributed:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer)
                buffer /= self.world

    def close(self) -> None:
        if self.is_distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def join(device: str) -> Session:
    """This process's Session: under torchrun (WORLD_SIZE > 1) the process group is joined here, nccl on this
    rank's GPU or gloo on the CPU; FeatxError when the other ranks cannot be reached."""
    shard = sharding.discover()
    if not shard.is_split:
        return Session(device=device)
    device = shard.device(device)
    from ..runtime import resolve_device

    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise OptionError("{device=}: finetune under torchrun trains on cpu or cuda", device=device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    sharding.join(shard, "nccl" if resolved.type == "cuda" else "gloo")
    return Session(rank=shard.index, world=shard.count, device=str(resolved))
