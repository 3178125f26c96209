"""Device and precision choice, shared by extract, finetune and predict."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from .choices import DEVICE_CHOICES, PRECISIONS
from .cpu import usable_cores
from .options import OptionError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: the device, the autocast precision and whether channels_last is used."""

    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        """channels_last (NHWC) pays off on CUDA tensor cores and on CPUs at every precision: oneDNN's convolutions are
        NHWC-native (benchmarks/precision_layouts.py measures it per precision)."""
        return self.device.type in ("cpu", "cuda")

    def autocast(self):
        """Context manager for the forward pass at this runtime's precision."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def describe(self) -> str:
        return f"{self.device} {self.precision}{' channels_last' if self.channels_last else ''}"


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn --device into a torch.device; 'auto' picks CUDA, then MPS, then CPU."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            raise OptionError("{device=}: CUDA is not available on this machine (use {device=cpu} or auto)", device=spec)
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise OptionError("{device=}: only {n} CUDA device(s) here (cuda:0..cuda:{last})", device=spec,
                              n=torch.cuda.device_count(), last=torch.cuda.device_count() - 1)
        return torch.device("cuda", index)
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise OptionError("{device=mps}: MPS is not available on this machine (use {device=cpu} or auto)")
        return torch.device("mps")
    raise OptionError("{device=}: expected one of {choices}", device=spec, choices=DEVICE_CHOICES)


def cpu_supports_bf16() -> bool:
    """True when oneDNN has fast bf16 kernels on this CPU (AVX512-BF16 / AMX / AVX512 emulation)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(spec: str, device: torch.device) -> str:
    """Turn --precision into fp32/bf16/fp16 for this device ('auto': bf16 where fast, fp16 on older GPUs)."""
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise OptionError("{precision=}: expected one of {choices}", precision=spec, choices="|".join(PRECISIONS))
    if spec != "auto":
        if spec == "fp16" and device.type == "cpu":
            raise OptionError("{precision=fp16}: fp16 is not supported on the CPU, use bf16 or fp32")
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve --device and --precision together."""
    dev = resolve_device(device)
    return Runtime(device=dev, precision=resolve_precision(precision, dev))


def prepare_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Move a model to the runtime's device and memory format."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def loader_workers(workers: int | None, n_items: int, batch_size: int) -> int:
    """DataLoader workers for `n_items` in batches of `batch_size`: --workers (default_workers() when not given),
    never more than there are batches, since each worker process loads whole batches."""
    workers = default_workers() if workers is None else workers
    return min(workers, -(-n_items // batch_size))


def default_workers() -> int:
    """DataLoader workers: one per spare core, at least one so decoding overlaps with compute."""
    return max(1, min(8, usable_cores() - 1))
