"""`featx advise`: the recommendation on generated stores whose answer is known, the JSON it prints and saves, and
one-line errors for data it cannot advise on."""
from __future__ import annotations

import json

import numpy as np

from featx.advice import recommend
from featx.store import write_store
from cli_support import invoke as run

TAPS = ["layer2", "layer3", "flatten"]
COSTS = {"forward_seconds_per_image": 0.01, "train_seconds_per_image": 0.03, "extract_seconds": 1.0}


def synthetic_store(path, separation: dict, per_class=24, classes=3, dim=16, seed=0, same=False, backbone="resnet18"):
    """A featx store of `backbone` whose taps separate the classes by `separation[tap]` noise standard deviations
    (`same`: every tap holds the first tap's rows)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    features = {t: (separation.get(t, 0.0) * centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
                for t in TAPS}
    if same:
        features = {t: features[TAPS[0]] for t in TAPS}
    n = len(labels)
    return write_store(path, config={"backbone": backbone, "weights": "none", "taps": TAPS},
                       keys=[f"{i:064x}" for i in range(n)], paths=[f"img/{i}.png" for i in range(n)],
                       labels=labels, classes=[f"c{i}" for i in range(classes)], features=features)


def test_deep_tap_separable_gives_a_probe_at_the_pre_logits(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", {"flatten": 6.0})
    advice = recommend(store, costs=COSTS)
    assert advice.recommendation.method == "probe" and advice.recommendation.tap == "flatten"
    assert advice.signal["gap"] > 0.3 and advice.signal["distance"] == "close to the pretraining"
    assert advice.recommendation.command.startswith(f"featx fit-head {store} -l flatten")
    assert advice.curves["flatten"][-1]["acc"] > 0.95 and advice.curves["layer3"][-1]["acc"] < 0.7
    assert list(advice.curves) == [t + s for t in TAPS for s in ("", "/none")]


def test_only_a_shallow_tap_separable_gives_a_probe_at_that_tap(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", {"layer2": 6.0})
    advice = recommend(store, costs=COSTS)
    assert advice.recommendation.method == "probe" and advice.recommendation.tap == "layer2"
    assert advice.signal["gap"] < -0.3 and advice.signal["distance"] == "far from the pretraining"
    assert "too few to adapt the backbone" in advice.signal["reason"]


def test_large_dissimilar_data_gives_finetuning(tmp_path):
    # Every tap is weak (a probe leaves errors) and the stage output is the better one: finetune, keeping it.
    store = synthetic_store(tmp_path / "s.h5", {"layer2": 1.2, "flatten": 0.3}, per_class=60)
    advice = recommend(store, per_class_full=2000, costs=COSTS)
    assert advice.recommendation.method == "finetune-freeze" and advice.recommendation.freeze == "until:layer2"
    assert "--freeze until:layer2" in advice.recommendation.command
    # Same weak features, but the pre-logits as good as the stage outputs: a full finetune.
    store = synthetic_store(tmp_path / "t.h5", {"layer2": 1.0}, same=True)
    full = recommend(store, per_class_full=2000, costs=COSTS)
    assert full.recommendation.method == "finetune" and "--freeze none" in full.recommendation.command
    assert full.recommendation.seconds == COSTS["train_seconds_per_image"] * 2000 * 3 * 10


def test_cli_json_schema_and_saved_advice(tmp_path, image_folders):
    data = image_folders("data", classes=("ants", "bees"), per_class=6)
    store = tmp_path / "adv.h5"
    out = run("advise", data, "-b", "resnet18", "-w", "none", "--image-size", "32", "--budget-seconds", "120",
              "-o", store, "--json")
    assert out.exit_code == 0, out.output
    advice = json.loads(out.output[out.output.index("{"):])
    assert set(advice) >= {"schema", "data", "store", "backbone", "classes", "images", "per_class", "budget_seconds",
                           "seconds", "costs", "curves", "signal", "recommendation", "alternatives"}
    assert advice["classes"] == 2 and advice["images"] == 12
    assert list(advice["curves"]) == [t + s for t in TAPS for s in ("", "/none")]
    rec = advice["recommendation"]
    assert set(rec) == {"method", "tap", "freeze", "normalize", "expected_accuracy", "seconds", "command"}
    assert rec["method"] in ("probe", "finetune-freeze", "finetune") and 0 <= rec["expected_accuracy"][0] <= 1
    assert json.loads((tmp_path / "adv.advice.json").read_text())["recommendation"] == rec
    assert store.exists()
    finetunes = [c["command"] for c in [rec, *advice["alternatives"]] if c["method"] != "probe"]
    assert finetunes and all("-b resnet18 -w none" in c and "--image-size 32" in c for c in finetunes), finetunes


def test_finetune_commands_keep_the_image_size(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", {"layer2": 1.2, "flatten": 0.3}, per_class=60)
    sized = recommend(store, per_class_full=2000, costs=COSTS, image_size=96)
    assert sized.recommendation.method == "finetune-freeze" and "--image-size 96" in sized.recommendation.command
    assert "--image-size" not in recommend(store, per_class_full=2000, costs=COSTS).recommendation.command


def test_bad_input_is_one_line(tmp_path, image_folders, images):
    flat = tmp_path / "flat"
    images("flat", 4, cls=0)
    few = image_folders("few", classes=("ants", "bees"), per_class=3)
    for p in (few / "bees").iterdir():
        if p.name != "bees_000.png":
            p.unlink()
    data = image_folders("data", classes=("ants", "bees"), per_class=3)
    cases = [
        ((flat,), "no labelled images"),
        ((few,), "bees (1)"),
        ((data, "--budget-seconds", "0.00001"), "too small"),
        ((data, "--budget-seconds", "-3"), "expected a positive, finite number"),
        ((data, "--budget-seconds", "inf"), "expected a positive, finite number"),
        ((data, "--budget-seconds", "nan"), "expected a positive, finite number"),
        ((data, "--image-size", "1000000000"), "--image-size 1000000000: one image alone needs about"),
        ((data, "--seed", str(10**30)), f"--seed {10**30}: expected an integer from 0 to 4294967295"),
    ]
    for args, expected in cases:
        out = run("advise", "-b", "resnet18", "-w", "none", "--image-size", "32", "-o", tmp_path / "x.h5", *args)
        assert out.exit_code == 2, out.output
        assert out.output.count("\n") == 1 and expected in out.output, out.output
    assert not (tmp_path / "x.h5").exists()


def scaled_store(path, signal_scale: float, noise_scale: float, per_class=8, informative=4, noisy=200, seed=0):
    """Two classes apart along `informative` dimensions of spread `signal_scale`, beside `noisy` pure-noise
    dimensions of spread `noise_scale` (every tap the same rows)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(2), per_class)
    signal = (2.0 * labels[:, None] - 1.0 + 0.6 * rng.normal(size=(len(labels), informative))) * signal_scale
    x = np.hstack([signal, noise_scale * rng.normal(size=(len(labels), noisy))]).astype(np.float32)
    n = len(labels)
    return write_store(path, config={"backbone": "resnet18", "weights": "none", "taps": TAPS},
                       keys=[f"{i:064x}" for i in range(n)], paths=[f"img/{i}.png" for i in range(n)],
                       labels=labels, classes=["a", "b"], features={t: x for t in TAPS})


