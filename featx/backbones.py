"""torchvision backbones: the model registry, weight resolution, safe weight files and partial loading.

`-w` (weights) is one of: a torchvision weights name (`DEFAULT`, `IMAGENET1K_V2`, `ResNet50_Weights.IMAGENET1K_V2`),
loaded through torchvision's own hub cache; a path to a local state dict or checkpoint, loaded by key and shape
into a seeded random model; or `none`, the seeded random model itself. Weight files are always read with
``torch.load(weights_only=True)``: a file that holds anything but tensors and plain containers is refused.
"""
from __future__ import annotations

import difflib
import functools
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from .errors import FeatxError
from .layers import final_layer, model_label
from .preprocess import TransformSpec
from .sources import content_key

OFFLINE_ENV = "FEATX_OFFLINE"
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "net")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
PARALLEL_PREFIX = "module."
SEED = 0
MAX_DETAILS = 10

__all__ = [
    "Backbone",
    "LoadReport",
    "check_backbone",
    "classifier_path",
    "list_backbones",
    "load_backbone",
    "load_partial",
    "read_weights_file",
    "sha256_file",
]


@dataclass
class LoadReport:
    """Which keys of a weights file went into the model: matched, missing from the file, unexpected by the model,
    and present in both with different shapes ("fc.weight: file (10, 512) vs model (1000, 512)")."""

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    source: str = "state dict"

    def summary(self) -> str:
        """One line: 'weights x.pth: 120 matched, 2 missing, 1 unexpected, 2 shape-mismatched'."""
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


@dataclass
class Backbone:
    """A model ready for extraction (eval mode, CPU) with where its weights came from and its eval transform."""

    name: str
    model: nn.Module
    weights_id: str  # 'IMAGENET1K_V2' | 'file:<basename>' | 'none'
    weights_sha256: str | None
    transform: TransformSpec
    load_report: LoadReport | None = None
    meta: dict = field(default_factory=dict)  # the 'featx' dict of a featx finetune model.pt


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[str, ...]:
    return tuple(sorted(list_models(module=torchvision.models)))


def list_backbones() -> list[str]:
    """Every torchvision classification model name, sorted."""
    return list(_registry())


def check_backbone(name: str) -> None:
    """FeatxError with the closest names unless `name` is a torchvision classification model."""
    names = _registry()
    if name in names:
        return
    close = difflib.get_close_matches(str(name).lower(), names, n=3, cutoff=0.5)
    hint = f": did you mean {', '.join(close)}?" if close else ""
    raise FeatxError(f"unknown backbone {name!r}{hint} (featx layers --list shows all)")


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return content_key(path)


