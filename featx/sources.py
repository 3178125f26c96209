"""Data sources: find images and their labels, decode them robustly, and key them by content.

`load_source(spec)` turns an ImageFolder tree (optionally split into train/val/test), a CSV of `path,label[,split]`,
a text list of paths, an image file, the built-in offline `digits` dataset, or a list of several of these into a
`Source`: a root folder, its `Item`s in a
deterministic order, the class names and the task. `decode_image` opens any file PIL understands and normalises it
to a fully loaded RGB image, or raises `DecodeError` with a one-line reason. `content_key` is the cache key of a row.
"""
from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from PIL import Image, ImageFile

from .errors import FeatxError
from .gcpause import without_gc

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
SPLITS = ("train", "val", "test")
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own MAX_IMAGE_PIXELS, applied per call instead of through PIL's global
DIGITS_SPEC = "digits"
DIGITS_FOLDER = "digits-v1"
COLUMN_NAMES = {  # header names of a CSV's columns, lower case without separators ('File_Path' is 'filepath')
    "path": {"path", "file", "filepath", "filename", "fname", "image", "imagepath", "imagefile", "imagename", "img",
             "imgpath"},
    "label": {"label", "labels", "class", "classname", "classes", "category", "target", "y"},
    "split": {"split", "subset", "set", "partition"},
}
EXPECTED_SOURCE = "expected a folder, a .csv of path,label, a .txt list of image paths, an image file, or 'digits'"
_SPLIT_ORDER = {name: rank for rank, name in enumerate((*SPLITS, ""))}
_HASH_BLOCK = 1 << 20
_WHITE = (255, 255, 255, 255)


@functools.cache
def _pil_failures() -> tuple[type[BaseException], ...]:
    """What PIL raises on bad input (its plugins are not consistent about it); every one of them becomes a
    DecodeError. PIL is imported here, on the first decode, so that listing and keying files does not load it."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError


class Item(NamedTuple):
    """One image of a source: where it is, and what is known about it (a named tuple: a million of them are made
    in a second)."""

    path: str  # absolute file path
    relpath: str  # path relative to Source.root, '/'-separated (absolute when the file lies outside the root)
    label: int  # class index, -1 when unlabelled
    target: float  # regression target, nan when the task is not regression
    split: str  # 'train' | 'val' | 'test' | '' (no split given)


@dataclass
class Source:
    """A loaded data source: items sorted by split (train, val, test, none), class, then relpath."""

    root: str
    items: list[Item]
    classes: list[str]
    task: str  # 'classification' | 'regression' | 'unlabelled'
    description: str
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason): folders that could not be read


class DecodeError(Exception):
    """An image file that cannot be decoded; str(err) is the one-line reason stored in the store's /failed/reason."""


# --------------------------------------------------------------------------------------------------------------------
# load_source


@without_gc
def load_source(spec) -> Source:
    """Load a data source: a folder (ImageFolder, split ImageFolder or flat), a .csv, a .txt list, an image file,
    'digits', or a list or tuple of several of these (see `merge_sources`).

    Raises FeatxError (one line) for a missing path, a folder without images, an unsupported file type, or a
    malformed list.
    """
    if isinstance(spec, (list, tuple)):
        return merge_sources([load_source(one) for one in spec], spec)
    if spec == DIGITS_SPEC:
        root = _digits_root()
        return _load_folder(root, f"built-in digits {root}{os.sep}")
    display = os.fspath(spec)
    if not os.path.exists(display):
        raise FeatxError(f"data source {display} does not exist ({EXPECTED_SOURCE})")
    if os.path.isdir(display):
        return _load_folder(display, f"ImageFolder {display.rstrip(os.sep)}{os.sep}")
    suffix = os.path.splitext(display)[1].lower()
    if suffix == ".csv":
        return _load_table(display, "CSV", _read_csv_rows(display))
    if suffix == ".txt":
        return _load_table(display, "list", _read_list_rows(display))
    if suffix in IMAGE_EXTENSIONS:
        return _load_image_file(display)
    raise FeatxError(f"data source {display}: unsupported file type {suffix or '(none)'} ({EXPECTED_SOURCE})")


