"""--decode gpu: the batch decoder's logic (run here on the CPU device, where torchvision decodes with the same
libjpeg as PIL), its fallbacks, the config identity, and on a CUDA machine the real thing end to end."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from featx.errors import FeatxError
from featx.extraction import extract
from featx.runner import CpuDecoder, identity_key
from featx.gpu_decode import DeviceDecoder, check_decoder, orient, read_encoded
from featx.preprocess import TransformSpec
from featx.store import open_store
from imagegen import make_image_folder

SPEC = TransformSpec(resize=40, crop=32)


def _photo(path, size=(64, 48), mode="RGB", orientation=None, fmt="JPEG"):
    rng = np.random.default_rng(len(str(path)))
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1) + rng.integers(0, 20, (size[1], size[0], 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").convert(mode)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, format=fmt, quality=95, exif=exif)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {
        "rgb": _photo(tmp_path / "rgb.jpg"),
        "gray": _photo(tmp_path / "gray.jpg", mode="L"),
        "rotated": _photo(tmp_path / "rotated.jpg", orientation=6),
        "cmyk": _photo(tmp_path / "cmyk.jpg", mode="CMYK"),
        "png": _photo(tmp_path / "image.png", fmt="PNG"),
    }


def test_workers_send_jpeg_bytes_and_decode_the_rest(files, tmp_path):
    cpu = CpuDecoder(SPEC)
    for name in ("rgb", "gray", "rotated"):
        enc = read_encoded(files[name], cpu)
        assert enc.data is not None and enc.image is None and enc.data.dtype == torch.uint8
    assert read_encoded(files["rotated"], cpu).orientation == 6
    for name in ("cmyk", "png"):  # nvJPEG does not take CMYK; other formats never reach it
        enc = read_encoded(files[name], cpu)
        assert enc.data is None and enc.image.shape == (3, 32, 32) and enc.reason == ""
    missing = read_encoded(str(tmp_path / "gone.jpg"), cpu)
    assert missing.data is None and "cannot read" in missing.reason


def test_batch_matches_the_cpu_decoder_within_a_few_values(files):
    cpu = CpuDecoder(SPEC)
    paths = list(files.values())
    batch, reasons = DeviceDecoder(SPEC, torch.device("cpu"), cpu)([read_encoded(p, cpu) for p in paths])
    assert batch.shape == (len(paths), 3, 32, 32) and batch.dtype == torch.uint8 and reasons == [""] * len(paths)
    for row, path in zip(batch, paths):
        expected = cpu(path)[0]
        diff = (row.int() - expected.int()).abs().float()
        assert diff.mean() < 3 and diff.max() <= 64, path  # resize kernels differ; rotation and colours agree


def _undecodable(jpeg: bytes) -> bytes:
    """A JPEG whose header still reads as one (format, size, mode) but that no decoder can decode: its first
    component uses a quantization table the file does not define."""
    out, pos = bytearray(jpeg), 2
    while out[pos + 1] != 0xC0:  # up to the frame header (baseline SOF0)
        pos += 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
    out[pos + 12] = 3  # length 2, precision 1, height 2, width 2, components 1, then id, sampling, table
    return bytes(out)


def test_a_file_the_device_decoder_rejects_fails_alone(files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_undecodable(open(files["rgb"], "rb").read()))
    cpu = CpuDecoder(SPEC)
    encoded = [read_encoded(files["rgb"], cpu), read_encoded(str(bad), cpu), read_encoded(files["png"], cpu)]
    assert encoded[1].data is not None  # its header looks fine: the device decoder gets it
    batch, reasons = DeviceDecoder(SPEC, torch.device("cpu"), cpu)(encoded)
    assert reasons[0] == "" and reasons[2] == "" and reasons[1]  # the CPU decoder's reason for the bad one
    assert batch.shape == (3, 3, 32, 32) and not batch[1].any()
    assert torch.equal(batch[2], cpu(files["png"])[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation):
    from PIL import ImageOps

    arr = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(buf)))
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_decoder_is_part_of_the_identity_and_old_stores_keep_theirs():
    config = {"backbone": "resnet18", "taps": ["avgpool"], "precision": "bf16"}
    legacy = identity_key(config)  # made before --decode: the reduced-scale decode, recorded as 'cpu' or not at all
    assert identity_key({**config, "decode": "cpu"}) == identity_key({**config, "decode": "reduced"}) == legacy
    keys = {identity_key({**config, "decode": mode}) for mode in ("exact", "fast", "gpu")}
    assert len(keys) == 3 and legacy not in keys


def test_decode_gpu_needs_cuda(monkeypatch):
    with pytest.raises(FeatxError, match="decode='png': expected one of exact, fast, reduced, gpu"):
        check_decoder("png", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FeatxError, match=r"^decode='gpu': CUDA is not available on this machine \(use decode='exact'\)$"):
        check_decoder("gpu", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(FeatxError, match="the model runs on cpu, expected a CUDA device"):
        check_decoder("gpu", torch.device("cpu"))
    for mode in ("exact", "fast", "reduced"):
        check_decoder(mode, torch.device("cpu"))


@pytest.mark.cuda
def test_gpu_decode_on_cuda_agrees_with_cpu_decode(files, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6, size=(96, 72), ext="jpg")
    (data / "ants/broken.jpg").write_bytes(_undecodable(open(files["rgb"], "rb").read()))
    opts = dict(backbone="resnet18", weights="none", image_size=64, batch_size=8, workers=2, precision="fp32")
    cpu = extract(data, tmp_path / "cpu.h5", **opts)
    gpu = extract(data, tmp_path / "gpu.h5", decode="gpu", **opts)
    assert (gpu.n_items, gpu.n_failed) == (cpu.n_items, cpu.n_failed) == (12, 1)
    with open_store(tmp_path / "cpu.h5") as a, open_store(tmp_path / "gpu.h5") as b:
        assert list(a.keys) == list(b.keys) and b.config["decode"] == "gpu" and a.config_key != b.config_key
        x, y = a.features("flatten"), b.features("flatten")
        cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cosine.min() > 0.99
    with pytest.raises(FeatxError, match="another config"):  # never mixed in one store
        extract(data, tmp_path / "cpu.h5", decode="gpu", **opts)
    batch, _ = DeviceDecoder(SPEC, torch.device("cuda"), CpuDecoder(SPEC))([read_encoded(p, CpuDecoder(SPEC)) for p in files.values()])
    assert batch.device.type == "cuda" and batch.shape == (5, 3, 32, 32)
