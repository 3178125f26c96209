"""torchvision's RandomResizedCrop box drawn from a seeded generator, so that a training image's crop is decided
by (index, seed) alone: shared by classification and segmentation training (where the mask takes the same box)."""
from __future__ import annotations

import math
import random

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def random_resized_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height  # fallback: the central crop of the closest allowed aspect ratio
    w, h = width, height
    if ratio < RATIO[0]:
        h = int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w = int(round(height * RATIO[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h