def _make_source(root: str, items: list[Item], classes: list[str], task: str, kind: str,
                 failed: list[tuple[str, str]] = (), missing: int = 0, ordered: bool = False) -> Source:
    """A Source with its items in the canonical order (split, label, relpath; `ordered`: they already are) and a
    one-line description."""
    if not ordered:
        items = sorted(items, key=lambda it: (_SPLIT_ORDER[it.split], it.label, it.relpath))
    summary = _summary(items, classes, task)
    if missing:
        summary += f", {missing} not found"
    if failed:
        summary += f", {len(failed)} unreadable folder{'s' if len(failed) > 1 else ''} left out"
    return Source(root, items, classes, task, f"{kind} ({summary})", sorted(failed))


def _summary(items: list[Item], classes: list[str], task: str) -> str:
    """'2 classes, 398 images, splits train 245 / val 153' and the like."""
    if task == "unlabelled":
        parts = [f"{len(items)} unlabelled images"]
    else:
        parts = ["regression" if task == "regression" else f"{len(classes)} classes", f"{len(items)} images"]
        unlabelled = sum(1 for it in items if it.label < 0 and math.isnan(it.target))
        if unlabelled:
            parts.append(f"{unlabelled} unlabelled")
    splits = Counter(it.split for it in items if it.split)
    if splits:
        parts.append("splits " + " / ".join(f"{name} {splits[name]}" for name in SPLITS if name in splits))
    return ", ".join(parts)


def _relpath(path: str, root: str) -> str:
    """`path` relative to `root`, '/'-separated; the absolute path when it lies outside the root."""
    prefix = root.rstrip(os.sep) + os.sep
    if path.startswith(prefix):  # roots are absolute and normalised, and so are the paths found under them
        return path[len(prefix):].replace(os.sep, "/")
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        rel = path
    return rel.replace(os.sep, "/")


# ---- folders


def _load_folder(folder: str, kind: str) -> Source:
    """ImageFolder `root/<class>/...`, split layout `root/{train,val,test}/<class>/...`, or a flat folder.

    Images lying next to class folders (a flat split folder such as an unlabelled `test/`) are unlabelled items, and
    so are the images of a segmentation level (only `images/` and `masks/` folders), whose masks are no items. A
    subfolder that cannot be read is left out and recorded in `Source.failed`; an unreadable root is a FeatxError.
    """
    root = os.path.abspath(folder)
    try:
        top = _entries(root)
    except OSError as err:
        raise FeatxError(f"cannot read folder {folder}: {err.strerror or err}") from None
    failed: list[tuple[str, str]] = []
    walk = _Walk(root, failed)
    splits = {e.name.lower(): e.path for e in top if _is_folder(e) and e.name.lower() in SPLITS}
    levels = splits or {"": root}
    found = {split: _without_masks(*walk.level(path)) for split, path in levels.items()}
    classes = sorted({name for by_class, _ in found.values() for name in by_class})
    index = {name: i for i, name in enumerate(classes)}
    cut = len(root.rstrip(os.sep)) + 1  # every path found starts with the root and a separator
    items = []
    for split in sorted(found, key=_SPLIT_ORDER.__getitem__):  # in the canonical order of _make_source
        by_class, loose = found[split]
        for label, paths in [(-1, loose), *((index[name], paths) for name, paths in sorted(by_class.items()))]:
            paths = sorted(paths)
            relpaths = [p[cut:] for p in paths] if os.sep == "/" else [p[cut:].replace(os.sep, "/") for p in paths]
            fields = zip(paths, relpaths, repeat(label), repeat(math.nan), repeat(split))
            items += map(tuple.__new__, repeat(Item), fields)  # Item(...) without its Python-level __new__
    if not items:
        raise FeatxError(
            f"no images found in {folder}: expected ImageFolder root/<class>/<image> (optionally under "
            f"root/train, root/val, root/test) or a flat folder of images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return _make_source(root, items, classes, "classification" if classes else "unlabelled", kind, failed,
                        ordered=True)


