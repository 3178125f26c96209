"""The dense probe: a per-pixel linear head on cached (N, C, H, W) maps (`featx extract --pooling none`).

The maps of several taps of one store can be fused: each is upsampled bilinearly to the finest map's size and the
channels are concatenated per cell, so a cell sees the fine tap's detail and the coarse tap's context; the head
records its taps in segment.json (`taps`, in the order given) and head.json's tap is the finest one.

Each store row is matched to its mask by the image's content key, and the mask goes through the store's own
transform (resize the shorter side with nearest, center crop) and then to the map's size. `pixels_per_image`
labelled pixels of each training image are drawn (seeded) and the heads' machinery fits a logistic regression on
them, C chosen by cross-validation with folds grouped by image (no image on both sides of a fold). The head folder
is an ordinary pickle-free head (head.json + weights.npz) plus segment.json (the class ids). Predictions are the
head's scores per map cell, upsampled bilinearly to the crop and mapped back to each image's own size (pixels
outside the center crop are background), so `extract --resize R --image-size S` with S at least the longer side
after the resize sees every pixel.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..choices import check_seed
from ..errors import FeatxError
from ..options import OptionError
from ..preprocess import TransformSpec, resize_shorter_side
from ..sources import content_key
from ..store import open_store
from . import SEGMENT_FILE
from .metrics import summarize
from .render import oriented_size, overlay_image, palette_image
from .source import IGNORE, load_mask_source, read_mask
from .transforms import eval_mask, mask_image

FORMAT = 1
PIXELS_PER_IMAGE = 256
CHUNK_IMAGES = 64


def _map_tap(store, tap: str | None) -> tuple[str, tuple[int, ...]]:
    """The tap to read and its (C, h, w) shape; FeatxError for pooled rows."""
    from ..heads.data import _choose_tap

    tap = _choose_tap(store, tap)
    shape = tuple(store.feature_shape(tap))
    if len(shape) != 3:
        raise FeatxError(f"{store.path}: tap {tap} holds {shape} rows per image (pooling "
                         f"{store.config.get('pooling')}); a segmentation head needs maps: "
                         "featx.extract(..., pooling='none') / `featx extract --pooling none`")
    return tap, shape


def _map_taps(store, taps) -> tuple[list[str], str, tuple[int, int, int]]:
    """(taps, the finest of them, (C, h, w) of their fused maps: channels summed, the finest map's size) for one
    tap (a name or None: the store's only tap) or a list of taps; OptionError for a tap given twice."""
    taps = [taps] if taps is None or isinstance(taps, str) else list(taps) or [None]
    twice = sorted({tap for tap in taps if taps.count(tap) > 1})
    if twice:
        raise OptionError("{tap=}: given twice; give each tap once", tap=twice[0])
    shapes = dict(_map_tap(store, tap) for tap in taps)
    finest = max(shapes, key=lambda tap: shapes[tap][1] * shapes[tap][2])
    return list(shapes), finest, (sum(shape[0] for shape in shapes.values()), *shapes[finest][1:])


def fuse_maps(maps: list[np.ndarray]) -> np.ndarray:
    """Maps (n, C_i, h_i, w_i) of one or several taps as one (n, sum C_i, h, w) array at the finest map's size:
    the coarser maps upsampled bilinearly (align_corners False, as the scores in crop_ids), channels in order."""
    if len(maps) == 1:
        return maps[0]
    import torch
    import torch.nn.functional as F

    h, w = max((m.shape[2:] for m in maps), key=lambda size: size[0] * size[1])
    return np.concatenate([m if m.shape[2:] == (h, w) else F.interpolate(
        torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)), size=(h, w), mode="bilinear",
        align_corners=False).numpy() for m in maps], axis=1)


def _read_maps(store, taps: list[str], rows) -> np.ndarray:
    return fuse_maps([store.features(tap, rows) for tap in taps])