def test_unscaled_rows_are_advised_when_standardising_hurts(tmp_path):
    # Strong, wide signal beside many faint noise dimensions: standardising lifts the noise to the signal's weight.
    store = scaled_store(tmp_path / "s.h5", signal_scale=3.0, noise_scale=0.05)
    advice = recommend(store, costs=COSTS)
    rec = advice.recommendation
    assert rec.method == "probe" and rec.normalize == "none" and "--normalize none" in rec.command
    assert advice.curves["flatten/none"][-1]["acc"] > advice.curves["flatten"][-1]["acc"] + 0.1
    assert advice.signal["normalize"]["flatten"] == "none"
    # The converse: a faint signal beside wide noise needs standardising, and the command keeps fit-head's default.
    store = scaled_store(tmp_path / "t.h5", signal_scale=0.01, noise_scale=3.0)
    rec = recommend(store, costs=COSTS).recommendation
    assert rec.normalize == "standard" and "--normalize" not in rec.command


def test_the_advice_store_holds_exactly_the_images_measured(tmp_path, image_folders):
    """The learning curves read every row of the store, so rows of other data (an earlier subset, another folder)
    go, and the summary line says so."""
    from featx.extraction import extract
    from featx.store import open_store

    data = image_folders("data", classes=("ants", "bees"), per_class=6)
    other = image_folders("other", classes=("ants", "bees"), per_class=2, seed=7)
    store = tmp_path / "adv.h5"
    extract(other, store, backbone="resnet18", weights="none", image_size=32, taps=TAPS, workers=0)
    out = run("advise", data, "-b", "resnet18", "-w", "none", "--image-size", "32", "--budget-seconds", "120",
              "-o", store)
    assert out.exit_code == 0, out.output
    assert f"12 images in {store} " in out.output and "4 dropped" in out.output
    with open_store(store) as st:
        assert st.root_counts() == {str(data.resolve()): 12}


def test_val_rows_that_leave_a_class_one_training_row_give_way_to_a_stratified_hold_out(tmp_path):
    """A few images per class drawn across the train and val folders can leave a class with a single training row:
    the curves then hold out a stratified part of all rows instead of refusing."""
    from featx.advice import learning_curves

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 4)
    splits = ["train", "val", "val", "val", "train", "train", "val", "val"]  # class 0: a single training row
    x = (3.0 * labels[:, None] + rng.normal(size=(8, 4))).astype(np.float32)
    store = write_store(tmp_path / "s.h5", config={"backbone": "resnet18", "weights": "none", "taps": ["flatten"]},
                        keys=[f"{i:064x}" for i in range(8)], paths=[f"img/{i}.png" for i in range(8)],
                        labels=labels, splits=splits, classes=["a", "b"], features={"flatten": x})
    curves, info = learning_curves(store, ["flatten"])
    assert info["held_out"] == 2 and info["n_max"] == 3 and curves["flatten"][-1]["n"] == 3