def _without_masks(by_class: dict[str, list[str]], loose: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """A segmentation level (only images/ and masks/ folders): its images are unlabelled items, its masks none."""
    if set(by_class) == {"images", "masks"}:
        return {}, loose + by_class["images"]
    return by_class, loose


class _Walk:
    """Finds the images under a root, following links but never re-entering a folder already visited; a folder
    that cannot be read is appended to `failed` as (relpath, reason) and left out."""

    def __init__(self, root: str, failed: list[tuple[str, str]]):
        self.root, self.failed = root, failed
        self.ancestors = {os.path.realpath(root)}

    def level(self, folder: str) -> tuple[dict[str, list[str]], list[str]]:
        """Images of each class subfolder of `folder` (classes without images left out), and images lying in
        `folder`."""
        ancestors = self.ancestors | {os.path.realpath(folder)}
        by_class, loose = {}, []
        for entry in self._entries(folder):
            if _is_folder(entry):
                images = self._images(entry.path, set(ancestors))
                if images:
                    by_class[entry.name] = images
            elif _is_image_file(entry):
                loose.append(entry.path)
        return by_class, loose

    def _images(self, folder: str, visited: set[str]) -> list[str]:
        """Image files under `folder`, recursively."""
        real = os.path.realpath(folder)
        if real in visited:
            return []
        visited.add(real)
        images = []
        for entry in self._entries(folder):
            name = entry.name
            if name[name.rfind("."):].lower() in IMAGE_EXTENSIONS:  # most entries: an image file, one test
                try:
                    if entry.is_file():
                        images.append(entry.path)
                        continue
                except OSError:
                    pass
            if _is_folder(entry):
                images += self._images(entry.path, visited)
            elif _is_image_file(entry):
                images.append(entry.path)
        return images

    def _entries(self, folder: str) -> list[os.DirEntry]:
        try:
            return _entries(folder)
        except OSError as err:
            self.failed.append((_relpath(folder, self.root), f"cannot read folder: {err.strerror or err}"))
            return []


def _entries(folder: str) -> list[os.DirEntry]:
    """The non-hidden entries of a folder (OSError when it cannot be read)."""
    with os.scandir(folder) as it:
        return [entry for entry in it if not entry.name.startswith(".")]


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder or a link to one; False for what cannot be examined (a link that loops)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_image_file(entry: os.DirEntry) -> bool:
    """An image extension, in any letter case, on a regular file or a link to one, or on a link that leads nowhere
    (dangling, or looping back to itself): that one becomes a failed row, like any file that cannot be read.
    Special files (FIFOs, sockets, devices), whose opening could block, are not images."""
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return True


# ---- CSV and text lists


class _Row(NamedTuple):
    """One data row of a CSV or list file, fields stripped."""

    line: int
    path: str
    label: str
    split: str


def _read_csv_rows(path: str) -> list[_Row]:
    """Rows of `path,label[,split]`, blank rows skipped. A first row that names its columns (path, label, split, or
    the usual synonyms: filepath, image, class, target, subset, ...) is a header: the columns are then taken by
    name, in any order, and other columns are ignored."""
    rows = []
    columns = None
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            for fields in reader:
                fields = [field.strip() for field in fields]
                if not any(fields):
                    continue
                if not rows and columns is None:
                    columns = _header_columns(fields, os.path.dirname(os.path.abspath(path)))
                    if columns is not None:
                        continue
                rows.append(_csv_row(path, reader.line_num, fields, columns))
        except csv.Error as err:
            raise FeatxError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
        except UnicodeDecodeError:
            raise FeatxError(f"{path} is not a UTF-8 text file: expected rows of path,label[,split]") from None
    return rows


def _header_columns(fields: list[str], folder: str) -> dict[str, int] | None:
    """{'path': i, 'label': j, 'split': k} when `fields` is a header row (names of the usual columns; a field that
    is an existing file makes it a data row), else None. Without a path column named, the path is the first
    column."""
    if os.path.isfile(os.path.join(folder, fields[0])):
        return None
    columns: dict[str, int] = {}
    for index, name in enumerate(re.sub(r"[^a-z0-9]", "", field.lower()) for field in fields):
        role = next((role for role, names in COLUMN_NAMES.items() if name in names), None)
        if role is not None:
            columns.setdefault(role, index)
    if not columns:
        return None
    if "path" not in columns and 0 not in columns.values():
        columns["path"] = 0
    return columns if "path" in columns else None


def _csv_row(path: str, line: int, fields: list[str], columns: dict[str, int] | None) -> _Row:
    """Validate one CSV row: a non-empty path, an optional label, an optional split (train / val / test); without a
    header the row is path,label[,split]."""
    if columns is None:
        if len(fields) > 3:
            raise FeatxError(f"{path} line {line}: malformed row {','.join(fields)!r}: expected path,label[,split]")
        columns = {"path": 0, "label": 1, "split": 2}
    value = {role: fields[index] if index < len(fields) else "" for role, index in columns.items()}
    image, label, split = value["path"], value.get("label", ""), value.get("split", "")
    if not image:
        raise FeatxError(f"{path} line {line}: malformed row {','.join(fields)!r}: the image path is empty")
    if split.lower() not in _SPLIT_ORDER:
        raise FeatxError(f"{path} line {line}: split {split!r}: expected one of {', '.join(SPLITS)} or empty")
    return _Row(line, image, label, split.lower())


def _read_list_rows(path: str) -> list[_Row]:
    """One image path per line; blank lines and '#' comments skipped."""
    with _open_text(path) as f:
        try:
            lines = [(number, text.strip()) for number, text in enumerate(f, start=1)]
        except UnicodeDecodeError:
            raise FeatxError(f"{path} is not a UTF-8 text file: expected one image path per line") from None
    return [_Row(number, text, "", "") for number, text in lines if text and not text.startswith("#")]


def _open_text(path: str):
    """Open a UTF-8 text file (a BOM is skipped), with a FeatxError when it cannot be read."""
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise FeatxError(f"cannot read {path}: {err.strerror or err}") from None


def _load_table(path: str, kind: str, rows: list[_Row]) -> Source:
    """A Source from CSV / list rows: paths relative to the file's folder, labels interpreted as a whole. A row
    whose file is missing stays an item (it becomes a failed row, like a file that cannot be decoded) unless no
    file at all is there."""
    if not rows:
        expected = "rows of path,label[,split]" if kind == "CSV" else "one image path per line"
        raise FeatxError(f"{path} is empty: expected {expected}")
    root = os.path.dirname(os.path.abspath(path))
    files = [os.path.normpath(os.path.join(root, row.path)) for row in rows]
    missing = [(row, file) for row, file in zip(rows, files) if not os.path.isfile(file)]
    if len(missing) == len(rows):
        row, file = missing[0]
        others = f"; none of its {len(rows)} images is there" if len(rows) > 1 else ""
        raise FeatxError(f"{path} line {row.line}: image {row.path} not found (looked for {file}){others} (relative "
                         f"paths start from the folder of {os.path.basename(path)})")
    task, classes, labels, targets = _interpret_labels([row.label for row in rows])
    items = [
        Item(file, _relpath(file, root), label, target, row.split)
        for row, file, label, target in zip(rows, files, labels, targets)
    ]
    return _make_source(root, items, classes, task, f"{kind} {path}", missing=len(missing))


def _interpret_labels(values: list[str]) -> tuple[str, list[str], list[int], list[float]]:
    """(task, classes, label per row, target per row) from the raw label fields; empty fields are unlabelled rows.

    All integers -> classification with classes sorted numerically; else all numbers -> regression; else strings
    -> classification with classes sorted; no label at all -> unlabelled.
    """
    given = [v for v in values if v]
    if not given:
        return "unlabelled", [], [-1] * len(values), [math.nan] * len(values)
    if _all_parse(given, int):
        canonical, order = (lambda v: str(int(v))), int
    elif _all_parse(given, float):
        return "regression", [], [-1] * len(values), [float(v) if v else math.nan for v in values]
    else:
        canonical, order = str, None
    classes = sorted({canonical(v) for v in given}, key=order)
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[canonical(v)] if v else -1 for v in values]
    return "classification", classes, labels, [math.nan] * len(values)


