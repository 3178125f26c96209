"""Will a batch fit? The memory one batch of images needs, against what the device has available.

A size typed by the user (--image-size, --resize, --batch-size, --max-batch) drives the first allocation of a run.
`check_batch_memory` estimates that allocation from the model's traced graph (`featx.taps.activation_bytes`) and
refuses a batch that cannot fit in one line naming the options, before any file is written; `out_of_memory_as_error`
turns an allocation that fails anyway (the estimate is approximate) into one line as well.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .options import OptionError
from .taps import activation_bytes, human_bytes

DECODED_BYTES = 3  # a pixel of the decoded uint8 batch (the normalized float batch is the graph's input)
RESIZED_ASPECT = 2  # a decoder resizes the shorter side to --resize: images up to 2:1 are counted
TRAINING_STATES = 3  # per parameter when training: its gradient and up to two optimizer states (Adam)
MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class BatchMemory:
    """Bytes a run needs: `per_image` grows with the batch, `fixed` does not (optimizer states, weights moved to
    the device, the images being resized to --resize by the decoders)."""

    per_image: int
    fixed: int

    def bytes(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_image

    def largest_batch(self, available: int) -> int:
        """The largest batch that fits in `available` bytes (0 when not even one image does)."""
        return max(0, (available - self.fixed) // self.per_image)


def batch_memory(model: nn.Module, image_size: int, *, training: bool = False, every_output: bool = False,
                 resize: int | None = None, decoders: int = 1, on_device: bool = False) -> BatchMemory:
    """The memory of a forward pass of `model` on image_size x image_size images, at float32.

    Per image: its decoded pixels and the tensors alive at once (the float input among them), or every tensor
    when `training` (kept for the backward pass) or `every_output` (a probe returning every node). Fixed: the
    gradients and optimizer states when training, the weights when they move to another device (`on_device`), and
    the image each of the `decoders` resizes to `resize` before cropping it.
    """
    activations = activation_bytes(model, image_size)
    kept = activations.total if training or every_output else activations.peak
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fixed = (TRAINING_STATES * weights if training else 0) + (weights if on_device else 0)
    if resize and resize > image_size:
        fixed += max(1, decoders) * 3 * resize * resize * RESIZED_ASPECT
    return BatchMemory(per_image=DECODED_BYTES * image_size * image_size + kept, fixed=fixed)


def check_batch_memory(model: nn.Module, image_size: int, batch_size: int, device: torch.device, *,
                       training: bool = False, every_output: bool = False, resize: int | None = None,
                       decoders: int = 1, size_option: str | None = "image_size", resize_option: str | None = None,
                       batch_option: str | None = "batch_size", n_images: int | None = None) -> int | None:
    """OptionError (one line naming the options, the bytes needed and available) when a batch of `batch_size`
    images (at most `n_images`, the images there are) cannot fit in the memory `device` has available; devices
    whose free memory is unknown (MPS) pass. Returns the largest batch that fits (None where unknown).

    The options are the parameters the user gave (`image_size`): `size_option` None when the size is not the
    user's (a head's crop), `resize_option` when the resize was given, `batch_option` None when the batch is not the
    user's."""
    available = available_bytes(device)
    if available is None:
        return None
    need = batch_memory(model, image_size, training=training, every_output=every_output, resize=resize,
                        decoders=decoders, on_device=device.type != "cpu")
    batch = min(batch_size, n_images or batch_size)
    if need.bytes(batch) <= available:
        return need.largest_batch(available)
    given = ["{%s=%d}" % (size_option, image_size) if size_option else f"{image_size}x{image_size} images"]
    given += ["{%s=%d}" % (resize_option, resize)] if resize_option else []
    sizes = ["{%s}" % option for option in (size_option, resize_option) if option]
    smaller = f"a smaller {' or '.join(sizes)}" if sizes else ""
    values = {"where": f"{device} has {human_bytes(available)} available", "one": human_bytes(need.bytes(1)),
              "batch": batch, "need": human_bytes(need.bytes(batch))}
    if need.bytes(1) > available:
        raise OptionError(", ".join(given) + ": one image alone needs about {one} of memory and {where}"
                          + (f": use {smaller}" if smaller else ""), **values)
    needs = "a batch of {batch} images needs about {need} of memory and {where}"
    if batch_option:
        fits = min(need.largest_batch(available), batch - 1)
        raise OptionError(", ".join(given) + ", {%s=%d}: " % (batch_option, batch_size) + needs
                          + ": use {%s=%d} or less" % (batch_option, fits) + (f", or {smaller}" if smaller else ""),
                          **values)
    raise OptionError(", ".join(given) + ": " + needs + (f": use {smaller}" if smaller else ""), **values)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on `device`: CUDA's free memory; on the CPU the lower of the system's
    MemAvailable and the control group's limit less its usage (reclaimable file cache aside); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    values = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(values) if values else None


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """limit - usage + inactive file cache of this process's memory control group (v2, else v1); None without a
    limit."""
    for folder, limit_file, usage_file, inactive in (
        (CGROUP_V2, "memory.max", "memory.current", "inactive_file"),
        (CGROUP_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # 'max', or v1's "no limit" (a page-rounded 2**63)
            return None
        return max(0, int(limit) - usage + _stat(folder / "memory.stat", inactive))
    return None


def _stat(path: Path, name: str) -> int:
    """One counter of a cgroup memory.stat file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@contextlib.contextmanager
def out_of_memory_as_error(batch_option: str, batch_size: int, device: torch.device, size_option: str = "image_size",
                           decode_options: tuple[str, ...] = ("workers",)):
    """Turn an allocation failure (torch's out-of-memory errors, a MemoryError, a DataLoader worker that ran out or
    was killed by the system) into a one-line OptionError saying what to try: a smaller batch, or for a decoding
    process less of the parameters `decode_options`."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        text = str(err)
        killed = text.startswith("DataLoader worker") and "exited unexpectedly" in text
        if not (killed or isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
                or "can't allocate memory" in text):
            raise
        at = "{%s=%d}" % (batch_option, batch_size)
        if killed or "DataLoader worker" in text:
            lower = " or ".join(filter(None, [", ".join("{%s}" % name for name in decode_options[:-1]),
                                              "{%s}" % decode_options[-1]]))
            raise OptionError(f"a decoding process ran out of memory at {at} (or the system killed it for memory): "
                              f"try lower {lower}") from None
        hint = "try {%s=%d}" % (batch_option, batch_size // 2) if batch_size > 1 else "try a smaller {%s}" % size_option
        raise OptionError(f"out of memory on {{device}} at {at}: {hint}", device=device) from None
