"""featx.backbones: registry, -w resolution (torchvision names through the hub cache, files, none), safe weight
files and partial loading. No network: torchvision weights are files the tests write into a temporary hub cache."""
from __future__ import annotations

import hashlib
import os
import pickle
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import MobileNet_V3_Small_Weights, get_model, list_models

from featx.backbones import (
    CHECKPOINT_KEYS,
    OFFLINE_ENV,
    check_backbone,
    classifier_path,
    list_backbones,
    load_backbone,
    load_partial,
    read_weights_file,
    sha256_file,
)
from featx.errors import FeatxError
from featx.taps import is_channels_last
from featx.preprocess import TransformSpec

SMALL = "mobilenet_v3_small"
SMALL_WEIGHTS = MobileNet_V3_Small_Weights.IMAGENET1K_V1
SMALL_FILE = os.path.basename(SMALL_WEIGHTS.url)



@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads are off unless a test turns them back on."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return tmp_path / "hub" / "checkpoints"


def seeded(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return get_model(name, weights=None, **kwargs).eval()


def skeleton(name: str) -> nn.Module:
    """The architecture, without parameter data where it can (meta device): enough for structure-only checks."""
    try:
        with torch.device("meta"):
            return get_model(name, weights=None)
    except NotImplementedError:  # an initialiser that reads values (regnet)
        return get_model(name, weights=None)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Trap:
    """Unpickling this creates a folder: proof that pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --- registry ---------------------------------------------------------------------------------------------------


def test_list_backbones_is_sorted_classification_only():
    names = list_backbones()
    assert names == sorted(names)
    assert {"resnet50", "vit_b_16", "swin_t", "efficientnet_b0"} <= set(names)
    others = set()
    for module in (torchvision.models.detection, torchvision.models.segmentation, torchvision.models.video,
                   torchvision.models.optical_flow, torchvision.models.quantization):
        others |= set(list_models(module=module))
    assert others and not others & set(names)


def test_unknown_backbone_suggests_close_names():
    check_backbone("resnet50")
    with pytest.raises(FeatxError) as err:
        check_backbone("resnet5")
    msg = str(err.value)
    assert msg.startswith("unknown backbone 'resnet5': did you mean resnet50")
    assert msg.endswith(" (featx.backbones.list_backbones() / `featx layers --list` names them all)")
    assert "\n" not in msg
    with pytest.raises(FeatxError, match=r"^unknown backbone 'nothing_like_it' \(featx\.backbones\.list_backbones"):
        load_backbone("nothing_like_it", "none")


# --- -w none ----------------------------------------------------------------------------------------------------


def test_none_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = load_backbone("resnet18", "none")
    second = load_backbone("resnet18", "none")
    assert torch.equal(torch.get_rng_state(), state)
    assert same_params(first.model, second.model)
    assert not first.model.training
    assert (first.weights_id, first.weights_sha256, first.load_report, first.meta) == ("none", None, None, {})
    assert first.transform == TransformSpec()


def test_num_classes_replaces_the_classifier():
    bb = load_backbone(SMALL, "none", num_classes=7)
    assert bb.model.classifier[3].out_features == 7
    assert same_params(bb.model, load_backbone(SMALL, "none", num_classes=7).model)
    assert bb.model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


# --- torchvision weights names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", ["DEFAULT", "IMAGENET1K_V1", "imagenet1k_v1", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"]
)
def test_weights_name_offline_says_which_file_to_put_where(hub, weights):
    with pytest.raises(FeatxError) as err:
        load_backbone(SMALL, weights)
    msg = str(err.value)
    assert f"weights {SMALL} IMAGENET1K_V1 are not in torchvision's cache" in msg
    assert f"put {SMALL_FILE} (from {SMALL_WEIGHTS.url}) into {hub}/" in msg
    assert "weights='path/to/weights.pth'" in msg and "\n" not in msg


def test_failed_download_gives_the_same_message(hub, monkeypatch):
    calls = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise URLError("no route to host")

    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FeatxError, match=f"cannot be downloaded \\(offline\\?\\): put {SMALL_FILE}"):
        load_backbone(SMALL, "DEFAULT")
    assert calls == [(SMALL_WEIGHTS.url, str(hub / SMALL_FILE), SMALL_FILE.split("-")[1].split(".")[0])]


@pytest.mark.parametrize(
    "weights, expected",
    [
        ("IMAGENET1K_V3", f"weights='IMAGENET1K_V3': not a weights name of {SMALL}: expected one of IMAGENET1K_V1, DEFAULT"),
        ("ResNet50_Weights.IMAGENET1K_V2", f"weights='ResNet50_Weights.IMAGENET1K_V2': those weights are not for {SMALL}"),
    ],
)
def test_bad_weights_names(hub, weights, expected):
    with pytest.raises(FeatxError) as err:
        load_backbone(SMALL, weights)
    assert str(err.value).startswith(expected)


def test_cached_torchvision_weights_load_with_their_transform(hub):
    hub.mkdir(parents=True)
    trained = seeded(SMALL, 5)
    torch.save(trained.state_dict(), hub / SMALL_FILE)
    bb = load_backbone(SMALL, "DEFAULT")
    assert same_params(bb.model, trained)
    assert bb.weights_id == "IMAGENET1K_V1"
    assert bb.weights_sha256 == hashlib.sha256((hub / SMALL_FILE).read_bytes()).hexdigest()
    assert bb.transform == TransformSpec(resize=256, crop=224, interpolation="bilinear")
    assert bb.load_report is None and not bb.model.training
    assert load_backbone(SMALL, "IMAGENET1K_V1", num_classes=3).model.classifier[3].out_features == 3


def test_cached_file_with_pickled_code_is_refused(hub, tmp_path):
    hub.mkdir(parents=True)
    ran = tmp_path / "ran"
    torch.save({"features.0.0.weight": _Trap(ran)}, hub / SMALL_FILE)
    with pytest.raises(FeatxError, match="weights_only=True"):
        load_backbone(SMALL, "DEFAULT")
    assert not ran.exists()


# --- weight files -----------------------------------------------------------------------------------------------


def test_partial_loading_reports_every_key():
    """The PyTorch transfer-learning tutorial's recipe: pretrained weights into a model with a new head and an extra module."""
    source = seeded("resnet18", 1).state_dict()
    source["aux.weight"] = torch.ones(3)
    model = seeded("resnet18", 2, num_classes=10)
    model.extra = nn.Linear(512, 5)
    fc_before = model.fc.weight.detach().clone()
    report = load_partial(model, source, source="pretrained.pth")
    body = [k for k in seeded("resnet18", 0).state_dict() if not k.startswith("fc.")]
    assert report.matched == body
    assert report.missing == ["extra.weight", "extra.bias"]
    assert report.unexpected == ["aux.weight"]
    fc = ["fc.weight: file (1000, 512) vs model (10, 512)", "fc.bias: file (1000,) vs model (10,)"]
    assert report.mismatched == fc
    counts = f"{len(body)} matched, 2 missing, 1 unexpected, 2 shape-mismatched"
    assert report.summary() == f"weights pretrained.pth: {counts}"
    assert report.details().splitlines() == [
        "missing (2):", "  extra.weight", "  extra.bias",
        "unexpected (1):", "  aux.weight",
        "shape-mismatched (2):", *(f"  {line}" for line in fc),
    ]
    assert torch.equal(model.conv1.weight, source["conv1.weight"])
    assert torch.equal(model.fc.weight, fc_before)


def test_details_are_truncated():
    report = load_partial(nn.Linear(2, 2), {f"k{i}": torch.zeros(1) for i in range(25)})
    lines = report.details().splitlines()
    assert lines[-1] == "  ... and 15 more" and "unexpected (25):" in lines
    assert load_partial(nn.Linear(2, 2), nn.Linear(2, 2).state_dict()).details() == "every key matched"


@pytest.mark.parametrize("key", CHECKPOINT_KEYS)
def test_checkpoints_are_unwrapped_and_dataparallel_prefix_removed(tmp_path, key):
    state = nn.Linear(3, 2).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({key: {f"module.{k}": v for k, v in state.items()}, "epoch": 4, "featx": {"classes": ["a"]}}, path)
    loaded, meta = read_weights_file(path)
    assert list(loaded) == ["weight", "bias"] and torch.equal(loaded["weight"], state["weight"])
    assert meta == {"classes": ["a"]}
    assert read_weights_file(path)[0].keys() == loaded.keys()


def test_plain_state_dict_has_no_meta(tmp_path):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    assert read_weights_file(tmp_path / "w.pt")[1] == {}


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: torch.save([1, 2], p), "is not a state dict: expected a dict of tensors or a checkpoint"),
        (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), "is not a state dict"),
        (lambda p: p.write_text("not weights at all\n"), "not a PyTorch weights file"),
        (lambda p: p.write_bytes(pickle.dumps([1, 2])), "not a plain state dict or checkpoint that torch.load("),
        (lambda p: None, "no such file"),
    ],
)
def test_files_that_are_not_state_dicts(tmp_path, write, expected):
    path = tmp_path / "x.pth"
    write(path)
    with pytest.raises(FeatxError) as err:
        read_weights_file(path)
    assert expected in str(err.value) and str(err.value).startswith(f"weights='{path}'") and "\n" not in str(err.value)


