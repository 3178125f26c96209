"""Turning a tap's output into a stored row: spatial pooling of feature maps, token pooling of transformer outputs."""
from __future__ import annotations

import torch

from .choices import POOLINGS, TOKEN_POOLINGS
from .options import OptionError

GEM_P = 3.0


def _spatial(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> pooled rows (B, D), or the map itself for 'none'."""
    if mode == "avg":
        return x.mean(dim=(2, 3))
    if mode == "max":
        return x.amax(dim=(2, 3))
    if mode == "avgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    if mode == "gem":
        return x.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    if mode == "flatten":
        return x.flatten(1)
    return x


def pool(x: torch.Tensor, mode: str = "avg", token_pool: str = "cls", channels_last_output: bool = False) -> torch.Tensor:
    """Pool one tap's batch output into float32 rows.

    4-D maps (B, C, H, W) use `mode`; Swin-style (B, H, W, C) maps pass `channels_last_output=True`.
    3-D token sequences (B, T, D) use `token_pool` (class token or mean of tokens). 2-D outputs are already rows.
    """
    if mode not in POOLINGS:
        raise OptionError("{pooling=}: expected one of {choices}", pooling=mode, choices=", ".join(POOLINGS))
    if token_pool not in TOKEN_POOLINGS:
        raise OptionError("{token_pool=}: expected one of {choices}", token_pool=token_pool,
                          choices=", ".join(TOKEN_POOLINGS))
    x = x.float()
    if x.dim() == 4:
        if channels_last_output:
            x = x.permute(0, 3, 1, 2)
        return _spatial(x, mode)
    if x.dim() == 3:
        return x[:, 0] if token_pool == "cls" else x.mean(dim=1)
    if x.dim() == 2:
        return x
    return x.flatten(1)


def pooled_shape(shape: tuple[int, ...], mode: str = "avg", channels_last_output: bool = False) -> tuple[int, ...]:
    """Per-image shape of a stored row, given a tap's per-image output shape (without the batch dimension)."""
    if len(shape) == 3:
        c, h, w = (shape[2], shape[0], shape[1]) if channels_last_output else shape
        return {
            "avg": (c,),
            "max": (c,),
            "gem": (c,),
            "avgmax": (2 * c,),
            "flatten": (c * h * w,),
            "none": (c, h, w),
        }[mode]
    if len(shape) == 2:
        return (shape[1],)
    if len(shape) == 1:
        return shape
    n = 1
    for s in shape:
        n *= s
    return (n,)

