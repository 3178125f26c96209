"""Tiny generated image datasets for tests: class-dependent colours so that even random features separate them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (160, 40, 200)]


def make_image(path: Path, cls: int, seed: int, size=(32, 24), fmt: str | None = None) -> Path:
    """One RGB image: a class colour plus seeded noise, so every file has different bytes."""
    rng = np.random.default_rng(seed)
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.float64)
    noise = rng.normal(0, 25, size=(size[1], size[0], 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format=fmt)
    return path


def make_image_folder(
    root: Path, classes=("ants", "bees"), per_class: int = 4, splits=None, size=(32, 24), ext: str = "png", seed: int = 0
) -> Path:
    """root/<class>/<i>.<ext>, or root/<split>/<class>/<i>.<ext> when `splits` is a dict split -> per_class."""
    root = Path(root)
    layout = splits or {None: per_class}
    counter = seed * 100_000
    for split, count in layout.items():
        for ci, cls in enumerate(classes):
            for i in range(count):
                counter += 1
                folder = root / split / cls if split else root / cls
                make_image(folder / f"{cls}_{i:03d}.{ext}", ci, counter, size)
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG with valid CRCs whose IHDR claims width x height 8-bit gray pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
