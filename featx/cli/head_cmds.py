"""CLI: `featx fit-head`, `featx predict`, `featx evaluate` (thin wrappers over featx.head_api)."""
from __future__ import annotations

import contextlib
import json
import warnings

import click

from ..choices import DEVICE_CHOICES
from ..errors import FeatxError
from ..heads.cv import DEFAULT_GRID
from ..heads.estimators import HEAD_TYPES, NORMALIZERS, SOLVERS
from ..tuning import max_workers
from .common import PathParam, echo_json, warn

FEATURES_FILE = PathParam("input", "a featx store (.h5) or an HDF5/NPZ feature file")
PREDICTIONS_FILE = PathParam("output", "a CSV or JSON file to write")
HEAD_HELP = "; ".join(f"{name}: {head.help}" for name, head in HEAD_TYPES.items())
TRUST = click.option("--trust", is_flag=True, help="Allow HEAD to be a model.joblib pickle (it can run code when loaded).")
GRID_DEFAULTS = "; ".join(
    f"{name}: {head.default_grid if isinstance(head.default_grid, str) else ','.join(map(str, head.default_grid))}"
    for name, head in HEAD_TYPES.items() if head.default_grid != DEFAULT_GRID
)


@contextlib.contextmanager
def _warnings_as_lines():
    """Show Python warnings raised by the API as `featx: warning: ...` lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: warn(str(message))
        yield


def _feature_keys(f):
    f = click.option("--y", "y_key", metavar="KEY", help="Foreign HDF5/NPZ file: the label vector.")(f)
    return click.option("--x", "x_key", metavar="KEY", help="Foreign HDF5/NPZ file: the 2-D feature array.")(f)


@click.command("fit-head")
@click.argument("store", type=FEATURES_FILE)
@click.option("-l", "--layer", "tap", multiple=True, help="Tap whose rows train the head (default: the store's only tap); --task segment: repeat it to fuse the maps of several taps.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Head folder to write (atomically).")
@click.option("--head", "kind", type=click.Choice(list(HEAD_TYPES)), help=f"Default: logistic, or ridge for float targets. {HEAD_HELP}.")
@click.option("--normalize", type=click.Choice(NORMALIZERS), help="Preprocessing of the rows. Default: standard (knn: none, cosine on the raw rows).")
@click.option("--grid", help=f"C values: LO:HI (per decade, then refined), a list 0.1,1,10, or one value (no CV). Default: {DEFAULT_GRID} ({GRID_DEFAULTS}).")
@click.option("--folds", type=click.IntRange(min=2), help="Cross-validation folds [default: 5, and 3 from 50,000 training rows on; fewer when a class is rarer].")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True, help="Held-out fraction for the metrics when the store has no 'val' split.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--jobs", "n_jobs", type=int, default=-1, show_default=True, help="Parallel cross-validation jobs (-1: all cores).")
@_feature_keys
@click.option("--epochs", type=click.IntRange(min=1), help="sgd / mlp passes over the rows (default: sgd 5, mlp about 500 steps).")
@click.option("--hidden", type=click.IntRange(min=1), default=512, show_default=True, help="mlp hidden width.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True, help="mlp dropout.")
@click.option("--neighbors", type=click.IntRange(min=1), default=20, show_default=True, help="knn: k, the neighbours that vote.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.07, show_default=True, help="knn: votes weigh exp(cosine / T).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=65536, show_default=True, help="Rows read at a time, at most 64 MiB of them (sgd streams the store in such chunks).")
@click.option("--solver", type=click.Choice(SOLVERS), default="auto", show_default=True, help="logistic: scikit-learn's lbfgs, or full-batch L-BFGS in torch on --device (same objective and C); auto: torch on large stores or with --device.")
@click.option("--device", default="auto", show_default=True, help=f"--solver torch: {DEVICE_CHOICES} (auto: CUDA when present).")
@click.option("--joblib", "joblib_export", is_flag=True, help="Also write model.joblib (a scikit-learn pickle) for sklearn users.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write confusion_matrix.png and cv_curve.png.")
@click.option("--overwrite", is_flag=True, help="Replace an existing head folder.")
@click.option("--task", type=click.Choice(["classify", "segment"]), default="classify", show_default=True, help="segment: a per-pixel linear head on the maps of a --pooling none store, against --masks.")
@click.option("--masks", help="segment: the image + mask pairs ({train,val}/{images,masks}/<name>, or a CSV image,mask[,split]).")
@click.option("--binary", is_flag=True, help="segment: every non-zero mask pixel is foreground.")
@click.option("--num-classes", type=click.IntRange(min=1), help="segment: mask ids are 0 (background) to this (default: the largest id found).")
@click.option("--pixels-per-image", type=click.IntRange(min=1), default=256, show_default=True, help="segment: labelled pixels drawn from each training image for the fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def fit_head_cmd(store, tap, output, kind, normalize, grid, folds, class_weight, val_split, seed, n_jobs, x_key, y_key,
                 epochs, hidden, dropout, neighbors, temperature, chunk_rows, solver, device, joblib_export, plots, overwrite, task, masks,
                 binary, num_classes, pixels_per_image, as_json):
    """Fit a head on the rows of STORE (a featx store, or any HDF5/NPZ file with --x/--y) and save it to -o.

    C is chosen by stratified k-fold cross-validation; the head is refit on all training rows ('train' split, or
    all labelled rows less --val-split) and measured on the held-out rows.
    """
    from ..head_api import fit_head
    from ..heads.metrics import metrics_table

    with _warnings_as_lines():
        head = fit_head(
            store, list(tap), output, task=task, masks=masks, binary=binary, num_classes=num_classes,
            pixels_per_image=pixels_per_image, head=kind, normalize=normalize, grid=grid, folds=folds,
            class_weight=None if class_weight == "none" else class_weight, val_split=val_split, seed=seed,
            n_jobs=n_jobs, x=x_key, y=y_key, epochs=epochs, hidden=hidden, dropout=dropout, neighbors=neighbors,
            temperature=temperature, chunk_rows=chunk_rows,
            solver=solver, device=device, joblib=joblib_export, plots=plots, overwrite=overwrite,
        )
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
@click.option("--x", "x_key", metavar="KEY", help="Foreign HDF5/NPZ DATA: the 2-D feature array.")
@WEIGHTS
@click.option("--overlay", type=click.Path(), metavar="DIR",
              help="Segmentation head: also write each image with its mask blended in, as DIR/<image path>.jpg.")
@TRUST
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|cuda:N|mps")
@click.option("--workers", type=click.IntRange(0, max_workers()), help="Image decoding workers (default: fitted to the machine, see docs/performance.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict_cmd(head, data, output, as_json, top_k, store, x_key, weights, overlay, trust, batch_size, device, workers,
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
        result = predict(head, data, output, overlay=overlay, store=store, weights=weights, x=x_key, trust=trust,
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
def evaluate_cmd(head, data, split, tap, x_key, y_key, masks, store, weights, trust, as_json, quiet):
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
        metrics = evaluate(head, data, masks=masks, split=split, tap=tap, x=x_key, y=y_key, trust=trust, store=store,
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
