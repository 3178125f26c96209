"""Weight files: safe reading, loading by key and shape (`--weights-match name`) or by position (`order`), and the
load report.

Weight files are always read without running code: ``torch.load(weights_only=True)`` for PyTorch files (a file
holding anything but tensors and plain containers is refused) and ``safetensors`` for ``.safetensors`` files.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..choices import WEIGHTS_MATCHES
from ..errors import FeatxError
from ..options import OptionError
from ..sources import sha256_file

OFFLINE_ENV = "FEATX_OFFLINE"
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "net")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
PARALLEL_PREFIX = "module."
BN_COUNTER = "num_batches_tracked"  # a BatchNorm step counter, not a weight: never paired by position
MAX_DETAILS = 10


@dataclass
class LoadReport:
    """Which keys of a weights file went into the model: matched, missing from the file, unexpected by the model,
    and present in both with different shapes ("fc.weight: file (10, 512) vs model (1000, 512)"). `match` says how
    the file's tensors were paired with the model's: by key ('name') or by position ('order')."""

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    source: str = "state dict"
    match: str = "name"

    def summary(self) -> str:
        """One line: 'weights x.pth: 120 matched, 2 missing, ...' or 'weights x.pth: 247/247 tensors loaded by
        position'."""
        if self.match == "order":
            total = len(self.matched) + len(self.missing)
            return f"weights {self.source}: {len(self.matched)}/{total} tensors loaded by position"
        return (
            f"weights {self.source}: {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        )

    def details(self) -> str:
        """The keys that did not load, per kind, at most MAX_DETAILS of each."""
        lines = []
        kinds = (("missing", self.missing), ("unexpected", self.unexpected), ("shape-mismatched", self.mismatched))
        for kind, keys in kinds:
            if keys:
                lines.append(f"{kind} ({len(keys)}):")
                lines += [f"  {key}" for key in keys[:MAX_DETAILS]]
                if len(keys) > MAX_DETAILS:
                    lines.append(f"  ... and {len(keys) - MAX_DETAILS} more")
        return "\n".join(lines) or "every key matched"


def is_offline() -> bool:
    """Whether FEATX_OFFLINE forbids downloading weights."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_weights_match(match: str) -> str:
    """`match` when it is a weights_match mode, else a one-line OptionError."""
    if match not in WEIGHTS_MATCHES:
        raise OptionError("{weights_match=}: expected one of {choices}", weights_match=match,
                          choices=", ".join(WEIGHTS_MATCHES))
    return match


def looks_like_path(weights: str) -> bool:
    """Whether a -w value names a file rather than a weights name or tag."""
    return os.path.exists(weights) or os.sep in weights or "/" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def _torch_load(path: Path):
    """torch.load with weights_only=True, memory-mapped when the file's format allows it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # plain pickles: refused below anyway
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _safetensors_load(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise OptionError("{weights=}: reading .safetensors files needs safetensors: pip install safetensors",
                          weights=str(path)) from None
    return load_file(str(path), device="cpu")


def read_weights_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, featx metadata) of a weights file: a state dict, or a checkpoint holding one under
    'model' / 'state_dict' / 'model_state_dict' / 'net' (a featx model.pt also has a 'featx' dict), or a
    .safetensors file.

    Never executes pickled code (weights_only=True); a DataParallel 'module.' prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise OptionError("{weights=}: no such file", weights=str(path))
    try:
        obj = _safetensors_load(path) if path.suffix.lower() == ".safetensors" else _torch_load(path)
    except FeatxError:
        raise
    except Exception as err:  # torch.load raises many types for foreign files (KeyError, RuntimeError, EOFError...)
        raise _load_error(path, err) from None  # torch's own message suggests weights_only=False: never show it
    state_dict, meta = _unwrap(obj)
    if not state_dict:
        raise OptionError("{weights=} is not a state dict: expected a dict of tensors or a checkpoint with a "
                          "'model'/'state_dict' entry", weights=str(path))
    return state_dict, meta


def _load_error(path: Path, err: Exception) -> OptionError:
    """One line for a weights file torch.load(weights_only=True) refused: a pickle of other objects, or no weights."""
    text = str(err)
    refused = isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text
    name = re.search(r"GLOBAL ([\w.]+)", text)
    if name or (refused and _starts_like_pickle(path)):
        detail = f" (it references the Python object {name.group(1)})" if name else ""
        return OptionError("{weights=}: not a plain state dict or checkpoint that torch.load(weights_only=True) can "
                           "read{detail}; featx never unpickles arbitrary objects: save model.state_dict() with "
                           "torch.save", weights=str(path), detail=detail)
    if refused:
        return OptionError("{weights=}: not a PyTorch weights file (neither a torch.save archive nor a pickle)",
                           weights=str(path))
    first_line = (text.strip().splitlines() or [""])[0][:100]
    return OptionError("{weights=}: not a PyTorch weights file ({kind}: {first_line})", weights=str(path),
                       kind=type(err).__name__, first_line=first_line)


def _starts_like_pickle(path: Path) -> bool:
    """Pickles of protocol 2 and later, legacy torch.save files included, start with the PROTO opcode."""
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"


def _unwrap(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a state dict or of a checkpoint's model entry (empty when there are none), and its featx dict."""
    if not isinstance(obj, dict):
        return {}, {}
    meta = obj.get("featx") if isinstance(obj.get("featx"), dict) else {}
    inner = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), obj)
    tensors = {str(k): v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith(PARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(PARALLEL_PREFIX):]: v for k, v in tensors.items()}
    return tensors, meta


