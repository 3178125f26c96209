"""Masks as a source: image + mask pairs, checked up front, and masks decoded to class ids.

Layouts: DATA/{train,val,test}/{images,masks}/<name> (or DATA/{images,masks}/<name> without splits), where a mask
has its image's name (any image extension: `a.jpg` pairs with `masks/a.png`) and its image's size; or a CSV of
`image,mask[,split]` with paths relative to the CSV's folder. A mask holds class ids: 0 = background, 1..K the
classes; `binary` makes every non-zero pixel foreground (instance ids become one class). `IGNORE` (255) marks
pixels that count nowhere (the padding of a crop larger than the image).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import FeatxError
from ..options import OptionError
from ..sources import IMAGE_EXTENSIONS, SPLITS, DecodeError

IGNORE = 255
LAYOUT = ("expected DATA/{train,val}/{images,masks}/<name> (or DATA/{images,masks}/<name>), or a CSV of "
          "image,mask[,split]")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass(frozen=True)
class MaskPair:
    """An image and its mask: absolute paths, the image's path relative to the source root, and its split."""

    image: str
    mask: str
    relpath: str
    split: str  # 'train' | 'val' | 'test' | ''


@dataclass
class MaskSource:
    """Checked pairs, the number of foreground classes K (ids 1..K) and whether masks are read as binary."""

    root: str
    pairs: list[MaskPair]
    num_classes: int
    binary: bool
    description: str
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason): pairs left out

    @property
    def classes(self) -> list[str]:
        """Class names, index = id: background, then foreground (binary) or the ids 1..K."""
        return ["background", "foreground"] if self.binary else ["background", *map(str, range(1, self.num_classes + 1))]

    @property
    def n_outputs(self) -> int:
        """Output channels of a model: one logit for binary masks (BCE), else one per class (cross-entropy)."""
        return 1 if self.binary else self.num_classes + 1


def read_mask(path, binary: bool = False) -> np.ndarray:
    """A mask file as a (H, W) int64 array of class ids; DecodeError for an unreadable file, FeatxError for a colour
    mask (ids are expected: one channel, mode L or P)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DecodeError(f"unreadable mask: {' '.join(str(err).split()) or type(err).__name__}") from None
    if mode in COLOUR_MODES or mode in ("LA", "PA"):
        channels = arr[..., :3] if mode not in ("LA", "PA") else arr[..., :1]
        if mode in ("CMYK", "YCbCr", "LAB", "HSV") or (channels != channels[..., :1]).any():
            raise FeatxError(
                f"{path}: an {mode} colour mask where class ids are expected: save each mask as a single-channel "
                f"PNG (mode L or P) whose values are the ids 0..K"
            )
        arr = channels[..., 0]
    arr = np.asarray(arr, dtype=np.int64)
    return (arr > 0).astype(np.int64) if binary else arr


def load_mask_source(spec, *, binary: bool = False, num_classes: int | None = None) -> MaskSource:
    """Pairs of `spec` (a folder in the masks layout or a CSV), each mask checked: it exists, has its image's size,
    holds ids (not colours) and none above `num_classes` (inferred from the masks when None). A mask that cannot
    be decoded leaves its pair out (MaskSource.failed); every other problem is a one-line FeatxError."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes < IGNORE):
        raise OptionError("{num_classes=}: expected an integer from 1 to {high}", num_classes=num_classes,
                          high=IGNORE - 1)
    display = os.fspath(spec)
    if os.path.isdir(display):
        root, pairs, kind = os.path.abspath(display), _folder_pairs(display), "masks folder"
    elif os.path.isfile(display) and display.lower().endswith(".csv"):
        root, pairs, kind = os.path.dirname(os.path.abspath(display)), _csv_pairs(display), "masks CSV"
    else:
        raise FeatxError(f"{display}: not a segmentation data set; {LAYOUT}")
    if not pairs:
        raise FeatxError(f"{display}: no image + mask pairs found; {LAYOUT}")
    found, failed, highest = [], [], 0
    for pair in pairs:
        try:
            highest = max(highest, _check_pair(pair, binary, num_classes))
            found.append(pair)
        except DecodeError as err:
            failed.append((pair.relpath, f"{os.path.basename(pair.mask)}: {err}"))
    if not found:
        raise FeatxError(f"{display}: none of the {len(pairs)} masks could be decoded (first: {failed[0][1]})")
    k = 1 if binary else (num_classes or max(highest, 1))
    splits = {s: sum(p.split == s for p in found) for s in SPLITS}
    shown = " / ".join(f"{s} {n}" for s, n in splits.items() if n)
    description = (f"{kind} {display} ({len(found)} pairs{', splits ' + shown if shown else ''}, "
                   f"{'binary' if binary else f'{k} classes + background'})")
    return MaskSource(root, found, k, binary, description, failed)


