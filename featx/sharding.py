"""Which part of a job this process does, and the hand-off between the processes that share it.

A job is split into shards: torchrun's ranks (RANK, WORLD_SIZE, LOCAL_RANK) or `--num-shards K --shard-index I`
for schedulers without torchrun (Slurm arrays, separate machines). Work items are assigned by their content key,
so every process agrees on the assignment without talking to the others, whatever each one finds already done.

Processes never talk while they work, so uneven shards cannot hang. Under torchrun the ranks meet once at the
start (a gloo rendezvous) to check that they run the same job and share the folder they write to. Each shard
leaves a marker file in that folder when its part is committed; the process that finds every shard's marker is
the one that finishes the job (`finish`). This module knows nothing about models or stores: a job is described by
an `identity` dict that must be equal in every shard.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import FeatxError
from .options import OptionError

RENDEZVOUS_TIMEOUT_ENV = "FEATX_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0


@dataclass(frozen=True)
class Shard:
    """One process's part of a job: shard `index` of `count`, launched by `launcher`."""

    index: int = 0
    count: int = 1
    local_rank: int = 0
    launcher: str = "single"  # 'single' | 'torchrun' | 'shards'

    @property
    def is_split(self) -> bool:
        return self.count > 1

    @property
    def name(self) -> str:
        return f"{'rank' if self.launcher == 'torchrun' else 'shard'} {self.index}/{self.count}"

    def owner(self, key: str) -> int:
        """The shard that computes content key `key` (a hex digest): the same answer in every process."""
        return int(key[:16], 16) % self.count

    def owns(self, key: str) -> bool:
        return self.owner(key) == self.index

    def device(self, spec: str) -> str:
        """--device for this process: under torchrun, 'auto' and 'cuda' mean this rank's GPU, cuda:LOCAL_RANK."""
        spec = (spec or "auto").strip().lower()
        if self.launcher != "torchrun" or spec not in ("auto", "cuda"):
            return spec
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else spec