def _all_parse(values: list[str], kind: type) -> bool:
    """Whether every value parses as `kind` (int or float)."""
    try:
        for value in values:
            kind(value)
    except ValueError:
        return False
    return True


# ---- image files, and several sources as one


def _load_image_file(path: str) -> Source:
    """One image file given by itself: an unlabelled item named after the file, its folder the root."""
    file = os.path.abspath(path)
    root = os.path.dirname(file)
    return _make_source(root, [Item(file, _relpath(file, root), -1, math.nan, "")], [], "unlabelled", f"image {path}")


def merge_sources(sources: list[Source], specs) -> Source:
    """Several loaded sources (the DATA arguments `specs`) as one: the root is the working folder, so paths read as
    they were given (absolute outside it), classes are the union (a source's labels keep their class names), and a
    file given twice is one item. Classification and regression data cannot be mixed; unlabelled data mixes with
    either."""
    if not sources:
        raise FeatxError(f"no data given ({EXPECTED_SOURCE})")
    if len(sources) == 1:
        return sources[0]
    tasks = {source.task for source in sources} - {"unlabelled"}
    if len(tasks) > 1:
        kinds = ", ".join(f"{spec} ({source.task})" for spec, source in zip(specs, sources))
        raise FeatxError(f"data {kinds}: classification and regression data cannot be given together")
    lists = {tuple(source.classes) for source in sources if source.classes}
    classes = list(lists.pop()) if len(lists) == 1 else sorted({name for names in lists for name in names})
    index = {name: i for i, name in enumerate(classes)}
    root = os.getcwd()
    items, seen = [], set()
    for source in sources:
        for item in source.items:
            if item.path in seen:
                continue
            seen.add(item.path)
            label = index[source.classes[item.label]] if item.label >= 0 else -1
            items.append(Item(item.path, _relpath(item.path, root), label, item.target, item.split))
    kind = f"{len(sources)} sources ({', '.join(map(os.fspath, specs))})"
    return _make_source(root, items, classes, tasks.pop() if tasks else "unlabelled", kind)


