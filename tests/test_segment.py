"""Segmentation: masks source and its bad input, decoder on a truncated backbone, metrics, loss, finetune --task
segment (files, resume, freezing) and the dense probe on cached maps (fit-head, evaluate, predict) on generated
pairs with random-init backbones."""
from __future__ import annotations

import importlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.backbones import load_backbone
from featx.errors import FeatxError
from featx.finetuning.checkpoint import load_checkpoint
from featx.segment.metrics import confusion, summarize
from featx.segment.model import build_segmenter, default_tap, parse_decoder, pyramid_taps
from featx.segment.probe import fit_dense_probe, load_segment_head, predict_dense
from featx.segment.source import IGNORE, load_mask_source
from featx.finetuning.segment import SegmentLoss
from featx.sources import load_source
from cli_support import featx as _cli
from maskgen import make_mask_folder

FAST = dict(backbone="resnet18", weights="none", image_size=64, batch_size=4, workers=0, precision="fp32",
            device="cpu", task="segment", decoder="conv:8", epochs=2, augment="default")
COMPARED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_miou", "val_dice", "train_miou")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mask_folder(tmp_path_factory.mktemp("seg") / "data", instances=True)


# ---- the masks source ---------------------------------------------------------------------------------------------

def test_layouts_binary_and_inferred_classes(data, tmp_path):
    source = load_mask_source(data)
    assert len(source.pairs) == 12 and {p.split for p in source.pairs} == {"train", "val"}
    assert source.num_classes == max(int(np.asarray(Image.open(p.mask)).max()) for p in source.pairs) >= 2
    binary = load_mask_source(data, binary=True)
    assert binary.classes == ["background", "foreground"] and binary.n_outputs == 1
    flat = make_mask_folder(tmp_path / "flat", splits={"": 3}, n_classes=2)
    assert [p.split for p in load_mask_source(flat).pairs] == ["", "", ""]
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask,split\n" + "".join(f"flat/images/p00{i}.png,flat/masks/p00{i}.png,train\n"
                                                  for i in range(3)))
    assert len(load_mask_source(csv, num_classes=2).pairs) == 3
    # extract sees the images of a masks folder, not its masks
    images = load_source(data)
    assert len(images.items) == 12 and all("/images/" in item.relpath for item in images.items)


def _copy(data, tmp_path):
    import shutil

    return shutil.copytree(data, tmp_path / "data")


def test_missing_mask_names_the_image(data, tmp_path):
    root = _copy(data, tmp_path)
    (root / "train" / "masks" / "p002.png").unlink()
    with pytest.raises(FeatxError, match=r"p002\.png: no mask for this image .*1 of 8 images"):
        load_mask_source(root)


def test_mask_of_another_size_names_the_file(data, tmp_path):
    root = _copy(data, tmp_path)
    Image.new("L", (10, 10)).save(root / "val" / "masks" / "p001.png")
    with pytest.raises(FeatxError, match=r"masks/p001\.png: mask is 10x10 but its image .* is 48x40"):
        load_mask_source(root)


def test_values_above_num_classes_and_colour_masks(data, tmp_path):
    with pytest.raises(FeatxError, match=r"mask value \d+ is above .*num_classes=1 allows ids 0\.\.1\); pass binary=True .* a larger num_classes$"):
        load_mask_source(data, num_classes=1)
    root = _copy(data, tmp_path)
    colours = np.zeros((40, 48, 3), dtype=np.uint8)
    colours[5:10, 5:10] = (200, 10, 10)
    Image.fromarray(colours, "RGB").save(root / "train" / "masks" / "p000.png")
    with pytest.raises(FeatxError, match=r"p000\.png: an RGB colour mask where class ids are expected"):
        load_mask_source(root, binary=True)
    grey = np.repeat(np.asarray(Image.open(data / "train" / "masks" / "p000.png"))[..., None], 3, axis=2)
    Image.fromarray(grey, "RGB").save(root / "train" / "masks" / "p000.png")  # ids saved as grey RGB: accepted
    assert len(load_mask_source(root, binary=True).pairs) == 12


def test_an_undecodable_mask_leaves_its_pair_out(data, tmp_path):
    root = _copy(data, tmp_path)
    (root / "train" / "masks" / "p003.png").write_bytes(b"not a png")
    source = load_mask_source(root, binary=True)
    assert len(source.pairs) == 11 and source.failed[0][0] == "train/images/p003.png"