def _check_pair(pair: MaskPair, binary: bool, num_classes: int | None) -> int:
    """The highest id in the pair's mask, after checking its size against the image's and its values."""
    ids = read_mask(pair.mask, binary)
    try:
        with Image.open(pair.image) as img:
            size = img.size
    except (OSError, ValueError, SyntaxError) as err:
        raise DecodeError(f"unreadable image {os.path.basename(pair.image)}: {err}") from None
    if (ids.shape[1], ids.shape[0]) != size:
        raise FeatxError(
            f"{pair.mask}: mask is {ids.shape[1]}x{ids.shape[0]} but its image {pair.image} is {size[0]}x{size[1]}: "
            f"expected a mask of its image's size"
        )
    highest = int(ids.max()) if ids.size else 0
    if ids.size and int(ids.min()) < 0:
        raise FeatxError(f"{pair.mask}: negative mask values; expected class ids 0..K")
    limit = num_classes if num_classes is not None else IGNORE - 1
    if highest > limit:
        expected = "{num_classes=$given} allows ids 0..{given}" if num_classes is not None else "ids 0..{high}"
        raise OptionError("{mask}: mask value {highest} is above the class ids expected (" + expected + "); pass "
                          "{binary=True} for instance masks, or a larger {num_classes}", mask=pair.mask,
                          highest=highest, given=num_classes, high=IGNORE - 1)
    return highest


def _folder_pairs(folder: str) -> list[MaskPair]:
    root = os.path.abspath(folder)
    if _is_pair_level(root):
        return _level_pairs(root, root, "")
    levels = [(s, os.path.join(root, s)) for s in SPLITS if _is_pair_level(os.path.join(root, s))]
    if not levels:
        raise FeatxError(f"{folder}: no images/ and masks/ folders found; {LAYOUT}")
    return [pair for split, path in levels for pair in _level_pairs(root, path, split)]


def _is_pair_level(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "masks"))


def _level_pairs(root: str, level: str, split: str) -> list[MaskPair]:
    """Pairs of LEVEL/images and LEVEL/masks; FeatxError naming the images that have no mask."""
    images_dir, masks_dir = os.path.join(level, "images"), os.path.join(level, "masks")
    masks = {}
    for name in sorted(os.listdir(masks_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            masks.setdefault(stem, os.path.join(masks_dir, name))
    pairs, missing = [], []
    images = [n for n in sorted(os.listdir(images_dir)) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    for name in images:
        mask = os.path.join(masks_dir, name) if os.path.isfile(os.path.join(masks_dir, name)) else \
            masks.get(os.path.splitext(name)[0])
        image = os.path.join(images_dir, name)
        if mask is None:
            missing.append(image)
        else:
            pairs.append(MaskPair(image, mask, os.path.relpath(image, root).replace(os.sep, "/"), split))
    if missing:
        raise FeatxError(
            f"{missing[0]}: no mask for this image in {masks_dir} ({len(missing)} of {len(images)} images have "
            f"none); expected masks/<name> with each image's name"
        )
    return pairs


def _csv_pairs(path: str) -> list[MaskPair]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "mask"]:
        rows = rows[1:]
    pairs = []
    for line, row in enumerate(rows, start=2):
        cells = [c.strip() for c in row]
        if len(cells) not in (2, 3) or (len(cells) == 3 and cells[2] not in (*SPLITS, "")):
            raise FeatxError(f"{path} line {line}: expected image,mask[,split] with split one of {', '.join(SPLITS)}")
        image, mask = (os.path.join(base, c) for c in cells[:2])
        for kind, file in (("image", image), ("mask", mask)):
            if not os.path.isfile(file):
                raise FeatxError(f"{path} line {line}: {kind} {file} does not exist")
        pairs.append(MaskPair(image, mask, os.path.relpath(image, base).replace(os.sep, "/"),
                              cells[2] if len(cells) == 3 else ""))
    return pairs
