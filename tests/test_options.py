"""featx.options: a command's options spelled once. The click options, the checks of a Python call and the API
signatures' defaults agree; errors name the keyword for Python callers and the flag on the command line."""
from __future__ import annotations

import dataclasses
import inspect
import json

import click
import pytest

import featx
from featx.advise_options import AdviseOptions
from featx.cli import main
from featx.errors import FeatxError
from featx.export_options import ExportOptions
from featx.extract_options import ExtractOptions
from featx.finetuning.options import FinetuneOptions, TrainOptions
from featx.heads.neighbor_options import NeighborsOptions
from featx.heads.options import EvaluateOptions, FitHeadOptions, PredictOptions
from featx.layers_options import LayersOptions
from featx.serve.options import ServeOptions
from featx.options import SPEC, OptionError, OptionWarning, flag_spelling
from heads_support import blob_store

COMMANDS = {"extract": ExtractOptions, "fit-head": FitHeadOptions, "finetune": FinetuneOptions,
            "predict": PredictOptions, "evaluate": EvaluateOptions, "advise": AdviseOptions,
            "export": ExportOptions, "neighbors": NeighborsOptions,
            "layers": LayersOptions, "serve": ServeOptions}


def _signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not p.empty}


@pytest.mark.parametrize("command, options", COMMANDS.items())
def test_every_option_with_flags_is_a_click_option_of_its_command(command, options):
    params = {p.name: p for p in main.commands[command].params}
    for field in dataclasses.fields(options):
        spec = field.metadata[SPEC]
        if spec.flags:
            assert params[field.name].opts[0] == spec.flags[0].split("/")[0], field.name
            if not spec.multiple and spec.flag_value is None:
                assert params[field.name].default == field.default, field.name


def test_the_api_signatures_default_as_the_options_do():
    from featx.finetuning.api import finetune
    from featx.heads.api import fit_head

    finetune_defaults = _signature_defaults(finetune)
    for name, default in FinetuneOptions.defaults().items():
        expected = "none" if name == "freeze" else default  # a strategy or a list of them
        assert finetune_defaults[name] == expected, name
    fit_defaults = _signature_defaults(fit_head)
    segment = set(FitHeadOptions.names(fits="segment")) | {"task"}
    assert {name: fit_defaults[name] for name in FitHeadOptions.names() if name not in segment} == {
        name: default for name, default in FitHeadOptions.defaults().items() if name not in segment}
    from featx.heads.api import evaluate
    from featx.heads.prediction import predict

    for options, function in ((PredictOptions, predict), (EvaluateOptions, evaluate)):
        defaults = _signature_defaults(function)
        rows = [name for name in options.names() if name not in options.names(fits="segment")]
        assert {name: defaults[name] for name in rows} == {name: options.defaults()[name] for name in rows}


def test_the_other_api_signatures_default_as_their_options_do():
    from featx.advice import advise
    from featx.advise_backbones import advise_backbones
    from featx.exporter import export
    from featx.heads.neighbors import duplicates, neighbors
    from featx.layer_table import format_layers_table, layers

    for options, function in ((AdviseOptions, advise), (AdviseOptions, advise_backbones), (ExportOptions, export),
                              (NeighborsOptions, neighbors), (NeighborsOptions, duplicates),
                              (LayersOptions, layers), (LayersOptions, format_layers_table)):
        defaults = _signature_defaults(function)
        assert {name: defaults[name] for name in options.names() if name in defaults} == {
            name: default for name, default in options.defaults().items() if name in defaults}, function.__name__
    assert set(AdviseOptions.names()) <= set(_signature_defaults(advise))
    assert set(ExportOptions.names()) <= set(_signature_defaults(export))
    assert set(LayersOptions().keywords()) <= set(_signature_defaults(layers))
    assert set(LayersOptions().keywords(table=True)) <= set(_signature_defaults(format_layers_table))
    for function in (neighbors, duplicates):
        assert set(NeighborsOptions().keywords(function.__name__)) <= set(_signature_defaults(function))


