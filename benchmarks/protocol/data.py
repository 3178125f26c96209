"""Datasets of the benchmark as lists of files, and the seeded, nested training subsets written as featx CSVs.

Every subset is a CSV `path,label,split` (absolute paths, class-name labels) that `featx` reads as a source. The
scoring set (`val`) is never part of a training CSV: the methods are trained on `train` rows only and scored on the
same held-out images afterwards, so nothing a method does during training can look at the scoring set.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Dataset:
    """Files per class of one target: `train` is the pool that subsets are drawn from, `val` the scoring set."""

    name: str
    root: Path
    classes: list[str]
    train: dict[str, list[str]]  # class -> sorted absolute paths
    val: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def pool_size(self) -> int:
        """Largest n per class that every class can give."""
        return min(len(v) for v in self.train.values())

    def n_val(self) -> int:
        return sum(len(v) for v in self.val.values())


def _images(folder: Path) -> list[str]:
    return sorted(str(p.resolve()) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def image_folder(root: Path, name: str | None = None, classes: list[str] | None = None, val_fraction: float = 0.2,
                 seed: int = 0) -> Dataset:
    """An ImageFolder tree: `root/{train,val}/<class>/` or `root/<class>/` (then a seeded per-class hold-out is val).

    `classes` restricts the dataset to those class folders (in that order).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SystemExit(f"--data {root}: no such folder")
    notes = []
    if (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()):
        val_dir = root / "val" if (root / "val").is_dir() else root / "test"
        names = classes or sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train = {c: _images(root / "train" / c) for c in names}
        val = {c: _images(val_dir / c) if (val_dir / c).is_dir() else [] for c in names}
        notes.append(f"scoring set: {val_dir.name}/ of {root}")
    else:
        names = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        train, val = {}, {}
        rng = np.random.default_rng(seed)
        for c in names:
            files = _images(root / c)
            held = set(rng.permutation(len(files))[: max(1, int(round(val_fraction * len(files))))].tolist())
            train[c] = [f for i, f in enumerate(files) if i not in held]
            val[c] = [f for i, f in enumerate(files) if i in held]
        notes.append(f"no train/val folders in {root}: a seeded {val_fraction:g} per-class hold-out is the scoring set")
    empty = [c for c in names if not train[c] or not val[c]]
    if empty:
        raise SystemExit(f"--data {root}: classes without train or val images: {', '.join(empty)}")
    return Dataset(name or root.name, root, list(names), train, val, notes)


def permutation(files: list[str], seed: int) -> list[str]:
    """The seeded order in which a class's pool is consumed; subsets are prefixes of it, so they are nested in n."""
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order]


def subset(ds: Dataset, n: int, seed: int) -> dict[str, list[str]]:
    """n training files per class: the first n of the class's seeded permutation (nested: subset(n) < subset(2n))."""
    out = {}
    for c in ds.classes:
        files = ds.train[c]
        if n > len(files):
            raise ValueError(f"{ds.name}: class {c} has {len(files)} training images, n={n} asked")
        out[c] = permutation(files, 1000 * seed + _class_salt(c))[:n]
    return out


def tune_split(ds: Dataset, n: int, n_holdout: int, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, tune-val) for choosing budgets: the n-subset of `seed` and `n_holdout` other pool images per class.

    Both come from the training pool, so the scoring set is never used to choose anything. The hold-out is taken from
    the end of the permutation (disjoint from every subset of up to pool - n_holdout images of that seed).
    """
    train, held = {}, {}
    for c in ds.classes:
        order = permutation(ds.train[c], 1000 * seed + _class_salt(c))
        k = min(n_holdout, len(order) - n)
        if k < 1:
            raise ValueError(f"{ds.name}: class {c} has too few images for a tuning hold-out")
        train[c], held[c] = order[:n], order[len(order) - k:]
    return train, held


def _class_salt(name: str) -> int:
    """A stable per-class seed offset (not Python's randomized hash)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 997


def write_csv(path: Path, groups: dict[str, dict[str, list[str]]]) -> Path:
    """Write `path,label,split` rows; `groups` maps split -> class -> files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for split, per_class in groups.items():
            for cls, files in per_class.items():
                for f in files:
                    writer.writerow([f, cls, split])
    return path


def count(per_class: dict[str, list[str]]) -> int:
    return sum(len(v) for v in per_class.values())
