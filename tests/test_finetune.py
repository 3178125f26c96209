"""featx.finetune at the API level, on tiny generated images and seeded random (-w none) backbones.

What training does to frozen and trainable parameters and BatchNorm statistics, partial loading with
--freeze loaded, the warm start from a fitted head (LP-FT), the heads, every --freeze strategy on three
architecture families, --unfreeze-at, resume = an uninterrupted run, and the one-line errors of bad input.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from featx.backbones import load_backbone
from featx.errors import FeatxError
from featx.finetuning import finetune
from featx.finetuning import data as D
from featx.finetuning.classify import build_model
from featx.finetuning.checkpoint import load_checkpoint, seed_everything
from featx.finetuning.freezing import (
    freeze_table, frozen_batchnorms, frozen_parameters, loaded_parameters, set_frozen, train_mode,
)
from featx.finetuning.resume import resume_arguments
from featx.finetuning.train import Trainer
from featx.options import OptionError
from featx.preprocess import EvalTransform, normalize_batch
from featx.sources import decode_image

from finetune_support import digest
from imagegen import make_image_folder
from options_support import FINETUNE as FAST, HEAD_EXTRACT

SIZE = FAST["image_size"]  # px: resnet18 and mobilenet_v3_small run on it
PROBE_EXTRACT = dict(HEAD_EXTRACT, image_size=SIZE, device="cpu")
COMPARED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "backbone_lr", "skipped_images")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 classes x 4 images of 20 px: the default 20% hold-out leaves 6 to train on, 2 steps of batch 3."""
    return str(make_image_folder(tmp_path_factory.mktemp("ft") / "data", per_class=4, size=(20, 20)))


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


class _Stop(Exception):
    """Raised from the log after epoch 1 has been saved: an in-process stand-in for a kill."""


def _stop_after_epoch_1(line: str) -> None:
    if line.startswith("Epoch 1/"):
        raise _Stop


# ---- partial loading, --freeze loaded, frozen parameters and BatchNorm statistics ----------------------------------

