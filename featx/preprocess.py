"""Image preprocessing: the eval transform (resize, center crop) on PIL images, normalization on batches.

Workers turn decoded images into uint8 CHW tensors (4x less to copy than float); the batch is converted to
float and normalized on the model's device, where it is cheapest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class TransformSpec:
    """What torchvision's ImageClassification preset does: resize the shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformSpec":
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data["interpolation"]),
        )

    def with_sizes(self, image_size: int | None = None, resize: int | None = None) -> "TransformSpec":
        """Override the crop (--image-size) and/or the resize; a new crop alone keeps the preset's ratio."""
        crop = int(image_size) if image_size else self.crop
        if resize:
            new_resize = int(resize)
        elif image_size:
            new_resize = int(round(crop * self.resize / self.crop))
        else:
            new_resize = self.resize
        return TransformSpec(new_resize, crop, self.mean, self.std, self.interpolation)


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing so that the shorter side is `size`, rounded as torchvision does."""
    if width <= height:
        return size, max(1, int(size * height / width))
    return max(1, int(size * width / height)), size


def resize_shorter_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so that the shorter side is `size` (antialiased, as torchvision does on PIL images)."""
    width, height = img.size
    if min(width, height) == size:
        return img
    return img.resize(shorter_side_to(width, height, size), INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Center crop to size x size, padding with black when the image is smaller (like torchvision)."""
    width, height = img.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic eval preprocessing: resize shorter side, center crop, uint8 CHW tensor."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_shorter_side(img, self.spec.resize, self.spec.interpolation)
        return to_uint8_tensor(center_crop(img, self.spec.crop))


def normalize_batch(
    batch: torch.Tensor, spec: TransformSpec, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalized float32 on `device` (non_blocking from pinned memory on CUDA)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