def sha256_file(path) -> str:
    """sha256 hex of a file's bytes, remembered per (path, size, mtime) for this process."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _sha256(path, st.st_size, st.st_mtime_ns)


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


def read_weights_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, featx metadata) of a weights file: a state dict, or a checkpoint holding one under
    'model' / 'state_dict' / 'model_state_dict' / 'net' (a featx model.pt also has a 'featx' dict).

    Never executes pickled code (weights_only=True); a DataParallel 'module.' prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"-w {path}: no such file")
    try:
        obj = _torch_load(path)
    except Exception as err:  # torch.load raises many types for foreign files (KeyError, RuntimeError, EOFError...)
        raise _load_error(path, err) from None  # torch's own message suggests weights_only=False: never show it
    state_dict, meta = _unwrap(obj)
    if not state_dict:
        raise FeatxError(
            f"-w {path} is not a state dict: expected a dict of tensors or a checkpoint with a "
            f"'model'/'state_dict' entry"
        )
    return state_dict, meta


def _load_error(path: Path, err: Exception) -> FeatxError:
    """One line for a weights file torch.load(weights_only=True) refused: a pickle of other objects, or no weights."""
    text = str(err)
    refused = isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text
    name = re.search(r"GLOBAL ([\w.]+)", text)
    if name or (refused and _starts_like_pickle(path)):
        detail = f" (it references the Python object {name.group(1)})" if name else ""
        return FeatxError(
            f"-w {path}: not a plain state dict or checkpoint that torch.load(weights_only=True) can read{detail}; "
            f"featx never unpickles arbitrary objects: save model.state_dict() with torch.save"
        )
    if refused:
        return FeatxError(f"-w {path}: not a PyTorch weights file (neither a torch.save archive nor a pickle)")
    first_line = (text.strip().splitlines() or [""])[0][:100]
    return FeatxError(f"-w {path}: not a PyTorch weights file ({type(err).__name__}: {first_line})")


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


def classifier_path(model: nn.Module) -> str:
    """Dotted name of the final classifier nn.Linear: 'fc', 'classifier.6', 'heads.head', ..."""
    name = final_layer(model)
    if name is None or not isinstance(model.get_submodule(name), nn.Linear):
        raise FeatxError(
            f"{model_label(model)} has no nn.Linear classifier "
            f"(its last layer is {name or 'unknown'}): choose a backbone with a linear head"
        )
    return name


def _seeded(build):
    """Run `build()` under torch.manual_seed(SEED) without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _set_classes(model: nn.Module, num_classes: int | None) -> None:
    """Replace the classifier with a seeded new Linear when it does not have num_classes outputs."""
    if num_classes is None:
        return
    path = classifier_path(model)
    old = model.get_submodule(path)
    if old.out_features != num_classes:
        new = _seeded(lambda: nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        model.set_submodule(path, new)


def _random_model(name: str, num_classes: int | None) -> nn.Module:
    """torchvision's architecture with its own initialisation, seeded so every run gets the same model."""
    def build():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*default weight initialization.*")
            return get_model(name, weights=None)

    model = _seeded(build)
    _set_classes(model, num_classes)
    return model


def _file_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the file's classifier when it is a Linear of another size than the model's."""
    name = final_layer(model)
    layer = model.get_submodule(name) if name else None
    weight = state_dict.get(f"{name}.weight")
    if not isinstance(layer, nn.Linear) or weight is None or weight.dim() != 2:
        return None
    rows, cols = weight.shape
    return rows if cols == layer.in_features and rows != layer.out_features else None


def _looks_like_path(weights: str) -> bool:
    return os.path.exists(weights) or os.sep in weights or "/" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def _from_file(name: str, path: str, num_classes: int | None) -> Backbone:
    """A seeded random model with every matching tensor of the file loaded into it."""
    state_dict, meta = read_weights_file(path)
    trained_on = meta.get("backbone")
    if trained_on and trained_on != name:
        raise FeatxError(f"-w {path}: was trained from backbone {trained_on}, not -b {name}")
    model = _random_model(name, num_classes)
    if num_classes is None:
        _set_classes(model, _file_classes(model, state_dict))
    report = load_partial(model, state_dict, source=os.path.basename(path))
    if not report.matched:
        example = next(iter(state_dict))
        raise FeatxError(
            f"-w {path}: none of its {len(state_dict)} tensors fit {name} (keys like {example!r}): "
            f"is it for another backbone?"
        )
    return Backbone(name, model.eval(), f"file:{os.path.basename(path)}", sha256_file(path),
                    _file_transform(path, meta), report, meta)


def _file_transform(path: str, meta: dict) -> TransformSpec:
    """The transform recorded in a featx model.pt, else the ImageNet default."""
    if not isinstance(meta.get("transform"), dict):
        return TransformSpec()
    try:
        return TransformSpec.from_dict(meta["transform"])
    except (KeyError, TypeError, ValueError) as err:
        raise FeatxError(f"-w {path}: its featx 'transform' entry is malformed ({err!r})") from err


def _weights_enum(name: str, weights: str):
    """The torchvision weights member `weights` ('IMAGENET1K_V2', 'DEFAULT', 'ResNet50_Weights.IMAGENET1K_V2')."""
    enum = get_model_weights(name)
    qualifier, _, member = weights.rpartition(".")
    valid = ", ".join(list(enum.__members__) + ["none"])
    if qualifier and qualifier.lower() != enum.__name__.lower():
        raise FeatxError(
            f"-w {weights}: those weights are not for {name} (expected {enum.__name__}.<name>; one of {valid})"
        )
    try:
        return enum[member.upper()]
    except KeyError:
        raise FeatxError(
            f"-w {weights}: not a weights name of {name}: expected one of {valid}, or a path to a weights file"
        ) from None


def _cache_file(weights) -> str:
    """Where torch.hub (and so torchvision) keeps the downloaded file of these weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _ensure_cached(name: str, weights) -> str:
    """Path of the cached weights file, downloading it as torchvision does when it is missing and we may."""
    path = _cache_file(weights)
    if os.path.isfile(path):
        return path
    folder, filename = os.path.split(path)
    offline = FeatxError(
        f"weights {name} {weights.name} are not in torchvision's cache and cannot be downloaded (offline?): "
        f"put {filename} (from {weights.url}) into {folder}/, or pass -w path/to/weights.pth"
    )
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise offline
    try:
        os.makedirs(folder, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(filename)
        torch.hub.download_url_to_file(weights.url, path, match.group(1) if match else None, progress=False)
    except Exception as err:  # URLError, timeouts, hash mismatch, read-only cache: all mean "not available"
        raise offline from err
    return path


def _from_torchvision(name: str, weights_arg: str, num_classes: int | None) -> Backbone:
    """Pretrained torchvision weights from the hub cache, with their own eval transform."""
    weights = _weights_enum(name, weights_arg)
    path = _ensure_cached(name, weights)
    read_weights_file(path)  # refuses a cache file with pickled code before torchvision loads it
    try:
        model = get_model(name, weights=weights)
    except RuntimeError as err:
        raise FeatxError(
            f"-w {weights_arg}: the cached file {path} does not fit {name} ({str(err).splitlines()[0][:120]}): "
            f"delete it and download it again"
        ) from err
    _set_classes(model, num_classes)
    preset = weights.transforms()
    transform = TransformSpec(
        resize=int(preset.resize_size[0]),
        crop=int(preset.crop_size[0]),
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation=preset.interpolation.value,
    )
    return Backbone(name, model.eval(), weights.name, sha256_file(path), transform)


def load_backbone(name: str, weights: str = "DEFAULT", *, num_classes: int | None = None) -> Backbone:
    """Build torchvision model `name` with `weights` (a torchvision weights name, a path to a weights file, or
    'none'), in eval mode on the CPU. `num_classes` replaces the classifier with a new Linear of that size; by
    default the classifier has the size the weights give it (a finetuned file's own number of classes)."""
    check_backbone(name)
    weights = str(weights)
    if weights.lower() == "none":
        backbone = Backbone(name, _random_model(name, num_classes).eval(), "none", None, TransformSpec())
    elif _looks_like_path(weights):
        backbone = _from_file(name, weights, num_classes)
    else:
        backbone = _from_torchvision(name, weights, num_classes)
    backbone.model.featx_backbone = name  # names the model in error messages of featx.layers
    return backbone
