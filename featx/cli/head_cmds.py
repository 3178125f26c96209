"""CLI: `featx fit-head`, `featx predict`, `featx evaluate` (thin wrappers over featx.head_api)."""
from __future__ import annotations

import contextlib
import json
import warnings

import click

from ..heads.options import EvaluateOptions, FitHeadOptions, PredictOptions
from ..options import OptionWarning, flag_spelling
from .common import PathParam, echo_json, warn

FEATURES_FILE = PathParam("input", "a featx store (.h5) or an HDF5/NPZ feature file")
PREDICTIONS_FILE = PathParam("output", "a CSV or JSON file to write")


@contextlib.contextmanager
def _warnings_as_lines():
    """Show Python warnings raised by the API as `featx: warning: ...` lines (parameters named by their flags)."""
    spell = flag_spelling(click.get_current_context().command.params)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: warn(
            message.spelled(spell) if isinstance(message, OptionWarning) else str(message))
        yield


@click.command("fit-head")
@click.argument("store", type=FEATURES_FILE)
@click.option("-l", "--layer", "tap", multiple=True, help="Tap whose rows train the head (default: the store's only tap); --task segment: repeat it to fuse the maps of several taps.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Head folder to write (atomically).")
@FitHeadOptions.click_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def fit_head_cmd(store, tap, output, as_json, **params):
    """Fit a head on the rows of STORE (a featx store, or any HDF5/NPZ file with --x/--y) and save it to -o.

    C is chosen by stratified k-fold cross-validation; the head is refit on all training rows ('train' split, or
    all labelled rows less --val-split) and measured on the held-out rows.
    """
    from ..head_api import fit_head
    from ..heads.metrics import metrics_table

    with _warnings_as_lines():
        head = fit_head(store, list(tap), output, **FitHeadOptions.from_command_line(params).to_dict())
    if as_json:
        echo_json({"path": str(head.path), **head.metrics})
        return
    if getattr(head, "segment", None) is not None:
        from ..segment.probe import segment_table

        click.echo(f"{segment_table(head.metrics)}\nhead written to {head.path}")
        return
    click.echo(metrics_table(head.metrics))
    click.echo(f"head written to {head.path}")


CACHE_STORE = PathParam("output", "the .h5 store that caches the images' features")


@click.command("predict")
@click.argument("head", type=click.Path())
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(),
              help="CSV file to write (default: stdout); for a segmentation head, the folder of mask PNGs.")
@click.option("--json", "as_json", is_flag=True, help="JSON records instead of CSV.")
@click.option("--top-k", type=click.IntRange(min=1), help="Only the k most likely classes per row.")
@PredictOptions.click_options(store=CACHE_STORE)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict_cmd(head, data, output, as_json, top_k, quiet, **params):
    """Predict with HEAD (a head folder) on DATA: images (folders, CSVs, lists or image files, one or several;
    extracted with the head's backbone, weights and tap, through a cache) or a feature file (.h5 store made with
    the same extractor, or HDF5/NPZ with --x)."""
    from ..head_api import predict
    from ..segment import is_segment_head

    options = PredictOptions.from_command_line(params).to_dict()
    data = data[0] if len(data) == 1 else list(data)
    if output and not is_segment_head(head):
        param = next(p for p in click.get_current_context().command.params if p.name == "output")
        PREDICTIONS_FILE.convert(output, param, click.get_current_context())
    with _warnings_as_lines():
        result = predict(head, data, output, **options, progress=not quiet,
                         log=lambda line: click.echo(line, err=True))
    for path, reason in result["failed"] if isinstance(result, dict) else result.failed:
        warn(f"not predicted: {path}: {reason}")
    if isinstance(result, dict):  # a segmentation head's mask files
        pictures = f", overlays in {options['overlay']}" if options["overlay"] else ""
        click.echo(f"{result['written']} masks written to {output}{pictures}", err=True)
        return
    with click.open_file(output or "-", "w", encoding="utf-8") as file:
        if as_json:
            file.write(json.dumps(result.records(top_k), indent=2) + "\n")
        else:
            result.write_csv(file, top_k)
    if output:
        click.echo(f"{len(result)} predictions written to {output}", err=True)


@click.command("evaluate")
@click.argument("head", type=click.Path())
@click.argument("data", nargs=-1, required=True)
@EvaluateOptions.click_options(store=CACHE_STORE)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(head, data, as_json, quiet, **params):
    """Measure HEAD on the labelled rows of DATA (a store or HDF5/NPZ file, or labelled images: folders, CSVs)
    and say which rows were scored: accuracy, balanced accuracy, macro F1, per-class precision/recall/F1 and the
    confusion matrix; R², MAE and RMSE for regression."""
    from ..head_api import evaluate
    from ..heads.metrics import metrics_table
    from ..heads.prediction import is_feature_file

    options = EvaluateOptions.from_command_line(params).to_dict()
    data = data[0] if len(data) == 1 else list(data)
    if is_feature_file(data):
        param = next(p for p in click.get_current_context().command.params if p.name == "data")
        FEATURES_FILE.convert(data, param, click.get_current_context())
    with _warnings_as_lines():
        metrics = evaluate(head, data, **options, progress=not quiet and not as_json,
                           log=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(metrics)
    elif "miou" in metrics:  # a segmentation head's metrics
        from ..segment.probe import segment_table

        click.echo(segment_table(metrics))
    else:
        click.echo(metrics_table(metrics))


COMMANDS = [fit_head_cmd, predict_cmd, evaluate_cmd]
