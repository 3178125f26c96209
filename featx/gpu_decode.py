"""`--decode gpu`: JPEGs decoded on the model's CUDA device in batches (nvJPEG through torchvision), then resized
and center-cropped there.

Decode workers only read the files: a JPEG that nvJPEG can take (RGB or grayscale, within the pixel limit) travels
as its bytes, every other file is decoded on the CPU as with `--decode exact`. A batch the device decoder rejects is
retried image by image, and a JPEG it rejects alone goes to the CPU decoder, so a bad file fails alone. The device
decoder differs from libjpeg (the CPU path's full-size decode) by a few
pixel values, so the decoder is part of a store's config identity. Resize and crop are the CPU path's own
(EvalTransform on a tensor), run on the device.
torchvision 0.29 deprecates its decoders in favour of TorchCodec; this module keeps to torchvision's API.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .choices import DECODES
from .options import OptionError
from .preprocess import EvalTransform, TransformSpec
from .sources import DEFAULT_MAX_PIXELS

EXIF_ORIENTATION = 0x0112
# CPU decoder: path -> (uint8 (3, crop, crop) tensor, reason; '' when decoded)
CpuDecode = Callable[[str], "tuple[torch.Tensor, str]"]


def check_decoder(decode: str, device: torch.device) -> None:
    """One-line OptionError unless `decode` can run with the model on `device`."""
    if decode not in DECODES:
        raise OptionError("{decode=}: expected one of {choices}", decode=decode, choices=", ".join(DECODES))
    if decode == "gpu" and device.type != "cuda":
        if not torch.cuda.is_available():
            raise OptionError("{decode=gpu}: CUDA is not available on this machine (use {decode=exact})")
        raise OptionError("{decode=gpu}: the model runs on {where}, expected a CUDA device ({device=cuda} or auto)",
                          where=str(device))


@dataclass
class Encoded:
    """What a decode worker hands over: a JPEG's bytes for the device, or an image the CPU already decoded."""

    path: str
    data: torch.Tensor | None = None  # uint8 (n,) file bytes when the device decodes it
    orientation: int = 1  # EXIF orientation of those bytes
    image: torch.Tensor | None = None  # uint8 (3, crop, crop) otherwise
    reason: str = ""  # why the CPU decoder failed ('' when it did not)


def _device_jpeg(data: bytes) -> tuple[bool, int]:
    """(nvJPEG can decode these bytes, their EXIF orientation), from the header alone."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            ok = img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= DEFAULT_MAX_PIXELS
            return ok, int(img.getexif().get(EXIF_ORIENTATION, 1)) if ok else 1
    except Exception:  # noqa: BLE001  (whatever PIL raises on a bad header: the CPU decoder names the reason)
        return False, 1


def read_encoded(path: str, cpu_decode: CpuDecode) -> Encoded:
    """The worker side: the bytes of a JPEG for the device decoder, any other file decoded by `cpu_decode`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        data = b""  # the CPU decoder reports why
    ok, orientation = _device_jpeg(data) if data else (False, 1)
    if ok:
        return Encoded(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)
    image, reason = cpu_decode(path)
    return Encoded(path, image=image, reason=reason)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) image, as PIL's ImageOps.exif_transpose does."""
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 7: (-1, -2)}.get(orientation)
    if orientation in (5, 7):
        image = image.transpose(-1, -2)
    elif orientation in (6, 8):
        image = torch.rot90(image, -1 if orientation == 6 else 1, dims=(-2, -1))
    return image.flip(flips) if flips else image


class DeviceDecoder:
    """The main-process side: a list of Encoded -> (uint8 (B, 3, crop, crop) on `device`, reasons)."""

    def __init__(self, spec: TransformSpec, device: torch.device, cpu_decode: CpuDecode):
        self.transform, self.device, self.cpu_decode = EvalTransform(spec), device, cpu_decode

    def __call__(self, items: list[Encoded]) -> tuple[torch.Tensor, list[str]]:
        jpegs = iter(self._decode_jpegs([e.data for e in items if e.data is not None]))
        images, reasons = [], []
        for e in items:
            reason = e.reason
            if e.data is None:
                image = e.image.to(self.device)
            else:
                decoded = next(jpegs)
                if decoded is not None:
                    image = self.transform(orient(decoded, e.orientation))  # the CPU path's resize and crop
                else:  # the device decoder rejects this file: the CPU decoder decides
                    image, reason = self.cpu_decode(e.path)
                    image = image.to(self.device)
            images.append(image)
            reasons.append(reason)
        return torch.stack(images), reasons

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice, once per call
            try:  # one call for the batch; nvJPEG returns nothing when any image fails
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                out = []
                for one in data:
                    try:
                        out.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=self.device)[0])
                    except RuntimeError:
                        out.append(None)
                return out
