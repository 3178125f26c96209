"""What a predicted mask becomes: a palette PNG, an overlay picture, a run-length encoding.

Pixel values are class ids everywhere (0 = background); the palette only decides how they look. It is the PASCAL
VOC colour map (id 1 dark red, 2 green, 3 olive, 4 navy, ...; 0 black), the usual palette of label PNGs, so a
predicted mask reads back as ids with any PNG reader (`np.asarray(Image.open(p))`) and as a mask for training.

The run-length encoding covers the whole mask, row by row (C order): `{"size": [H, W], "values": [...], "counts":
[...]}` with one value and one count per run, so `np.repeat(values, counts).reshape(H, W)` decodes it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image

OVERLAY_ALPHA = 0.5  # weight of the class colour over the image, on pixels that are not background
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height (what decode_image's transpose undoes)


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours of ids 0..n-1: the PASCAL VOC colour map (the bits of an id spread over R, G, B)."""
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.uint8)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * shift + channel)) & 1) << (7 - shift)).astype(np.uint8)
    return colours


PALETTE = voc_palette()


def palette_image(ids: np.ndarray) -> Image.Image:
    """A mode-P image whose pixel values are the class ids (0..255) and whose palette shows them."""
    image = Image.fromarray(np.asarray(ids, dtype=np.uint8), "P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return image


def palette_png(ids: np.ndarray) -> bytes:
    """The palette PNG of a mask, as bytes."""
    buffer = io.BytesIO()
    palette_image(ids).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_image(image: Image.Image, ids: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The RGB `image` with each non-background pixel blended with its class colour (`alpha` of the colour)."""
    ids = np.asarray(ids)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = PALETTE[np.minimum(ids, 255)].astype(np.float32)
    blended = np.where((ids != 0)[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")


def run_lengths(ids: np.ndarray) -> dict:
    """{"size": [H, W], "values": [...], "counts": [...]}: the runs of equal ids in row-major order."""
    flat = np.asarray(ids).reshape(-1)
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    counts = np.diff(np.append(starts, len(flat)))
    return {"size": list(np.shape(ids)), "values": flat[starts].tolist(), "counts": counts.tolist()}


def oriented_size(source) -> tuple[int, int]:
    """(width, height) of an image file or its bytes as decoding shows it: after the EXIF orientation, read from
    the header only."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as img:
        width, height = img.size
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in TRANSPOSING else (width, height)