@pytest.fixture(scope="module")
def partial_weights(tmp_path_factory):
    """A resnet18 file (another seed, non-trivial BN statistics) lacking layer4, with conv1 of another shape and
    an extra module: the weights a model with an added module would have."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.")}
    state["conv1.weight"] = torch.randn(64, 3, 3, 3)
    state["extra.proj.weight"] = torch.randn(4, 4)
    path = tmp_path_factory.mktemp("weights") / "partial.pth"
    torch.save(state, path)
    return path, state


def test_load_report_and_loaded_set(partial_weights):
    path, state = partial_weights
    bb = load_backbone("resnet18", str(path))
    report = bb.load_report
    layer4 = [k for k in bb.model.state_dict() if k.startswith("layer4.")]
    assert sorted(report.missing) == sorted(layer4)
    assert report.unexpected == ["extra.proj.weight"]
    assert [m.split(":")[0] for m in report.mismatched] == ["conv1.weight"]
    assert set(report.matched) == set(state) - {"conv1.weight", "extra.proj.weight"}

    loaded = loaded_parameters(bb)
    model, head = build_model(bb, ["a", "b"], "linear", SIZE)
    frozen = frozen_parameters(model, ["loaded"], head, loaded)
    params = {name for name, _ in model.named_parameters()}
    expected = {n for n in params if n in state and not n.startswith(("fc.", "conv1."))}
    assert frozen == expected
    assert not any(n.startswith(("fc.", "layer4.", "conv1.")) for n in frozen)


def test_freeze_loaded_never_freezes_the_new_head_even_when_its_shapes_match(tmp_path):
    """A file with a 2-class fc (a finetuned model, say): the new 2-class head has the file's key names and
    shapes, but it is new, so it trains."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=2)
    torch.save(model.state_dict(), tmp_path / "two.pth")
    bb = load_backbone("resnet18", str(tmp_path / "two.pth"))
    assert "fc.weight" in bb.load_report.matched
    loaded = loaded_parameters(bb)
    model, head = build_model(bb, ["a", "b"], "linear", SIZE)
    frozen = frozen_parameters(model, ["loaded"], head, loaded)
    assert frozen == {n for n, _ in model.named_parameters()} - {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("train_bn", [False, True], ids=["bn-fixed", "train-bn"])
def test_training_leaves_frozen_parameters_and_frozen_bn_statistics_unchanged(data, partial_weights, tmp_path,
                                                                               train_bn):
    path, state = partial_weights
    lines = []
    finetune(data, tmp_path / "run", **{**FAST, "backbone": "resnet18", "weights": str(path)}, freeze="loaded",
             train_bn=train_bn, epochs=1, lr=0.05, log=lines.append)
    text = "\n".join(lines)
    assert "weights partial.pth: " in text and "missing (30):\n  layer4." in text  # the report and its details
    after = _state(tmp_path / "run" / "last.pt")
    seed_everything(0)  # as finetune does before it builds the head
    model, _ = build_model(load_backbone("resnet18", str(path)), ["ants", "bees"], "linear", SIZE)
    before = model.state_dict()
    for name, _ in model.named_parameters():
        frozen = name in state and not name.startswith(("fc.", "conv1."))
        assert torch.equal(after[name], before[name]) == frozen, (name, frozen)
    assert ("BatchNorm statistics stay fixed: batch 3 < 16 images" in text) != train_bn
    for key in (k for k in before if k.endswith(("running_mean", "running_var"))):
        assert torch.equal(after[key], before[key]) != train_bn, key  # batch 3: every layer's stay fixed


def test_batches_of_16_images_update_the_statistics_of_trained_layers(partial_weights, tmp_path, image_folders):
    path, _ = partial_weights
    data = image_folders("data", per_class=10, size=(20, 20))  # 16 to train on: one batch of 16
    lines = []
    finetune(data, tmp_path / "run", **{**FAST, "backbone": "resnet18", "weights": str(path), "batch_size": 16},
             freeze="loaded", epochs=1, lr=0.05, log=lines.append)
    assert not any("BatchNorm statistics" in line for line in lines)
    after = _state(tmp_path / "run" / "last.pt")
    seed_everything(0)
    before = build_model(load_backbone("resnet18", str(path)), ["ants", "bees"], "linear", SIZE)[0].state_dict()
    for key in (k for k in before if k.endswith(("running_mean", "running_var"))):
        assert torch.equal(after[key], before[key]) == (not key.startswith("layer4.")), key  # frozen ones fixed


def test_small_batches_keep_every_batch_norm_fixed_unless_train_bn():
    model = torchvision.models.resnet18()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    train_mode(model, train_bn=False, batch_size=8)
    assert model.training and model.layer1.training and not any(m.training for m in norms)
    assert all(p.requires_grad for m in norms for p in m.parameters())  # their scale and shift still train
    train_mode(model, train_bn=False, batch_size=16)
    assert all(m.training for m in norms)
    train_mode(model, train_bn=True, batch_size=2)
    assert all(m.training for m in model.modules())


def test_a_head_started_from_a_probe_keeps_batch_norm_fixed_unless_train_bn(probe):
    """The probe was fitted on features normalised with the running statistics: with batch statistics the same
    images give other features, and the probe's logits at step 0 would be lost."""
    model = torchvision.models.resnet18()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    train_mode(model, train_bn=False, batch_size=64, from_probe=True)
    assert model.training and not any(m.training for m in norms)
    train_mode(model, train_bn=True, batch_size=64, from_probe=True)
    assert all(m.training for m in norms)
    model, _ = build_model(load_backbone("resnet18", "none"), ["ants", "bees", "wasps"], "linear", SIZE,
                           init_head=probe[2])
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
        train_mode(model, train_bn=False, batch_size=16, from_probe=True)
        assert torch.allclose(model(x), expected, atol=1e-5)  # the probe's logits, in training mode too
        train_mode(model, train_bn=False, batch_size=16)
        assert not torch.allclose(model(x), expected, atol=1e-3)  # batch statistics change them


# ---- the new head and the warm start from a probe ------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbones():
    """One seeded random model per family (built once: vgg11 alone takes seconds), with the crop it runs at."""
    return {name: (load_backbone(name, "none"), crop) for name, crop in
            (("resnet18", SIZE), ("vgg11", 32), ("mobilenet_v3_small", SIZE))}


def test_mlp_head_goes_where_the_classifier_is():
    for name, path, width in (("resnet18", "fc", 512), ("mobilenet_v3_small", "classifier.3", 1024)):
        model, head = build_model(load_backbone(name, "none"), ["a", "b", "c"], "mlp:16,0.1", SIZE)
        assert head == path
        mlp = model.get_submodule(path)
        assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert (mlp[0].in_features, mlp[0].out_features, mlp[2].p, mlp[3].out_features) == (width, 16, 0.1, 3)
        assert model.eval()(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 3)


@pytest.mark.parametrize("head", ["mlp", "mlp:0", "mlp:8,1.5", "conv", "mlp:x"])
def test_bad_head_is_an_error(head):
    from featx.finetuning.heads import parse_head

    with pytest.raises(FeatxError, match="^head="):
        parse_head(head)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A 3-class image folder, its resnet18 (-w none) store at SIZE px and a logistic head fitted on it."""
    from featx.extraction import extract
    from featx.heads import fit_head

    root = tmp_path_factory.mktemp("probe")
    folder = make_image_folder(root / "data", classes=("ants", "bees", "wasps"), per_class=4, size=(20, 20))
    extract(str(folder), root / "store.h5", **PROBE_EXTRACT)
    fit_head(root / "store.h5", "avgpool", root / "head", grid="1.0", n_jobs=1, plots=False)
    return folder, root / "store.h5", root / "head"


def test_init_head_gives_the_probe_logits_at_step_0(probe):
    from featx.heads import load_head
    from featx.store import open_store

    folder, store_path, head_dir = probe
    bb = load_backbone("resnet18", "none")
    spec = bb.transform.with_sizes(SIZE)
    model, _ = build_model(bb, ["ants", "bees", "wasps"], "linear", SIZE, init_head=head_dir)
    with open_store(store_path) as store:
        features = store.features("avgpool")
        paths = [str(folder / p) for p in store.paths]
    images = torch.stack([EvalTransform(spec)(decode_image(p)) for p in paths])
    with torch.no_grad():
        logits = model.eval()(normalize_batch(images, spec, torch.device("cpu"), False)).double().numpy()
    expected = load_head(head_dir).decision_function(features)
    assert expected.shape == logits.shape == (12, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_a_finetune_from_a_probe_says_batch_norm_stays_fixed(probe, tmp_path, monkeypatch):
    from featx.finetuning import freezing, train

    for module in (freezing, train):  # batches of the 12 images are not small: only the probe fixes BatchNorm
        monkeypatch.setattr(module, "SMALL_BATCH", 2)
    lines = []
    finetune(probe[0], tmp_path / "run", backbone="resnet18", weights="none", init_head=probe[2], epochs=1,
             batch_size=8, image_size=SIZE, workers=0, device="cpu", precision="fp32", log=lines.append)
    assert "BatchNorm statistics stay fixed: the head starts from a probe (train_bn=True / --train-bn updates " \
        "them)" in lines


def test_init_head_binary_probe_gives_its_probabilities(tmp_path, probe, image_folders):
    """A binary logistic head has one score s: the new head's logits (-s/2, s/2) give softmax = sigmoid(s)."""
    from featx.extraction import extract
    from featx.heads import fit_head, load_head
    from featx.store import open_store

    folder = image_folders("data", per_class=4, size=(20, 20))
    extract(str(folder), tmp_path / "s.h5", **PROBE_EXTRACT)
    fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid="1.0", n_jobs=1, plots=False)
    bb = load_backbone("resnet18", "none")
    model, head = build_model(bb, ["ants", "bees"], "linear", SIZE, init_head=tmp_path / "head")
    with open_store(tmp_path / "s.h5") as store:
        features = store.features("avgpool")
    with torch.no_grad():
        proba = torch.softmax(model.get_submodule(head)(torch.from_numpy(features).double().float()), 1).numpy()
    np.testing.assert_allclose(proba, load_head(tmp_path / "head").predict_proba(features), rtol=1e-4, atol=1e-5)

    with pytest.raises(FeatxError, match="^init_head=.*: needs head='linear'"):
        build_model(load_backbone("resnet18", "none"), ["ants", "bees"], "mlp:8", SIZE, init_head=tmp_path / "head")
    with pytest.raises(FeatxError, match="^init_head=.*classes"):
        build_model(load_backbone("resnet18", "none"), ["bees", "ants"], "linear", SIZE, init_head=tmp_path / "head")
    _, _, head3 = probe
    with pytest.raises(FeatxError, match="^init_head="):
        build_model(load_backbone("mobilenet_v3_small", "none"), ["ants", "bees", "wasps"], "linear", SIZE,
                    init_head=head3)


