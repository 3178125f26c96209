"""A torch Dataset over the rows of a featx store, safe with DataLoader worker processes.

An h5py file handle must not cross a fork or a pickle: each process (the main one, every DataLoader worker) opens
the store itself on its first read, through featx.store.open_store, and a pickled dataset carries only the path and
the row selection. The DataLoader fetches a whole batch with one read (``__getitems__``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import Store, open_store


class StoreDataset(Dataset):
    """(features, target) pairs of one tap of a featx store: features a float32 tensor of the tap's row shape,
    target the int64 label (-1 unlabelled) or, in a regression store, the float32 target.

    `tap`: default the store's only tap. `split`: only the rows of that split ('train', 'val', 'test'). `rows`: an
    index array or boolean mask over the store's rows (with `split`: those of that split). `classes`: the store's
    class names.
    """

    def __init__(self, store, tap: str | None = None, split: str | None = None, rows=None):
        self.path = Path(store)
        with open_store(self.path) as st:
            self.tap = st.resolve_tap(tap)
            selected = np.arange(len(st), dtype=np.int64) if rows is None else st.row_index(rows)
            self.rows = selected if split is None else selected[st.split_mask(split)[selected]]
            self.classes = list(st.classes)
            regression = st.targets is not None
            self.targets = (st.targets.astype(np.float32) if regression else st.labels)[self.rows]
        self._store: Store | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> Store:
        """This process's handle on the store: opened on the first read here (a forked worker opens its own)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = open_store(self.path), os.getpid()
        return self._store

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        x = self._open().features(self.tap, slice(row, row + 1))[0]
        return torch.from_numpy(x), torch.tensor(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list:
        """A batch in one read (torch's DataLoader calls this instead of __getitem__ per item)."""
        indices = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(self._open().features(self.tap, self.rows[indices]))
        y = torch.from_numpy(np.asarray(self.targets[indices]))
        return list(zip(x, y))

    def close(self) -> None:
        """Close this process's handle (reads open it again)."""
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None}
