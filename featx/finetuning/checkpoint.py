"""The run folder's files, written atomically, and the RNG states a resumed run needs.

    config.json      the run's options and data (a resume must match it)
    checkpoint.pt    model, optimizer, scheduler, scaler, epoch, RNG states, history: rewritten every epoch
    model.pt         best epoch by val accuracy (the last one without validation); last.pt: the last epoch
    metrics.jsonl    one JSON line per epoch;  curves.png: loss and accuracy per epoch

Everything is written to a temporary file and renamed into place, so a kill at any instant leaves either the old
file or the new one (and maybe the temporary file, which the next run in the folder deletes). A call that ends, by
success, failure or Ctrl-C, removes its lock file; when the folder then holds no checkpoint (the call failed before
its first epoch completed), it also removes the files and folders it created, so that no half-started run is left
behind: what holds progress (a checkpoint) is all that stays. model.pt / last.pt
are `{"model": state_dict, "featx": {...}}` with plain tensors and JSON values only, readable with
torch.load(weights_only=True) and as `-w` by extract, fit-head and finetune.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatxError
from ..options import OptionError
from ..store import publish

CONFIG, CHECKPOINT, MODEL, LAST, METRICS, CURVES = (
    "config.json", "checkpoint.pt", "model.pt", "last.pt", "metrics.jsonl", "curves.png"
)
LOCK = ".featx-finetune.lock"
FORMAT = 1


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then fsync it and rename it over `path` durably (store.publish)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (no channels_last strides, no device)."""
    return {name: t.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for name, t in model.state_dict().items()}


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunDir:
    """A run folder: its paths, the rules for starting or resuming in it, and a lock against a second writer."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this call created, deepest first
        self._found: set[str] = set()  # the folder's entries when this call locked it

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """Create and lock the folder; return the checkpoint to resume from (None: start at epoch 1).

        A new run refuses a folder holding a checkpoint unless `overwrite` (the old files stay until the new run
        completes its first epoch); `resume` needs the folder to exist.
        """
        if self.path.exists() and not self.path.is_dir():
            raise OptionError("{output=}: is a file, expected a run folder", output=str(self.path))
        if resume and not self.path.is_dir():
            raise OptionError("{output=}: no such run folder to resume", output=str(self.path))
        missing = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OptionError("{output=}: cannot create the run folder ({reason})", output=str(self.path),
                              reason=err.strerror) from err
        self._created = missing
        self._lock()
        try:
            self._found = {entry.name for entry in self.path.iterdir()}
            self._remove_stale_temporaries()
            has_checkpoint = (self / CHECKPOINT).is_file()
            if has_checkpoint and not resume and not overwrite:
                raise OptionError("{output=}: holds a run already ({checkpoint}); pass {resume=True} to continue "
                                  "it, or {overwrite=True} to start a new one", output=str(self.path),
                                  checkpoint=CHECKPOINT)
            return load_checkpoint(self / CHECKPOINT) if resume and has_checkpoint else None
        except BaseException:
            self.release()  # a failed call must not keep the folder locked for the rest of this process
            raise

    def _lock(self) -> None:
        """Take the lock file exclusively. The file is removed by its holder (release), so a lock taken on a file
        that was unlinked meanwhile is taken again on the file now in its place."""
        while True:
            fd = os.open(self / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FeatxError(f"{self.path} is being written by another featx finetune process: wait for it") from None
            try:
                current = os.stat(self / LOCK).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._lock_fd = fd
                return
            os.close(fd)

    def _remove_stale_temporaries(self) -> None:
        """Delete the `.<name>.tmp-<pid>` files of atomic_write calls that a kill interrupted (safe: we hold the lock,
        so no other process of this folder is writing)."""
        for tmp in self.path.glob(".*.tmp-*"):
            if tmp.is_file() and tmp.name.rpartition(".tmp-")[2].isdigit():
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Unlock and remove the lock file. Without a checkpoint in the folder (no epoch completed), also remove
        what this call created: its files and folders inside the run folder, then the folders it made."""
        if self._lock_fd is None:
            return
        try:
            if not (self / CHECKPOINT).is_file():
                for entry in self.path.iterdir():
                    if entry.name not in self._found and entry.name != LOCK:
                        _remove(entry)
            (self / LOCK).unlink(missing_ok=True)
        except OSError:
            pass  # a folder that cannot be cleaned keeps what it holds; the lock is released all the same
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
        for folder in self._created:
            try:
                folder.rmdir()  # only when empty: a folder holding anything else stays
            except OSError:
                break

    def write_config(self, config: dict) -> None:
        save_text(json.dumps(config, indent=2) + "\n", self / CONFIG)

    def write_metrics(self, history: list[dict]) -> None:
        save_text("".join(json.dumps(row) + "\n" for row in history), self / METRICS)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by featx finetune (weights_only: no code runs), FeatxError when damaged."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise FeatxError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0][:120]})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise FeatxError(f"{path}: not a featx finetune checkpoint (format {FORMAT})")
    return checkpoint
