"""`featx finetune` through the command line: per-epoch lines and the run folder, one-line errors with exit code 2,
and a finetuned RUN/model.pt as -w of extract (then fit-head and predict on images) and of another finetune."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from featx.finetuning.options import FinetuneOptions
from featx.store import open_store
from finetune_support import digest
from imagegen import make_image_folder
from options_support import FINETUNE, cli_args

FAST = (*cli_args({name: value for name, value in FINETUNE.items() if name != "weights"}, FinetuneOptions), "-q")
FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "last.pt", "curves.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cli):
    """A 2-epoch run of the command on 8 tiny images (6 train, 2 val)."""
    root = tmp_path_factory.mktemp("ftcli")
    data = make_image_folder(root / "data", per_class=4, size=(20, 20))
    result = cli("finetune", data, "-w", "none", "--epochs", "2", "--lr", "0.05", *FAST, "-o", root / "run")
    assert result.exit_code == 0, result.output
    return data, root / "run", result


def test_run_prints_epoch_lines_and_writes_the_run_folder(trained):
    _, run, result = trained
    err = result.stderr.splitlines()
    assert err[0].startswith("data: ImageFolder ") and "validation: 20% of the training images held out (2)" in err[0]
    header = next(i for i, line in enumerate(err) if line.split()[:3] == ["module", "trainable", "frozen"])
    assert [line.split()[0] for line in err[header + 1:header + 4]] == ["features", "classifier", "total"]
    epochs = [line for line in err if line.startswith("Epoch ")]
    assert len(epochs) == 2 and epochs[0].startswith("Epoch 1/2  train loss ") and " val loss " in epochs[1]
    assert epochs[1].endswith("img/s")
    assert "2 epochs in " in result.stdout and f"{run}/model.pt" in result.stdout
    assert set(FILES) <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "mobilenet_v3_small" and config["epochs"] == 2 and config["lr"] == 0.05
    assert config["decode"] == "exact"


def test_model_pt_as_weights_of_extract_fit_head_and_predict(cli, trained, tmp_path):
    data, run, _ = trained
    weights = run / "model.pt"
    out = cli("extract", data, "-b", "mobilenet_v3_small", "-w", weights, "--image-size", "16", "--workers", "0",
              "--precision", "fp32", "--device", "cpu", "-q", "-o", tmp_path / "s.h5")
    assert out.exit_code == 0, out.output
    with open_store(tmp_path / "s.h5") as store:
        assert len(store) == 8 and store.config["weights"] == "file:model.pt"
    fit = cli("fit-head", tmp_path / "s.h5", "-o", tmp_path / "head", "--grid", "1", "--no-plots")
    assert fit.exit_code == 0, fit.output
    predicted = cli("predict", tmp_path / "head", data, "--json")
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.stdout)) == 8


def test_model_pt_as_weights_of_another_finetune(cli, trained, tmp_path):
    """The load report: every key matched; --freeze loaded: only the new head trains."""
    data, run, _ = trained
    out = cli("finetune", data, "-w", run / "model.pt", "--freeze", "loaded", "--epochs", "1", "--augment", "none",
              *FAST, "-o", tmp_path / "again")
    assert out.exit_code == 0, out.output
    assert "weights model.pt: " in out.stderr and " 0 missing, 0 unexpected, 0 shape-mismatched" in out.stderr
    total = next(line for line in out.stderr.splitlines() if line.startswith("total"))
    assert total.split()[1] == f"{1024 * 2 + 2:,}"  # classifier.3, Linear(1024, 2)
    assert "Epoch 1/1  train loss " in out.stderr and (tmp_path / "again" / "model.pt").is_file()


def _not_weights(tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    return tmp_path / "w.pth"


BAD = [
    (("--freeze", "until:nope"), "--freeze until:nope: no module named 'nope'; top-level modules: features"),
    (("--freeze", "nothing*"), "--freeze 'nothing*': no parameter name matches"),
    (("--lr", "0"), "--lr 0.0: expected a number greater than 0"),
    (("--backbone-lr", "-1"), "--backbone-lr -1.0"),
    (("--batch-size", "50"), "--batch-size 50: larger than the 6 training images"),
    (("-w", _not_weights), "-w "),
    (("--head", "mlp:x"), "--head mlp:x"),
    (("--task", "segment", "--decode", "fast"), "--decode fast is for classification: --task segment decodes images"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[needle.split(":")[0].split()[0] for _, needle in BAD])
def test_bad_input_is_one_line_and_exit_code_2(cli, trained, tmp_path, args, needle):
    data, run, _ = trained
    args = [a(tmp_path) if callable(a) else a for a in args]
    before = digest(run)
    opts = ("-w", "none", *FAST) if "-w" not in args else FAST
    out = cli("finetune", data, *opts, *args, "--epochs", "2", "--overwrite", "-o", run)
    assert out.exit_code == 2, out.output
    err = out.stderr.strip()
    assert err.startswith("featx: error: ") and "\n" not in err and needle in err, err
    assert "Traceback" not in out.output
    assert digest(run) == before


def test_resume_errors(cli, trained, tmp_path):
    data, run, _ = trained
    before = digest(run)
    for args, needle in (
        (("--resume", run, "--lr", "0.5"),
         f"--resume {run}: the run was recorded with other settings (--lr 0.05 there, 0.5 now): leave those out"),
        (("--resume", run, "--decode", "fast"), "other settings (--decode exact there, fast now): leave those"),
        (("--resume", run, "--epochs", "1"), "--epochs 1: the run in "),
        (("--resume", tmp_path / "nothing"), f"--resume {tmp_path / 'nothing'}: no such run folder to resume"),
        (("--resume", run, "-o", tmp_path / "other"), "give one run folder"),
        ((), "give the run folder with -o RUN_DIR"),
        (("-o", run), f"-o {run}: holds a run already (checkpoint.pt); pass --resume {run} to continue it, or "
                      "--overwrite to start"),
    ):
        out = cli("finetune", data, "-w", "none", "--epochs", "2", *FAST, *args)
        err = out.stderr.strip()
        assert out.exit_code == 2 and err.startswith("featx: error: ") and "\n" not in err and needle in err, err
    assert digest(run) == before


def test_resume_of_the_finished_run_as_json(cli, trained):
    data, run, _ = trained
    out = cli("finetune", data, "-w", "none", "--epochs", "2", "--lr", "0.05", *FAST, "--resume", run, "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["epochs"] == 2 and [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["run_dir"] == str(run) and not out.stderr


def test_resume_alone_continues_with_what_the_run_recorded(cli, trained, tmp_path):
    """`--resume RUN` without DATA or options: a complete run says so and trains nothing; --epochs above the
    recorded number extends it with the recorded data, backbone, weights and options; free options may differ."""
    _, run, _ = trained
    before = digest(run)
    out = cli("finetune", "--resume", run, "--workers", "0", "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert out.stdout.strip().startswith(f"{run}: complete already, nothing to train (2 of 2 epochs")
    assert "give more than 2 epochs to train it further" in out.stdout and " epochs in " not in out.stdout and not out.stderr
    assert digest(run) == before and not [p for p in run.iterdir() if p.name.startswith(".featx")]
    as_json = json.loads(cli("finetune", "--resume", run, "--json").stdout)
    assert as_json["trained_epochs"] == 0 and as_json["epochs"] == 2

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = cli("finetune", "--resume", copy, "--epochs", "3", "-q")
    assert out.exit_code == 0, out.output
    assert f"extending {copy} from 2 to 3 epochs, after epoch 2" in out.stderr and "3 epochs in " in out.stdout
    config = json.loads((copy / "config.json").read_text())
    assert config["epochs"] == 3 and config["backbone"] == "mobilenet_v3_small" and config["lr"] == 0.05
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_alone_with_a_moved_weights_file(cli, trained, tmp_path):
    """A run whose -w FILE moved: one line naming the file; -w with the same file elsewhere continues it."""
    data, run, _ = trained
    weights = tmp_path / "w.pt"
    shutil.copy(run / "model.pt", weights)
    out = cli("finetune", data, "-w", weights, "--freeze", "loaded", "--epochs", "1", *FAST, "-o", tmp_path / "r")
    assert out.exit_code == 0, out.output
    weights.rename(tmp_path / "moved.pt")
    out = cli("finetune", "--resume", tmp_path / "r", "--epochs", "2")
    assert out.exit_code == 2 and out.stderr.count("\n") == 1
    assert f"--resume {tmp_path / 'r'}: the run's weights file {weights} is gone; pass -w FILE with the same file" \
        in out.stderr
    out = cli("finetune", "--resume", tmp_path / "r", "--epochs", "2", "-w", tmp_path / "moved.pt", "-q")
    assert out.exit_code == 0, out.output
    assert "2 epochs in " in out.stdout


def test_a_run_that_fails_before_its_first_epoch_leaves_nothing(cli, trained, tmp_path):
    """The folders this call created are gone; a folder that existed keeps only what it held."""
    data, _, _ = trained
    out = cli("finetune", data, "-w", "none", *FAST, "--batch-size", "50", "-o", tmp_path / "new" / "run")
    assert out.exit_code == 2 and "--batch-size 50" in out.stderr
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    out = cli("finetune", data, "-w", "none", *FAST, "--batch-size", "50", "-o", kept)
    assert out.exit_code == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    out = cli("finetune", "-w", "none", *FAST, "-o", tmp_path / "r")
    assert out.exit_code == 2 and "give DATA" in out.stderr and not (tmp_path / "r").exists()


# ---- Ctrl-C on a real process ---------------------------------------------------------------------------------------

def _interrupt(proc, after: str) -> tuple[int, str]:
    """Send a started `featx` process SIGINT once a stderr line contains `after`; (exit status, stderr)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if after in line:
            proc.send_signal(signal.SIGINT)
            break
    seen.append(proc.stderr.read())
    return proc.wait(timeout=120), "".join(seen)


