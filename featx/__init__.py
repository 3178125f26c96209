"""featx: frozen-backbone embeddings cached in HDF5, scikit-learn heads on top, torch finetuning when data is large.

Every command is a Python function (each documents what it takes and returns):

    featx.layers(backbone, weights)             featx layers: taps, shapes, row sizes -> [LayerInfo]
    featx.weights(backbone)                     featx weights: tags, cache files, packages -> dict
    featx.extract(data, output, ...)            featx extract: images -> a store -> ExtractResult
    featx.open_store(path)                      featx info: a store's rows and config -> Store (.summary())
    featx.fit_head(store, tap, output, ...)     featx fit-head -> Head
    featx.load_head(path)                       a saved head folder -> Head
    featx.predict(head, data, ...)              featx predict: images or feature rows -> Predictions
    featx.evaluate(head, data, ...)             featx evaluate -> metrics dict
    featx.neighbors(store, queries, k=10)       featx neighbors: nearest stored rows -> NeighborResult
    featx.finetune(data, output, ...)           featx finetune -> FinetuneResult
    featx.advise(data, ...)                     featx advise -> Advice
    featx.export(store, output, ...)            featx export: a store's rows as npy/parquet -> ExportResult

`import featx` loads neither torch nor scikit-learn: each function's module is imported on its first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import FeatxError  # noqa: E402

# The API functions and the module each one lives in, imported on first use so that `import featx` (and the CLI's
# --help) loads neither torch nor scikit-learn.
_FUNCTIONS = {
    "layers": "featx.layer_table",
    "weights": "featx.backbones.catalog",
    "extract": "featx.extraction",
    "open_store": "featx.store",
    "fit_head": "featx.head_api",
    "load_head": "featx.heads.persistence",
    "predict": "featx.head_api",
    "evaluate": "featx.head_api",
    "neighbors": "featx.heads.neighbors",
    "finetune": "featx.finetuning.api",
    "advise": "featx.advice",
    "export": "featx.exporter",
}
__all__ = ["FeatxError", "__version__", *_FUNCTIONS]


def __getattr__(name: str):
    """Import the heavy modules (torch, sklearn) only when their function is used."""
    if name not in _FUNCTIONS:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    function = getattr(importlib.import_module(_FUNCTIONS[name]), name)
    globals()[name] = function  # later look-ups skip this hook
    return function


def __dir__() -> list[str]:
    """The API, so that dir(featx) and completion show the functions, also those not imported yet."""
    return sorted(__all__)