# ---- digits


def _digits_root() -> str:
    """The materialized digits dataset folder (split ImageFolder), written on first use."""
    cache = Path(os.environ.get("FEATX_CACHE") or Path.home() / ".cache" / "featx")
    final = cache / DIGITS_FOLDER
    if not final.is_dir():
        try:
            _materialize_digits(cache, final)
        except OSError as err:
            raise FeatxError(f"cannot write the digits dataset under {cache}: {err} (set FEATX_CACHE)") from None
    return str(final)


def _materialize_digits(cache: Path, final: Path) -> None:
    """Write scikit-learn's digits as 32x32 grayscale PNGs, {train,val}/<digit>/<index>.png, every 5th image in val.

    Built in a private temporary folder and renamed into place, so a concurrent run or a kill never leaves a partial
    dataset where `final` is; when another process wins the race its copy is kept.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{DIGITS_FOLDER}.partial-", dir=cache))
    try:
        for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
            folder = partial / ("val" if index % 5 == 4 else "train") / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            gray = np.round(pixels * (255 / 16)).astype(np.uint8)
            Image.fromarray(gray).resize((32, 32), Image.Resampling.NEAREST).save(folder / f"{index}.png")
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# content keys and decoding


def content_key(path) -> str:
    """sha256 hex digest of the file's bytes, read in 1 MiB blocks (OSError when the file cannot be read).
    `path` may also be the bytes themselves (an upload), which give the key their file would have."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return hashlib.sha256(path).hexdigest()
    digest = hashlib.sha256()
    with _open_regular(path) as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_key(path: str, size: int, mtime_ns: int) -> str:
    return content_key(path)


def sha256_file(path) -> str:
    """content_key of a file (a weights file), remembered per (path, size, mtime) for this process."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _file_key(path, st.st_size, st.st_mtime_ns)


def unreadable_reason(path) -> str:
    """Why the file at `path` cannot be read, as the store's /failed/reason records it."""
    try:
        with _open_regular(path):
            return "cannot read file"
    except OSError as err:
        return _cannot_read(err)