def test_cli_bad_input_is_one_line_exit_2(data, tmp_path):
    root = _copy(data, tmp_path)
    (root / "val" / "masks" / "p000.png").unlink()
    out = _cli("finetune", root, "--task", "segment", "-b", "resnet18", "-w", "none", "-o", tmp_path / "run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "p000.png: no mask" in out.stderr
    out = _cli("finetune", data, "--task", "segment", "--num-classes", "1", "-b", "resnet18", "-w", "none",
               "-o", tmp_path / "run2")
    assert out.returncode == 2 and "above the class ids expected" in out.stderr and out.stderr.count("\n") == 1
    out = _cli("finetune", data, "--tap", "layer3", "-b", "resnet18", "-w", "none", "-o", tmp_path / "run3")
    assert out.returncode == 2 and "need --task segment" in out.stderr
    out = _cli("finetune", data, "--task", "segment", "--binary", "--tap", "x", "-b", "resnet18", "-w", "none",
               "--image-size", "64", "--batch-size", "4", "-o", tmp_path / "run4")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--tap x: too shallow for the decoder" in out.stderr


# ---- model, metrics, loss ---------------------------------------------------------------------------------------

def test_decoder_shapes_names_and_taps():
    model = load_backbone("resnet18", "none").model
    assert default_tap(model) == "layer4"
    net = build_segmenter(model, "layer3", parse_decoder("conv:16"), 3, 64, "resnet18")
    assert net(torch.zeros(2, 3, 64, 80)).shape == (2, 3, 64, 80)
    names = [n for n, _ in net.named_parameters()]
    assert names[0] == "conv1.weight" and not any(n.startswith("layer4") for n in names)
    assert [n for n in names if n.startswith("decoder")] == ["decoder.conv.weight", "decoder.conv.bias",
                                                              "decoder.classify.weight", "decoder.classify.bias"]
    linear = build_segmenter(model, "layer2", parse_decoder("linear"), 1, 64, "resnet18")
    assert [n for n, _ in linear.decoder.named_parameters()] == ["classify.weight", "classify.bias"]
    with pytest.raises(FeatxError, match=r"tap='x': too shallow for the decoder"):
        build_segmenter(model, "x", parse_decoder("linear"), 1, 64, "resnet18")
    with pytest.raises(FeatxError, match=r"tap='flatten': gives \(512,\) per image, not a spatial map"):
        build_segmenter(model, "flatten", parse_decoder("linear"), 1, 64, "resnet18")
    with pytest.raises(FeatxError, match=r"map is 1x1 at 32x32 inputs, too coarse"):
        build_segmenter(model, "layer4", parse_decoder("linear"), 1, 32, "resnet18")
    with pytest.raises(FeatxError, match=r"tap='layer9': unknown tap for resnet18"):
        build_segmenter(model, "layer9", parse_decoder("linear"), 1, 64, "resnet18")
    with pytest.raises(FeatxError, match=r"decoder='conv'"):
        parse_decoder("conv")


def test_pyramid_decoder_fuses_the_stage_maps():
    model = load_backbone("resnet18", "none").model
    assert pyramid_taps(model) == ["layer1", "layer2", "layer3", "layer4"]
    net = build_segmenter(model, None, parse_decoder("fpn:16"), 2, 64, "resnet18")
    assert net(torch.zeros(2, 3, 64, 80)).shape == (2, 2, 64, 80)
    decoder = dict(net.decoder.named_parameters())
    assert [decoder[f"lateral.{i}.weight"].shape[1] for i in range(4)] == [64, 128, 256, 512]  # finest first
    assert decoder["smooth.weight"].shape == (16, 16, 3, 3) and decoder["classify.weight"].shape == (2, 16, 1, 1)
    # the taps' order on the command line does not matter: the decoder takes them finest first
    two = build_segmenter(model, ["layer3", "layer1"], parse_decoder("fpn:8"), 1, 64, "resnet18")
    assert [two.decoder.lateral[i].weight.shape[1] for i in range(2)] == [64, 256]
    assert not any(name.startswith("layer4") for name, _ in two.named_parameters())
    # every tap reaches the logits: a change in the finest map changes them
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = two(image)
        two.decoder.lateral[0].weight.add_(1.0)
        assert not torch.allclose(before, two(image))


@pytest.mark.parametrize("taps, decoder, message", [
    (["layer1"], "fpn:8", r"decoder='fpn:8' with one tap='layer1': a pyramid fuses two or more taps; give tap once"),
    (["layer1", "layer2"], "conv:8", r"decoder='conv:8' reads one tap, got tap=\['layer1', 'layer2'\]: keep one, or use "
                                     r"decoder='fpn:WIDTH'"),
    (["layer2", "layer2"], "fpn:8", r"tap='layer2' given twice"),
    (["layer1", "layer1.1"], "fpn:8", r"tap=\['layer1', 'layer1.1'\] are the same node"),
    (["layer1", "flatten"], "fpn:8", r"tap='flatten': gives \(512,\) per image, not a spatial map"),
    (["layer1", "layer9"], "fpn:8", r"tap='layer9': unknown tap for resnet18"),
])
def test_pyramid_tap_mistakes(taps, decoder, message):
    with pytest.raises(FeatxError, match=message):
        build_segmenter(load_backbone("resnet18", "none").model, taps, parse_decoder(decoder), 1, 64, "resnet18")


def test_pyramid_cli_mistakes_are_one_line_exit_2(data, tmp_path):
    base = ("finetune", data, "--task", "segment", "--binary", "-b", "resnet18", "-w", "none", "--image-size", "64")
    for extra, message in ((("--decoder", "fpn:0"), "--decoder fpn:0: expected"),
                           (("--decoder", "fpn:8", "--tap", "layer2"), "--decoder fpn:8 with one --tap layer2: a pyramid "
                                                                       "fuses two or more taps; give --tap once"),
                           (("--tap", "layer2", "--tap", "layer3"), "--decoder conv:256 reads one tap, got --tap layer2 "
                                                                    "--tap layer3: keep one, or use --decoder fpn:WIDTH")):
        out = _cli(*base, *extra, "-o", tmp_path / "run")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()


def test_pyramid_decoder_learns_masks_and_records_its_taps(tmp_path):
    data = make_mask_folder(tmp_path / "data", splits={"train": 16, "val": 6}, seed=3)
    truth = [np.asarray(Image.open(p)) > 0 for p in sorted((data / "val" / "masks").iterdir())]
    all_background = np.mean([1 - t.mean() for t in truth]) / 2  # mean IoU of predicting background everywhere
    options = {**FAST, "decoder": "fpn:16", "epochs": 4, "augment": "none"}
    result = featx.finetune(data, tmp_path / "run", binary=True, freeze="backbone", optimizer="adam", lr=3e-3,
                            **options)
    best = max(row["val_miou"] for row in result.history)
    assert best > all_background + 0.25, (best, all_background)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tap"] == ["layer1", "layer2", "layer3", "layer4"] and config["decoder"] == "fpn:16"
    weights = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert weights["decoder.lateral.3.weight"].shape == (16, 512, 1, 1)
    with pytest.raises(FeatxError, match=r'^output=.* \(tap \["layer1"'):
        featx.finetune(data, tmp_path / "run", binary=True, freeze="backbone", optimizer="adam", lr=3e-3,
                       **options, tap=["layer1", "layer2"], resume=True)


def test_metrics_from_a_known_confusion():
    true = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    matrix = confusion(true, pred, 3)
    assert matrix.sum() == 7 and matrix[0, 0] == 2 and matrix[2, 0] == 1
    m = summarize(matrix.numpy(), ["background", "1", "2"])
    assert m["pixel_acc"] == pytest.approx(5 / 7)
    assert m["iou"] == pytest.approx({"background": 2 / 4, "1": 2 / 3, "2": 1 / 2})
    assert m["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert m["dice"] == pytest.approx((2 * 2 / 5 + 2 * 1 / 3) / 2)


def test_loss_ignores_padding_and_dice_rewards_overlap():
    masks = torch.tensor([[[0, 1], [1, IGNORE]]])
    good = torch.tensor([[[[-5.0, 5.0], [5.0, 0.0]]]])
    assert SegmentLoss()(good, masks) < SegmentLoss()(-good, masks)
    changed = good.clone()
    changed[..., 1, 1] = -100.0  # only the IGNORE pixel differs
    assert SegmentLoss(1.0)(changed, masks) == pytest.approx(SegmentLoss(1.0)(good, masks).item())
    assert SegmentLoss(1.0)(good, masks) > SegmentLoss()(good, masks)
    multi = torch.zeros(1, 3, 2, 2)
    assert SegmentLoss(0.5)(multi, torch.tensor([[[0, 1], [2, IGNORE]]])).item() > 0


# ---- finetune --task segment --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("clean") / "run"
    return run, featx.finetune(data, run, binary=True, freeze="until:layer2", dice_weight=0.5, **FAST)


class _Stop(Exception):
    pass


def _stop_after_epoch_1(line: str) -> None:
    if line.startswith("Epoch 1/"):
        raise _Stop


def test_run_folder_metrics_and_preview(clean_run):
    run, result = clean_run
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "last.pt", "curves.png",
            "predictions.png"} <= names
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= row[k] <= 1 for row in rows for k in ("val_acc", "val_miou", "val_dice"))
    best = max(rows, key=lambda r: (r["val_miou"], -r["epoch"]))
    assert result.best_epoch == best["epoch"] and "val miou" in result.summary()
    weights = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert weights["featx"]["task"] == "segment" and weights["featx"]["classes"] == ["background", "foreground"]
    assert weights["model"]["decoder.classify.weight"].shape[0] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["tap"] == "layer4" and config["decoder"] == "conv:8" and config["binary"] is True
    assert Image.open(run / "predictions.png").size[0] > 100