# ---- every --freeze strategy on three families ---------------------------------------------------------------------

FAMILIES = {  # backbone: (head, an until: layer, the parameter-name prefixes it freezes, a module pattern)
    "resnet18": ("fc", "layer1", ("conv1.", "bn1.", "layer1."), "layer3"),
    "vgg11": ("classifier.6", "features.3", ("features.0.", "features.3."), "classifier.0"),
    "mobilenet_v3_small": ("classifier.3", "features.1", ("features.0.", "features.1."), "features.2.block.*"),
}


@pytest.fixture(scope="module")
def headed(backbones):
    """Each family with a new 2-class linear head."""
    out = {}
    for name, (bb, crop) in backbones.items():
        model, head = build_model(bb, ["a", "b"], "linear", crop)
        out[name] = (model, head, crop)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_freeze_strategy(headed, family):
    model, head, _ = headed[family]
    want_head, layer, until_prefixes, pattern = FAMILIES[family]
    assert head == want_head
    names = [n for n, _ in model.named_parameters()]
    in_head = {n for n in names if n.startswith(head + ".")}
    assert in_head and len(in_head) == 2

    def frozen(*specs, loaded=None):
        return frozen_parameters(model, specs, head, loaded)

    assert frozen("none") == set()
    assert frozen("backbone") == set(names) - in_head
    assert frozen("loaded", loaded=set(names)) == set(names) - in_head  # torchvision weights: all but the head
    assert frozen(f"until:{layer}") == {n for n in names if n.startswith(until_prefixes)}
    by_pattern = frozen(pattern)
    prefix = pattern.rstrip("*").rstrip(".") + "."
    assert by_pattern and by_pattern == {n for n in names if n.startswith(prefix)}
    assert frozen(f"until:{layer}", pattern) == frozen(f"until:{layer}") | by_pattern
    with pytest.raises(FeatxError, match=r"freeze='until:nope': .*modules: "):
        frozen("until:nope")
    with pytest.raises(FeatxError, match=r"freeze='nomatch\*'.*modules: "):
        frozen("nomatch*")
    with pytest.raises(FeatxError, match="freeze='loaded': weights='none'"):
        frozen("loaded")
    with pytest.raises(FeatxError, match="freeze='none' cannot be combined"):
        frozen("none", "backbone")
    with pytest.raises(FeatxError, match="freezes every parameter"):
        frozen("backbone", f"{head}.*")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_frozen_model_modes_gradients_and_table(headed, family):
    model, head, crop = headed[family]
    _, layer, until_prefixes, _ = FAMILIES[family]
    frozen = frozen_parameters(model, [f"until:{layer}"], head, None)
    try:
        set_frozen(model, frozen)
        train_mode(model, train_bn=False)
        for name, param in model.named_parameters():
            assert param.requires_grad == (name not in frozen), name
        fixed = frozen_batchnorms(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert module.training == (module not in fixed)
        assert all(not p.requires_grad for m in fixed for p in m.parameters())
        if family != "vgg11":
            assert fixed  # resnet18's bn1 and layer1, mobilenet's first blocks
        train_mode(model, train_bn=True)
        assert all(m.training for m in model.modules())

        table = freeze_table(model).splitlines()
        rows = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1:]] for line in table[1:]}
        params = dict(model.named_parameters())
        assert rows["total"] == [sum(p.numel() for n, p in params.items() if n not in frozen),
                                 sum(params[n].numel() for n in frozen)]
        top = until_prefixes[0].split(".")[0]
        assert rows[top][1] > 0
        assert set(rows) - {"total"} == {n.split(".")[0] for n in params}

        if family != "vgg11":  # a backward pass through vgg11's 120M-parameter classifier takes seconds here
            model.zero_grad(set_to_none=True)
            model(torch.rand(2, 3, crop, crop)).sum().backward()
            for name, param in model.named_parameters():
                assert (param.grad is None) == (name in frozen), name
    finally:
        set_frozen(model, set())
        model.zero_grad(set_to_none=True)
        model.eval()