@pytest.mark.parametrize("options, change, message", [
    (ExtractOptions, {"workers": -1}, r"^workers=-1: expected an integer from 0 to \d+ \(4 per core; \d+ cores here\)$"),
    (ExtractOptions, {"pooling": "sum"}, r"^pooling='sum': expected one of avg, max, avgmax, gem, flatten, none$"),
    (ExtractOptions, {"taps": [3]}, r"^taps=\[3\]: expected a name or a list of names$"),
    (ExtractOptions, {"batch_size": True}, r"^batch_size=True: expected an integer >= 1$"),
    (ExtractOptions, {"num_gpus_per_worker": float("nan")}, r"^num_gpus_per_worker=nan: expected a number >= 0$"),
    (ExtractOptions, {"rehash": "yes"}, r"^rehash='yes': expected True or False$"),
    (FitHeadOptions, {"dropout": 1}, r"^dropout=1: expected a number in \[0, 1\)$"),
    (FitHeadOptions, {"n_jobs": 0}, r"^n_jobs=0: expected a non-zero integer"),
    (TrainOptions, {"lr": 0}, r"^lr=0: expected a number greater than 0$"),
    (ExportOptions, {"chunk_rows": 0}, r"^chunk_rows=0: expected a whole number of rows >= 1$"),
    (NeighborsOptions, {"threshold": 1.5}, r"^threshold=1.5: expected a cosine similarity from -1 to 1$"),
    (NeighborsOptions, {"k": 0}, r"^k=0: expected an integer >= 1$"),
    (ServeOptions, {"port": 70000}, r"^port=70000: expected 0 to 65535$"),
    (ServeOptions, {"host": "0.0.0.0"}, r"^host='0.0.0.0': not a loopback address, .* \(api_key_env='VAR'\)$"),
    (AdviseOptions, {"budget_seconds": float("inf")}, r"^budget_seconds=inf: expected a positive, finite number"),
    (AdviseOptions, {"weights_match": ["name", "sum"]}, r"^weights_match='sum': expected one of name, order$"),
    (AdviseOptions, {"backbone": ["a", "b"], "weights": "none"}, r"^weights given 1 times for 2 backbone\(s\)"),
])
def test_a_bad_value_names_the_keyword(options, change, message):
    with pytest.raises(OptionError, match=message):
        options(**change)


def test_values_within_range_are_taken_as_given():
    import numpy as np

    assert ExtractOptions(workers=np.int64(0), taps="layer3", num_gpus_per_worker=1).workers == 0
    assert FitHeadOptions(n_jobs=None, class_weight="balanced").n_jobs is None
    assert TrainOptions(freeze=["backbone", "layer1.*"], lr=1e-3).to_dict()["freeze"] == ["backbone", "layer1.*"]


def test_an_option_error_reads_as_keywords_in_python_and_as_flags_on_the_command_line():
    err = OptionError("{ray_address}: only with {engine=} (not {decode=}, {size_limit=})", engine="ray",
                      decode="a b", size_limit=-1)
    assert isinstance(err, FeatxError)
    assert str(err) == "ray_address: only with engine='ray' (not decode='a b', size_limit=-1)"
    spell = flag_spelling(main.commands["extract"].params)
    assert err.spelled(spell) == "--ray-address: only with --engine ray (not --decode 'a b', size_limit=-1)"


def test_the_command_line_spells_switches_repeated_options_and_arguments_as_typed():
    err = OptionError("{data=}: {overwrite=True}, {retention=prune}, {retention=add}, {taps=}, {overwrite=False}",
                      data="my data", taps=["a", "b"])
    assert str(err) == ("data='my data': overwrite=True, retention='prune', retention='add', taps=['a', 'b'], "
                        "overwrite=False")
    assert err.spelled(flag_spelling(main.commands["extract"].params)) == (
        "'my data': --overwrite, --prune, retention='add', -l a -l b, overwrite=False")
    assert OptionError("{store}, {plots=False}, {plots=True}").spelled(flag_spelling(main.commands["fit-head"].params)) \
        == "STORE, --no-plots, --plots"


def test_the_command_line_names_the_flag_of_a_checked_combination(cli, tmp_path):
    (tmp_path / "data").mkdir()
    result = cli("extract", tmp_path / "data", "-o", tmp_path / "s.h5", "--num-gpus-per-worker", "1")
    assert result.exit_code == 2
    assert result.output.strip() == "featx: error: --num-gpus-per-worker: only with --engine ray"


def test_a_parameter_named_bare_and_with_a_value_of_another_key():
    err = OptionError("{tap=$one}: give {tap} once per map", one="layer1")
    assert str(err) == "tap='layer1': give tap once per map"
    assert err.spelled(flag_spelling(main.commands["finetune"].params)) == "--tap layer1: give --tap once per map"


def _blob_store(path):
    blob_store(path)
    return path