def test_freezing_keeps_the_frozen_layers(clean_run):
    run, _ = clean_run
    initial = build_segmenter(load_backbone("resnet18", "none").model, "layer4", parse_decoder("conv:8"), 1, 64,
                              "resnet18").state_dict()
    final = load_checkpoint(run / "checkpoint.pt")["model"]
    assert torch.equal(final["layer2.1.conv2.weight"], initial["layer2.1.conv2.weight"])
    assert torch.equal(final["bn1.running_mean"], initial["bn1.running_mean"])
    assert not torch.equal(final["layer3.0.conv1.weight"], initial["layer3.0.conv1.weight"])


def test_resume_equals_an_uninterrupted_run(data, clean_run, tmp_path):
    run, clean = clean_run
    with pytest.raises(_Stop):
        featx.finetune(data, tmp_path / "run", binary=True, freeze="until:layer2", dice_weight=0.5, **FAST,
                       log=_stop_after_epoch_1)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    result = featx.finetune(data, tmp_path / "run", binary=True, freeze="until:layer2", dice_weight=0.5, **FAST,
                            resume=True)
    for got, want in zip(result.history, clean.history):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}
    with pytest.raises(FeatxError, match=r"^output=.* \(decoder conv:8 there, linear now\)"):
        featx.finetune(data, tmp_path / "run", binary=True, freeze="until:layer2", dice_weight=0.5,
                       **{**FAST, "decoder": "linear"}, resume=True)


