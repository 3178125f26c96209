"""The decoded-image cache of finetuning: the same batches as decoding afresh, each image decoded once, bounded by
its limit, and a folder that cannot be written (or a full disk) leaves the run going uncached."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from featx.finetuning import finetune
from featx.finetuning import data as D
from featx.finetuning.decoded import DecodedCache, stage_key
from featx.preprocess import TransformSpec
from featx.sources import content_key, load_source

from imagegen import make_image, make_image_folder
from options_support import FINETUNE

SPEC = TransformSpec(resize=24, crop=20, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
FAST = {**FINETUNE, "epochs": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 classes x 5 images of mixed sizes (some smaller than the working size, some larger)."""
    root = tmp_path_factory.mktemp("dc") / "data"
    make_image_folder(root, per_class=5, size=(40, 30))
    make_image_folder(root, per_class=2, size=(18, 22), ext="jpg", seed=1)
    return str(root)


def batches(items, augment, cache, epochs=2, workers=0):
    loader = D.make_loader(items, SPEC, augment, train=True, batch_size=4, workers=workers, seed=7,
                           pin_memory=False, cache=cache)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += [(x.clone(), y.clone(), ok.clone()) for x, y, ok in loader]
    return out


def counting_decoder(monkeypatch):
    calls = []
    real = D.decode_image

    def decode(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(D, "decode_image", decode)
    return calls


@pytest.mark.parametrize("augment", ["default", "flip", "none"])
def test_cached_batches_equal_fresh_decoding_and_each_image_is_decoded_once(data, tmp_path, monkeypatch, augment):
    items = load_source(data).items
    fresh = batches(items, augment, None)
    calls = counting_decoder(monkeypatch)
    cache = DecodedCache.open(tmp_path / "cache", 64, print)
    cached = batches(items, augment, cache)
    assert len(cached) == len(fresh) == 2 * (len(items) // 4)
    for (x1, y1, ok1), (x2, y2, ok2) in zip(fresh, cached):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(ok1, ok2)
    seen = set(calls)
    assert len(calls) == len(seen) <= len(items)  # epoch 2 decoded nothing again
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(seen)


def test_workers_share_the_cache_and_give_the_same_batches(data, tmp_path):
    items = load_source(data).items
    fresh = batches(items, "default", None)
    cached = batches(items, "default", DecodedCache.open(tmp_path / "cache", 64, print), workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh, cached))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(items)


def test_the_limit_bounds_the_folder_and_the_rest_is_decoded_every_epoch(data, tmp_path, monkeypatch):
    items = load_source(data).items
    one = 3 * 24 * 32  # one 40x30 image at the working size (shorter side 24)
    cache = DecodedCache.open(tmp_path / "cache", 3.5 * one / 2**20, print)
    calls = counting_decoder(monkeypatch)
    cached = batches(items, "default", cache)
    stored = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.npy"))
    assert 0 < stored <= cache.limit_bytes + 3 * 128  # .npy headers aside
    assert len(calls) > len(set(calls))  # images beyond the limit were decoded again in epoch 2
    fresh = batches(items, "default", None)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh, cached))


def test_unwritable_folder_is_one_line_and_the_run_goes_on(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    lines = []
    result = finetune(data, tmp_path / "run", **FAST, decode_cache=str(blocker / "cache"), log=lines.append)
    assert result.epochs == 2
    said = [line for line in lines if "decoded-image cache" in line]
    assert len(said) == 1 and str(blocker / "cache") in said[0] and "goes on without it" in said[0]


def test_a_full_disk_is_one_line_and_the_epoch_goes_on_uncached(data, tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    items = load_source(data).items
    cache = DecodedCache.open(tmp_path / "cache", 64, print)
    cached = batches(items, "flip", cache)
    fresh = batches(items, "flip", None)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh, cached))
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "decoded every epoch" in err
    assert not list((tmp_path / "cache").iterdir())  # no half-written entry


def test_default_cache_lives_in_the_run_until_training_ends_and_a_given_folder_is_kept(data, tmp_path, monkeypatch):
    result = finetune(data, tmp_path / "run", **FAST)
    assert result.epochs == 2 and not (tmp_path / "run" / "decoded").exists()
    shared = tmp_path / "shared"
    first = finetune(data, tmp_path / "a", **FAST, decode_cache=str(shared))
    entries = sorted(p.name for p in shared.glob("*.npy"))
    assert entries
    calls = counting_decoder(monkeypatch)
    second = finetune(data, tmp_path / "b", **FAST, decode_cache=str(shared))
    assert calls == []  # every image came from the shared folder
    assert sorted(p.name for p in shared.glob("*.npy")) == entries
    assert [r["train_loss"] for r in second.history] == [r["train_loss"] for r in first.history]
    off = finetune(data, tmp_path / "c", **FAST, decode_cache="none")
    assert [r["train_loss"] for r in off.history] == [r["train_loss"] for r in first.history]


def test_bad_limit_is_an_error(data, tmp_path):
    from featx.errors import FeatxError

    with pytest.raises(FeatxError, match="decode_cache_mb=-1"):
        finetune(data, tmp_path / "run", **FAST, decode_cache_mb=-1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("augment", ["default", "none"])
def test_fast_and_exact_keep_their_own_pixels_which_differ_for_a_large_jpeg_only(tmp_path, augment):
    """One cache folder, both modes: each image has an entry per mode; an 800x600 JPEG decoded at a reduced DCT
    scale (fast) gives other pixels than at full size (exact), a JPEG under 2x the resize the same ones."""
    for cls, name in enumerate(("large", "small")):
        make_image(tmp_path / "data" / f"class{cls}" / f"{name}.jpg", cls, cls, (800, 600) if cls == 0 else (40, 30))
    items = load_source(str(tmp_path / "data")).items
    cache = DecodedCache.open(tmp_path / "cache", 64, print)
    pixels = {}
    for mode in ("exact", "fast"):
        loader = D.make_loader(items, SPEC, augment, train=False, batch_size=1, workers=0, seed=7, pin_memory=False,
                               cache=cache, decode=mode)
        list(loader)
        stage = D.TrainTransform(SPEC, augment, mode).describe()
        pixels[mode] = {item.path: cache.get(stage_key(content_key(item.path), stage)) for item in items}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 * len(items)
    for item in items:
        exact, fast = pixels["exact"][item.path], pixels["fast"][item.path]
        assert exact is not None and fast is not None and exact.shape == fast.shape
        assert torch.equal(exact, fast) == item.path.endswith("small.jpg"), item.path
