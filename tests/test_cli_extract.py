"""`featx extract`, `info` and `layers` through click's runner: output, JSON, exit codes and one-line errors."""
from __future__ import annotations

import json
import os

import pytest

from cli_support import invoke as run
from options_support import EXTRACT_ARGS as FAST


@pytest.fixture
def folder(image_folder):
    return image_folder


def test_extract_info_round_trip(folder, tmp_path):
    out = tmp_path / "s.h5"
    res = run("extract", folder, "-o", out, "-l", "layer1", "-l", "avgpool", *FAST)
    assert res.exit_code == 0, res.output
    assert "6 images" in res.output and "6 computed" in res.output and "img/s" in res.output
    res = run("info", out, "--json")
    info = json.loads(res.output)
    assert info["items"] == 6 and info["classes"] == {"ants": 3, "bees": 3}
    assert info["taps"]["avgpool"]["shape"] == [512]
    text = run("info", out).output
    assert "resnet18" in text and "layer1" in text


def test_extract_json_and_rerun(folder, tmp_path):
    out = tmp_path / "s.h5"
    first = json.loads(run("extract", folder, "-o", out, "--json", *FAST).output)
    second = json.loads(run("extract", folder, "-o", out, "--json", *FAST).output)
    assert (first["computed"], second["computed"], second["reused"]) == (6, 0, 6)


def test_layers_table_and_list():
    res = run("layers", "resnet18", "--image-size", "64", "-n", "1000")
    assert res.exit_code == 0, res.output
    assert "layer4" in res.output and "penultimate" in res.output
    names = run("layers", "--list").output.split()
    assert "resnet50" in names and "vit_b_16" in names


def _error_line(res):
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("featx: error:"), res.output
    return lines[0]