def _curve_labels(monkeypatch) -> list[tuple[str, str]]:
    """The axis labels of every curves.png the runs write (what the loss and the accuracy are)."""
    report = importlib.import_module("featx.finetuning.report")
    labels, draw = [], report.curves_figure

    def recording(history, loss_name="cross-entropy", acc_name="accuracy"):
        figure = draw(history, loss_name, acc_name)
        labels.append(tuple(ax.get_ylabel() for ax in figure.axes))
        return figure

    monkeypatch.setattr(report, "curves_figure", recording)
    return labels


def test_binary_curves_label_the_loss_binary_cross_entropy(data, tmp_path, monkeypatch):
    labels = _curve_labels(monkeypatch)
    featx.finetune(data, tmp_path / "run", binary=True, dice_weight=0.5, **{**FAST, "epochs": 1}, freeze="backbone")
    assert labels == [("binary cross-entropy + 0.5 x (1 - Dice)", "pixel accuracy")]


def test_multiclass_cross_entropy_run(tmp_path, monkeypatch):
    labels = _curve_labels(monkeypatch)
    data = make_mask_folder(tmp_path / "multi", splits={"train": 6}, n_classes=2)
    result = featx.finetune(data, tmp_path / "run", **{**FAST, "decoder": "linear", "epochs": 1}, tap="layer3",
                            val_split=0.34, freeze="backbone", optimizer="adam")
    assert labels == [("cross-entropy", "pixel accuracy")]
    row = result.history[0]
    assert row["val_miou"] is not None and json.loads((tmp_path / "run" / "config.json").read_text())["num_classes"] == 2
    weights = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert weights["decoder.classify.weight"].shape == (3, 256, 1, 1)


