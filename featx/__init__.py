"""featx: frozen-backbone embeddings cached in HDF5, scikit-learn heads on top, torch finetuning when data is large."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import FeatxError  # noqa: E402

__all__ = ["FeatxError", "__version__", "extract", "open_store", "fit_head", "load_head", "evaluate", "finetune"]


def __getattr__(name: str):
    """Import the heavy modules (torch, sklearn) only when their function is used."""
    if name == "extract":
        from .extract import extract

        return extract
    if name == "open_store":
        from .store import open_store

        return open_store
    if name in ("fit_head", "load_head", "evaluate"):
        from . import heads

        return getattr(heads, name)
    if name == "finetune":
        from .finetune import finetune

        return finetune
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