# ---- optimizer, schedules, early stop ------------------------------------------------------------------------------

def _lrs(scheduler, optimizer, steps: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(steps):
        out.append(tuple(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    return out


def test_optimizer_groups_and_schedules_with_warmup():
    from featx.finetuning.optim import build_optimizer, build_scheduler, warmup_steps

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for name, kind in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        optimizer = build_optimizer(model, "1", name, lr=0.1, backbone_lr=0.01, momentum=0.8, weight_decay=0.0)
        assert isinstance(optimizer, kind)
        groups = {g["name"]: g for g in optimizer.param_groups}
        assert (groups["backbone"]["lr"], groups["head"]["lr"]) == (0.01, 0.1)
        assert [len(groups["backbone"]["params"]), len(groups["head"]["params"])] == [2, 2]

    optimizer = build_optimizer(model, "1", "sgd", lr=0.1, backbone_lr=0.01, momentum=0.9, weight_decay=0.0)
    assert warmup_steps("2", steps_per_epoch=3, total_steps=10) == 6
    assert warmup_steps("4steps", 3, 10) == 4
    lrs = _lrs(build_scheduler(optimizer, "cosine", total_steps=10, warmup=4), optimizer, 10)
    assert [round(head, 6) for _, head in lrs[:5]] == [0.025, 0.05, 0.075, 0.1, 0.1]  # linear warmup, then cosine
    assert all(a > b for (_, a), (_, b) in zip(lrs[4:], lrs[5:]))
    assert all(abs(backbone * 10 - head) < 1e-12 for backbone, head in lrs)  # the ratio of the two groups stays

    optimizer = build_optimizer(model, "1", "sgd", lr=0.1, backbone_lr=0.1, momentum=0.9, weight_decay=0.0)
    lrs = [head for _, head in _lrs(build_scheduler(optimizer, "step", total_steps=9, warmup=0), optimizer, 9)]
    assert [round(v, 6) for v in lrs] == [0.1] * 3 + [0.01] * 3 + [0.001] * 3
    with pytest.raises(FeatxError, match="warmup='4': 12 steps, but the whole run has only 10"):
        warmup_steps("4", 3, 10)
    with pytest.raises(FeatxError, match="warmup='soon'"):
        warmup_steps("soon", 3, 10)


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle"])
def test_a_scheduler_continued_after_n_steps_is_that_schedule_from_step_n(schedule):
    """build_scheduler(done_steps=n) on a loaded optimizer: the rates of the same schedule stepped n times."""
    from featx.finetuning.optim import build_optimizer, build_scheduler

    def fresh():
        return build_optimizer(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "1", "adam", lr=0.1,
                               backbone_lr=0.01, momentum=0.9, weight_decay=0.0)

    reference = fresh()
    expected = _lrs(build_scheduler(reference, schedule, total_steps=12, warmup=2), reference, 12)
    shorter = fresh()
    _lrs(build_scheduler(shorter, schedule, total_steps=8, warmup=2), shorter, 5)  # 5 steps of an 8-step run
    continued = build_scheduler(shorter, schedule, total_steps=12, warmup=2, done_steps=5)
    np.testing.assert_allclose(_lrs(continued, shorter, 7), expected[5:], rtol=1e-12)
    if schedule == "onecycle":  # the momentum cycles with it
        assert shorter.param_groups[0]["betas"][0] == pytest.approx(reference.param_groups[0]["betas"][0])


def test_early_stop_and_best_epoch():
    from types import SimpleNamespace

    def state(accs, patience, epochs=10):
        history = [{"epoch": i + 1, "val_acc": acc} for i, acc in enumerate(accs)]
        trainer = SimpleNamespace(history=history, val_loader=object(), early_stop=patience, epochs=epochs,
                                  score_key="val_acc")
        trainer.best = Trainer.best.fget(trainer)
        return trainer.best["epoch"], Trainer.stopped_early.fget(trainer)

    assert state([0.5, 0.7, 0.7, 0.6], patience=2) == (2, True)  # ties keep the earlier epoch
    assert state([0.5, 0.7, 0.7], patience=2) == (2, False)
    assert state([0.5, 0.7, 0.6, 0.6], patience=None) == (2, False)
    assert state([0.5, 0.4, 0.3], patience=2, epochs=3) == (1, False)  # the run is over anyway


# ---- --unfreeze-at and --resume -----------------------------------------------------------------------------------

UNFREEZE = dict(FAST, freeze="backbone", unfreeze_at=2, train_bn=True, epochs=2, warmup="1", label_smoothing=0.1,
                lr=0.05)


@pytest.fixture(scope="module")
def clean_run(data, tmp_path_factory):
    """An uninterrupted 2-epoch run: head only in epoch 1 (but with BatchNorm statistics updating: --train-bn),
    everything from epoch 2 (--unfreeze-at 2)."""
    run = tmp_path_factory.mktemp("clean") / "run"
    return run, finetune(data, run, **UNFREEZE)


def test_run_folder_files(clean_run):
    run, result = clean_run
    assert result.epochs == 2 and len(result.history) == 2
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "last.pt", "curves.png"} <= names
    assert not [n for n in names if ".tmp-" in n]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    weights = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert weights["featx"]["backbone"] == "mobilenet_v3_small" and weights["featx"]["classes"] == ["ants", "bees"]
    assert weights["featx"]["epoch"] == result.best_epoch


def test_resume_equals_an_uninterrupted_run_across_unfreeze(data, clean_run, tmp_path):
    run, clean = clean_run
    initial_model = load_backbone("mobilenet_v3_small", "none").model
    initial = initial_model.state_dict()
    with pytest.raises(_Stop):
        finetune(data, tmp_path / "run", **UNFREEZE, log=_stop_after_epoch_1)
    after_1 = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert after_1["epoch"] == 1
    frozen = [n for n, _ in initial_model.named_parameters() if not n.startswith("classifier.3.")]
    assert all(torch.equal(after_1["model"][k], initial[k]) for k in frozen)  # frozen in epoch 1
    bn_stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and not any(torch.equal(after_1["model"][k], initial[k]) for k in bn_stats)  # --train-bn

    result = finetune(data, tmp_path / "run", **UNFREEZE, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]
    for got, want in zip(result.history, clean.history):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}
    for name in ("last.pt", "model.pt"):
        ours, theirs = _state(tmp_path / "run" / name), _state(run / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    final = _state(tmp_path / "run" / "last.pt")
    assert not torch.equal(final["features.0.0.weight"], initial["features.0.0.weight"])  # unfrozen at 2
    optimizer = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]
    assert len(optimizer["state"]) == len(frozen) + 2  # momentum for the unfrozen parameters and the head


def test_resume_with_other_settings_is_an_error(data, clean_run):
    run, _ = clean_run
    before = digest(run)
    with pytest.raises(OptionError, match=r"^output='.*': the run was recorded with other settings \(lr 0\.05 there, "
                                          r"0\.1 now;.*\(another output, or overwrite=True\)$"):
        finetune(data, run, **{**UNFREEZE, "lr": 0.1}, resume=True)
    with pytest.raises(FeatxError, match=r"^output=.*\(decode exact there, fast now\)"):
        finetune(data, run, **{**UNFREEZE, "decode": "fast"}, resume=True)
    with pytest.raises(FeatxError, match=r"^output=.*\(freeze "):
        finetune(data, run, **{**UNFREEZE, "freeze": "features.0"}, resume=True)
    assert digest(run) == before


def test_the_decode_mode_is_recorded_and_fast_decodes_jpegs_at_a_reduced_scale(tmp_path, monkeypatch, clean_run):
    run, _ = clean_run
    assert json.loads((run / "config.json").read_text())["decode"] == "exact"
    assert torch.load(run / "model.pt", weights_only=True)["featx"]["decode"] == "exact"
    data = make_image_folder(tmp_path / "data", per_class=4, size=(20, 20), ext="jpg")
    sizes = []
    real = D.decode_image
    monkeypatch.setattr(D, "decode_image", lambda path, **kw: sizes.append(kw.get("min_size")) or real(path, **kw))
    resize = load_backbone("mobilenet_v3_small", "none").transform.with_sizes(SIZE).resize
    finetune(data, tmp_path / "fast", **FAST, epochs=1, decode="fast", decode_cache="none")
    assert sizes and set(sizes) == {2 * resize}  # training and val images
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["decode"] == "fast"
    assert torch.load(tmp_path / "fast" / "model.pt", weights_only=True)["featx"]["decode"] == "fast"


def test_a_run_recorded_before_the_decode_mode_resumes_as_exact(data, clean_run, tmp_path):
    run, _ = clean_run
    old = tmp_path / "run"
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    del config["decode"]
    (old / "config.json").write_text(json.dumps(config))
    checkpoint = load_checkpoint(old / "checkpoint.pt")
    del checkpoint["config"]["decode"]
    torch.save(checkpoint, old / "checkpoint.pt")
    with pytest.raises(FeatxError, match=r"^output=.*\(decode exact there, fast now\)"):
        finetune(data, old, **{**UNFREEZE, "decode": "fast", "epochs": 3}, resume=True)
    result = finetune(**resume_arguments(old, {"epochs": 3, "workers": 0, "device": "cpu"}))
    assert result.trained_epochs == 1
    assert json.loads((old / "config.json").read_text())["decode"] == "exact"


def test_segmentation_refuses_fast_decoding(data, tmp_path):
    with pytest.raises(OptionError, match=r"^decode='fast' is for classification: task='segment' decodes images "
                                          r"at full size") as err:
        finetune(data, tmp_path / "seg", **FAST, task="segment", decode="fast")
    assert "\n" not in str(err.value) and not (tmp_path / "seg").exists()


def test_resume_of_a_completed_run_removes_stale_temporary_files_and_changes_nothing(data, clean_run):
    run, clean = clean_run
    before = digest(run)
    stale = run / ".checkpoint.pt.tmp-999999"  # what a kill during atomic_write leaves
    stale.write_bytes(b"half a checkpoint")
    result = finetune(data, run, **UNFREEZE, resume=True)
    assert result.history == clean.history
    assert not stale.exists()
    assert digest(run) == before


# ---- bad input: one FeatxError naming the option, and no file of the run folder touched ----------------------------

def _not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return str(tmp_path / "list.pt")


def _text_file(tmp_path):
    (tmp_path / "notes.pth").write_text("not weights")
    return str(tmp_path / "notes.pth")


BAD = [
    (dict(freeze="until:nope"), r"freeze='until:nope': no module named 'nope'; top-level modules: features, avgpool"),
    (dict(freeze=["backbone", "layer9.*"]), r"freeze='layer9\.\*': no parameter name matches.*top-level modules"),
    (dict(lr=0), r"lr=0: expected a number greater than 0"),
    (dict(lr=-0.1), r"lr=-0\.1"),
    (dict(backbone_lr=0.0), r"backbone_lr=0\.0"),
    (dict(batch_size=7), r"batch_size=7: larger than the 6 training images"),
    (dict(weights=_not_a_state_dict), r"weights='.*list\.pt' is not a state dict"),
    (dict(weights=_text_file), r"weights='.*notes\.pth': "),
    (dict(head="mlp:0"), r"head='mlp:0'"),
    (dict(unfreeze_at=3), r"unfreeze_at=3: the run has only 2 epochs"),
    (dict(freeze="none", unfreeze_at=2), r"unfreeze_at needs a freeze"),
    (dict(warmup="4"), r"warmup='4': 8 steps, but the whole run has only 4"),
    (dict(optimizer="lbfgs"), r"optimizer='lbfgs'"),
    (dict(label_smoothing=1.0), r"label_smoothing=1\.0"),
    (dict(val_split=1.5), r"val_split=1\.5"),
    (dict(seed=2**32), r"seed=4294967296: expected an integer from 0 to 4294967295"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0].split(" ")[0] + str(i) for i, (_, m)
                                                     in enumerate(BAD)])