def _open_regular(path) -> BinaryIO:
    """Open a file for reading in binary mode; OSError for what is not a regular file (a FIFO would block, a
    device may never end), checked on the open file itself."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: opening a FIFO returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _cannot_read(err: OSError) -> str:
    return f"cannot read file: {err.strerror or err}"


def content_keys(paths: list[str], progress: bool = False) -> list[str | None]:
    """content_key of every path, in threads (hashing releases the GIL); None where a file cannot be read."""
    import concurrent.futures as cf

    from tqdm import tqdm

    def safe_key(path: str):
        try:
            return content_key(path)
        except OSError:
            return None

    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        keys = pool.map(safe_key, paths, chunksize=64)
        return list(tqdm(keys, total=len(paths), desc="hashing", unit="file", disable=None if progress else True,
                         leave=False))


def decode_image(path, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file into a fully loaded RGB PIL image, whatever its format, mode, orientation or extension.

    `min_size`: when the file is a JPEG, let libjpeg decode at a reduced scale that keeps both sides >= min_size.
    `max_pixels`: reject images whose header claims more pixels than this, before any pixel is decoded.
    `path` may also be the file's bytes (an upload). Raises DecodeError with a one-line reason for files that
    cannot be read or decoded.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        fp, name = io.BytesIO(path), ""
    else:
        try:
            fp = _open_regular(path)
        except OSError as err:
            raise DecodeError(_cannot_read(err)) from None
        name = os.fspath(path)
    with fp:
        image = _identify(fp, name)
        _check_pixels(image.size, max_pixels)
        try:
            image = _load(image, min_size)
        except _pil_failures() as err:
            raise DecodeError(f"truncated or corrupt image data: {_one_line(err)}") from None
    try:
        return _to_rgb(image)
    except _pil_failures() as err:
        raise DecodeError(f"cannot convert a {image.mode} image to RGB: {_one_line(err)}") from None


def _identify(fp: BinaryIO, filename: str) -> ImageFile.ImageFile:
    """Open the image with the PIL plugin that accepts its first bytes (the extension is ignored).

    This is Image.open's own detection loop minus its check against PIL's global MAX_IMAGE_PIXELS: decode_image
    applies its own per-call limit instead.
    """
    try:
        prefix = fp.read(16)
    except OSError as err:
        raise DecodeError(_cannot_read(err)) from None
    if not prefix:
        raise DecodeError("empty file (0 bytes)")
    from PIL import Image

    Image.init()
    header_error = None
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept else None
        except _pil_failures():  # some signature checks unpack more bytes than a tiny file has
            continue
        if accept and (not accepted or isinstance(accepted, str)):
            continue
        fp.seek(0)
        try:
            return factory(fp, filename)
        except _pil_failures() as err:
            if accepted:  # the format's signature matched, so this is a broken file of that format
                header_error = header_error or f"{fmt} header: {_one_line(err)}"
    if header_error:
        raise DecodeError(f"truncated or corrupt image data: {header_error}")
    raise DecodeError("not a recognised image format")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """The decompression-bomb guard: DecodeError when width * height exceeds `max_pixels`."""
    width, height = size
    if width * height > max_pixels:
        raise DecodeError(
            f"image too large: {width} x {height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(decompression-bomb guard)"
        )


def _load(image: ImageFile.ImageFile, min_size: int | None) -> Image.Image:
    """Decode the first frame (JPEGs at a reduced scale when `min_size` allows) and apply the EXIF orientation."""
    from PIL import ImageOps

    image.seek(0)
    if min_size:
        image.draft("RGB", (min_size, min_size))  # a no-op for formats other than JPEG
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image (the decoded one itself when it is RGB already): high bit-depth gray scaled to 8 bits, transparency composited onto white."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.clip(np.asarray(image), 0, 65535) >> 8
        image = Image.fromarray(gray.astype(np.uint8))
    elif image.mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image)), 0, 255)
        image = Image.fromarray(gray.astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _one_line(err: BaseException) -> str:
    """An exception as one line of text (its type name when it has no message)."""
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------------------------------------------------
# hold-out split


def stratified_holdout(labels, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = held out: about `fraction` of each class, chosen at random with `seed`.

    Every class with at least 2 items keeps at least one item on each side; a class with one item stays in train.
    """
    if not 0 < fraction < 1:
        raise FeatxError(f"hold-out fraction {fraction!r}: expected a number strictly between 0 and 1")
    labels = np.asarray(labels)
    held = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        if len(members) < 2:
            continue
        count = min(max(int(round(len(members) * fraction)), 1), len(members) - 1)
        held[rng.choice(members, size=count, replace=False)] = True
    return held
