"""Image preprocessing: the eval transform (resize, center crop) on uint8 tensors, normalization on batches.

Workers turn decoded images into uint8 HWC pixels (4x less to copy than float) and resize them with torch's uint8
kernels; the batch is converted to float and normalized on the model's device in the model's memory format.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
TV_INTERPOLATIONS = {
    "nearest": TF.InterpolationMode.NEAREST,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
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

# --decode mode -> the smallest side a JPEG's reduced-scale (DCT) decode may keep, in units of the resize; None:
# decoded at full size, as the reference pipelines (PIL, then the resize) do
DRAFT_FACTORS = {"exact": None, "fast": 2, "reduced": 1, "gpu": None}


def draft_size(spec: TransformSpec, decode: str) -> int | None:
    """The `min_size` of sources.decode_image for a --decode mode: the smallest side a JPEG may be decoded to
    before `spec`'s resize (None: full size)."""
    factor = DRAFT_FACTORS[decode]
    return spec.resize * factor if factor else None


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing so that the shorter side is `size`, rounded as torchvision does."""
    if width <= height:
        return size, max(1, int(size * height / width))
    return max(1, int(size * width / height)), size


def pixels(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) viewing one HWC copy of the pixels (channels_last strides)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def resize_shorter_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize a PIL image so that the shorter side is `size` (antialiased, as torchvision does on PIL images)."""
    width, height = img.size
    if min(width, height) == size:
        return img
    return img.resize(shorter_side_to(width, height, size), INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Center crop a PIL image to size x size, padding with black when it is smaller (like torchvision)."""
    width, height = img.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def resize_pixels(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """resize_shorter_side for a uint8 (3, H, W) tensor, with torch's antialiased uint8 kernels: several times
    faster than PIL's resize, and within one grey level of it."""
    height, width = x.shape[-2:]
    new_w, new_h = shorter_side_to(width, height, size)
    if (new_w, new_h) == (width, height):
        return x
    return TF.resize(x, [new_h, new_w], interpolation=TV_INTERPOLATIONS[interpolation], antialias=True)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 tensor (3, H, W)."""
    return pixels(img).contiguous()


class EvalTransform:
    """Deterministic eval preprocessing: resize shorter side, center crop, uint8 (3, crop, crop) tensor whose memory
    is HWC (channels_last strides), so that `.permute(1, 2, 0)` is a contiguous (crop, crop, 3) image for free."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = pixels(img) if isinstance(img, Image.Image) else img
        x = TF.center_crop(resize_pixels(x, self.spec.resize, self.spec.interpolation), [self.spec.crop] * 2)
        return x.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def normalize_batch(
    batch: torch.Tensor, spec: TransformSpec, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalized float32 on `device` in the model's memory format, in two passes: one copy that
    converts dtype and layout together, and one fused multiply-add in place, (x / 255 - mean) / std = x * scale + shift.
    From pinned memory on CUDA the transfer is non_blocking."""
    x = batch.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(x, dtype=torch.float32, memory_format=layout).copy_(x)
    std = torch.tensor(spec.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1).to(device)
    shift = (-torch.tensor(spec.mean, dtype=torch.float64) / std).float().view(1, -1, 1, 1).to(device)
    return torch.addcmul(shift, out, scale, out=out)
