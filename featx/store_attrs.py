"""The attributes that make a store self-describing: what each dataset holds, for readers that know nothing of featx.

Written by the writer into every new store just before it is published (featx.store.create_store), so a store is
described whole or not at all. They add to schema 1 and change nothing in it: readers that do not know them
(older featx, plain h5py) ignore them, and featx never needs them to read a store.
"""
from __future__ import annotations

import h5py
import numpy as np

CLASS_NAMES_BYTES = 32 << 10  # /items/label carries the class names as an attribute up to this size (HDF5 limits it)

ROOT = ("featx store: row i of every dataset under /items and /features is the same image; each dataset's "
        "attributes say what it holds; the config attribute says how the rows were computed")
ITEMS = {
    "items/key": "sha256 of the image file's bytes (hex): the row's cache key",
    "items/path": "path of the image relative to its data root (/roots[/items/root])",
    "items/label": "class index of the row: /classes[label] is its class name; -1 = unlabelled",
    "items/target": "regression target of the row",
    "items/split": "train / val / test from the data's layout; empty when the data has no splits",
    "items/root": "index into /roots: the data the row came from",
    "roots": "the data the store holds rows of: a folder, CSV or list file (absolute path), 'digits' or 'uploads'",
    "classes": "class names: entry i names label i",
    "failed/path": "inputs that could not be read or decoded, relative to their data root",
    "failed/reason": "why each /failed/path could not be read or decoded",
    "failed/root": "index into /roots: the data each failure came from",
}
AXES = {2: "image, feature", 4: "image, channel, height, width"}


def describe_datasets(h5: h5py.File, config: dict) -> None:
    """Attributes on the root, on every dataset of /items, /roots, /classes and /failed, and on each
    /features/<tap>: meaning, tap, backbone, weights, pooling, axes, dtype; the label mapping on /items/label."""
    h5.attrs["description"] = ROOT
    for name, description in ITEMS.items():
        if name in h5:
            h5[name].attrs["description"] = description
    if "items/label" in h5:
        label = h5["items/label"].attrs
        label["unlabelled"] = np.int64(-1)
        label["classes"] = "/classes"
        if "classes" in h5:
            names = [str(c) for c in h5["classes"].asstr()[...]]
            if sum(len(n.encode()) + 16 for n in names) <= CLASS_NAMES_BYTES:
                label["class_names"] = np.array(names, dtype=h5py.string_dtype("utf-8"))
    for tap, ds in h5.get("features", {}).items():
        _describe_tap(ds, tap, config)


def _describe_tap(ds: h5py.Dataset, tap: str, config: dict) -> None:
    pooling = config.get("pooling", "")
    backbone, weights = config.get("backbone", "?"), config.get("weights", "?")
    ds.attrs["description"] = (
        f"embedding of each image at tap {tap} of {backbone} (weights {weights}), pooling {pooling}: row i is the "
        f"image of /items row i; raw activations, not normalised")
    ds.attrs["tap"] = tap
    ds.attrs["backbone"] = str(backbone)
    ds.attrs["weights"] = str(weights)
    ds.attrs["pooling"] = str(pooling)
    if len(ds.shape) in AXES:
        ds.attrs["axes"] = AXES[len(ds.shape)]
    ds.attrs["dtype_note"] = (
        "float16 on disk (half the size); featx reads the rows as float32" if ds.dtype == np.float16
        else f"{ds.dtype} on disk; featx reads the rows as float32")