# ---- the dense probe on cached maps ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def maps(data, tmp_path_factory):
    store = tmp_path_factory.mktemp("maps") / "maps.h5"
    featx.extract(data, store, backbone="resnet18", weights="none", taps=["layer2"], pooling="none", image_size=64,
                  workers=0, precision="fp32", device="cpu")
    return store


def test_dense_probe_fit_save_evaluate_predict(data, maps, tmp_path):
    head = fit_dense_probe(maps, data, tmp_path / "head", binary=True, grid="0.01,1,100", pixels_per_image=64)
    assert head.metrics["rows"] == {"train": 8, "eval": 4} and head.metrics["fit_pixels"] == 8 * 64
    assert head.metrics["miou"] > 0.6  # colour separates the rectangles even through random features
    assert json.loads((tmp_path / "head" / "head.json").read_text())["task"] == "segmentation"
    loaded = load_segment_head(tmp_path / "head")
    assert loaded.segment["classes"] == ["background", "foreground"]

    out = _cli("evaluate", tmp_path / "head", maps, "--masks", data, "--split", "val", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["miou"] == pytest.approx(head.metrics["miou"])

    out = _cli("predict", tmp_path / "head", data, "-o", tmp_path / "pred", "--overlay", tmp_path / "seen", "-q")
    assert out.returncode == 0, out.stderr
    assert f"12 masks written to {tmp_path / 'pred'}, overlays in {tmp_path / 'seen'}" in out.stderr
    png = Image.open(tmp_path / "pred" / "val" / "images" / "p000.png")
    assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # ids shown in the VOC colours
    predicted = np.asarray(png)
    truth = np.asarray(Image.open(data / "val" / "masks" / "p000.png")) > 0
    assert predicted.shape == truth.shape and (predicted == truth).mean() > 0.8
    picture = np.asarray(Image.open(tmp_path / "seen" / "val" / "images" / "p000.jpg"), dtype=float)
    image = np.asarray(Image.open(data / "val" / "images" / "p000.png"), dtype=float)
    assert picture.shape == image.shape
    expected = np.where(predicted[..., None] == 1, 0.5 * image + 0.5 * np.array([128.0, 0, 0]), image)
    for region in (predicted == 0, predicted == 1):  # JPEG keeps each region's mean colour
        assert region.any() and np.abs(picture[region].mean(0) - expected[region].mean(0)).max() < 6

    out = _cli("predict", tmp_path / "head", data / "val", "-o", tmp_path / "val-only", "-q")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "val-only" / "images").iterdir()) == [f"p00{i}.png" for i in range(4)]
    assert not (tmp_path / "val-only" / "masks").exists()


def test_dense_probe_bad_input(data, maps, tmp_path):
    pooled = tmp_path / "pooled.h5"
    featx.extract(data, pooled, backbone="resnet18", weights="none", taps=["layer2"], image_size=64, workers=0,
                  precision="fp32", device="cpu")
    with pytest.raises(FeatxError, match=r"a segmentation head needs maps: featx\.extract\(\.\.\., "
                                          r"pooling='none'\) / `featx extract --pooling none`$"):
        fit_dense_probe(pooled, data, binary=True)
    other = make_mask_folder(tmp_path / "other", seed=7)
    with pytest.raises(FeatxError, match=r"no mask for train/images/p000\.png \(row 0 of"):
        fit_dense_probe(maps, other, binary=True)
    out = _cli("fit-head", maps, "--task", "segment", "-o", tmp_path / "h")
    assert out.returncode == 2 and "--masks MASKS" in out.stderr


