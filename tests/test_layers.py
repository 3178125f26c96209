"""featx.layers: taps, output shapes, usual taps (stages, penultimate, output), tap checks and the layers table."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from featx.backbones import load_backbone
from featx.errors import FeatxError
from featx.layer_table import describe_layers, format_layers_table
from featx.taps import activation_bytes, check_taps, penultimate_node, usual_taps, valid_taps



def zeros_model(name: str) -> nn.Module:
    """The architecture with all-zero parameters: shapes do not depend on values, and this skips slow inits."""
    try:
        with torch.device("meta"):
            model = get_model(name, weights=None)
        model = model.to_empty(device="cpu")
    except NotImplementedError:  # an initialiser that reads values (regnet)
        model = get_model(name, weights=None)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def resnet18():
    return load_backbone("resnet18", "none").model


def by_name(infos):
    return {info.name: info for info in infos}


def test_resnet18_rows_shapes_and_usual_marks(resnet18):
    infos = describe_layers(resnet18, image_size=64)
    rows = by_name(infos)
    assert [i.name for i in infos][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert [i.name for i in infos][-3:] == ["avgpool", "flatten", "fc"]
    assert rows["layer1"].shape == (64, 16, 16) and rows["layer4"].shape == (512, 2, 2)
    assert rows["avgpool"].shape == (512, 1, 1) and rows["flatten"].shape == (512,) and rows["fc"].shape == (1000,)
    assert (rows["layer4"].pooled_dim, rows["layer4"].bytes_per_image) == (512, 2048)
    assert (rows["layer3"].pooled_dim, rows["layer3"].bytes_per_image) == (256, 1024)
    stages = [i.name for i in infos if i.usual == "stage"]
    assert stages[-4:] == ["layer1", "layer2", "layer3", "layer4"]
    assert (rows["flatten"].usual, rows["fc"].usual, rows["avgpool"].usual) == ("penultimate", "output", "")
    assert "layer1.1" not in rows  # the same node as layer1: listed once, under the module name


def test_usual_taps_and_penultimate(resnet18):
    taps = usual_taps(resnet18)
    assert taps[-5:] == ["layer1", "layer2", "layer3", "layer4", "flatten"]
    assert penultimate_node(resnet18) == "flatten"


@pytest.mark.parametrize(
    "pooling, dim", [("avg", 512), ("gem", 512), ("avgmax", 1024), ("flatten", 2048), ("none", 2048)]
)
def test_pooling_sets_row_size(resnet18, pooling, dim):
    layer4 = by_name(describe_layers(resnet18, image_size=64, pooling=pooling))["layer4"]
    assert (layer4.pooled_dim, layer4.bytes_per_image) == (dim, 4 * dim)


def test_bad_pooling(resnet18):
    with pytest.raises(FeatxError, match="pooling='sum': expected one of avg, max"):
        describe_layers(resnet18, image_size=64, pooling="sum")


def test_include_all_lists_every_tensor_node(resnet18):
    infos = describe_layers(resnet18, image_size=64, include_all=True)
    names = [i.name for i in infos]
    assert names == valid_taps(resnet18)
    assert "layer1.0.conv1" in names and "layer4.1.relu_1" in names and "x" not in names
    marks = {i.name: i.usual for i in infos if i.usual}
    assert marks["layer4.1.relu_1"] == "stage" and marks["flatten"] == "penultimate" and marks["fc"] == "output"


def test_table_with_store_estimate(resnet18):
    infos = describe_layers(resnet18, image_size=64)
    lines = format_layers_table(infos, n_images=1000).splitlines()
    assert lines[0].split() == ["tap", "output", "shape", "row", "dim", "bytes/image", "(float32)", "store", "for",
                                "1,000", "images", "usual"]
    assert next(line for line in lines if line.startswith("layer4 ")).split() == [
        "layer4", "512x2x2", "512", "2,048", "2.0", "MB", "stage"]
    assert next(line for line in lines if line.startswith("fc ")).split() == [
        "fc", "1000", "1000", "4,000", "4.0", "MB", "output"]
    half = format_layers_table(infos, n_images=1000, dtype="float16").splitlines()
    assert next(line for line in half if line.startswith("layer4 ")).split()[3:6] == ["1,024", "1.0", "MB"]
    plain = format_layers_table(infos).splitlines()
    assert "store" not in plain[0] and len(plain) == len(infos) + 1
    with pytest.raises(FeatxError, match="dtype='int8'"):
        format_layers_table(infos, dtype="int8")


def test_check_taps(resnet18):
    check_taps(resnet18, ["layer1", "layer4.1.relu_1", "avgpool", "fc"])
    with pytest.raises(FeatxError) as err:
        check_taps(resnet18, ["xyzzy"])
    msg = str(err.value)
    assert msg.startswith("taps='xyzzy': unknown tap for resnet18; valid taps include conv1, bn1")
    every = (f"(featx.layers('resnet18', include_all=True) / `featx layers resnet18 --all` lists all "
             f"{len(valid_taps(resnet18))})")
    assert "layer4" in msg and every in msg


@pytest.mark.parametrize("typo, close", [
    ("avgpol", "avgpool"), ("layr3", "layer3"), ("layer4.1.relu1", "layer4.1.relu_1"), ("Flatten", "flatten"),
])
def test_unknown_tap_suggests_the_closest_names(resnet18, typo, close):
    with pytest.raises(FeatxError) as err:
        check_taps(resnet18, [typo])
    hint = str(err.value).split("(did you mean ", 1)[1].split("?)", 1)[0].split(", ")
    assert hint[0] == close and len(hint) <= 3


def test_activation_bytes_follow_the_graph():
    """input (3 maps) -> conv (8) -> relu (8) -> conv (4) -> pool -> flatten -> linear: at most two maps are alive
    at once, the largest pair being the conv's output and the relu's; a training forward keeps every one."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    plane = 224 * 224 * 4  # one float32 map at the reference size
    exact = activation_bytes(model, 224)
    assert exact.peak == (8 + 8) * plane
    assert exact.total == (3 + 8 + 8 + 4) * plane + (4 + 4 + 2) * 4
    doubled = activation_bytes(model, 448)  # maps grow with the area, rows do not
    assert doubled.peak == 4 * exact.peak and doubled.total == 4 * (3 + 8 + 8 + 4) * plane + (4 * 4 + 4 + 2) * 4
    assert model.training is False and activation_bytes(model.train(), 224) == exact and model.training


