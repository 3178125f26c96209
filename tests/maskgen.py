"""Tiny generated image + mask pairs for segmentation tests: coloured rectangles on noise, with their id masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imagegen import PALETTE


def make_pair(image_path: Path, mask_path: Path, seed: int, size=(48, 40), n_classes: int = 1,
              instances: bool = False) -> tuple[Path, Path]:
    """One RGB image and its mode-L mask: 1-3 rectangles, each of class 1..n_classes painted in that class's colour
    (ids 1, 2, 3 ... per rectangle instead when `instances`), on seeded grey noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    arr = np.clip(rng.normal(128, 20, size=(height, width, 3)), 0, 255)
    mask = np.zeros((height, width), dtype=np.uint8)
    for k in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, n_classes + 1))
        w, h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
        left, top = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        arr[top:top + h, left:left + w] = np.array(PALETTE[cls % len(PALETTE)]) + rng.normal(0, 10, size=(h, w, 3))
        mask[top:top + h, left:left + w] = k + 1 if instances else cls
    for path in (image_path, mask_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(image_path)
    Image.fromarray(mask, "L").save(mask_path)
    return image_path, mask_path


def make_mask_folder(root: Path, splits=None, size=(48, 40), n_classes: int = 1, instances: bool = False,
                     seed: int = 0) -> Path:
    """root/<split>/{images,masks}/<i>.png for each split -> count in `splits` (default train 8, val 4)."""
    root = Path(root)
    counter = seed * 100_000
    for split, count in (splits or {"train": 8, "val": 4}).items():
        level = root / split if split else root
        for i in range(count):
            counter += 1
            make_pair(level / "images" / f"p{i:03d}.png", level / "masks" / f"p{i:03d}.png", counter, size,
                      n_classes, instances)
    return root
