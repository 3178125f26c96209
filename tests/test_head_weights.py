"""Weights files after the fact: a head whose weights file moved takes it again with -w (checked by sha256) in
predict, evaluate and serve; a weights file written by `featx finetune` names its backbone, so -b is not needed."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torchvision

import featx
from featx.backbones import load_backbone
from featx.cli import main
from featx.errors import FeatxError
from cli_support import invoke as run
from heads_support import blob_store
from imagegen import make_image_folder
from options_support import HEAD_EXTRACT

EXTRACT = {name: value for name, value in HEAD_EXTRACT.items() if name not in ("backbone", "weights")}  # per test


def random_weights(path, seed: int, featx_meta: dict | None = None, num_classes: int = 1000):
    """A resnet18 state dict of seeded random values; with `featx_meta`, saved as `featx finetune` saves model.pt."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(num_classes=num_classes).state_dict()
    torch.save({"model": state, "featx": featx_meta} if featx_meta else state, path)
    return path


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A head fitted on features of a weights file that was then moved (same name) and copied (another name)."""
    root = tmp_path_factory.mktemp("moved")
    data = make_image_folder(root / "data", per_class=4, splits={"train": 4, "val": 2})
    weights = random_weights(root / "w.pth", seed=1)
    featx.extract(data, root / "s.h5", backbone="resnet18", weights=str(weights), **EXTRACT)
    head = featx.fit_head(root / "s.h5", "avgpool", root / "head", grid=1.0, plots=False, n_jobs=1)
    expected = featx.predict(head, root / "s.h5")
    (root / "elsewhere").mkdir()
    shutil.move(weights, root / "elsewhere" / "w.pth")
    shutil.copy(root / "elsewhere" / "w.pth", root / "renamed.pth")
    random_weights(root / "other.pth", seed=2)
    return root, data, expected


def test_predict_names_the_option_for_a_moved_weights_file(moved):
    root, data, _ = moved
    with pytest.raises(FeatxError, match=r"^the weights file .*/w\.pth that the features were computed with is missing: "
                                         r"pass weights=.FILE., that file where it is now \(the file of sha256 [0-9a-f]{16}"):
        featx.predict(root / "head", data, workers=0)
    out = run("predict", root / "head", data, "-q")
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "pass -w FILE" in out.output, out.output


@pytest.mark.parametrize("given", ["elsewhere/w.pth", "renamed.pth"])
def test_predict_and_evaluate_take_the_moved_file_with_w(moved, given):
    root, data, expected = moved
    on_images = featx.predict(root / "head", data, weights=root / given, workers=0)
    assert list(on_images.names) == list(expected.names)
    np.testing.assert_allclose(on_images.scores, expected.scores, rtol=1e-5, atol=1e-6)
    metrics = featx.evaluate(root / "head", data, weights=str(root / given), workers=0)
    assert metrics["split"] == "val" and metrics["rows"] == {"eval": 4}
    out = run("predict", root / "head", data, "-w", root / given, "-q")
    assert out.exit_code == 0 and out.stdout.count("\n") == 1 + len(expected), out.output


def test_a_weights_file_of_other_bytes_is_one_line_naming_both(moved):
    root, data, _ = moved
    with pytest.raises(FeatxError, match=r"^weights='.*other\.pth': sha256 [0-9a-f]{16}\.\.\., but the features were computed "
                                         r"with w\.pth \(the file of sha256 "):
        featx.predict(root / "head", data, weights=root / "other.pth", workers=0)
    out = run("evaluate", root / "head", data, "-w", root / "nope.pth")
    assert out.exit_code == 2 and "-w " in out.output and "nope.pth: no such file" in out.output, out.output


def test_w_for_a_head_on_named_weights_says_to_drop_it(moved, tmp_path):
    root, data, _ = moved
    blob_store(tmp_path / "s.h5")  # its config: resnet18 with weights 'none'
    featx.fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, plots=False, n_jobs=1)
    with pytest.raises(FeatxError, match=r"^weights='.*renamed\.pth': the features were computed with weights none, not "
                                         r"with a file: drop weights$"):
        featx.predict(tmp_path / "head", data, weights=root / "renamed.pth", workers=0)


def test_serve_takes_moved_weights_files(moved):
    pytest.importorskip("fastapi")
    from featx.serve.options import ServeOptions
    from featx.serve.service import Service

    root, _, _ = moved
    with pytest.raises(FeatxError, match=r"w\.pth that the features were computed with is missing: pass weights='FILE'"):
        Service(ServeOptions(heads=[str(root / "head")]).checked())
    with pytest.raises(FeatxError, match=r"^weights='.*other\.pth': sha256 [0-9a-f]{16}\.\.\. is the weights of none of the "
                                         r"served heads"):
        Service(ServeOptions(heads=[str(root / "head")], weights=[str(root / "elsewhere" / "w.pth"),
                                                                  str(root / "other.pth")]).checked())
    with pytest.raises(FeatxError, match=r"^weights='.*nope\.pth': no such file"):
        ServeOptions(heads=[str(root / "head")], weights=[str(root / "nope.pth")]).checked()
    service = Service(ServeOptions(heads=[str(root / "head")], weights=[str(root / "renamed.pth")]).checked())
    try:
        service.start()
        assert service.ready and service.failure is None and len(service.engine.extractors) == 1
    finally:
        service.close()


# --------------------------------------------------------------------------------------------------------------------
# the backbone a featx finetune weights file records


FINETUNED = {"backbone": "resnet18", "num_classes": 2, "classes": ["ants", "bees"], "head": "linear"}


def test_a_featx_weights_file_names_its_backbone(tmp_path, image_folders):
    model_pt = random_weights(tmp_path / "model.pt", seed=3, featx_meta=FINETUNED, num_classes=2)
    bb = load_backbone(None, str(model_pt))
    assert bb.name == "resnet18" and bb.model.fc.out_features == 2
    with pytest.raises(FeatxError, match=r"^weights='.*model\.pt': was trained from backbone resnet18, not backbone='resnet34'"):
        load_backbone("resnet34", str(model_pt))
    plain = random_weights(tmp_path / "plain.pth", seed=3, num_classes=2)
    assert load_backbone(None, "none").name == "resnet50"  # the default when nothing names one

    data = image_folders("data", per_class=2)
    result = featx.extract(data, tmp_path / "s.h5", weights=str(model_pt), **EXTRACT)
    assert result.config["backbone"] == "resnet18"
    again = featx.extract(data, tmp_path / "s.h5", weights=str(model_pt), **EXTRACT)
    assert again.n_computed == 0 and not again.sealed  # an unchanged rerun, before anything is built

    table = run("layers", "-w", model_pt, "--image-size", "32")
    assert table.exit_code == 0 and "flatten" in table.output, table.output
    for args, message in [(("resnet34", "-w", model_pt), "was trained from backbone resnet18, not resnet34 (drop BACKBONE to use resnet18)"),
                          (("-w", plain), "records no backbone (it was not written by featx finetune)"),
                          ((), "give a BACKBONE name")]:
        out = run("layers", *args)
        assert out.exit_code == 2 and message in out.output and out.output.count("\n") == 1, out.output
    out = run("extract", data, "-w", model_pt, "-b", "resnet34", "-o", tmp_path / "t.h5", "-q")
    assert out.exit_code == 2 and "not -b resnet34 (drop -b to use resnet18)" in out.output, out.output


def test_every_command_with_b_and_w_defaults_b_to_the_file():
    for name, args in {"extract": ["d", "-o", "s.h5"], "finetune": ["d", "-o", "run"], "advise": ["d"]}.items():
        command = main.commands[name]
        (backbone,) = [p for p in command.params if "-b" in p.opts]  # advise takes several: its name is backbones
        assert command.make_context(name, args).params[backbone.name] in (None, ()), name
        assert "a -w file from featx finetune records" in backbone.help, name
    (argument,) = [p for p in main.commands["layers"].params if p.name == "backbone"]
    assert not argument.required