def load_partial(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "state dict") -> LoadReport:
    """Load every tensor whose key and shape match the model; report the rest. Never raises for partial matches."""
    own = model.state_dict()
    matched, missing, mismatched = [], [], []
    for key, param in own.items():
        if key not in state_dict:
            missing.append(key)
        elif tuple(state_dict[key].shape) != tuple(param.shape):
            mismatched.append(f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(param.shape)}")
        else:
            matched.append(key)
    unexpected = [key for key in state_dict if key not in own]
    model.load_state_dict({key: state_dict[key] for key in matched}, strict=False)
    return LoadReport(matched, missing, unexpected, mismatched, source)


def _weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Keys in order, BatchNorm step counters aside."""
    return [key for key in state_dict if key.rsplit(".", 1)[-1] != BN_COUNTER]


def load_by_order(model: nn.Module, state_dict: dict[str, torch.Tensor], *, weights: str,
                  source: str = "state dict") -> LoadReport:
    """Load the file's tensors into the model's by position (registration order, BatchNorm step counters aside,
    which keep the model's own values), for a file of the same architecture in another implementation's names.

    Every pair must agree in shape and the counts must be equal: otherwise a one-line OptionError about the file
    `weights` names the first disagreeing pair (both keys and shapes). Returns a LoadReport with every key matched.
    """
    own = model.state_dict()
    ours, theirs = _weights(own), _weights(state_dict)
    for i, (mine, other) in enumerate(zip(ours, theirs)):
        if tuple(own[mine].shape) != tuple(state_dict[other].shape):
            raise OptionError(
                "{weights=} {weights_match=order}: tensor {i} of {n} does not fit by position: file {other} {theirs} "
                "vs model {mine} {ours} (a file for another architecture?)", weights=weights, i=i + 1, n=len(theirs),
                other=other, theirs=tuple(state_dict[other].shape), mine=mine, ours=tuple(own[mine].shape))
    if len(ours) != len(theirs):
        extra = theirs[len(ours)] if len(theirs) > len(ours) else ours[len(theirs)]
        side = "file" if len(theirs) > len(ours) else "model"
        raise OptionError(
            "{weights=} {weights_match=order}: the file has {n} tensors and the model {m} ({counter} aside); the first "
            "without a partner is {side} {extra} (a file for another architecture?)", weights=weights, n=len(theirs),
            m=len(ours), counter=BN_COUNTER, side=side, extra=extra)
    with torch.no_grad():
        model.load_state_dict({mine: state_dict[other] for mine, other in zip(ours, theirs)}, strict=False)
    return LoadReport(list(ours), [], [], [], source, match="order")
