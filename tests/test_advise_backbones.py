"""`featx advise` with several backbones: the ranking of backbone x tap on generated stores whose answer is known,
the CLI on generated images with random-init and test-made weights, and one-line errors that lose nothing."""
from __future__ import annotations

import json

import pytest
import torch
from test_advise import COSTS, synthetic_store

from featx.advice import recommend
from featx.advise_backbones import WITHIN, compare


def advice_of(path, separation, backbone, seconds_per_image, seed=0):
    store = synthetic_store(path, separation, backbone=backbone, seed=seed)
    return recommend(store, costs={**COSTS, "forward_seconds_per_image": seconds_per_image})


def test_uninformative_backbone_loses_and_its_taps_rank_last(tmp_path):
    good = advice_of(tmp_path / "good.h5", {"layer2": 4.0, "layer3": 5.0, "flatten": 6.0}, "resnet50", 0.05)
    # Cheaper, but its rows hold no class signal at any tap: it must neither win nor be the cheap choice.
    noise = advice_of(tmp_path / "noise.h5", {}, "mobilenet_v2", 0.001)
    comparison = compare([noise, good])
    assert comparison.best.backbone == "resnet50" and comparison.best.tap == "flatten"
    assert comparison.cheapest is comparison.best
    assert [c.backbone for c in comparison.candidates[-3:]] == ["mobilenet_v2"] * 3
    assert len(comparison.candidates) == 6 and comparison.best.expected_accuracy[0] > 0.8
    assert comparison.recommendation.command.startswith(f"featx fit-head {good.store} -l flatten")
    accs = [c.accuracy for c in comparison.candidates]
    assert accs == sorted(accs, reverse=True)


def test_cheapest_within_a_point_is_the_faster_backbone(tmp_path):
    slow = advice_of(tmp_path / "slow.h5", {"flatten": 8.0}, "resnet50", 0.05)
    fast = advice_of(tmp_path / "fast.h5", {"flatten": 8.0}, "mobilenet_v2", 0.002, seed=1)
    comparison = compare([slow, fast])
    assert comparison.cheapest.backbone == "mobilenet_v2" and comparison.cheapest.tap == "flatten"
    assert comparison.cheapest.accuracy >= comparison.best.accuracy - WITHIN
    assert comparison.cheapest.extract_seconds_per_image == pytest.approx(0.002 * 1.3)
    assert comparison.cheapest.embedding_size == 16


@pytest.fixture
def data(image_folders):
    return image_folders(per_class=8)


def test_cli_two_backbones_made_uninformative_weights_lose(cli, tmp_path, data):
    from featx.backbones import load_backbone

    # resnet18 with every tensor zero: every image gives the same rows.
    zeros = tmp_path / "zeros.pth"
    torch.save({k: torch.zeros_like(v) for k, v in load_backbone("resnet18", "none").model.state_dict().items()}, zeros)
    out = cli("advise", data, "-b", "resnet18", "-w", zeros, "-b", "mobilenet_v2", "-w", "none", "--image-size", "32",
              "--budget-seconds", "300", "-o", tmp_path / "adv.h5", "--json")
    assert out.exit_code == 0, out.output
    advice = json.loads(out.output[out.output.index("\n{") + 1:])
    assert advice["schema"] == 3 and advice["backbone"] == advice["best"]["backbone"] == "mobilenet_v2"
    assert {"data", "store", "classes", "images", "curves", "signal", "recommendation", "alternatives"} <= set(advice)
    assert [b["backbone"] for b in advice["backbones"]] == ["resnet18", "mobilenet_v2"]
    assert len(advice["candidates"]) == 6 and advice["candidates"][-1]["backbone"] == "resnet18"
    zero_rows = [c for c in advice["candidates"] if c["backbone"] == "resnet18"]
    assert max(c["accuracy"] for c in zero_rows) < advice["best"]["accuracy"]
    assert all(c["embedding_size"] > 0 and c["extract_seconds_per_image"] > 0 for c in advice["candidates"])
    stores = [tmp_path / "adv.resnet18-zeros.h5", tmp_path / "adv.mobilenet_v2-none.h5"]
    assert all(s.exists() and s.with_name(s.stem + ".advice.json").exists() for s in stores)
    assert json.loads((tmp_path / "adv.advice.json").read_text())["candidates"] == advice["candidates"]
    table = cli("advise", data, "-b", "resnet18", "-w", zeros, "-b", "mobilenet_v2", "-w", "none", "--image-size",
                "32", "--budget-seconds", "300", "-o", tmp_path / "adv.h5")
    assert table.exit_code == 0 and "recommended: probe at" in table.output and "on mobilenet_v2" in table.output


def test_bad_backbone_lists_are_one_line_and_lose_nothing(cli, tmp_path, data, monkeypatch):
    # The offline case must find no weights file, whether or not this machine has the package that ships it.
    monkeypatch.setattr("featx.backbones.catalog.OfflinePackage.path", lambda self: None)
    kept = tmp_path / "x.resnet18-none.h5"
    kept.write_bytes(b"rows extracted earlier")
    two = ("-b", "resnet18", "-w", "none", "-b", "mobilenet_v2", "-w", "none")
    offline = {"FEATX_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "empty-hub")}
    cases = [
        (("-b", "resnet18", "-w", "none", "-b", "resnet18", "-w", "none"), None, "-b resnet18 -w none: listed twice"),
        (("-b", "resnet18", "-b", "mobilenet_v2", "-w", "none"), None, "-w given 1 times for 2 backbone(s)"),
        (("-b", "resnet18", "-w", "none", "-w", "none"), None, "-w given 2 times for 1 backbone(s)"),
        ((*two, "--weights-match", "name", "--weights-match", "order", "--weights-match", "name"), None,
         "--weights-match given 3 times for 2 backbones"),
        ((*two, "--budget-seconds", "0.00001"), None, "too small to compare 2 backbones here"),
        ((*two, "-l", "layer3"), None, "-l: tap names differ between backbones"),
        (("-b", "resnet18", "-w", "none", "-b", "mobilenet_v2", "-w", "IMAGENET1K_V1"), offline,
         "put mobilenet_v2-b0353104.pth (from https://"),
    ]
    for args, env, expected in cases:
        out = cli("advise", data, "--image-size", "32", "-o", tmp_path / "x.h5", *args, env=env)
        assert out.exit_code == 2, out.output
        assert out.output.count("\n") == 1 and expected in out.output, out.output
    assert kept.read_bytes() == b"rows extracted earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "x.resnet18-none.h5"]


def test_projections_capped_at_100_are_told_apart_by_the_measured_curve(tmp_path):
    # Both project to 100 % (a steep curve extrapolated), but only one measured near it: cost must not decide.
    steady = advice_of(tmp_path / "steady.h5", {"flatten": 6.0}, "resnet50", 0.05)
    steep = advice_of(tmp_path / "steep.h5", {"flatten": 6.0}, "mobilenet_v2", 0.001)
    for advice, points in ((steady, (0.98, 1.0)), (steep, (0.6, 0.9))):
        for name in list(advice.curves):
            advice.curves[name] = [{"n": 2, "acc": points[0]}, {"n": 4, "acc": points[1]}]
    comparison = compare([steep, steady])
    assert comparison.candidates[0].accuracy == comparison.candidates[-1].accuracy == 1.0
    assert comparison.best.backbone == "resnet50" and comparison.best.curve_accuracy == pytest.approx(0.99)
    assert comparison.cheapest is comparison.best  # 1000x cheaper, but 24 points below on the curve
    assert "best" in comparison.table() and "resnet50 (none)" in comparison.table()
