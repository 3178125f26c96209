"""The options of `featx fit-head` and `featx.fit_head`, spelled once (featx.options): flags, help, ranges, defaults.

A field's metadata says which kind of head takes it: `fits="segment"` (the dense per-pixel probe alone),
`fits="both"`, or nothing (the heads on rows alone).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..choices import DEVICE_CHOICES, MAX_SEED
from ..options import SEGMENT, OptionError, Options, binary_mask_option, num_classes_option, option
from ..tuning import max_workers
from .cv import DEFAULT_GRID
from .estimators import HEAD_TYPES, NORMALIZERS, SOLVERS

TASKS = ("classify", "segment")
BOTH = {"fits": "both"}
HEAD_HELP = "; ".join(f"{name}: {head.help}" for name, head in HEAD_TYPES.items())
GRID_DEFAULTS = "; ".join(
    f"{name}: {head.default_grid if isinstance(head.default_grid, str) else ','.join(map(str, head.default_grid))}"
    for name, head in HEAD_TYPES.items() if head.default_grid != DEFAULT_GRID
)


@dataclass(frozen=True)
class FitHeadOptions(Options):
    """Everything a fit-head call takes besides the rows (data, tap) and the head folder (output)."""

    task: str = option("classify", "--task", choices=TASKS, metadata=BOTH,
                       help="segment: a per-pixel linear head on the maps of a --pooling none store, against --masks.")
    head: str | None = option(None, "--head", choices=tuple(HEAD_TYPES),
                              help=f"Default: logistic, or ridge for float targets. {HEAD_HELP}.")
    normalize: str | None = option(
        None, "--normalize", choices=NORMALIZERS, metadata=BOTH,
        help="Preprocessing of the rows. Default: standard (knn: none, cosine on the raw rows).")
    grid: object = option(
        None, "--grid", metadata=BOTH,
        help=f"C values: LO:HI (per decade, then refined), a list 0.1,1,10, or one value (no CV). Default: "
             f"{DEFAULT_GRID} ({GRID_DEFAULTS}).")
    folds: int | None = option(
        None, "--folds", kind=int, low=2, metadata=BOTH,
        help="Cross-validation folds [default: 5, and 3 from 50,000 training rows on; fewer when a class is rarer].")
    class_weight: str | None = option(None, "--class-weight", choices=("none", "balanced"),
                                      help="Default: none.")
    val_split: float = option(0.2, "--val-split", kind=float, low=0, high=1, high_open=True, metadata=BOTH,
                              help="Held-out fraction for the metrics when the store has no 'val' split.")
    seed: int = option(0, "--seed", low=0, high=MAX_SEED, metadata=BOTH)
    n_jobs: int | None = option(-1, "--jobs", optional=True, metadata=BOTH,
                                help="Parallel cross-validation jobs (-1: all cores).")
    x: str | None = option(None, "--x", kind=str, metavar="KEY", help="Foreign HDF5/NPZ file: the 2-D feature array.")
    y: str | None = option(None, "--y", kind=str, metavar="KEY", help="Foreign HDF5/NPZ file: the label vector.")
    epochs: int | None = option(None, "--epochs", kind=int, low=1,
                                help="sgd / mlp passes over the rows (default: sgd 5, mlp about 500 steps).")
    hidden: int = option(512, "--hidden", low=1, help="mlp hidden width.")
    dropout: float = option(0.5, "--dropout", low=0, high=1, high_open=True, help="mlp dropout.")
    neighbors: int = option(20, "--neighbors", low=1, help="knn: k, the neighbours that vote.")
    temperature: float = option(0.07, "--temperature", low=0, low_open=True, help="knn: votes weigh exp(cosine / T).")
    chunk_rows: int = option(65536, "--chunk-rows", low=1,
                             help="Rows read at a time, at most 64 MiB of them (sgd streams the store in such chunks).")
    solver: str = option(
        "auto", "--solver", choices=SOLVERS,
        help="logistic: scikit-learn's lbfgs, or full-batch L-BFGS in torch on --device (same objective and C); "
             "auto: torch on large stores or with --device.")
    device: str = option("auto", "--device", help=f"--solver torch: {DEVICE_CHOICES} (auto: CUDA when present).")
    joblib: bool = option(False, "--joblib",
                          help="Also write model.joblib (a scikit-learn pickle) for sklearn users.")
    plots: bool = option(True, "--plots/--no-plots", help="Write confusion_matrix.png and cv_curve.png.")
    overwrite: bool = option(False, "--overwrite", metadata=BOTH, help="Replace an existing head folder.")
    masks: str | None = option(
        None, "--masks", metadata=SEGMENT,
        help="segment: the image + mask pairs ({train,val}/{images,masks}/<name>, or a CSV image,mask[,split]).")
    binary: bool = binary_mask_option()
    num_classes: int | None = num_classes_option()
    pixels_per_image: int = option(256, "--pixels-per-image", low=1, metadata=SEGMENT,
                                   help="segment: labelled pixels drawn from each training image for the fit.")

    def __post_init__(self):
        super().__post_init__()
        if self.n_jobs == 0:
            raise OptionError("{n_jobs=}: expected a non-zero integer (-1: all cores)", n_jobs=self.n_jobs)
        if self.solver == "sklearn" and str(self.device).strip().lower() != "auto":
            raise OptionError("{device=}: only {solver=} runs on a device; add {solver=}", device=self.device,
                              solver="torch")


@dataclass(frozen=True)
class HeadDataOptions(Options):
    """How a head reaches the rows of its data (predict, evaluate): a feature file's array, or images whose features
    are extracted with the head's extractor through a cache store."""

    store: str | None = option(None, "--store", help="Images: the store for their features (default: HEAD/cache/).")
    weights: str | None = option(
        None, "-w", "--weights", metavar="FILE",
        help="The head's weights file, when it is no longer where the head recorded it (its sha256 must be the "
             "recorded one).")
    x: str | None = option(None, "--x", kind=str, metavar="KEY", help="Foreign HDF5/NPZ DATA: the 2-D feature array.")
    trust: bool = option(False, "--trust",
                         help="Allow HEAD to be a model.joblib pickle (it can run code when loaded).")
    batch_size: int = option(64, "--batch-size", low=1, help="Images per batch.")
    device: str = option("auto", "--device", help=DEVICE_CHOICES)
    workers: int | None = option(
        None, "--workers", kind=int, low=0, high=max_workers,
        help="Image decoding workers (default: fitted to the machine, see docs/performance.md).")


@dataclass(frozen=True)
class PredictOptions(HeadDataOptions):
    """The options of `featx predict` and `featx.predict` besides the head, the data and the output."""

    overlay: str | None = option(
        None, "--overlay", metavar="DIR", metadata=SEGMENT,
        help="Segmentation head: also write each image with its mask blended in, as DIR/<image path>.jpg.")


@dataclass(frozen=True)
class EvaluateOptions(HeadDataOptions):
    """The options of `featx evaluate` and `featx.evaluate` besides the head and the data."""

    split: str | None = option(
        None, "--split", kind=str,
        help="Only rows of this split (train, val, test), or 'all' for every labelled row. Default: the val split "
             "when DATA has one, else test, else every labelled row.")
    tap: str | None = option(None, "-l", "--layer", kind=str, help="Tap to read (default: the head's).")
    y: str | None = option(None, "--y", kind=str, metavar="KEY", help="Foreign HDF5/NPZ DATA: the label vector.")
    masks: str | None = option(None, "--masks", metadata=SEGMENT,
                               help="Segmentation head: the image + mask pairs of the store's images.")