@pytest.mark.slow
def test_ctrl_c_keeps_completed_epochs_and_resume_alone_continues(featx_run, trained, tmp_path):
    data, _, _ = trained
    run = tmp_path / "run"
    # a loader worker: Ctrl-C also reaches it, and no decoded image may be left behind
    options = [option if option != "0" else "1" for option in FAST]  # --workers 1
    code, err = _interrupt(featx_run("finetune", data, "-w", "none", "--epochs", "3", *options, "-o", run, wait=False),
                           after="Epoch 1/3")
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"featx: interrupted: {run} keeps 1 completed epoch; continue with: "
                                            f"featx finetune --resume {run}")
    assert {p.name for p in run.iterdir()} == set(FILES)
    resumed = featx_run("finetune", "--resume", run, "--workers", "0", "-q", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch 1/3" in resumed.stderr and "3 epochs in " in resumed.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and set(FILES) == {p.name for p in run.iterdir()}


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_leaves_no_run_folder(featx_run, image_folders, tmp_path):
    data = image_folders(per_class=24, size=(48, 48))
    run = tmp_path / "runs" / "first"
    # the signal comes as the loader starts its worker: held back during the fork, then delivered
    code, err = _interrupt(featx_run("finetune", data, "-b", "resnet18", "-w", "none", "--image-size", "48",
                                     "--batch-size", "2", "--workers", "1", "--precision", "fp32", "--device", "cpu",
                                     "-q", "-o", run, wait=False),
                           after="decoded-image cache")
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"featx: interrupted before the first epoch completed: nothing was kept in {run}"
    assert not (tmp_path / "runs").exists()