def test_the_api_functions_take_segmentation_heads_as_the_command_line_does(data, maps, tmp_path):
    """featx.fit_head / predict / evaluate choose the dense probe by task or head folder, as the CLI does."""
    head = featx.fit_head(maps, output=tmp_path / "head", task="segment", masks=data, binary=True, grid="1",
                          pixels_per_image=16)
    assert head.segment["classes"] == ["background", "foreground"] and (tmp_path / "head" / "segment.json").is_file()
    metrics = featx.evaluate(tmp_path / "head", maps, masks=data, split="val")
    assert metrics["miou"] == pytest.approx(featx.evaluate(head, maps, masks=data, split="val")["miou"])
    written = featx.predict(tmp_path / "head", data, tmp_path / "pred")
    assert written["written"] == 12 and (tmp_path / "pred" / "val" / "images" / "p000.png").is_file()
    for call, message in [
        (lambda: featx.fit_head(maps, task="segment", masks=data, binary=True, head="mlp"), "^head: not for a segm"),
        (lambda: featx.fit_head(maps, task="segment", masks=data, solver="torch"), "^solver: not for a segm"),
        (lambda: featx.fit_head(maps, masks=data), "^masks: segmentation options, they need task='segment'"),
        (lambda: featx.fit_head(maps, task="segments"), "^task='segments': expected one of classify, segment"),
        (lambda: featx.predict(tmp_path / "head", data), "is a segmentation head: give the folder"),
        (lambda: featx.predict(tmp_path / "head", data, tmp_path / "p2", x="X"), "^x: not for a segmentation"),
        (lambda: featx.evaluate(tmp_path / "head", maps), "give the store's masks with masks='MASKS'"),
        (lambda: featx.evaluate(tmp_path / "head", maps, masks=data, tap="layer3"), "^tap: not for a segm"),
    ]:
        with pytest.raises(FeatxError, match=message):
            call()
    assert not (tmp_path / "p2").exists()


@pytest.fixture(scope="module")
def two_taps(data, tmp_path_factory):
    """A store with the stride 4 (16x16 at 64 px) and stride 8 (8x8) maps of one backbone pass."""
    store = tmp_path_factory.mktemp("taps") / "taps.h5"
    featx.extract(data, store, backbone="resnet18", weights="none", taps=["layer1", "layer2"], pooling="none",
                  image_size=64, workers=0, precision="fp32", device="cpu")
    return store


