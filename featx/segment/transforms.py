"""Joint transforms: the same crop and flip for an image and its mask; masks are resized with nearest.

Evaluation (and `--augment none`) is the weights' eval transform: resize the shorter side, center crop. Mask
pixels of a crop larger than the image are IGNORE, so they count in no loss and no metric. `--augment default`
is classification's random resized crop + flip; `flip` the eval crop + flip.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ..crop_box import random_resized_box
from ..preprocess import INTERPOLATIONS, TransformSpec, center_crop, resize_shorter_side, to_uint8_tensor
from .source import IGNORE


def mask_image(ids: np.ndarray) -> Image.Image:
    """Class ids (0..254, IGNORE) as a mode-L image, for PIL's nearest resizing and cropping."""
    return Image.fromarray(ids.astype(np.uint8), "L")


def eval_mask(mask: Image.Image, spec: TransformSpec) -> Image.Image:
    """The eval transform's geometry on a mask: shorter side to spec.resize (nearest), center crop padded with
    IGNORE."""
    mask = resize_shorter_side(mask, spec.resize, "nearest")
    width, height = mask.size
    left, top = int(round((width - spec.crop) / 2.0)), int(round((height - spec.crop) / 2.0))
    canvas = Image.new("L", (spec.crop, spec.crop), IGNORE)
    canvas.paste(mask, (-left, -top))
    return canvas


class JointTransform:
    """(PIL RGB image, mode-L mask) -> (uint8 (3, S, S), int64 (S, S)); randomness from the `rng` argument."""

    def __init__(self, spec: TransformSpec, augment: str):
        self.spec, self.augment = spec, augment

    def __call__(self, img: Image.Image, mask: Image.Image, rng: random.Random):
        size = (self.spec.crop,) * 2
        if self.augment == "default":
            box = random_resized_box(*img.size, rng)
            img = img.resize(size, INTERPOLATIONS[self.spec.interpolation], box=box)
            mask = mask.resize(size, Image.Resampling.NEAREST, box=box)
        else:
            img = center_crop(resize_shorter_side(img, self.spec.resize, self.spec.interpolation), self.spec.crop)
            mask = eval_mask(mask, self.spec)
        x, y = to_uint8_tensor(img), torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        if self.augment != "none" and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y
