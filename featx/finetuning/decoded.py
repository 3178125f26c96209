"""The decoded-image cache of a training run: each image decoded once, its uint8 pixels kept under its content key.

Training images are kept at the run's working size (see data.TrainTransform.stage), so every epoch's random crop
and flip start from cached pixels instead of a JPEG; validation images are kept after the eval transform. Entries
are .npy files named by the image's content key and the stage, written atomically (a temporary file renamed) by
the loader's workers: workers share them through the page cache, a resumed run finds them, and a run killed while
writing leaves no half entry. Every entry is exactly what decoding afresh gives, so a cached epoch is the same as
an uncached one.

The folder holds at most `limit_mb` (and half the free disk space at the start): each worker may add its share of
what is left, and once that is used, images it has not cached are decoded every epoch, as without a cache. A folder
that cannot be written costs one line at the start, a disk that fills up one line from the worker that hit it; the
run goes on uncached either way. Nothing is kept in memory beyond the batch being built.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

SUFFIX = ".npy"


class DecodedCache:
    """uint8 arrays under (content key, stage) in `folder`, within `limit_bytes` for the whole folder."""

    def __init__(self, folder: Path, limit_bytes: int, used_bytes: int, remove_when_done: bool):
        self.folder = Path(folder)
        self.limit_bytes = limit_bytes
        self.used_bytes = used_bytes
        self.remove_when_done = remove_when_done
        self._written = 0  # bytes this process added
        self._disabled = False

    @classmethod
    def open(cls, folder, limit_mb: float, log, remove_when_done: bool = False) -> "DecodedCache | None":
        """The cache in `folder` (created), or None after one log line when it cannot be written."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"0")
            probe.unlink()
            used = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == SUFFIX)
            free = shutil.disk_usage(folder).free
        except OSError as err:
            log(f"decoded-image cache {folder}: {err.strerror or err}: training goes on without it (every epoch "
                "decodes its images)")
            return None
        limit = int(min(limit_mb * 2**20, used + free // 2))
        log(f"decoded-image cache: {folder} ({used / 2**20:.0f} MB used, limit {limit / 2**20:.0f} MB)")
        return cls(folder, limit, used, remove_when_done)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached (3, H, W) pixels of `key` over HWC memory, as decoding gives them; None when absent or
        unreadable (the image is then decoded again)."""
        try:
            return torch.from_numpy(np.load(self._path(key), allow_pickle=False)).permute(2, 0, 1)
        except (OSError, ValueError):
            return None

    def put(self, key: str, pixels: torch.Tensor) -> None:
        """Keep `pixels` under `key` when this worker's share of the limit allows it; never raises."""
        if self._disabled:
            return
        array = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())  # HWC, the memory order of a decoded image
        if self._written + array.nbytes > self._share():
            return
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, path)
            self._written += array.nbytes
        except OSError as err:
            self._disabled = True
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            print(f"featx: decoded-image cache {self.folder}: {err.strerror or err}: images not cached yet are "
                  "decoded every epoch from now on", file=sys.stderr)

    def _share(self) -> int:
        """Bytes this process may add: an equal part, per loader worker, of what the limit leaves."""
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        return max(0, self.limit_bytes - self.used_bytes) // workers

    def close(self) -> None:
        """Remove the folder when the run owns it (the default folder inside the run, once training is done)."""
        if self.remove_when_done:
            shutil.rmtree(self.folder, ignore_errors=True)


def stage_key(content_key: str, stage: dict) -> str:
    """The entry name of an image's pixels after `stage` (a JSON-able description of the decoding step)."""
    digest = hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest()[:16]
    return f"{content_key}-{digest}"