def test_dense_probe_on_two_taps_predicts_at_the_finest_maps_size(data, two_taps, tmp_path):
    from types import SimpleNamespace

    from featx.preprocess import TransformSpec
    from featx.segment.probe import fuse_maps, image_masks
    from featx.store import open_store

    out = _cli("fit-head", two_taps, "--task", "segment", "-l", "layer2", "-l", "layer1", "--masks", data, "--binary",
               "--grid", "1", "--pixels-per-image", "32", "-o", tmp_path / "head", "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["taps"] == ["layer2", "layer1"] and metrics["tap"] == "layer1"
    assert metrics["map_shape"] == [128 + 64, 16, 16] and metrics["miou"] > 0.6
    head = load_segment_head(tmp_path / "head")
    assert head.segment["taps"] == ["layer2", "layer1"] and head.tap == "layer1" and head.n_features_in_ == 192

    with open_store(two_taps) as store:
        fine, coarse = store.features("layer1", np.arange(2)), store.features("layer2", np.arange(2))
        paths = [store.paths[i] for i in range(2)]
    fused = fuse_maps([coarse, fine])
    assert fused.shape == (2, 192, 16, 16) and np.array_equal(fused[:, 128:], fine)
    assert np.allclose(fused[:, :128, ::2, ::2].mean(), coarse.mean(), atol=0.1)  # the coarse map, upsampled
    # per-cell scores change within a coarse cell: the mask follows the 16x16 map, not the 8x8 one
    channels = fused.shape[1]
    scores = head.decision_function(fused.transpose(0, 2, 3, 1).reshape(-1, channels)).reshape(2, 8, 2, 8, 2)
    assert np.abs(np.diff(scores, axis=2)).max() > 1e-3 and np.abs(np.diff(scores, axis=4)).max() > 1e-3

    out = _cli("evaluate", tmp_path / "head", two_taps, "--masks", data, "--split", "val", "--json")
    assert out.returncode == 0, out.stderr
    evaluated = json.loads(out.stdout)
    assert evaluated["miou"] == pytest.approx(metrics["miou"]) and evaluated["taps"] == ["layer2", "layer1"]

    out = _cli("predict", tmp_path / "head", data, "-o", tmp_path / "pred", "-q")
    assert out.returncode == 0, out.stderr
    spec = TransformSpec.from_dict(head.config["transform"])
    sizes = [Image.open(data / p).size for p in paths]
    expected = image_masks(head, fused, sizes, spec)
    for path, ids in zip(paths, expected):
        written = np.asarray(Image.open(tmp_path / "pred" / f"{path.rsplit('.', 1)[0]}.png"))
        assert np.array_equal(written, ids)
    # the service fuses the rows of the head's taps as predict does
    pytest.importorskip("fastapi")
    from featx.serve.masks import _masks

    embedded = [SimpleNamespace(rows={"layer1": fine[i], "layer2": coarse[i]}) for i in range(2)]
    uploads = [SimpleNamespace(data=(data / p).read_bytes()) for p in paths]
    assert all(np.array_equal(a, b) for a, b in zip(_masks(head, embedded, uploads), expected))
    assert "taps" not in json.loads((tmp_path / "head" / "head.json").read_text())


def test_dense_probe_taps_that_cannot_be_fused_are_one_line(data, two_taps, tmp_path):
    pooled = tmp_path / "pooled.h5"
    featx.extract(data, pooled, backbone="resnet18", weights="none", taps=["layer1", "layer2"], image_size=64,
                  workers=0, precision="fp32", device="cpu")
    for store, taps, message in [
        (two_taps, ["layer1", "layer3"], "-l layer3: no such tap in"),
        (pooled, ["layer1", "layer2"], "tap layer1 holds (64,) rows per image"),
        (two_taps, ["layer1", "layer1"], "-l layer1: given twice; give each tap once"),
        (two_taps, [], "holds several taps (layer1, layer2): choose one with -l\n"),
    ]:
        out = _cli("fit-head", store, "--task", "segment", *[a for t in taps for a in ("-l", t)], "--masks", data,
                   "--binary", "-o", tmp_path / "head")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    out = _cli("fit-head", pooled, "-l", "layer1", "-l", "layer2", "-o", tmp_path / "head")
    assert out.returncode == 2 and "a classification head reads one tap" in out.stderr, out.stderr
    assert not (tmp_path / "head").exists()


# ---- masks as pictures and as run lengths ------------------------------------------------------------------------

def test_palette_png_keeps_the_ids_and_shows_them():
    from featx.segment.render import PALETTE, palette_png, run_lengths

    ids = np.random.default_rng(0).integers(0, 4, size=(7, 9))
    ids[0, :] = 255
    read = Image.open(io.BytesIO(palette_png(ids)))
    assert read.mode == "P" and np.array_equal(np.asarray(read), ids)
    assert PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # PASCAL VOC's colour map
    assert PALETTE[255].tolist() == [224, 224, 192]
    encoded = run_lengths(ids)
    assert encoded["size"] == [7, 9] and sum(encoded["counts"]) == 63
    assert np.array_equal(np.repeat(encoded["values"], encoded["counts"]).reshape(encoded["size"]), ids)
    assert run_lengths(np.zeros((2, 3), int)) == {"size": [2, 3], "values": [0], "counts": [6]}


def test_masks_take_the_size_of_the_image_as_decoded(tmp_path):
    """An EXIF-rotated photo: the mask has the rotated size (what decoding, hence extraction, sees)."""
    from featx.segment.render import oriented_size

    image = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif)
    image.save(tmp_path / "plain.jpg")
    assert oriented_size(tmp_path / "turned.jpg") == (30, 50)
    assert oriented_size((tmp_path / "plain.jpg").read_bytes()) == (50, 30)


def test_overlay_needs_a_segmentation_head_and_a_writable_folder(data, maps, tmp_path):
    fit_dense_probe(maps, data, tmp_path / "head", binary=True, grid="1", pixels_per_image=16)
    (tmp_path / "file").write_text("x")
    out = _cli("predict", tmp_path / "head", data, "-o", tmp_path / "pred", "--overlay", tmp_path / "file")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--overlay" in out.stderr and "is a file" in out.stderr
    assert not (tmp_path / "pred").exists()


def test_dense_predict_refuses_an_output_that_cannot_be_a_folder(data, maps, tmp_path):
    head = fit_dense_probe(maps, data, tmp_path / "head", binary=True, grid="1", pixels_per_image=16)
    (tmp_path / "file.txt").write_text("x")
    for output, store, message in [
        (tmp_path / "file.txt", None, "file.txt is a file, expected a folder for the mask PNGs"),
        (tmp_path / "file.txt" / "masks", None, "file.txt is a file, expected a folder for the mask PNGs"),
        (tmp_path / "same.h5", tmp_path / "same.h5", "one path for both; the mask PNGs need a folder of their own"),
    ]:
        with pytest.raises(FeatxError, match=re.escape(message)):
            predict_dense(head, data, output, store=store, workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "head"]