def _row_masks(store, masks, binary: bool, num_classes: int | None, rows: np.ndarray, spec: TransformSpec):
    """(MaskSource, {row: crop-sized int64 mask}) for store `rows`; FeatxError naming an image without a mask."""
    source = load_mask_source(masks, binary=binary, num_classes=num_classes)
    by_key = {content_key(pair.image): pair for pair in source.pairs}
    out = {}
    for row in rows:
        pair = by_key.get(store.keys[row])
        if pair is None:
            raise FeatxError(f"{masks}: no mask for {store.paths[row]} (row {row} of {store.path}); expected a mask "
                             f"for every image of the store")
        out[int(row)] = np.asarray(eval_mask(mask_image(read_mask(pair.mask, binary)), spec), dtype=np.int64)
    return source, out


def _at(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """A crop-sized mask at the map's size (nearest)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8), "L").resize((w, h), Image.Resampling.NEAREST),
                      dtype=np.int64)


def _rows_of(store, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(training rows, held-out rows, how): splits 'train'/'val' of the store, else a seeded image hold-out."""
    splits = np.asarray(store.splits, dtype=str)
    if (splits == "val").any():
        return np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val"), "split 'val'"
    rows = np.flatnonzero(splits != "test")
    if not 0 <= val_split < 1:
        raise OptionError("{val_split=}: expected a fraction in [0, 1)", val_split=val_split)
    held = np.random.default_rng(seed).permutation(len(rows))[: int(round(val_split * len(rows)))]
    keep = np.ones(len(rows), dtype=bool)
    keep[held] = False
    return rows[keep], np.sort(rows[~keep]), f"{val_split:g} of the images held out (seed {seed})"


def _pixels(store, taps, rows, masks, shape, per_image: int, seed: int):
    """(X (n, C), ids (n,), image index (n,)): up to `per_image` labelled cells of each image, drawn seeded."""
    channels, h, w = shape
    rng = np.random.default_rng(seed)
    xs, ys, groups = [], [], []
    for start in range(0, len(rows), CHUNK_IMAGES):
        chunk = rows[start : start + CHUNK_IMAGES]
        maps = _read_maps(store, taps, chunk)
        for k, row in enumerate(chunk):
            ids = _at(masks[int(row)], h, w).reshape(-1)
            cells = np.flatnonzero(ids != IGNORE)
            cells = rng.choice(cells, size=min(per_image, len(cells)), replace=False) if len(cells) else cells
            xs.append(maps[k].reshape(channels, -1)[:, cells].T)
            ys.append(ids[cells])
            groups.append(np.full(len(cells), row))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(groups)


def fit_dense_probe(store_path, masks, output=None, *, tap: str | list[str] | None = None, binary: bool = False,
                    num_classes: int | None = None, pixels_per_image: int = PIXELS_PER_IMAGE, grid=None,
                    folds: int | None = None, normalize: str = "standard", val_split: float = 0.2, seed: int = 0,
                    n_jobs: int | None = -1, overwrite: bool = False):
    """Fit a per-pixel logistic regression on the maps of `tap` in the featx store `store_path` (a list of taps:
    their fused maps, see fuse_maps), against the masks of `masks` (a masks folder or CSV, see
    featx.segment.source). Returns the Head; with `output` it is saved."""
    from ..heads import cv
    from ..heads.data import Rows
    from ..heads.estimators import HeadOptions, get_head_type
    from ..heads.inmemory import InMemoryFit
    from ..heads.model import Head
    from ..heads.persistence import atomic_folder, check_output, save_head

    if isinstance(pixels_per_image, bool) or not isinstance(pixels_per_image, int) or pixels_per_image < 1:
        raise OptionError("{pixels_per_image=}: expected a positive integer", pixels_per_image=pixels_per_image)
    check_seed(seed)
    if output is not None:
        check_output(Path(output), overwrite)
    started = time.perf_counter()
    with open_store(store_path) as store:
        taps, tap, shape = _map_taps(store, tap)
        spec = TransformSpec.from_dict(store.config["transform"])
        train, held, how = _rows_of(store, val_split, seed)
        if not len(train):
            raise FeatxError(f"{store.path}: no training rows (split 'train', or rows without a split)")
        source, masks_by_row = _row_masks(store, masks, binary, num_classes, np.concatenate([train, held]), spec)
        X, y, groups = _pixels(store, taps, train, masks_by_row, shape, pixels_per_image, seed)
        present, y_index = np.unique(y, return_inverse=True)
        if len(present) < 2:
            raise FeatxError(f"{masks}: every sampled training pixel is of class {source.classes[present[0]]!r}; a "
                             f"segmentation head needs 2 or more classes")
        names = [source.classes[i] for i in present]
        head_type = get_head_type("logistic", "classification", str(store.path))
        rows = Rows(path=Path(store.path), tap=tap, n_rows=len(X), n_features=shape[0], labels=y_index,
                    classes=names, targets=None, splits=np.full(len(X), "train"), names=np.arange(len(X)).astype(str),
                    config=dict(store.config), config_key=store.config_key, _read_index=lambda index: X[index],
                    _close=lambda: None)
        fit_started = time.perf_counter()
        trainer = InMemoryFit(head_type, HeadOptions(seed=seed), rows, np.arange(len(X)), y_index, len(names),
                              normalize, len(X), n_jobs)
        values, refine = cv.parse_grid(head_type.default_grid if grid is None else grid)
        result = None
        if len(values) > 1:
            trainer.set_folds(_group_folds(groups, folds or cv.FOLDS), "accuracy")
            result = cv.search(trainer.score_grid, values, refine, "accuracy")
        C = result.best if result else float(values[0])
        head = Head(trainer.fit(C), kind=head_type.name, task="segmentation", model="linear", classes=names,
                    n_features=shape[0], tap=tap, normalize=normalize, link=head_type.link, C=C,
                    config=dict(store.config), config_key=store.config_key)
        segment = {"featx_segment": FORMAT, "classes": source.classes, "binary": bool(binary),
                   "num_classes": source.num_classes, "masks": os.path.abspath(masks), **_several(taps)}
        head.segment = segment
        head.metrics = {
            "head": head_type.name, "task": "segmentation", "tap": tap, **_several(taps), "map_shape": list(shape),
            "trained_on": str(store.path), "masks": segment["masks"], "pixels_per_image": pixels_per_image,
            "rows": {"train": len(train), "eval": len(held)}, "fit_pixels": len(X), "C": C,
            "cv": result.to_dict() if result else None, "converged": trainer.converged,
            "fit_seconds": time.perf_counter() - fit_started,
        }
        if len(held):
            matrix = _confusion(head, store, taps, held, masks_by_row, spec, source.classes)
            head.metrics.update(evaluated_on=how, **summarize(matrix, source.classes))
        head.metrics["total_seconds"] = time.perf_counter() - started
    if output is not None:
        with atomic_folder(output, overwrite) as folder:
            save_head(head, folder)
            (folder / SEGMENT_FILE).write_text(json.dumps(segment, indent=2))
        head.path = Path(output)
    return head


def _several(taps: list[str]) -> dict:
    """{"taps": taps} for a head on several taps; nothing for one, whose files stay as they were."""
    return {"taps": taps} if len(taps) > 1 else {}


def _group_folds(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions with every image's pixels on one side."""
    from sklearn.model_selection import GroupKFold

    n = min(folds, len(np.unique(groups)))
    if n < 2:
        raise FeatxError("cross-validation of a segmentation head needs 2 or more training images")
    return list(GroupKFold(n_splits=n).split(groups, groups=groups))


def load_segment_head(path):
    """A segment head folder: the Head (from its arrays) with `.segment` (segment.json) attached."""
    from ..heads.persistence import load_head

    head = load_head(path)
    try:
        head.segment = json.loads((Path(path) / SEGMENT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise FeatxError(f"{Path(path) / SEGMENT_FILE}: unreadable segmentation head description ({err})") from err
    return head


def crop_ids(head, maps: np.ndarray, crop: int) -> np.ndarray:
    """Class ids (n, crop, crop) of maps (n, C, h, w): the head's scores per cell, upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    n, channels, h, w = maps.shape
    scores = head.decision_function(maps.transpose(0, 2, 3, 1).reshape(-1, channels))
    scores = scores.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), size=(crop, crop),
                       mode="bilinear", align_corners=False)
    index = (up[:, 0] > 0).long() if up.shape[1] == 1 else up.argmax(1)
    ids = np.asarray([head.segment["classes"].index(str(c)) for c in head.classes_], dtype=np.int64)
    return ids[index.numpy()]


def _confusion(head, store, taps, rows, masks_by_row, spec: TransformSpec, classes) -> np.ndarray:
    k = len(classes)
    matrix = np.zeros((k, k), dtype=np.int64)
    for start in range(0, len(rows), CHUNK_IMAGES):
        chunk = rows[start : start + CHUNK_IMAGES]
        predicted = crop_ids(head, _read_maps(store, taps, chunk), spec.crop)
        for row, pred in zip(chunk, predicted):
            true = masks_by_row[int(row)]
            keep = true != IGNORE
            matrix += np.bincount(true[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    return matrix


def evaluate_dense(head, store_path, masks, *, split: str | None = None) -> dict:
    """pixel_acc, miou, dice, per-class IoU of a segment head on the rows of a store: those of `split` ('all':
    every row; None: the 'val' split, else 'test', else every row, as featx.heads.evaluate)."""
    from ..heads.data import evaluation_rows

    head = head if hasattr(head, "segment") else load_segment_head(head)
    if not isinstance(store_path, (str, Path)):
        raise FeatxError(f"DATA: a segmentation head is evaluated on one store (.h5 from featx extract of the images), "
                         f"not {len(store_path)} inputs")
    with open_store(store_path) as store:
        taps, tap, shape = _map_taps(store, head.taps)
        _check_store(head, store, "+".join(taps), shape[0])
        spec = TransformSpec.from_dict(store.config["transform"])
        rows, chosen, where = evaluation_rows(np.ones(len(store), dtype=bool), store.splits, split, store.path)
        _, masks_by_row = _row_masks(store, masks, head.segment["binary"], head.segment["num_classes"], rows, spec)
        matrix = _confusion(head, store, taps, rows, masks_by_row, spec, head.segment["classes"])
    return {"head": head.kind, "task": "segmentation", "tap": tap, **_several(taps), "data": str(store_path), "masks": str(masks),
            "split": chosen, "rows": {"eval": len(rows)}, "evaluated_on": where,
            **summarize(matrix, head.segment["classes"])}


def _check_store(head, store, tap: str, channels: int) -> None:
    """The head's check of an extractor, on the store's config and the map's per-cell width."""
    from types import SimpleNamespace

    head.check_rows(SimpleNamespace(config=dict(store.config), path=store.path, n_features=channels,
                                    describe=lambda: f"{store.path} ({tap}, per map cell)"))


def predict_dense(head, data, output, *, overlay=None, store=None, weights=None, batch_size: int = 64,
                  device: str = "auto", workers: int | None = None, progress: bool = False, log=None) -> dict:
    """Mask PNGs of `data` (images, or a masks folder's images) in the folder `output`, named after the images
    (`<relpath without extension>.png`): palette PNGs whose pixel values are the class ids (render.py), each at
    its image's size. `overlay`: a folder for the images with their masks blended in (`<relpath>.jpg`).
    `weights`: the head's weights file when it moved (see featx.heads.predict).
    Returns {written, output, overlay, failed}."""
    from ..heads.prediction import image_features, is_feature_file
    from ..sources import decode_image, load_source

    head = head if hasattr(head, "segment") else load_segment_head(head)
    if is_feature_file(data):
        raise FeatxError(f"{data}: a segmentation head predicts on images (a folder, CSV or list), whose sizes the "
                         f"masks take; for a store's rows use featx.evaluate(head, store, masks=...) / "
                         f"`featx evaluate HEAD STORE --masks MASKS`")
    folders = [Path(output)] + ([Path(overlay)] if overlay is not None else [])
    for name, folder, what in zip(("output", "overlay"), folders, ("the mask PNGs", "the overlay pictures")):
        _check_writable(name, folder, what)
    if store is not None and os.path.abspath(store) == os.path.abspath(output):
        raise OptionError("{output=} and {store=}: one path for both; the mask PNGs need a folder of their own",
                          output=str(output), store=str(store))
    items = {item.relpath: item for item in load_source(data).items}
    written = 0
    with image_features(head, data, store, weights, batch_size=batch_size, device=device, workers=workers,
                        progress=progress, log=log) as (store_path, selected, failed), open_store(store_path) as st:
        taps, _, shape = _map_taps(st, head.taps)
        _check_store(head, st, "+".join(taps), shape[0])
        spec = TransformSpec.from_dict(st.config["transform"])
        for start in range(0, len(selected), CHUNK_IMAGES):
            rows = selected[start : start + CHUNK_IMAGES]
            chunk = [items[st.paths[row]] for row in rows]
            sizes = [oriented_size(item.path) for item in chunk]
            for item, ids in zip(chunk, image_masks(head, _read_maps(st, taps, rows), sizes, spec)):
                stem = os.path.splitext(item.relpath)[0]
                _save(palette_image(ids), folders[0] / f"{stem}.png")
                if overlay is not None:
                    _save(overlay_image(decode_image(item.path), ids), folders[1] / f"{stem}.jpg", quality=90)
                written += 1
    return {"written": written, "output": str(output), "overlay": None if overlay is None else str(overlay),
            "failed": failed}


def _check_writable(name: str, folder: Path, what: str) -> None:
    """OptionError about the parameter `name`, before any image is computed, when `what` cannot be written into
    `folder`."""
    from ..heads.prediction import can_write_in

    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise OptionError("{%s=}: {existing} is a file, expected a folder for {what}" % name, **{name: str(folder)},
                          existing=existing, what=what)
    if not can_write_in(folder):
        raise OptionError("{%s=}: cannot write there, expected a folder you can write for {what}" % name,
                          **{name: str(folder)}, what=what)


def _save(image: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def image_masks(head, maps: np.ndarray, sizes, spec: TransformSpec) -> list[np.ndarray]:
    """Class-id masks (H, W) at each image's own size ((width, height) in `sizes`) from the maps (n, C, h, w) of
    the head's tap (its taps: fused, fuse_maps): scores per cell upsampled to the crop (crop_ids), then the crop and the resize undone."""
    return [uncrop(ids, size, spec) for ids, size in zip(crop_ids(head, maps, spec.crop), sizes)]


def uncrop(ids: np.ndarray, size: tuple[int, int], spec: TransformSpec) -> np.ndarray:
    """Crop-sized ids back to an image of `size`: undo the center crop (background outside it), then the resize."""
    resized = resize_shorter_side(Image.new("L", size), spec.resize, "nearest").size
    left, top = int(round((resized[0] - spec.crop) / 2.0)), int(round((resized[1] - spec.crop) / 2.0))
    canvas = Image.new("L", resized, 0)
    canvas.paste(Image.fromarray(ids.astype(np.uint8), "L"), (left, top))
    return np.asarray(canvas.resize(size, Image.Resampling.NEAREST), dtype=np.uint8)


def segment_table(metrics: dict) -> str:
    """pixel accuracy, mean IoU, Dice and the per-class IoU as a few aligned lines."""
    lines = [f"{name:<16}{metrics[key]:.4f}" for name, key in
             (("pixel accuracy", "pixel_acc"), ("mean IoU", "miou"), ("Dice", "dice")) if key in metrics]
    lines += [f"IoU {cls:<12}{'-' if v is None else f'{v:.4f}'}" for cls, v in metrics.get("iou", {}).items()]
    where = metrics.get("evaluated_on")
    return "\n".join(([f"evaluated on {where} ({metrics['rows']['eval']} images)"] if where else []) + lines)