def test_bad_input_is_one_error_and_leaves_the_run_folder_alone(data, clean_run, tmp_path, change, message):
    run, _ = clean_run
    before = digest(run)
    change = {k: v(tmp_path) if callable(v) else v for k, v in change.items()}
    with pytest.raises(FeatxError, match=message) as err:
        finetune(data, run, **{**UNFREEZE, **change}, overwrite=True)
    assert "\n" not in str(err.value)
    assert digest(run) == before


def test_out_of_memory_names_a_batch_size_and_leaves_the_run_folder_alone(data, clean_run, monkeypatch):
    run, _ = clean_run
    before = digest(run)

    def fit(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "fit", fit)
    with pytest.raises(FeatxError, match=r"out of memory on cpu at batch_size=3: try batch_size=1"):
        finetune(data, run, **UNFREEZE, overwrite=True)
    assert digest(run) == before


def test_a_run_folder_needs_resume_or_overwrite(data, clean_run, tmp_path):
    run, _ = clean_run
    with pytest.raises(OptionError, match=r"^output='.*': holds a run already .*; pass resume=True to continue it, or "
                                          r"overwrite=True to start a new one$"):
        finetune(data, run, **UNFREEZE)
    finetune(data, run, **UNFREEZE, resume=True)  # the failed call left no lock behind
    with pytest.raises(OptionError, match=r"^output='.*nothing': no such run folder to resume$"):
        finetune(data, tmp_path / "nothing", **UNFREEZE, resume=True)


