"""The answers of a segmentation head (`featx fit-head --task segment`): the class id of every pixel of each
uploaded image, at the image's own size.

The masks come from featx.segment.probe.image_masks, the code of `featx predict` on a segmentation head, so an
answer holds the ids of the PNG that command writes. The request chooses the form with ?mask=, else with its
Accept header (image/png: png; anything else: rle):

    rle    JSON (the default): per image {"sha256", "cached", "size": [H, W], "pixels": {class: count},
           "mask": {"size", "values", "counts"}}, the runs of equal ids row by row (featx.segment.render.run_lengths)
    array  JSON as rle, with "mask" as H lists of W ids; only up to ARRAY_PIXELS pixels per image
    png    the palette PNG itself (pixel values = class ids), one image per request; headers X-Featx-Sha256 and
           X-Featx-Cached say which image and whether its maps came from the cache
"""
from __future__ import annotations

import warnings

import numpy as np
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..preprocess import TransformSpec
from ..segment.probe import fuse_maps, image_masks
from ..segment.render import oriented_size, palette_png, run_lengths
from .errors import ServiceError

FORMATS = ("rle", "array", "png")
ARRAY_PIXELS = 65_536


def mask_format(requested: str | None, accept: str, images: int) -> str:
    """The answer's form: ?mask= when given, else png when the Accept header asks for image/png, else rle."""
    fmt = requested or ("png" if "image/png" in accept.lower() else "rle")
    if fmt not in FORMATS:
        raise ServiceError(422, f"mask={fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "png" and images != 1:
        raise ServiceError(422, f"a PNG answer holds one mask, and the request has {images} images: send one "
                                "image, or ask for JSON (mask=rle or mask=array)")
    return fmt


def _sizes(uploads) -> list[tuple[int, int]]:
    """(width, height) of each upload as decoded (EXIF orientation applied); its pixel count was checked when it
    was decoded, so PIL's own pixel limit is not applied twice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return [oriented_size(upload.data) for upload in uploads]


def _masks(head, embedded, uploads) -> list[np.ndarray]:
    maps = fuse_maps([np.stack([np.asarray(e.rows[tap], dtype=np.float32) for e in embedded]) for tap in head.taps])
    return image_masks(head, maps, _sizes(uploads), TransformSpec.from_dict(head.config["transform"]))


async def answer(served, embedded, uploads, fmt: str):
    """The masks of the embedded uploads in the form `fmt` (a PNG Response, or the JSON body as a dict)."""
    head = served.head
    masks = await run_in_threadpool(_masks, head, embedded, uploads)
    if fmt == "png":
        body = await run_in_threadpool(palette_png, masks[0])
        return Response(body, media_type="image/png", headers={
            "X-Featx-Sha256": embedded[0].key, "X-Featx-Cached": str(embedded[0].cached).lower()})
    classes = list(head.segment["classes"])
    results = []
    for upload, e, ids in zip(uploads, embedded, masks):
        if fmt == "array" and ids.size > ARRAY_PIXELS:
            raise ServiceError(422, f"{upload.name}: {ids.shape[1]}x{ids.shape[0]} is {ids.size} pixels, over the "
                                    f"{ARRAY_PIXELS} of mask=array: ask for mask=rle or mask=png")
        counts = np.bincount(ids.reshape(-1), minlength=len(classes))
        results.append({
            "sha256": e.key, "cached": e.cached, "size": list(ids.shape),
            "pixels": {name: int(counts[i]) for i, name in enumerate(classes) if counts[i]},
            "mask": ids.tolist() if fmt == "array" else run_lengths(ids),
        })
    return {"head": served.name, "task": "segmentation", "classes": classes, "results": results}
