"""timm backbones (-b timm/<name>) and --weights-match order, on timm's tiny test_efficientnet with random or
test-made weights and tiny images: registry and transform, order matching, extract / layers / fit-head / predict /
finetune, the match mode through store, head and run configs, one-line errors, and a missing timm. No network."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from featx.backbones import LoadReport, check_backbone, list_backbones, load_backbone  # noqa: E402
from featx.errors import FeatxError  # noqa: E402
from featx.extract_request import extract_options_from_config  # noqa: E402
from featx.extraction import extract  # noqa: E402
from featx.heads import fit_head, load_head, predict  # noqa: E402
from featx.preprocess import IMAGENET_MEAN, IMAGENET_STD, TransformSpec  # noqa: E402
from featx.store import open_store  # noqa: E402
from cli_support import invoke as featx  # noqa: E402
from imagegen import make_image_folder  # noqa: E402

NAME = "timm/test_efficientnet"
ARCH = "test_efficientnet"
FAST = ("--image-size", "32", "--workers", "0", "--precision", "fp32", "--device", "cpu", "-q")


def renamed_file(path, seed=1, drop_last=False):
    """A seeded test_efficientnet's state dict under other keys (another implementation's names), saved to path;
    returns the original tensors in the model's names."""
    torch.manual_seed(seed)
    own = timm.create_model(ARCH, pretrained=False).state_dict()
    items = list(own.items())[:-1] if drop_last else list(own.items())
    torch.save({f"_other{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in enumerate(items)}, path)
    return own


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("timm") / "data", per_class=4, size=(36, 36))


@pytest.fixture(scope="module")
def lite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "other.pth"
    return path, renamed_file(path)


# --- registry and transform ---------------------------------------------------------------------------------------

def test_timm_names_are_listed_and_checked_with_close_names():
    assert NAME in list_backbones() and "resnet50" in list_backbones()
    check_backbone(NAME)
    with pytest.raises(FeatxError, match=r"unknown backbone 'timm/test_efficientnt': did you mean timm/test_efficientnet"):
        check_backbone("timm/test_efficientnt")
    with pytest.raises(FeatxError, match=r"a pretrained tag goes into the weights: backbone='timm/test_efficientnet' weights='r160_in1k'"):
        check_backbone("timm/test_efficientnet.r160_in1k")
    with pytest.raises(FeatxError, match=r"unknown backbone 'test_efficientnet': it is a timm model, backbone='timm/test_eff"):
        check_backbone("test_efficientnet")


def test_random_timm_backbone_is_seeded_with_the_pretrained_config_transform():
    first, second = load_backbone(NAME, "none"), load_backbone(NAME, "none")
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = timm.data.resolve_data_config({}, model=first.model)
    assert cfg["input_size"] == (3, 160, 160) and cfg["crop_pct"] == 0.95  # timm's config of the test model
    assert first.transform == TransformSpec(168, 160, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert first.versions == {"timm": timm.__version__} and first.weights_id == "none"
    assert not first.model.training


def test_num_classes_goes_through_reset_classifier():
    bb = load_backbone(NAME, "none", num_classes=3)
    assert bb.model.get_classifier().out_features == 3 and bb.model.num_classes == 3
    assert bb.model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


# --- weights by position ------------------------------------------------------------------------------------------

def test_order_matching_of_a_renamed_file_gives_bitwise_equal_tensors(lite_file):
    path, own = lite_file
    bb = load_backbone(NAME, str(path), match="order")
    loaded = bb.model.state_dict()
    weights = [k for k in own if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(loaded[k], own[k]) for k in weights)
    assert isinstance(bb.load_report, LoadReport) and bb.weights_match == "order"
    assert bb.load_report.summary() == f"weights other.pth: {len(weights)}/{len(weights)} tensors loaded by position"
    with pytest.raises(FeatxError, match="none of its .* tensors fit .*weights_match='order'"):
        load_backbone(NAME, str(path))


def test_order_matching_refuses_another_architecture_naming_the_first_pair(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(FeatxError) as err:
        load_backbone(NAME, str(tmp_path / "resnet.pth"), match="order")
    msg = str(err.value)
    assert "\n" not in msg and "weights_match='order': tensor 1 of " in msg
    assert "file conv1.0.weight (" in msg and "vs model conv_stem.weight (24, 3, 3, 3)" in msg


def test_order_matching_refuses_a_file_with_fewer_tensors(tmp_path):
    renamed_file(tmp_path / "short.pth", drop_last=True)
    with pytest.raises(FeatxError, match=r"the file has \d+ tensors and the model \d+ .* model classifier.bias"):
        load_backbone(NAME, str(tmp_path / "short.pth"), match="order")


def test_order_needs_a_weights_file():
    with pytest.raises(FeatxError, match="weights_match='order': pairs the tensors of a weights file \\(weights='FILE'\\), not weights='none'"):
        load_backbone(NAME, "none", match="order")
    with pytest.raises(FeatxError, match="weights_match='position': expected one of name, order"):
        load_backbone(NAME, "none", match="position")


def test_safetensors_file_loads_by_name(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    own = timm.create_model(ARCH, pretrained=False).state_dict()
    save_file(own, tmp_path / "model.safetensors")
    bb = load_backbone(NAME, str(tmp_path / "model.safetensors"))
    assert not bb.load_report.missing and all(torch.equal(bb.model.state_dict()[k], own[k]) for k in own)


# --- pretrained tags through timm's cache ---------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache; downloads are off."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("FEATX_OFFLINE", "1")
    return tmp_path / "hf"


def test_pretrained_tag_missing_offline_names_the_file_and_folder(hf_cache):
    with pytest.raises(FeatxError) as err:
        load_backbone(NAME, "DEFAULT")
    msg = str(err.value)
    assert "\n" not in msg and "weights timm/test_efficientnet r160_in1k are not in timm's Hugging Face cache" in msg
    assert "https://huggingface.co/timm/test_efficientnet.r160_in1k" in msg and "and pass weights='path/to/model.safetensors'" in msg
    assert f"{hf_cache}/models--timm--test_efficientnet.r160_in1k/" in msg


def test_a_failed_download_is_the_same_one_line(hf_cache, monkeypatch):
    import featx.backbones.timm as source

    create = timm.create_model

    def no_network(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.delenv("FEATX_OFFLINE")
    monkeypatch.setattr(source, "_hub_reachable", lambda: True)
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(FeatxError, match="r160_in1k are not in timm's Hugging Face cache and cannot be downloaded"):
        load_backbone(NAME, "DEFAULT")


def test_pretrained_tag_from_the_cache_and_unknown_tags(hf_cache):
    from safetensors.torch import save_file

    snapshot = hf_cache / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    torch.manual_seed(5)
    own = timm.create_model(ARCH, pretrained=False).state_dict()
    save_file(own, snapshot / "model.safetensors")
    for tag in ("DEFAULT", "r160_in1k"):
        bb = load_backbone(NAME, tag)
        assert bb.weights_id == "r160_in1k" and bb.weights_sha256 and bb.load_report is None
        assert all(torch.equal(bb.model.state_dict()[k], own[k]) for k in own)
    with pytest.raises(FeatxError, match="weights='in22k': not a pretrained tag of timm/test_efficientnet: expected one of "
                                         "DEFAULT, r160_in1k"):
        load_backbone(NAME, "in22k")


# --- commands -------------------------------------------------------------------------------------------------

def test_layers_lists_timm_taps_and_the_order_report(lite_file):
    path, _ = lite_file
    out = featx("layers", NAME, "-w", path, "--weights-match", "order", "--image-size", "64")
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert lines["global_pool.flatten"].split()[1:] == ["256", "256", "1,024", "penultimate"]
    assert lines["blocks.1"].split()[-1] == "stage" and lines["classifier"].split()[-1] == "output"
    assert "tensors loaded by position" in out.stderr


def test_store_head_and_predict_keep_the_match_mode(data, lite_file, tmp_path):
    path, _ = lite_file
    store = tmp_path / "s.h5"
    out = featx("extract", data, "-b", NAME, "-w", path, "--weights-match", "order", *FAST, "-o", store)
    assert out.exit_code == 0, out.output
    assert "tensors loaded by position" in out.stderr
    with open_store(store) as st:
        config = st.config
        assert st.taps == ["global_pool.flatten"] and st.features("global_pool.flatten").shape == (8, 256)
    assert config["weights_match"] == "order" and config["backbone"] == NAME and config["timm"] == timm.__version__
    assert extract_options_from_config(config)["weights_match"] == "order"
    head = fit_head(store, output=tmp_path / "head", grid="1", plots=False)
    assert load_head(tmp_path / "head").config["weights_match"] == "order"
    result = predict(tmp_path / "head", data, workers=0, device="cpu")
    assert len(result) == 8
    with open_store(next((tmp_path / "head" / "cache").glob("*.h5"))) as cache:
        assert cache.config["weights_match"] == "order"
    assert head.config["weights_sha256"] == cache.config["weights_sha256"]


def test_match_mode_is_part_of_the_store_identity(data, tmp_path):
    torch.manual_seed(2)
    torch.save(timm.create_model(ARCH, pretrained=False).state_dict(), tmp_path / "own.pth")
    common = dict(backbone=NAME, weights=str(tmp_path / "own.pth"), image_size=32, workers=0, precision="fp32",
                  device="cpu")
    by_name = extract(data, tmp_path / "a.h5", **common)
    by_order = extract(data, tmp_path / "b.h5", weights_match="order", **common)
    with open_store(by_name.store_path) as a, open_store(by_order.store_path) as b:
        assert (a.features(a.taps[0]) == b.features(b.taps[0])).all()  # the same tensors, however paired
        assert a.config_key != b.config_key
    with pytest.raises(FeatxError, match="was made with another config"):
        extract(data, tmp_path / "a.h5", weights_match="order", **common)


def test_finetune_a_timm_backbone_from_order_matched_weights(data, lite_file, tmp_path):
    path, _ = lite_file
    run = tmp_path / "run"
    out = featx("finetune", data, "-b", NAME, "-w", path, "--weights-match", "order", "--epochs", "1",
                "--batch-size", "3", "--freeze", "backbone", *FAST, "-o", run)
    assert out.exit_code == 0, out.output
    config = json.loads((run / "config.json").read_text())
    assert config["weights_match"] == "order" and config["classifier"] == "classifier"
    meta = torch.load(run / "model.pt", weights_only=True)["featx"]
    assert meta["weights_match"] == "order" and meta["num_classes"] == 2
    bb = load_backbone(NAME, str(run / "model.pt"))
    assert not bb.load_report.missing and bb.model.get_classifier().out_features == 2
    again = load_backbone(NAME, str(run / "model.pt"), match="order")
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in bb.model.state_dict().items())


@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_bad_weights_are_one_line_and_touch_no_output(command, data, tmp_path):
    renamed_file(tmp_path / "short.pth", drop_last=True)
    target = tmp_path / ("out.h5" if command == "extract" else "run")
    out = featx(command, data, "-b", NAME, "-w", tmp_path / "short.pth", "--weights-match", "order", *FAST,
                "-o", target)
    assert out.exit_code == 2 and out.stderr.count("\n") == 1 and "featx: error: -w " in out.stderr
    assert not target.exists()
    out = featx(command, data, "-b", "timm/no_such_net", "-w", "none", *FAST, "-o", target)
    assert out.exit_code == 2 and "unknown backbone 'timm/no_such_net'" in out.stderr and not target.exists()


# --- timm stays optional --------------------------------------------------------------------------------------

def test_without_timm_a_timm_backbone_is_one_line_naming_the_extra(data, tmp_path):
    """Blocks the timm import in a fresh interpreter: torchvision backbones still work and never import timm."""
    script = f"""
import sys
sys.modules["timm"] = None  # import timm raises ImportError
from click.testing import CliRunner
from featx.backbones import list_backbones, load_backbone
from featx.cli import main
load_backbone("resnet18", "none")
assert "timm/test_efficientnet" not in list_backbones() and "resnet18" in list_backbones()
out = CliRunner().invoke(main, ["extract", {str(data)!r}, "-b", "{NAME}", "-w", "none", "-o", {str(tmp_path / 'x.h5')!r}])
print(out.exit_code, out.stderr, end="")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("2 featx: error: timm backbones (-b timm/...) need timm, which is not installed: "
                           "pip install featx[timm]\n")
    assert not (tmp_path / "x.h5").exists()


def test_torchvision_path_does_not_import_timm():
    script = ("import sys, featx.backbones as b; b.load_backbone('resnet18', 'none'); b.check_backbone('resnet18'); "
              "print('timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
