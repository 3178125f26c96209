"""An unchanged rerun of `featx extract`, and `featx predict` on images already in the head's cache, answer before
torch is imported; any change still runs for real."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featx.extract_request import EXTRACT_DEFAULTS, FORCING, NOT_IDENTITY, describe
from imagegen import make_image
from options_support import EXTRACT_ARGS

FAST = [*EXTRACT_ARGS, "--json"]
# Runs the CLI in a fresh interpreter and reports, after it, whether torch (and scikit-learn) were imported.
PROBE = (
    "import sys, json\n"
    "from featx.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "print(json.dumps({'torch': 'torch' in sys.modules, 'code': code, 'sklearn': 'sklearn' in sys.modules}))\n"
)


def featx(*args) -> tuple[dict | str, dict, str]:
    """(the --json result, or the output text, {torch imported, exit code}, stderr) of `featx ARGS` in a
    subprocess."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    *body, probe = proc.stdout.strip().splitlines()
    text = "\n".join(body)
    probe = json.loads(probe)
    if args[0] != "predict":
        del probe["sklearn"]  # extract's checks are about torch alone
    return (json.loads(text) if text.startswith("{") else text), probe, proc.stderr


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def made(image_folder, tmp_path):
    data = image_folder
    out = tmp_path / "out" / "s.h5"
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe == {"torch": True, "code": 0} and result["computed"] == 6
    return data, out


def test_unchanged_rerun_imports_no_torch_and_leaves_nothing(made):
    data, out = made
    before = listing(out.parent)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe == {"torch": False, "code": 0}
    assert (result["items"], result["computed"], result["reused"], result["failed"]) == (6, 0, 6, 0)
    assert listing(out.parent) == before  # no STORE.parts/ nor anything else new
    text, probe, _ = featx("extract", data, "-o", out, *FAST[:-1])
    assert probe == {"torch": False, "code": 0}
    assert f"6 images in {out} " in text and "(already up to date): 0 computed, 6 reused, 0 dropped, 0 failed" in text


def test_a_store_of_two_data_answers_either_rerun_before_importing_torch(made, tmp_path, image_folders):
    data, out = made
    other = image_folders("other", classes=("cats",), per_class=2, seed=4)
    added, probe, _ = featx("extract", other, "-o", out, *FAST)
    assert probe["torch"] is True and (added["computed"], added["other_data"]) == (2, {str(data.resolve()): 6})
    for folder, items in ((data, 6), (other, 2), (data, 6)):
        result, probe, _ = featx("extract", folder, "-o", out, *FAST)
        assert probe == {"torch": False, "code": 0} and (result["items"], result["dropped"]) == (items, 0)
    pruned, probe, _ = featx("extract", other, "-o", out, *FAST, "--prune")  # drops rows: a real run
    assert probe["torch"] is True and (pruned["computed"], pruned["dropped"]) == (0, 6)
    _, probe, _ = featx("extract", other, "-o", out, *FAST, "--prune")  # then nothing left to drop
    assert probe == {"torch": False, "code": 0}


def test_an_unchanged_undecodable_file_keeps_the_fast_path_and_is_reported(made):
    data, out = made
    (data / "ants" / "notes.jpg").write_text("a text file named .jpg")
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe["torch"] is True and (result["computed"], result["failed"], result["still_failing"]) == (0, 1, 0)
    text, probe, err = featx("extract", data, "-o", out, *FAST[:-1])
    assert probe == {"torch": False, "code": 0}
    assert "failed: ants/notes.jpg: " in err
    assert "(already up to date): 0 computed, 6 reused, 0 dropped, 1 failed (1 still fails: unchanged" in text


def test_options_that_do_not_change_rows_keep_the_fast_path(made):
    data, out = made
    _, probe, _ = featx("extract", data, "-o", out, *FAST[:-3], "--batch-size", "2", "--workers", "1", "--json")
    assert probe == {"torch": False, "code": 0}


def test_changed_file_runs_for_real(made):
    data, out = made
    victim = next((data / "ants").iterdir())
    make_image(victim, cls=0, seed=99)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe["torch"] is True and result["computed"] == 1


def test_new_file_runs_for_real(made):
    data, out = made
    make_image(data / "bees" / "new.png", cls=1, seed=77)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe["torch"] is True and (result["items"], result["computed"]) == (7, 1)


@pytest.mark.parametrize("option", [["--pooling", "max"], ["--precision", "fp32"], ["--image-size", "40"],
                                    ["-l", "layer3"], ["--dtype", "float16"]])
def test_changed_identity_option_runs_for_real(made, option):
    data, out = made
    _, probe, err = featx("extract", data, "-o", out, *FAST, *option)
    assert probe["torch"] is True
    if probe["code"] == 2:  # another config for this store: the real run's one-line refusal
        assert "was made with another config" in err


def test_overwrite_runs_for_real(made):
    data, out = made
    result, probe, _ = featx("extract", data, "-o", out, *FAST, "--overwrite")
    assert probe["torch"] is True and result["computed"] == 6


def test_changed_weights_file_runs_for_real(tmp_path, image_folders):
    torch = pytest.importorskip("torch")
    import torchvision

    data = image_folders("data", per_class=2)
    weights = tmp_path / "w.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "s.h5"
    args = ["extract", data, "-o", out, *FAST[:2], "-w", weights, *FAST[4:]]
    assert featx(*args)[1]["torch"] is True
    assert featx(*args)[1] == {"torch": False, "code": 0}
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    _, probe, err = featx(*args)
    assert probe["torch"] is True and probe["code"] == 2 and "another config" in err


def test_description_covers_every_extract_option():
    """A new option of extract is part of the identity unless it is declared unable to change rows."""
    import inspect

    from featx.extraction import extract

    parameters = set(inspect.signature(extract).parameters)
    assert set(describe({name: None for name in parameters})) == parameters - NOT_IDENTITY - FORCING
    assert {"weights", "weights_match", "taps", "pooling", "precision", "dtype", "decode"} <= set(
        describe({name: None for name in parameters}))


def test_extract_defaults_are_extracts_own():
    """featx.extract_request completes a call's arguments without importing extract: its defaults must be extract's."""
    import inspect

    from featx.extraction import extract

    parameters = inspect.signature(extract).parameters
    assert EXTRACT_DEFAULTS == {name: p.default for name, p in parameters.items() if p.default is not p.empty}


@pytest.fixture
def head_on_images(made, tmp_path):
    """A head fitted on the store of `made`, and the CSV of its first `featx predict` on the same images."""
    data, out = made
    head = tmp_path / "head"
    fit, probe, err = featx("fit-head", out, "-o", head, "--grid", "1", "--no-plots", "--val-split", "0")
    assert probe["code"] == 0, err
    first, probe, err = featx("predict", head, data)
    assert probe["torch"] is True and probe["code"] == 0, err
    return data, head, first


def test_predict_on_cached_images_builds_no_backbone(head_on_images):
    data, head, first = head_on_images
    before = listing(head)
    again, probe, err = featx("predict", head, data)
    assert probe == {"torch": False, "sklearn": False, "code": 0}, err
    assert again == first and again.count("\n") == 6  # header + 6 rows, the same predictions
    assert listing(head) == before


def test_predict_on_a_changed_image_runs_for_real(head_on_images):
    data, head, first = head_on_images
    make_image(next((data / "bees").iterdir()), cls=0, seed=123)
    again, probe, err = featx("predict", head, data)
    assert probe["torch"] is True and probe["code"] == 0, err
    assert again.count("\n") == 6