def _export_into_a_full_folder(tmp_path):
    store, out = _blob_store(tmp_path / "s.h5"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return (lambda: featx.export(store, out, tap="avgpool")), ["export", store, "-o", out, "-l", "avgpool"], \
        (f"output='{out}': the folder is not empty (notes.txt): choose a new or empty folder, or pass overwrite=True to "
         "replace an earlier export there",
         f"-o {out}: the folder is not empty (notes.txt): choose a new or empty folder, or pass --overwrite to "
         "replace an earlier export there")


def _a_weights_file_that_is_missing(tmp_path):
    missing = tmp_path / "missing.pth"
    return (lambda: featx.layers("resnet18", str(missing))), ["layers", "resnet18", "-w", missing], \
        (f"weights='{missing}': no such file", f"-w {missing}: no such file")


def _a_split_without_rows(tmp_path):
    store = _blob_store(tmp_path / "s.h5")
    featx.fit_head(store, "avgpool", tmp_path / "head", grid=1.0, plots=False, n_jobs=1)
    return (lambda: featx.evaluate(tmp_path / "head", store, split="test")), \
        ["evaluate", tmp_path / "head", store, "--split", "test"], \
        (f"split='test': no labelled rows in {store} (its splits: train, val; split='all' scores every labelled row)",
         f"--split test: no labelled rows in {store} (its splits: train, val; --split all scores every labelled row)")


def _a_run_folder_that_holds_a_run(tmp_path):
    """--resume DIR stands for output=DIR and resume=True."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    return (lambda: featx.finetune("digits", run, backbone="resnet18", weights="none", device="cpu")), \
        ["finetune", "digits", "-o", run, "-b", "resnet18", "-w", "none", "--device", "cpu"], \
        (f"output='{run}': holds a run already (checkpoint.pt); pass resume=True to continue it, or overwrite=True "
         "to start a new one",
         f"-o {run}: holds a run already (checkpoint.pt); pass --resume {run} to continue it, or --overwrite to "
         "start a new one")


def _a_resumed_run_whose_weights_file_is_gone(tmp_path):
    from featx.finetuning.resume import resume_arguments

    run, gone = tmp_path / "run", tmp_path / "w.pt"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": "digits", "backbone": "resnet18", "weights": f"file:{gone}",
                                                 "weights_path": str(gone), "weights_sha256": "0123456789abcdef" * 4}))
    gone_hint = f"the run's weights file {gone} is gone; pass %s with the same file (its sha256 must be " \
                "0123456789abcdef...)"
    return (lambda: resume_arguments(run, {})), ["finetune", "--resume", run], \
        (f"run='{run}': " + gone_hint % "weights='FILE'", f"--resume {run}: " + gone_hint % "-w FILE")


@pytest.mark.parametrize("case", [_export_into_a_full_folder, _a_weights_file_that_is_missing, _a_split_without_rows,
                                  _a_run_folder_that_holds_a_run, _a_resumed_run_whose_weights_file_is_gone])
def test_a_library_error_names_the_keyword_in_python_and_the_flag_on_the_command_line(cli, tmp_path, case):
    _reads_as(cli, *case(tmp_path))


def test_a_hint_names_the_keyword_in_python_and_the_flag_on_the_command_line(cli, tmp_path, monkeypatch):
    import featx.heads.data

    store = _blob_store(tmp_path / "s.h5")
    monkeypatch.setattr(featx.heads.data, "available_memory", lambda: 2000)  # 72 rows x 8 float32: 2,304 bytes
    too_big = f"{store}: tap 'avgpool' does not fit in memory (72 rows x 8 float32 features need 2,304 bytes, " \
              "0.0 GB, 0.0 GB available): use %s, which streams the store in chunks"
    _reads_as(cli, lambda: featx.fit_head(store, "avgpool", tmp_path / "head", plots=False, n_jobs=1),
              ["fit-head", store, "-l", "avgpool", "-o", tmp_path / "head", "--no-plots"],
              (too_big % "head='sgd'", too_big % "--head sgd"))


def _reads_as(cli, call, argv, expected):
    """`call` raises an OptionError reading as expected[0]; the command line `argv` exits 2 with expected[1]."""
    python, command_line = expected
    with pytest.raises(OptionError) as err:
        call()
    assert str(err.value) == python
    result = cli(*argv)
    assert result.exit_code == 2
    assert result.output == f"featx: error: {command_line}\n"


def test_a_warning_names_the_keyword_in_python_and_the_flag_on_the_command_line(tmp_path, monkeypatch):
    from contextlib import ExitStack

    from featx.heads import neighbors
    from featx.store import open_store

    monkeypatch.setattr(neighbors, "can_write_in", lambda folder: False)
    with ExitStack() as stack, pytest.warns(OptionWarning) as caught:
        neighbors._query_cache(stack.enter_context(open_store(_blob_store(tmp_path / "s.h5"))), None, stack)
    said = f"{tmp_path} is read-only: the query images' features are not cached (pass %s to keep them)"
    assert str(caught[0].message) == said % "query_store='FILE.h5'"
    assert caught[0].message.spelled(flag_spelling(main.commands["neighbors"].params)) == said % "--query-store FILE.h5"


def test_click_types_and_help_carry_the_choices_and_ranges():
    params = {p.name: p for p in main.commands["extract"].params}
    assert params["workers"].type is click.INT and "[0<=x<=" in params["workers"].help
    assert isinstance(params["pooling"].type, click.Choice)
    assert params["retention"].is_flag and params["retention"].flag_value == "prune"
    assert params["retention"].default == "mirror"
    fit = {p.name: p for p in main.commands["fit-head"].params}
    assert fit["plots"].secondary_opts == ["--no-plots"] and fit["plots"].default is True