def test_pickled_code_is_never_executed(tmp_path):
    ran = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "trap": _Trap(ran)}, path)
    with pytest.raises(FeatxError, match="weights_only=True"):
        read_weights_file(path)
    assert not ran.exists()


@pytest.mark.parametrize("write", [
    lambda p, trap: p.write_bytes(pickle.dumps({"weight": trap})),  # plain pickle.dump, not a zip
    lambda p, trap: torch.save({"weight": trap}, p, _use_new_zipfile_serialization=False),  # legacy torch.save
    lambda p, trap: p.write_bytes(pickle.dumps({"weight": trap}, protocol=2)),
])
def test_non_zip_pickle_with_objects_is_one_clear_line(tmp_path, write):
    ran = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    write(path, _Trap(ran))
    with pytest.raises(FeatxError) as err:
        read_weights_file(path)
    message = str(err.value)
    assert message.startswith(f"weights='{path}': not a plain state dict or checkpoint that torch.load(weights_only=True) "
                              "can read") and "\n" not in message, message
    assert message.endswith("featx never unpickles arbitrary objects: save model.state_dict() with torch.save")
    assert "weights_only=False" not in message and not ran.exists()


def test_finetuned_file_loads_with_its_head_transform_and_meta(tmp_path):
    """A featx finetune model.pt: {'model': state dict, 'featx': {...}} with a 4-class head."""
    trained = seeded("resnet18", 3, num_classes=4)
    spec = TransformSpec(resize=72, crop=64)
    featx_meta = {"backbone": "resnet18", "transform": spec.to_dict(), "classes": list("abcd")}
    path = tmp_path / "model.pt"
    torch.save({"model": trained.state_dict(), "featx": featx_meta}, path)
    bb = load_backbone("resnet18", str(path))
    assert same_params(bb.model, trained)
    assert (bb.weights_id, bb.transform, bb.meta) == ("file:model.pt", spec, featx_meta)
    assert bb.weights_sha256 == sha256_file(path)
    n = len(trained.state_dict())
    assert bb.load_report.summary() == f"weights model.pt: {n} matched, 0 missing, 0 unexpected, 0 shape-mismatched"

    imagenet_head = load_backbone("resnet18", str(path), num_classes=1000)
    assert [m.split(":")[0] for m in imagenet_head.load_report.mismatched] == ["fc.weight", "fc.bias"]
    assert torch.equal(imagenet_head.model.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)