def test_two_names_for_one_node_are_refused(resnet18):
    """torchvision would return a wrong tensor for one of them (each output node serves one name)."""
    same = "taps=\\['layer4', 'layer4.1'\\] are the same node of resnet18 \\(layer4.1.relu_1\\)"
    with pytest.raises(FeatxError, match=same):
        check_taps(resnet18, ["layer4", "layer4.1"])


def test_image_too_small_for_the_model():
    with pytest.raises(FeatxError, match="image_size=16: SqueezeNet cannot run on 16x16 images \\(Given input"):
        describe_layers(zeros_model("squeezenet1_0"), image_size=16)


def spatial(info):
    return info.shape[:2] if info.channels_last else info.shape[1:]


def check_usual(model, penultimate, output):
    """Stages precede the penultimate node, in forward order, each at a lower or equal resolution (at 224 px, the
    size usual taps are decided at: smaller inputs can be upsampled by a fixed-size pool, as VGG's avgpool does)."""
    infos = describe_layers(model, image_size=224)
    names = [i.name for i in infos]
    stages = [i for i in infos if i.usual == "stage"]
    assert len(stages) >= 3
    assert [spatial(s) for s in stages] == sorted((spatial(s) for s in stages), reverse=True)
    assert by_name(infos)[penultimate].usual == "penultimate" and by_name(infos)[output].usual == "output"
    taps = usual_taps(model)
    assert taps == [s.name for s in stages] + [penultimate]
    assert [names.index(t) for t in taps] == sorted(names.index(t) for t in taps)
    check_taps(model, taps)
    return stages


@pytest.mark.parametrize(
    "name, penultimate, output, last_stage",
    [
        ("mobilenet_v3_small", "classifier.2", "classifier.3", "features"),
        ("efficientnet_b0", "classifier.0", "classifier.1", "features"),
        ("vgg11", "classifier.5", "classifier.6", "avgpool"),
        ("densenet121", "flatten", "classifier", "features"),
        ("convnext_tiny", "classifier.1", "classifier.2", "features"),
        ("regnet_y_400mf", "flatten", "fc", "trunk_output"),
    ],
)
def test_usual_taps_across_families(name, penultimate, output, last_stage):
    stages = check_usual(zeros_model(name), penultimate, output)
    assert stages[-1].name == last_stage


@pytest.mark.slow
def test_vit_tokens_and_class_token():
    model = zeros_model("vit_b_16")
    with pytest.raises(FeatxError, match="image_size=64: VisionTransformer takes 224x224 images only"):
        describe_layers(model, image_size=64)
    rows = by_name(describe_layers(model, image_size=224))
    assert rows["encoder.layers.encoder_layer_11"].shape == (197, 768)
    assert rows["encoder.layers.encoder_layer_11"].pooled_dim == 768
    penultimate = penultimate_node(model)
    assert penultimate.startswith("getitem") and rows[penultimate].shape == (768,)
    assert rows[penultimate].usual == "penultimate" and rows["heads.head"].usual == "output"
    assert usual_taps(model) == [penultimate]


@pytest.mark.slow
def test_swin_channels_last_stages():
    model = zeros_model("swin_t")
    stages = check_usual(model, "flatten", "head")
    assert [s.name for s in stages] == ["features.1", "features.3", "features.5", "norm"]
    assert all(s.channels_last for s in stages)
    norm = stages[-1]
    assert (norm.shape, norm.pooled_dim) == ((7, 7, 768), 768)
    assert "(HWC)" in format_layers_table([norm])
