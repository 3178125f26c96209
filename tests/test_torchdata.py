"""featx.torchdata.StoreDataset: rows of a store through a torch DataLoader, in worker processes too."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from featx.errors import FeatxError
from featx.torchdata import StoreDataset
from test_store_readers import make_store


def with_pid(batch):
    return default_collate(batch), os.getpid()


def test_two_workers_read_every_row_once_each_with_its_own_handle(tmp_path):
    feats = make_store(tmp_path / "s.h5")["avgpool"]
    ds = StoreDataset(tmp_path / "s.h5", tap="avgpool")
    x0, y0 = ds[0]  # the main process opens its own handle first: workers must not share it
    assert x0.dtype == torch.float32 and y0.item() == 0
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=with_pid)
    batches = list(loader)
    xs = torch.cat([x for (x, _), _ in batches]).numpy()
    ys = torch.cat([y for (_, y), _ in batches]).numpy()
    np.testing.assert_array_equal(xs, feats)
    assert ys.tolist() == [i % 3 for i in range(22)] + [-1] and ys.dtype == np.int64
    pids = {pid for _, pid in batches}
    assert len(pids) == 2 and os.getpid() not in pids
    shuffled = DataLoader(ds, batch_size=5, shuffle=True, num_workers=2, persistent_workers=True)
    for _ in range(2):
        seen = torch.cat([x for x, _ in shuffled]).numpy()
        assert sorted(map(tuple, seen)) == sorted(map(tuple, feats))
    ds.close()


def test_split_rows_regression_and_pickling(tmp_path):
    feats = make_store(tmp_path / "s.h5")
    val = StoreDataset(tmp_path / "s.h5", tap="layer4", split="val", rows=np.arange(10))
    assert val.rows.tolist() == [1, 4, 7] and val.classes == ["ants", "bees", "wasps"]
    x, y = val[2]
    np.testing.assert_array_equal(x.numpy(), feats["layer4"][7])
    assert y.item() == 1
    copy = pickle.loads(pickle.dumps(val))  # with the handle open: the copy opens its own
    np.testing.assert_array_equal(copy[0][0].numpy(), feats["layer4"][1])
    make_store(tmp_path / "r.h5", targets=np.arange(23) / 4)
    reg = StoreDataset(tmp_path / "r.h5", tap="avgpool", split="test")
    xb, yb = next(iter(DataLoader(reg, batch_size=3)))
    assert yb.dtype == torch.float32 and yb.tolist() == [0.5, 1.25, 2.0] and xb.shape == (3, 5)
    with pytest.raises(FeatxError, match="several taps"):
        StoreDataset(tmp_path / "s.h5")
    with pytest.raises(FeatxError, match="split 'nope' is not in"):
        StoreDataset(tmp_path / "s.h5", tap="avgpool", split="nope")
