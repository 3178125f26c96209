"""--engine ray: a local Ray cluster (ray.init(num_cpus=2)) computes what a local run computes; the driver
commits and seals. Option mistakes are one line."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.extraction import extract
from featx.store import open_store
from options_support import EXTRACT


@pytest.fixture
def folder(image_folders):
    root = image_folders(splits={"train": 5, "val": 2})
    (root / "val/bees/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


@pytest.mark.slow
def test_ray_engine_equals_a_local_run(folder, tmp_path):
    ray = pytest.importorskip("ray")
    local = extract(folder, tmp_path / "local.h5", **EXTRACT)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(FeatxError, match=r"^num_gpus_per_worker=1(\.0)?: the Ray cluster has 0 GPUs"):
            extract(folder, tmp_path / "ray.h5", engine="ray", num_gpus_per_worker=1, **EXTRACT)
        res = extract(folder, tmp_path / "ray.h5", engine="ray", **EXTRACT)
        assert ray.is_initialized()  # a cluster the caller started stays up
    finally:
        ray.shutdown()
    assert (res.n_items, res.n_computed, res.n_failed, res.sealed) == (local.n_items, 14, 1, True)
    with open_store(tmp_path / "local.h5") as a, open_store(tmp_path / "ray.h5") as b:
        assert list(a.keys) == list(b.keys) and list(a.paths) == list(b.paths) and a.failed == b.failed
        assert a.config_key == b.config_key
        np.testing.assert_allclose(a.features("flatten"), b.features("flatten"), rtol=1e-5, atol=1e-6)
    assert not extract(folder, tmp_path / "ray.h5", **EXTRACT).sealed  # the same store as a local run's


def test_engine_ray_without_ray_installed_is_one_line(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FeatxError, match=r"^engine=.ray.: Ray Data is not installed here: pip install 'featx\[ray\]'$"):
        extract(folder, tmp_path / "s.h5", engine="ray", **EXTRACT)


@pytest.mark.parametrize("kwargs, match", [
    (dict(engine="spark"), "engine='spark': expected one of local, ray"),
    (dict(ray_address="10.0.0.1:6379"), "ray_address: only with engine='ray'"),
    (dict(num_gpus_per_worker=1), "num_gpus_per_worker: only with engine='ray'"),
    (dict(engine="ray", num_shards=2, shard_index=0), "engine='ray': not with torchrun or num_shards"),
    (dict(engine="ray", decode="gpu"), "decode='gpu': only with engine='local'"),
    (dict(engine="ray", device="cpu"), "device='cpu': not with engine='ray'"),
])
def test_engine_option_mistakes(folder, tmp_path, kwargs, match):
    with pytest.raises(FeatxError, match=match) as err:
        extract(folder, tmp_path / "s.h5", **{**EXTRACT, **kwargs})
    assert "\n" not in str(err.value)
