"""Training and validation data: the split, the augmentation, and loaders whose order depends only on the seed.

Workers decode and crop images into uint8 tensors (each image decoded once when the run has a DecodedCache); the
batch is normalized on the model's device. Every random choice (the epoch's order, each image's crop and flip) is
drawn from (seed, epoch) in the main process, so a resumed run sees exactly the data an uninterrupted one does,
whatever the number of workers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from ..choices import DEFAULT_DECODE
from ..crop_box import random_resized_box
from ..errors import FeatxError
from ..options import OptionError
from ..preprocess import TV_INTERPOLATIONS, EvalTransform, TransformSpec, draft_size, pixels, resize_pixels
from ..runtime import loader_workers
from ..sources import DecodeError, Item, Source, content_keys, decode_image, stratified_holdout
from .decoded import DecodedCache, stage_key

DEFAULT_VAL_SPLIT = 0.2


@dataclass
class Splits:
    """Training and validation items of a classification source."""

    train: list[Item]
    val: list[Item]
    classes: list[str]
    how: str  # where the validation items come from, for the log


def hold_out(train: list, val: list, val_split: float | None, held_out, noun: str) -> tuple[list, list, str]:
    """(train, val, how): the data's own `val` items, else the `val_split` fraction of `train` (0.2 by default, 0 for
    no validation) that `held_out(fraction)` marks True; `noun` names the items in the log line and errors."""
    if val:
        if val_split:
            raise OptionError("{val_split=}: the data has a val split already ({n} {noun})", val_split=val_split,
                              n=len(val), noun=noun)
        return train, val, f"the data's val split ({len(val)} {noun})"
    fraction = DEFAULT_VAL_SPLIT if val_split is None else float(val_split)
    if not 0 <= fraction < 1:
        raise OptionError("{val_split=}: expected a fraction in [0, 1)", val_split=val_split)
    if fraction:
        held = held_out(fraction)
        val = [item for item, h in zip(train, held) if h]
        train = [item for item, h in zip(train, held) if not h]
    return train, val, f"{fraction:.0%} of the training {noun} held out ({len(val)})" if val else "none (0% held out)"


def split_items(source: Source, val_split: float | None, seed: int) -> Splits:
    """Train / val items: the source's 'val' split, else a stratified `val_split` hold-out of the training items
    (0.2 by default, 0 for no validation). Unlabelled items and the 'test' split are left out."""
    if source.task != "classification":
        raise FeatxError(f"finetune needs class labels, but {source.description} is {source.task}")
    labelled = [item for item in source.items if item.label >= 0 and item.split != "test"]
    val = [item for item in labelled if item.split == "val"]
    train = [item for item in labelled if item.split != "val"]
    train, val, how = hold_out(
        train, val, val_split, lambda fraction: stratified_holdout([item.label for item in train], fraction, seed), "images"
    )
    if len({item.label for item in train}) < 2:
        raise FeatxError(f"finetune needs training images of at least 2 classes; {source.description}")
    return Splits(train, val, list(source.classes), how)


class TrainTransform:
    """--augment in two steps: `stage`, the deterministic decoding step whose pixels a DecodedCache can keep, then
    `augment`, the random part drawn from an `rng` argument, to a uint8 (3, crop, crop) tensor. `decode`, a
    --decode mode, is how a JPEG is decoded first: at full size ('exact'), or at the reduced scale of extract's
    'fast' (`min_size`, for sources.decode_image).

    'default' keeps the image at the working size (shorter side shrunk to the transform's resize; smaller images as
    they are) and takes torchvision's RandomResizedCrop box from it, resized to the crop, then a random flip; 'flip'
    keeps the eval transform's crop and flips it at random; 'none' is the eval transform alone.
    """

    def __init__(self, spec: TransformSpec, augment: str, decode: str = DEFAULT_DECODE):
        self.spec = spec
        self.augment = augment
        self.decode = decode
        self.eval = EvalTransform(spec)
        self.min_size = draft_size(spec, decode)

    def describe(self) -> dict:
        """What `stage` computes (the cache's key for it)."""
        kind = "working-size" if self.augment == "default" else "eval"
        return {"stage": kind, "decode": self.decode, **self.spec.to_dict()}

    def stage(self, img: Image.Image) -> torch.Tensor:
        """The image's uint8 (3, H, W) pixels before any random choice."""
        if self.augment != "default":
            return self.eval(img)
        x = pixels(img)
        if min(x.shape[-2:]) > self.spec.resize:
            x = resize_pixels(x, self.spec.resize, self.spec.interpolation)
        return x

    def augment_pixels(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """The random part: crop box (for 'default') and flip, from `rng`."""
        if self.augment == "default":
            left, top, right, bottom = random_resized_box(x.shape[-1], x.shape[-2], rng)
            x = TF.resized_crop(x, top, left, bottom - top, right - left, [self.spec.crop] * 2,
                                interpolation=TV_INTERPOLATIONS[self.spec.interpolation], antialias=True)
        if self.augment != "none" and rng.random() < 0.5:
            x = x.flip(-1)
        return x


class ImageDataset(Dataset):
    """(uint8 image, label, decoded ok) for a key (index, seed); an undecodable file gives a zero image and False.
    With a `cache` (and each item's content key in `keys`), an image's staged pixels are decoded once."""

    def __init__(self, items: list, transform, cache: DecodedCache | None = None,
                 keys: list[str | None] | None = None):
        self.items = items
        self.transform = transform
        self.cache = cache
        self.keys = None
        if cache is not None:
            stage = transform.describe()
            self.keys = [None if key is None else stage_key(key, stage) for key in keys]

    def __len__(self) -> int:
        return len(self.items)

    def _staged(self, index: int) -> torch.Tensor:
        key = self.keys[index] if self.keys is not None else None
        x = self.cache.get(key) if key is not None else None
        if x is None:
            img = decode_image(self.items[index].path, min_size=self.transform.min_size)
            x = self.transform.stage(img)
            if key is not None:
                self.cache.put(key, x)
        return x

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        item = self.items[index]
        try:
            return self.transform.augment_pixels(self._staged(index), random.Random(seed)), item.label, True
        except DecodeError:
            crop = self.transform.spec.crop
            return torch.zeros(3, crop, crop, dtype=torch.uint8), item.label, False


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) pairs drawn from (seed, epoch) alone; call set_epoch before each epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**63 - 1, size=self.n)
        return iter(zip(order.tolist(), seeds.tolist()))


def make_loader(items: list[Item], spec: TransformSpec, augment: str, *, train: bool, batch_size: int, workers: int,
                seed: int, pin_memory: bool, cache: DecodedCache | None = None,
                decode: str = DEFAULT_DECODE) -> DataLoader:
    """A loader of (uint8 images, labels, ok) batches; training batches are shuffled per epoch and full-size.

    `augment` is an --augment value; validation loaders take 'none' (the weights' eval transform); `decode` a
    --decode mode of finetune. With a `cache`, each image is decoded once (its content key is computed here, in
    threads).
    """
    keys = content_keys([item.path for item in items]) if cache is not None else None
    return loader_for(ImageDataset(items, TrainTransform(spec, augment, decode), cache, keys), train=train,
                      batch_size=batch_size, workers=workers, seed=seed, pin_memory=pin_memory)


def loader_for(dataset: Dataset, *, train: bool, batch_size: int, workers: int, seed: int,
               pin_memory: bool) -> DataLoader:
    """A DataLoader over `dataset` (keys (index, augmentation seed) from EpochSampler); training batches are
    shuffled per epoch and full-size."""
    workers = loader_workers(workers, len(dataset), batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, shuffle=train),
        drop_last=train,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker base seeds: keeps the global RNG untouched
    )