# ---- what a call leaves in the run folder, and resuming or extending a run ------------------------------------------

def test_a_stopped_run_keeps_its_checkpoint_and_no_lock_or_decoded_cache(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        finetune(data, run, **UNFREEZE, log=_stop_after_epoch_1)
    assert {p.name for p in run.iterdir()} == {"config.json", "checkpoint.pt", "model.pt", "last.pt",
                                               "metrics.jsonl", "curves.png"}


def _stop_at_first_line(line: str) -> None:
    raise _Stop


def test_a_run_stopped_before_its_first_epoch_leaves_nothing(data, tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(_Stop):
        finetune(data, run, **UNFREEZE, log=_stop_at_first_line)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    with pytest.raises(_Stop):
        finetune(data, mine, **UNFREEZE, log=_stop_at_first_line)
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_resuming_a_complete_run_trains_nothing_and_says_so(data, clean_run):
    run, clean = clean_run
    before = digest(run)
    result = finetune(data, run, **UNFREEZE, resume=True)
    assert result.trained_epochs == 0 and result.history == clean.history
    assert result.summary().startswith(f"{run}: complete already, nothing to train (2 of 2 epochs")
    assert digest(run) == before


def test_more_epochs_extend_a_finished_run_on_the_longer_schedule(data, tmp_path):
    """Epochs 1-2 stay as they were; epoch 3 runs at the rates a 3-epoch run has from step 2 x steps on."""
    from featx.finetuning.optim import build_optimizer, build_scheduler

    options = dict(FAST, epochs=2, lr=0.05, optimizer="adam", warmup="2steps")
    first = finetune(data, tmp_path / "run", **options)
    lines = []
    longer = finetune(data, tmp_path / "run", **{**options, "epochs": 3}, resume=True, log=lines.append)
    assert longer.trained_epochs == 1 and [row["epoch"] for row in longer.history] == [1, 2, 3]
    assert longer.history[:2] == first.history
    steps = 2  # 6 training images, batch 3
    assert any(line.startswith(f"extending {tmp_path / 'run'} from 2 to 3 epochs") for line in lines)
    optimizer = build_optimizer(nn.Linear(2, 2), "bias", "adam", lr=0.05, backbone_lr=0.05, momentum=0.9,
                                weight_decay=0.0)
    rates = _lrs(build_scheduler(optimizer, "cosine", total_steps=3 * steps, warmup=2), optimizer, 3 * steps)
    assert longer.history[2]["lr"] == pytest.approx(rates[2 * steps][1]) and rates[2 * steps][1] > 0.01
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["epochs"] == 3
    with pytest.raises(FeatxError, match=r"epochs=2: the run in .* was recorded with 3 epochs \(3 done\): give 3 \(or leave epochs out\)"):
        finetune(data, tmp_path / "run", **options, resume=True)


def test_the_run_lock_refuses_a_second_writer_and_leaves_with_its_holder(tmp_path):
    from featx.finetuning.checkpoint import CHECKPOINT, LOCK, RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"a run's progress")
    holder = RunDir(run)
    assert holder.prepare(resume=False, overwrite=True) is None
    with pytest.raises(FeatxError, match=r"is being written by another featx finetune process"):
        RunDir(run).prepare(resume=False, overwrite=True)
    holder.release()
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT]  # progress stays, the lock file goes
    again = RunDir(run)
    again.prepare(resume=False, overwrite=True)
    assert (run / LOCK).exists()
    again.release()
    assert not (run / LOCK).exists()
