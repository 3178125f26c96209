"""CLI: `featx fit-head`, `featx predict`, `featx evaluate` (thin wrappers over featx.head_api)."""
from __future__ import annotations

import contextlib
import json
import warnings

import click

from ..heads.options import FitHeadOptions
from ..tuning import max_workers
from .common import PathParam, echo_json, warn

FEATURES_FILE = PathParam("input", "a featx store (.h5) or an HDF5/NPZ feature file")
PREDICTIONS_FILE = PathParam("output", "a CSV or JSON file to write")
TRUST = click.option("--trust", is_flag=True, help="Allow HEAD to be a model.joblib pickle (it can run code when loaded).")


@contextlib.contextmanager
def _warnings_as_lines():
    """Show Python warnings raised by the API as `featx: warning: ...` lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: warn(str(message))
        yield


def _feature_keys(f):
    f = click.option("--y", "y", metavar="KEY", help="Foreign HDF5/NPZ file: the label vector.")(f)
    return click.option("--x", "x", metavar="KEY", help="Foreign HDF5/NPZ file: the 2-D feature array.")(f)


@click.command("fit-head")
@click.argument("store", type=FEATURES_FILE)
@click.option("-l", "--layer", "tap", help="Tap whose rows train the head (default: the store's only tap).")
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
        head = fit_head(store, tap, output, **FitHeadOptions.from_command_line(params).to_dict())
    if as_json:
        echo_json({"path": str(head.path), **head.metrics})
        return
    if getattr(head, "segment", None) is not None:
        from ..segment.probe import segment_table

        click.echo(f"{segment_table(head.metrics)}\nhead written to {head.path}")
        return
    click.echo(metrics_table(head.metrics))
    click.echo(f"head written to {head.path}")


WEIGHTS = click.option("-w", "--weights", metavar="FILE", help="The head's weights file, when it is no longer where the "
                                                             "head recorded it (its sha256 must be the recorded one).")


@click.command("predict")
@click.argument("head", type=click.Path())
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(),
              help="CSV file to write (default: stdout); for a segmentation head, the folder of mask PNGs.")
@click.option("--json", "as_json", is_flag=True, help="JSON records instead of CSV.")
@click.option("--top-k", type=click.IntRange(min=1), help="Only the k most likely classes per row.")
@click.option("--store", type=PathParam("output", "the .h5 store that caches the images' features"),
              help="Store for the images' features (default: HEAD/cache/).")
@click.option("--x", "x", metavar="KEY", help="Foreign HDF5/NPZ DATA: the 2-D feature array.")
@WEIGHTS
@click.option("--overlay", type=click.Path(), metavar="DIR",
              help="Segmentation head: also write each image with its mask blended in, as DIR/<image path>.jpg.")
@TRUST
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|cuda:N|mps")
@click.option("--workers", type=click.IntRange(0, max_workers()), help="Image decoding workers (default: fitted to the machine, see docs/performance.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict_cmd(head, data, output, as_json, top_k, store, x, weights, overlay, trust, batch_size, device, workers,
                quiet):
    """Predict with HEAD (a head folder) on DATA: images (folders, CSVs, lists or image files, one or several;
    extracted with the head's backbone, weights and tap, through a cache) or a feature file (.h5 store made with
    the same extractor, or HDF5/NPZ with --x)."""
    from ..head_api import predict
    from ..segment import is_segment_head

    data = data[0] if len(data) == 1 else list(data)
    if output and not is_segment_head(head):
        param = next(p for p in click.get_current_context().command.params if p.name == "output")
        PREDICTIONS_FILE.convert(output, param, click.get_current_context())
    with _warnings_as_lines():
        result = predict(head, data, output, overlay=overlay, store=store, weights=weights, x=x, trust=trust,
                         batch_size=batch_size, device=device, workers=workers, progress=not quiet,
                         log=lambda line: click.echo(line, err=True))
    for path, reason in result["failed"] if isinstance(result, dict) else result.failed:
        warn(f"not predicted: {path}: {reason}")
    if isinstance(result, dict):  # a segmentation head's mask files
        pictures = f", overlays in {overlay}" if overlay else ""
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
@click.option("--split", help="Only rows of this split (train, val, test), or 'all' for every labelled row. Default: "
                              "the val split when DATA has one, else test, else every labelled row.")
@click.option("-l", "--layer", "tap", help="Tap to read (default: the head's).")
@_feature_keys
@click.option("--masks", help="Segmentation head: the image + mask pairs of the store's images.")
@click.option("--store", type=PathParam("output", "the .h5 store that caches the images' features"),
              help="Labelled images: the store for their features (default: HEAD/cache/).")
@WEIGHTS
@TRUST
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(head, data, split, tap, x, y, masks, store, weights, trust, as_json, quiet):
    """Measure HEAD on the labelled rows of DATA (a store or HDF5/NPZ file, or labelled images: folders, CSVs)
    and say which rows were scored: accuracy, balanced accuracy, macro F1, per-class precision/recall/F1 and the
    confusion matrix; R², MAE and RMSE for regression."""
    from ..head_api import evaluate
    from ..heads.metrics import metrics_table
    from ..heads.prediction import is_feature_file

    data = data[0] if len(data) == 1 else list(data)
    if is_feature_file(data):
        param = next(p for p in click.get_current_context().command.params if p.name == "data")
        FEATURES_FILE.convert(data, param, click.get_current_context())
    with _warnings_as_lines():
        metrics = evaluate(head, data, masks=masks, split=split, tap=tap, x=x, y=y, trust=trust, store=store,
                           weights=weights, progress=not quiet and not as_json,
                           log=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(metrics)
    elif "miou" in metrics:  # a segmentation head's metrics
        from ..segment.probe import segment_table

        click.echo(segment_table(metrics))
    else:
        click.echo(metrics_table(metrics))


COMMANDS = [fit_head_cmd, predict_cmd, evaluate_cmd]
