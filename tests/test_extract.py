"""The extraction engine: correctness against a hand-written forward pass, cache semantics, failures, options."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from featx.errors import FeatxError
from featx.extract_request import extract_options_from_config
from featx.extraction import extract
from featx.store import open_store
from imagegen import make_image
from options_support import EXTRACT as FAST


@pytest.fixture
def folder(image_folders):
    return image_folders("data", per_class=3, splits={"train": 3, "val": 2})


def test_one_tap_given_as_a_string_is_that_tap(folder, tmp_path):
    extract(folder, tmp_path / "s.h5", taps="layer2", **FAST)
    with open_store(tmp_path / "s.h5") as st:
        assert st.taps == ["layer2"]


def test_extract_writes_schema_rows(folder, tmp_path):
    out = tmp_path / "s.h5"
    result = extract(folder, out, taps=["layer2", "avgpool"], **FAST)
    assert (result.n_items, result.n_computed, result.n_failed, result.sealed) == (10, 10, 0, True)
    with open_store(out) as st:
        assert st.classes == ["ants", "bees"]
        assert sorted(st.taps) == ["avgpool", "layer2"]
        assert st.features("avgpool").shape == (10, 512) and st.features("layer2").shape == (10, 128)
        assert list(st.splits).count("val") == 4
        assert st.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
        assert st.paths[0] == "train/ants/ants_000.png"
        assert st.config["weights"] == "none" and st.config["transform"]["crop"] == 32
        assert st.config["precision"] in ("bf16", "fp32")


def _reference_rows(paths, tap, pooling_fn):
    """What the tutorial's loop computes: torchvision transforms (on uint8 tensors, antialiased, as the weights'
    presets run them), fp32, the model called on the batch."""
    torch.manual_seed(0)  # the same seeded init featx uses for -w none
    model = torchvision.models.resnet18().eval()
    v2 = torchvision.transforms.v2
    tf = v2.Compose([
        v2.PILToTensor(), v2.Resize(37, antialias=True), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    body = torchvision.models.feature_extraction.create_feature_extractor(model, {tap: tap})
    with torch.no_grad():
        return pooling_fn(body(x)[tap]).numpy()


@pytest.mark.parametrize("pooling, fn", [("avg", lambda t: t.mean((2, 3))), ("max", lambda t: t.amax((2, 3)))])
def test_rows_match_hand_written_forward(folder, tmp_path, pooling, fn):
    out = tmp_path / "s.h5"
    extract(folder, out, taps=["layer3"], pooling=pooling, precision="fp32", **FAST)
    with open_store(out) as st:
        paths = [folder / p for p in st.paths]
        got = st.features("layer3")
    np.testing.assert_allclose(got, _reference_rows(paths, "layer3", fn), rtol=1e-3, atol=1e-4)


def test_pooling_shapes(folder, tmp_path):
    shapes = {}
    for pooling in ("avgmax", "gem", "flatten", "none"):
        out = tmp_path / f"{pooling}.h5"
        extract(folder, out, taps=["layer4"], pooling=pooling, **FAST)
        with open_store(out) as st:
            shapes[pooling] = st.features("layer4").shape[1:]
    assert shapes == {"avgmax": (1024,), "gem": (512,), "flatten": (512,), "none": (512, 1, 1)}


def test_rerun_computes_only_new_changed_and_drops_removed(folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(folder, out, **FAST)
    with open_store(out) as st:
        before = dict(zip(st.paths, st.features("flatten")))
    again = extract(folder, out, **FAST)
    assert (again.n_computed, again.n_reused, again.sealed) == (0, 10, False)

    (folder / "train/ants/ants_000.png").rename(folder / "train/ants/renamed.png")
    (folder / "train/bees/bees_000.png").unlink()
    make_image(folder / "train/bees/new.png", 1, seed=999, size=(32, 24))
    make_image(folder / "val/ants/ants_000.png", 0, seed=12345, size=(32, 24))  # same name, new content
    res = extract(folder, out, **FAST)
    assert (res.n_items, res.n_computed) == (10, 2)
    with open_store(out) as st:
        after = dict(zip(st.paths, st.features("flatten")))
    assert "train/bees/bees_000.png" not in after
    np.testing.assert_array_equal(after["train/ants/renamed.png"], before["train/ants/ants_000.png"])
    assert not np.allclose(after["val/ants/ants_000.png"], before["val/ants/ants_000.png"])
    assert not (tmp_path / "s.h5.parts").exists()


def test_cached_rows_equal_fresh_run(folder, tmp_path, image_folders):
    extract(folder, tmp_path / "a.h5", **FAST)
    shutil.rmtree(folder / "val")
    extract(folder, tmp_path / "b.h5", **FAST)
    image_folders("data", per_class=3, splits={"train": 3, "val": 2})
    extract(folder, tmp_path / "b.h5", **FAST)
    with open_store(tmp_path / "a.h5") as a, open_store(tmp_path / "b.h5") as b:
        assert list(a.paths) == list(b.paths)
        np.testing.assert_array_equal(a.features("flatten"), b.features("flatten"))


def test_workers_and_batch_size_do_not_change_rows(folder, tmp_path):
    extract(folder, tmp_path / "a.h5", **FAST)
    extract(folder, tmp_path / "b.h5", **{**FAST, "workers": 2, "batch_size": 3})
    with open_store(tmp_path / "a.h5") as a, open_store(tmp_path / "b.h5") as b:
        np.testing.assert_allclose(a.features("flatten"), b.features("flatten"), rtol=1e-2, atol=1e-3)


def test_broken_files_are_recorded_and_run_goes_on(folder, tmp_path):
    (folder / "train/ants/empty.jpg").write_bytes(b"")
    (folder / "train/ants/text.jpg").write_text("not an image")
    res = extract(folder, tmp_path / "s.h5", **FAST)
    assert (res.n_items, res.n_failed) == (10, 2)
    with open_store(tmp_path / "s.h5") as st:
        failed = dict(st.failed)
    assert set(failed) == {"train/ants/empty.jpg", "train/ants/text.jpg"}
    assert "empty" in failed["train/ants/empty.jpg"]
    with pytest.raises(FeatxError, match="text.jpg|empty.jpg"):
        extract(folder, tmp_path / "t.h5", on_error="fail", **FAST)


def test_fail_stop_keeps_committed_batches(folder, tmp_path):
    (folder / "val/bees/zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "s.h5"
    with pytest.raises(FeatxError):
        extract(folder, out, on_error="fail", **{**FAST, "batch_size": 2})
    assert list((tmp_path / "s.h5.parts").glob("seg-*.h5"))
    res = extract(folder, out, **{**FAST, "batch_size": 2})
    assert res.n_reused >= 8 and res.n_items == 10 and res.n_failed == 1


def test_config_mismatch_is_refused_then_overwritten(folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(folder, out, **FAST)
    with pytest.raises(FeatxError, match="another config") as err:
        extract(folder, out, **{**FAST, "image_size": 40})
    assert "\n" not in str(err.value) and "32" in str(err.value) and "40" in str(err.value)
    extract(folder, out, overwrite=True, **{**FAST, "image_size": 40})
    with open_store(out) as st:
        assert st.config["transform"]["crop"] == 40


def test_float16_storage_and_options_round_trip(folder, tmp_path):
    out = tmp_path / "s.h5"
    res = extract(folder, out, dtype="float16", taps=["layer1"], **FAST)
    with open_store(out) as st:
        assert st.feature_dtype("layer1") == np.float16 and st.features("layer1").dtype == np.float32
    opts = extract_options_from_config(res.config)
    assert opts["image_size"] == 32 and opts["taps"] == ["layer1"] and opts["dtype"] == "float16"
    again = extract(folder, out, workers=0, batch_size=4, **opts)
    assert again.n_computed == 0


def test_csv_regression_and_unlabelled_list(tmp_path, image_folder):
    data = image_folder
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    (data / "targets.csv").write_text("path,label\n" + "".join(f"{f},{i * 0.5}\n" for i, f in enumerate(files)))
    extract(data / "targets.csv", tmp_path / "r.h5", **FAST)
    with open_store(tmp_path / "r.h5") as st:
        assert st.targets.tolist() == [i * 0.5 for i in range(6)]
    (data / "list.txt").write_text("\n".join(files))
    extract(data / "list.txt", tmp_path / "u.h5", **FAST)
    with open_store(tmp_path / "u.h5") as st:
        assert (st.labels == -1).all() and len(st) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data="missing-folder"), "missing-folder"),
        (dict(backbone="resnet5"), "resnet50"),
        (dict(taps=["layer9"]), "layer9"),
        (dict(pooling="median"), "pooling='median'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(precision="fp8"), "precision='fp8'"),
        (dict(device="tpu"), "device='tpu'"),
    ],
)
def test_bad_options_are_one_line_errors(folder, tmp_path, kwargs, match):
    args = {**FAST, **kwargs}
    data = args.pop("data", folder)
    with pytest.raises(FeatxError, match=match) as err:
        extract(data, tmp_path / "s.h5", **args)
    assert "\n" not in str(err.value)


API_CHECK = """
import importlib, sys, types, featx
functions = {"extract": "featx.extraction", "finetune": "featx.finetuning.api", "open_store": "featx.store",
             "fit_head": "featx.head_api", "load_head": "featx.heads.persistence", "evaluate": "featx.head_api",
             "layers": "featx.layer_table", "advise": "featx.advice", "predict": "featx.head_api"}