def test_file_for_another_backbone_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict(), "featx": {"backbone": "resnet50"}}, path)
    with pytest.raises(FeatxError, match="trained from backbone resnet50, not backbone='resnet18' \\(drop backbone to use resnet50\\)"):
        load_backbone("resnet18", str(path))
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(FeatxError, match="none of its 2 tensors fit resnet18"):
        load_backbone("resnet18", str(path))


def test_missing_weights_path(tmp_path):
    with pytest.raises(FeatxError, match="no such file"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_sha256_follows_file_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert sha256_file(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"three")
    assert sha256_file(path) == hashlib.sha256(b"three").hexdigest()


# --- structure --------------------------------------------------------------------------------------------------

CLASSIFIERS = {
    "resnet18": "fc",
    "vgg11": "classifier.6",
    "mobilenet_v3_small": "classifier.3",
    "efficientnet_b0": "classifier.1",
    "convnext_tiny": "classifier.2",
    "densenet121": "classifier",
    "regnet_y_400mf": "fc",
    "googlenet": "fc",
    "vit_b_16": "heads.head",
    "swin_t": "head",
    "maxvit_t": "classifier.5",
}


@pytest.mark.filterwarnings("ignore:The default weight initialization")
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_path(name):
    assert classifier_path(skeleton(name)) == CLASSIFIERS[name]


def test_classifier_path_needs_a_linear_head():
    with pytest.raises(FeatxError, match="no nn.Linear classifier \\(its last layer is classifier.1\\)"):
        classifier_path(skeleton("squeezenet1_0"))


def test_channels_last_outputs_are_found_in_the_graph():
    swin = skeleton("swin_t")
    assert [is_channels_last(swin, t) for t in ("features.0.0", "features.0", "features.3", "norm")] == [
        False, True, True, True,
    ]
    assert [is_channels_last(swin, t) for t in ("permute", "avgpool", "flatten")] == [False, False, False]
    convnext = skeleton("convnext_tiny")
    assert is_channels_last(convnext, "features.1.0.block.3")  # between its block's two permutes
    assert not is_channels_last(convnext, "features.1")
    assert not is_channels_last(skeleton("resnet18"), "layer4")
