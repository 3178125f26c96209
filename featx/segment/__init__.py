"""Segmentation: masks as a source, decoder heads on a truncated backbone, segmentation metrics, the dense probe.

    source.py    image + mask pairs (DATA/{train,val}/{images,masks}/<name>, or a CSV image,mask[,split]), checked
    transforms.py  the same crop and flip for an image and its mask (masks resized with nearest)
    model.py     the backbone cut at a tap plus a decoder (--decoder conv:256 | linear), upsampled to the input
    metrics.py   pixel accuracy, per-class IoU, mean IoU and Dice from a confusion matrix
    probe.py     the cheap path: a per-pixel linear head on cached (N, C, H, W) maps of one or several taps, its
                 predict and evaluate

Importing this package loads nothing heavy; the modules import torch / sklearn themselves.
"""
from __future__ import annotations

from pathlib import Path

SEGMENT_FILE = "segment.json"  # in a head folder: the head is a dense (per-pixel) probe


def is_segment_head(path) -> bool:
    """Whether the head folder at `path` holds a segmentation head."""
    return (Path(path) / SEGMENT_FILE).is_file()