for name, module in functions.items():
    value = getattr(featx, name)
    assert callable(value) and value is getattr(importlib.import_module(module), name), (name, value)
for module in ("featx.extraction", "featx.finetuning", "featx.taps", "featx.advice"):
    assert isinstance(sys.modules[module], types.ModuleType), module
"""


@pytest.mark.parametrize("first", [
    "import featx.extraction, featx.finetuning, featx.finetuning.api, featx.store, featx.heads.api, featx.taps, "
    "featx.advice",  # submodules first
    "import featx.cli, featx.cli.extract_cmds, featx.cli.finetune_cmd; import featx.extraction, featx.finetuning",  # CLI
    "import featx; featx.extract, featx.finetune, featx.layers, featx.advise; import featx.extraction, "
    "featx.finetuning.train, featx.taps, featx.advice",  # functions first
])
def test_api_names_stay_functions_after_their_submodules_load(first):
    """No submodule is named like an API function, so importing any of them leaves featx.extract(...) and the
    others the functions."""
    import subprocess
    import sys

    code = f"{first}\n{API_CHECK}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_compiled_extractor_gives_the_eager_rows_and_pads_the_last_batch(tmp_path, image_folders):
    """--compile: the same rows as eager (to float tolerance), a short last batch included, one compile."""
    data = image_folders("data", per_class=5)
    opts = dict(backbone="resnet18", weights="none", taps=["layer3", "avgpool"], image_size=32, batch_size=4,
                workers=0, precision="fp32", device="cpu")
    eager = extract(str(data), tmp_path / "eager.h5", **opts)
    compiled = extract(str(data), tmp_path / "compiled.h5", **opts, compile_model=True)
    assert compiled.n_computed == eager.n_computed == 10
    with open_store(tmp_path / "eager.h5") as a, open_store(tmp_path / "compiled.h5") as b:
        assert a.config_key == b.config_key
        for tap in ("layer3", "avgpool"):
            np.testing.assert_allclose(b.features(tap), a.features(tap), rtol=1e-3, atol=1e-4)


def test_an_unreadable_subfolder_is_one_line_and_its_rows_stay(tmp_path, monkeypatch, image_folder):
    """A folder that cannot be listed (chmod 000, a failing mount) is left out with one line, its rows are kept,
    and --on-error fail refuses the run before anything is written; no unchanged-rerun shortcut hides it."""
    import os

    data = image_folder
    out = tmp_path / "s.h5"
    extract(data, out, **FAST)
    with open_store(out) as store:
        keys = sorted(store.keys)
    scandir = os.scandir

    def refusing(path="."):  # what chmod 000 does for anyone but root
        if str(path) == str(data / "bees"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    lines = []
    result = extract(data, out, **FAST, log=lines.append)
    assert lines == [f"{data / 'bees'}: cannot read folder: Permission denied: left out, the store keeps the rows it "
                     f"has of them (on_error='fail' / --on-error fail stops instead)"]
    assert (result.n_computed, result.n_dropped) == (0, 0)
    with open_store(out) as store:
        assert sorted(store.keys) == keys
    before = out.read_bytes()
    with pytest.raises(FeatxError, match=r"bees: cannot read folder: Permission denied \(on_error='fail'\)$"):
        extract(data, out, **FAST, on_error="fail")
    assert out.read_bytes() == before
