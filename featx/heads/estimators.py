"""The head types: which scikit-learn (or featx) estimator each one is, and how C maps onto its parameter.

Every head but knn is regularized by C, the inverse strength of the linear-probe protocols (objective C * sum of
losses + ||w||² / 2). Ridge's alpha is 1 / (2C); SGD's and the MLP's per-row penalties are 1 / (C * rows). The knn
head has no C: its settings are k (`neighbors`) and the temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..options import OptionError
from .cv import DEFAULT_GRID

NORMALIZERS = ("standard", "l2", "none")
SOLVERS = ("auto", "sklearn", "torch")
LBFGS_MAX_ITER = 200
SVM_MAX_ITER = 2000


@dataclass(frozen=True)
class HeadOptions:
    """Settings shared by all head types (each uses the ones it knows)."""

    task: str = "classification"
    class_weight: str | dict | None = None
    seed: int = 0
    epochs: int | None = None
    hidden: int = 512
    dropout: float = 0.5
    device: str = "auto"  # where --solver torch runs
    neighbors: int = 20  # knn: k
    temperature: float = 0.07  # knn: the votes' temperature


@dataclass(frozen=True)
class HeadType:
    """One `--head` choice.

    build(C, rows, options) makes an unfitted estimator. link is how scores become probabilities
    ('softmax', 'ovr' = normalised one-vs-rest sigmoids, None = no probabilities).
    """

    name: str
    build: Callable
    tasks: tuple[str, ...] = ("classification",)
    link: str | None = None
    streaming: bool = False
    default_grid: object = DEFAULT_GRID
    model: str = "linear"
    regularized: bool = True  # has a C to search
    default_normalize: str = "standard"
    help: str = field(default="", compare=False)


def _logistic(C, rows, options):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, class_weight=options.class_weight, max_iter=LBFGS_MAX_ITER)


def _ridge(C, rows, options):
    from sklearn.linear_model import Ridge, RidgeClassifier

    if options.task == "regression":
        return Ridge(**_ridge_strength(C, rows))
    return RidgeClassifier(**_ridge_strength(C, rows), class_weight=options.class_weight)


def _ridge_strength(C, rows):
    return {"alpha": 1.0 / (2.0 * C)}


def _linear_svm(C, rows, options):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, class_weight=options.class_weight, max_iter=SVM_MAX_ITER, random_state=options.seed)


def _sgd(C, rows, options):
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(loss="log_loss", **_sgd_strength(C, rows), class_weight=options.class_weight,
                         random_state=options.seed)


def _sgd_strength(C, rows):
    return {"alpha": 1.0 / (C * rows)}


def _mlp(C, rows, options):
    from .mlp import MLPHead

    return MLPHead(C=C, hidden=options.hidden, dropout=options.dropout, epochs=options.epochs,
                   class_weight=options.class_weight, seed=options.seed)


def _knn(C, rows, options):
    from .knn import KNNHead

    return KNNHead(n_neighbors=options.neighbors, temperature=options.temperature)


HEAD_TYPES = {
    head.name: head
    for head in (
        HeadType("logistic", _logistic, link="softmax", help="multinomial logistic regression (lbfgs)"),
        HeadType("ridge", _ridge, tasks=("classification", "regression"),
                 help="ridge classifier, or ridge regression for float targets"),
        HeadType("linear-svm", _linear_svm, help="linear SVM (liblinear, squared hinge)"),
        HeadType("sgd", _sgd, link="ovr", streaming=True, default_grid="1e-4:1e3",
                 help="logistic loss by SGD, streamed from the store in chunks (partial_fit)"),
        HeadType("mlp", _mlp, link="softmax", default_grid=(0.01, 1.0, 100.0), model="mlp",
                 help="Linear-ReLU-Dropout-Linear trained with Adam (torch)"),
        HeadType("knn", _knn, link="votes", model="knn", regularized=False, default_normalize="none",
                 help="weighted k-NN on cosine similarity (DINO's evaluation: --neighbors 20, --temperature 0.07)"),
    )
}


def get_head_type(name: str | None, task: str, where: str) -> HeadType:
    """The head type for `--head name` (None: logistic, or ridge for float targets) on data of `task`."""
    if name is None:
        name = "ridge" if task == "regression" else "logistic"
    if name not in HEAD_TYPES:
        raise OptionError("{head=}: expected one of {choices}", head=name, choices=", ".join(HEAD_TYPES))
    head = HEAD_TYPES[name]
    if task in ("classification", "regression") and task not in head.tasks:
        raise OptionError("{head=}: needs class labels, but {where} holds float targets; use {head=ridge}", head=name,
                          where=where)
    return head


def make_normalizer(mode: str):
    """The preprocessing step: StandardScaler, row-wise L2 normalisation, or the identity."""
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler

    if mode not in NORMALIZERS:
        raise OptionError("{normalize=}: expected one of {choices}", normalize=mode, choices=", ".join(NORMALIZERS))
    return {"standard": StandardScaler, "l2": Normalizer, "none": FunctionTransformer}[mode]()


def fit_normalizer(mode: str, X: np.ndarray):
    """(fitted normalizer, normalized rows), transforming X in place to spare a copy of a large matrix."""
    normalizer = make_normalizer(mode)
    if "copy" not in normalizer.get_params():
        return normalizer.fit(X), X
    normalizer.set_params(copy=False)
    X = normalizer.fit_transform(X)
    return normalizer.set_params(copy=True), X


def transform_in_place(normalizer, X: np.ndarray) -> np.ndarray:
    """X normalised by a fitted normaliser, overwriting X where the normaliser can (StandardScaler, Normalizer)."""
    if "copy" in normalizer.get_params():
        return normalizer.transform(X, copy=False)
    return normalizer.transform(X)

