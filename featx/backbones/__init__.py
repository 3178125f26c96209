"""Backbones: one registry per model source (`torchvision.py`, `timm.py`) behind one factory (`factory.py`), and
weight files (`weights.py`: safe reading, matching by name or by position, load reports).

timm is optional: it is imported only when a `timm/<name>` backbone is asked for.
"""
from __future__ import annotations

from .factory import (
    LIST_BACKBONES,
    Backbone,
    check_backbone,
    check_complete,
    classifier_path,
    list_backbones,
    load_backbone,
)
from .weights import (
    CHECKPOINT_KEYS,
    OFFLINE_ENV,
    WEIGHTS_MATCHES,
    LoadReport,
    load_by_order,
    load_partial,
    read_weights_file,
    sha256_file,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "LIST_BACKBONES",
    "OFFLINE_ENV",
    "WEIGHTS_MATCHES",
    "Backbone",
    "LoadReport",
    "check_backbone",
    "check_complete",
    "classifier_path",
    "list_backbones",
    "load_backbone",
    "load_by_order",
    "load_partial",
    "read_weights_file",
    "sha256_file",
]
