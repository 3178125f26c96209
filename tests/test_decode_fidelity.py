"""Rows of the default decode (--decode exact) against timm's and torchvision's own reference pipelines (PIL
decode, their eval transforms, their models) on JPEGs large enough for a reduced-scale (DCT) decode; the other
modes' deviation; the decode mode as part of the store's identity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featx.backbones import load_backbone
from featx.errors import FeatxError
from featx.extraction import extract
from featx.store import open_store

pytest.importorskip("timm")

# shorter sides >= 4x the largest resize below (256): every mode but exact decodes them at a reduced scale
SIZES = [(1400, 1040), (1030, 1500), (2100, 1100)]
OPTIONS = dict(weights="none", precision="fp32", batch_size=4, workers=0)


def _photo(path, size, seed):
    """A JPEG with edges, gradients and fine texture: what a reduced-scale decode visibly changes."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, ((x // 37 + y // 23) % 2) * 200], axis=-1)
    stripes = (np.sin(x / (1.5 + seed)) * np.cos(y / 2.3) * 60)[..., None]
    image = np.clip(base + stripes + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    (root / "a").mkdir()
    return root, [str(_photo(root / "a" / f"{i}.jpg", size, i)) for i, size in enumerate(SIZES)]


def _rows(store_path) -> dict[str, np.ndarray]:
    with open_store(store_path) as store:
        tap = store.taps[0]
        return dict(zip(store.paths, store.features(tap).astype(np.float64)))


def _cosines(rows: dict, reference: dict) -> np.ndarray:
    a = np.stack([rows[name] for name in sorted(reference)])
    b = np.stack([reference[name] for name in sorted(reference)])
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _reference_timm(backbone, paths) -> dict:
    """timm's path: resolve_data_config + create_transform on PIL images, pre-logits of forward_head."""
    import timm

    model = load_backbone(backbone, "none").model
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        rows = model.forward_head(model.forward_features(batch), pre_logits=True)
    return {f"a/{i}.jpg": row.double().numpy() for i, row in enumerate(rows)}


def _reference_torchvision(backbone, paths) -> dict:
    """torchvision's path: the weights' eval preset on PIL images, create_feature_extractor at the penultimate
    layer."""
    from torchvision.models import get_model_weights
    from torchvision.models.feature_extraction import create_feature_extractor

    model = load_backbone(backbone, "none").model
    transform = get_model_weights(backbone).DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        rows = create_feature_extractor(model, {"flatten": "rows"})(batch)["rows"]
    return {f"a/{i}.jpg": row.double().numpy() for i, row in enumerate(rows)}


@pytest.mark.parametrize("backbone, reference", [
    ("timm/test_efficientnet", _reference_timm),
    ("resnet18", _reference_torchvision),
])
def test_default_decode_gives_the_reference_rows_on_large_jpegs(photos, tmp_path, backbone, reference):
    root, paths = photos
    expected = reference(backbone, paths)
    taps = None if backbone.startswith("timm/") else ["flatten"]
    cosines = {}
    for mode in ("exact", "fast", "reduced"):
        extract(root, tmp_path / f"{mode}.h5", backbone=backbone, taps=taps, decode=mode, **OPTIONS)
        cosines[mode] = _cosines(_rows(tmp_path / f"{mode}.h5"), expected)
    assert cosines["exact"].min() >= 0.9999, cosines
    # the images do trigger reduced-scale decoding: the older decode is measurably off the reference
    assert cosines["reduced"].min() < cosines["fast"].min() - 1e-5, cosines
    assert cosines["fast"].min() < cosines["exact"].min() - 1e-6, cosines
    assert cosines["fast"].min() > 0.99, cosines


def test_default_decode_gives_the_reference_pixels(photos):
    """The input tensors themselves: within 2 grey levels of timm's bicubic PIL pipeline at every pixel."""
    import timm

    from featx.runner import CpuDecoder
    from featx.preprocess import TransformSpec

    spec = TransformSpec(resize=168, crop=160, interpolation="bicubic")
    reference = timm.data.create_transform(input_size=(3, 160, 160), crop_pct=160 / 168, interpolation="bicubic",
                                           mean=(0, 0, 0), std=(1 / 255,) * 3)
    for path in photos[1]:
        ours, reason = CpuDecoder(spec)(path)
        theirs = reference(Image.open(path).convert("RGB"))
        assert reason == "" and (ours.float() - theirs).abs().max() <= 2.0


def test_decode_mode_is_part_of_the_store_identity(cli, photos, tmp_path):
    root, _ = photos
    store = tmp_path / "s.h5"
    opts = dict(backbone="timm/test_efficientnet", **OPTIONS)
    extract(root, store, **opts)
    with open_store(store) as s:
        before = (s.config["decode"], list(s.keys), s.features(s.taps[0]).copy())
    assert before[0] == "exact"
    with pytest.raises(FeatxError, match=r"another config \(.*decode=exact\); this run asks for \(.*decode=fast\)"):
        extract(root, store, decode="fast", **opts)
    result = cli("extract", root, "-o", store, "-b", "timm/test_efficientnet", "-w", "none", "--precision", "fp32",
                 "--decode", "fast", "-q")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "decode=fast" in result.output
    with open_store(store) as s:  # nothing lost
        assert s.config["decode"] == "exact" and list(s.keys) == before[1]
        np.testing.assert_array_equal(s.features(s.taps[0]), before[2])