def test_bad_input_one_line_exit_2(folder, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    assert "nope" in _error_line(run("extract", tmp_path / "nope", "-o", out, *FAST))
    (tmp_path / "empty").mkdir()
    assert "empty" in _error_line(run("extract", tmp_path / "empty", "-o", out, *FAST))
    assert "resnet50" in _error_line(run("extract", folder, "-o", out, *FAST, "-b", "resnet5"))
    assert "layer1" in _error_line(run("extract", folder, "-o", out, *FAST, "-l", "layer9"))
    monkeypatch.setenv("FEATX_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    line = _error_line(run("extract", folder, "-o", out, *FAST, "-w", "IMAGENET1K_V1"))
    assert ".pth" in line and "-w" in line


def test_existing_store_with_other_config_keeps_rows(folder, tmp_path):
    out = tmp_path / "s.h5"
    run("extract", folder, "-o", out, *FAST)
    before = out.read_bytes()
    line = _error_line(run("extract", folder, "-o", out, *FAST, "--pooling", "max"))
    assert "--overwrite" in line and "pooling=avg" in line and "pooling=max" in line
    assert out.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(folder, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable" in _error_line(run("extract", folder, "-o", locked / "s.h5", *FAST))


def test_output_is_a_folder(folder, tmp_path):
    assert "folder" in _error_line(run("extract", folder, "-o", tmp_path, *FAST))


def test_info_on_garbage(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(os.urandom(2000))
    assert "bad.h5" in _error_line(run("info", bad))


STARTUP = """
import sys
from click.testing import CliRunner
from featx.cli import main
for args in (["--help"], ["info", {store!r}], ["fit-head", "--help"], ["finetune", "--help"], ["layers", "--help"]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output)
heavy = sorted({{"torch", "torchvision", "sklearn"}} & set(sys.modules))
assert not heavy, "importing the CLI loaded " + ", ".join(heavy)
"""


def test_help_and_info_do_not_import_torch(tmp_path):
    """`featx --help` and `featx info` take a fraction of a second: every command builds its options without torch
    (the choice lists live in featx/choices.py and featx/finetuning/choices.py) and imports the engine when it runs."""
    import subprocess
    import sys

    from heads_support import blob_store

    blob_store(tmp_path / "s.h5")
    code = STARTUP.format(store=str(tmp_path / "s.h5"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, names", [
    (["finetune", "data", "--batch-size", "0"], "--batch-size"),
    (["extract", "digits", "--pooling", "bogus"], "--pooling"),
    (["extract"], "DATA"),
    (["nosuch"], "nosuch"),
    (["--bogus"], "featx: error: featx: No such option '--bogus'"),  # featx's own options, before the command
    (["--verbose", "extract", "data"], "--verbose"),
    (["-w", "none", "extract"], "-w"),
])
def test_usage_mistakes_are_one_line_naming_the_option(args, names):
    result = run(*args)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and names in result.output and "Usage:" not in result.output
    assert result.output.startswith("featx: error: ") and "(see featx" in result.output


def test_second_data_adds_its_rows_and_prune_mirrors_one(folder, tmp_path, image_folders):
    """Extracting another folder into a store keeps the first folder's rows and says so; --prune drops them."""
    out = tmp_path / "s.h5"
    other = image_folders("other", classes=("cats", "dogs"), per_class=2, seed=5)
    run("extract", folder, "-o", out, *FAST)
    added = run("extract", other, "-o", out, *FAST)
    assert added.exit_code == 0, added.output
    assert f"4 images in {out} " in added.output and "4 computed, 0 reused, 0 dropped, 0 failed" in added.output
    assert f"it also keeps 6 rows of {folder.resolve()}" in added.output
    info = json.loads(run("info", out, "--json").output)
    assert info["items"] == 10 and info["roots"] == {str(folder.resolve()): 6, str(other.resolve()): 4}
    assert info["classes"] == {"ants": 3, "bees": 3, "cats": 2, "dogs": 2}
    assert f"data       {folder.resolve()} (6 rows), {other.resolve()} (4 rows)" in run("info", out).output
    again = json.loads(run("extract", folder, "-o", out, "--json", *FAST).output)  # nothing to do, nothing lost
    assert (again["computed"], again["reused"], again["dropped"], again["other_data"]) == (0, 6, 0, {str(other.resolve()): 4})
    pruned = json.loads(run("extract", other, "-o", out, "--json", "--prune", *FAST).output)
    assert (pruned["items"], pruned["computed"], pruned["dropped"], pruned["other_data"]) == (4, 0, 6, {})
    assert json.loads(run("info", out, "--json").output)["roots"] == {str(other.resolve()): 4}


def test_dropping_many_rows_of_gone_files_needs_prune(tmp_path, image_folders):
    data = image_folders("data", per_class=8)
    out = tmp_path / "s.h5"
    run("extract", data, "-o", out, *FAST)
    for victim in sorted((data / "ants").iterdir())[:3]:
        victim.unlink()
    few_gone = json.loads(run("extract", data, "-o", out, "--json", *FAST).output)
    assert (few_gone["items"], few_gone["computed"], few_gone["dropped"]) == (13, 0, 3)
    for victim in sorted(data.rglob("*.png"))[:6]:
        victim.unlink()
    before = out.read_bytes()
    line = _error_line(run("extract", data, "-o", out, *FAST))
    assert f"{out}: this run would drop 6 rows of files gone from {data.resolve()}" in line and "--prune" in line
    assert out.read_bytes() == before and not (tmp_path / "s.h5.parts").exists()
    pruned = json.loads(run("extract", data, "-o", out, "--json", "--prune", *FAST).output)
    assert (pruned["items"], pruned["dropped"]) == (7, 6)


def test_extract_onto_a_file_that_is_no_store_hints_overwrite_and_leaves_nothing(folder, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"not hdf5 at all")
    line = _error_line(run("extract", folder, "-o", out, *FAST))
    assert f"{out}: not a readable HDF5 file" in line and "--overwrite replaces it" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "s.h5"]
    assert run("extract", folder, "-o", out, "--overwrite", *FAST).exit_code == 0


def test_a_run_that_fails_before_its_first_batch_leaves_no_parts_folder(folder, tmp_path):
    (folder / "ants" / "aa_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the first file computed
    out = tmp_path / "s.h5"
    assert "aa_broken.png" in _error_line(run("extract", folder, "-o", out, *FAST, "--on-error", "fail"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_info_on_an_interrupted_first_run_says_how_to_resume(folder, tmp_path):
    (folder / "bees" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the last file computed
    out = tmp_path / "s.h5"
    _error_line(run("extract", folder, "-o", out, *FAST, "--batch-size", "2", "--on-error", "fail"))
    line = _error_line(run("info", out))
    assert f"{out}: no store sealed yet; {out}.parts holds 3 committed batches (6 rows)" in line
    assert "run the same command again to resume" in line
    assert run("extract", folder, "-o", out, *FAST).exit_code == 0
    text = run("info", out).output
    assert "items      6 (classification), failed 1" in text and "unfinished" not in text


def test_names_longer_than_the_file_system_allows(folder, tmp_path):
    long = "x" * 300
    assert _error_line(run("info", long)) == f"featx: error: {long}: File name too long"
    line = _error_line(run("fit-head", long, "-o", tmp_path / "head"))
    assert line == f"featx: error: STORE {long}: File name too long, expected a featx store (.h5) or an HDF5/NPZ feature file"
    assert _error_line(run("extract", folder, "-o", tmp_path / long, *FAST)).endswith(": File name too long")


def test_numbers_beyond_any_batch_or_worker_count(folder, tmp_path):
    """A batch larger than the images there are is that many (--batch-size 10**30 used to reach the DataLoader,
    larger than sys.maxsize); a worker count beyond 4 per core is refused in one line before anything starts."""
    huge = [*FAST[:6], "--batch-size", str(10**30), "--workers", "0", "--json"]
    res = run("extract", folder, "-o", tmp_path / "s.h5", *huge)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["computed"] == 6
    line = _error_line(run("extract", folder, "-o", tmp_path / "t.h5", *FAST[:6], "--workers", str(10**9)))
    assert "--workers" in line and "1000000000" in line


def test_a_fixed_size_model_names_its_size(folder, tmp_path):
    line = _error_line(run("extract", folder, "-o", tmp_path / "s.h5", *FAST, "-b", "vit_b_16"))
    assert line == "featx: error: --image-size 32: vit_b_16 takes 224x224 images only"


def test_featx_alone_shows_the_help():
    result = run()
    assert "Usage: featx [OPTIONS] COMMAND" in result.output and "featx: error" not in result.output


def test_unknown_tap_suggests_the_closest(folder, tmp_path):
    line = _error_line(run("extract", folder, "-o", tmp_path / "s.h5", *FAST, "-l", "avgpol"))
    assert line.startswith("featx: error: -l avgpol: unknown tap for resnet18 (did you mean avgpool")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.parts").exists()


def test_links_that_loop_and_missing_csv_files_are_failed_rows(folder, tmp_path):
    os.symlink("self.png", folder / "bees" / "self.png")
    os.symlink("gone.png", folder / "ants" / "dangling.png")
    out = tmp_path / "s.h5"
    res = run("extract", folder, "-o", out, *FAST, "--json")
    assert res.exit_code == 0, res.output
    failures = {f["path"]: f["reason"] for f in json.loads(res.stdout)["failures"]}
    assert failures == {"ants/dangling.png": "cannot read file: No such file or directory",
                        "bees/self.png": "cannot read file: Too many levels of symbolic links"}

    rows = [f"data/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(folder.glob("*/*_00[01].png"))]
    table = tmp_path / "list.csv"
    table.write_text("filepath,class\n" + "\n".join(rows + ["data/ants/removed.png,ants"]) + "\n")
    res = run("extract", table, "-o", tmp_path / "t.h5", *FAST, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert (result["items"], result["failures"]) == (4, [{"path": "data/ants/removed.png",
                                                         "reason": "cannot read file: No such file or directory"}])
    line = _error_line(run("extract", table, "-o", tmp_path / "u.h5", *FAST, "--on-error", "fail"))
    assert line.endswith(f"{tmp_path / 'data' / 'ants' / 'removed.png'}: cannot read file: No such file or directory "
                         "(--on-error fail)")
    assert not (tmp_path / "u.h5").exists() and not (tmp_path / "u.h5.parts").exists()


@pytest.mark.slow
def test_the_reported_inputs_as_real_processes(folder, tmp_path, featx_run):
    """A file link looping to itself is a failed row; --image-size 100000 is one line before anything exists;
    featx's own unknown option is the same one-line format."""
    def featx(*args):
        return featx_run(*args, cwd=tmp_path, timeout=300)

    os.symlink("self.png", folder / "bees" / "self.png")
    done = featx("extract", folder, "-o", "s.h5", *FAST)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "failed: bees/self.png: cannot read file: Too many levels of symbolic links" in done.stderr
    huge = featx("extract", folder, "-o", "big.h5", *FAST[:4], "--image-size", "100000")
    assert huge.returncode == 2 and huge.stderr.count("\n") == 1, huge.stderr
    assert huge.stderr.startswith("featx: error: --image-size 100000: one image alone needs about ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "s.h5"]
    bogus = featx("--bogus")
    assert (bogus.returncode, bogus.stderr) == (2, "featx: error: featx: No such option '--bogus'. (see featx --help)\n")