def _env_int(environ, name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FeatxError(
            f"{name}={value!r}: expected an integer (WORLD_SIZE is set, so featx expects torchrun's RANK, "
            f"WORLD_SIZE and LOCAL_RANK)"
        ) from None


def discover(num_shards: int | None = None, shard_index: int | None = None, environ=None) -> Shard:
    """This process's shard, from `num_shards`/`shard_index` or torchrun's environment (one-line FeatxErrors)."""
    environ = os.environ if environ is None else environ
    if (num_shards is None) != (shard_index is None):
        raise OptionError("{num_shards} and {shard_index}: give both (e.g. {num_shards=4} {shard_index=0}) or neither")
    world = _env_int(environ, "WORLD_SIZE") if "WORLD_SIZE" in environ else 1
    if num_shards is not None:
        if world > 1:
            raise OptionError("{num_shards}: not under torchrun (WORLD_SIZE={world} already splits the work between "
                              "the ranks)", world=world)
        if num_shards < 1:
            raise OptionError("{num_shards=}: expected 1 or more", num_shards=num_shards)
        if not 0 <= shard_index < num_shards:
            raise OptionError("{shard_index=}: expected 0..{last} for {num_shards=}", shard_index=shard_index,
                              num_shards=num_shards, last=num_shards - 1)
        return Shard(shard_index, num_shards, 0, "shards") if num_shards > 1 else Shard()
    if world < 1:
        raise FeatxError(f"WORLD_SIZE={world}: expected 1 or more")
    if world == 1:
        return Shard()
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    if not 0 <= rank < world:
        raise FeatxError(f"RANK={rank}: expected 0..{world - 1} for WORLD_SIZE={world}")
    return Shard(rank, world, local_rank, "torchrun")


def rendezvous_timeout(environ=None) -> float:
    environ = os.environ if environ is None else environ
    value = environ.get(RENDEZVOUS_TIMEOUT_ENV, str(DEFAULT_RENDEZVOUS_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise FeatxError(f"{RENDEZVOUS_TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def join(shard: Shard, backend: str = "gloo"):
    """Join the process group of a torchrun job (gloo, or nccl for GPU training); FeatxError when the other ranks
    cannot be reached. Returns torch.distributed."""
    import torch.distributed as dist

    timeout = rendezvous_timeout()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise OptionError("WORLD_SIZE={count} is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun, or use "
                          "{num_shards}/{shard_index} for independent processes", count=shard.count)
    try:
        with _native_stderr_held() as held:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        held.replay()
    except (RuntimeError, ValueError, OSError) as err:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise FeatxError(
            f"{shard.name}: no rendezvous with the other ranks at {where} within {timeout:g} s "
            f"({str(err).splitlines()[0][:120]}): check MASTER_ADDR/MASTER_PORT and that every rank was started"
        ) from None
    return dist


class _native_stderr_held(contextlib.AbstractContextManager):
    """Hold what native code writes to file descriptor 2 (c10d logs every failed connection attempt there) until
    `replay()`; a failed rendezvous drops it, so that the user sees the one-line error alone."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, kind, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if kind is not None:
            self._file.close()
        return False

    def replay(self) -> None:
        self._file.seek(0)
        sys.stderr.write(self._file.read().decode(errors="replace"))
        self._file.close()


def _write_json(path: Path, data: dict) -> None:
    """Write a small JSON file atomically (a reader sees all of it or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def disagreement(mine: dict, theirs: dict) -> str:
    fields = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
    return ", ".join(fields)


def start(shard: Shard, folder: Path, identity: dict) -> None:
    """Before any work: under torchrun, check that every rank runs the same job (equal `identity`) and sees the
    others' files in `folder`; FeatxError on every rank otherwise. For independent shards, check the markers
    that shards already finished have left: another job's are an error."""
    if not shard.is_split:
        return
    if shard.launcher == "shards":
        for marker in folder.glob(f"done-*-of-{shard.count}.json"):
            done = _read_json(marker)
            if done is not None and done.get("identity", {}).get("config") != identity.get("config"):
                raise FeatxError(
                    f"{marker}: a shard of this store ran with another config "
                    f"({disagreement(identity, done['identity'])} differ): run every shard with the same options"
                )
        return
    dist = join(shard)
    try:
        token = [uuid.uuid4().hex if shard.index == 0 else None]
        dist.broadcast_object_list(token, src=0)
        hello = folder / f"hello-{token[0]}-{shard.index}.json"
        _write_json(hello, identity)
        dist.barrier()
        seen = sorted(int(p.stem.rsplit("-", 1)[1]) for p in folder.glob(f"hello-{token[0]}-*.json"))
        reports: list = [None] * shard.count
        dist.all_gather_object(reports, {"identity": identity, "sees": seen, "host": socket.gethostname()})
        dist.barrier()
        hello.unlink(missing_ok=True)
    finally:
        dist.destroy_process_group()
    for rank, report in enumerate(reports):
        if report["identity"] != reports[0]["identity"]:
            raise FeatxError(
                f"rank {rank} disagrees with rank 0 on the job ({disagreement(reports[0]['identity'], report['identity'])} "
                f"differ): start every rank with the same options and data"
            )
    for rank, report in enumerate(reports):
        if report["sees"] != list(range(shard.count)):
            missing = sorted(set(range(shard.count)) - set(report["sees"]))
            raise OptionError("{folder}: not shared between the ranks (rank {rank} on {host} cannot see the files of "
                              "ranks {missing}): put {output} on a filesystem that every node mounts", folder=folder,
                              rank=rank, host=report["host"], missing=", ".join(map(str, missing)))


def finish(shard: Shard, folder: Path, identity: dict, report: dict) -> tuple[list[dict], list[int]]:
    """After this shard's part is committed: leave its marker (with `report`, e.g. its failures) and return
    (every shard's report, the shards not done yet). When none is left, this process finishes the job."""
    _write_json(folder / f"done-{shard.index}-of-{shard.count}.json", {"identity": identity, "report": report})
    reports, waiting = [], []
    for index in range(shard.count):
        done = _read_json(folder / f"done-{index}-of-{shard.count}.json")
        if done is None or done.get("identity") != identity:  # not run yet, or run on other data
            waiting.append(index)
        else:
            reports.append(done["report"])
    return reports, waiting
