"""The torchvision model source: its classification registry, its weights names through torchvision's hub cache,
and the weights' own eval transform.

Every model source module offers the same functions: `names`, `build`, `transform`, `set_classes`, `pretrained`
and `versions`; `featx.backbones.factory` picks the source from the backbone's name.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from ..options import OptionError
from ..preprocess import TransformSpec
from ..sources import sha256_file
from .catalog import package_file_for, packages_hint
from .weights import is_offline, read_weights_file

PREFIX = ""  # torchvision names are given bare: -b resnet50


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    return tuple(sorted(list_models(module=torchvision.models)))


def build(name: str) -> nn.Module:
    """The architecture with torchvision's own initialisation (the factory seeds it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*default weight initialization.*")
        return get_model(name, weights=None)


def transform(model: nn.Module) -> TransformSpec:
    """The eval transform of a model without torchvision weights: the ImageNet preset."""
    return TransformSpec()


def set_classes(model: nn.Module, path: str, num_classes: int) -> None:
    """Put a new Linear with `num_classes` outputs where the classifier at dotted `path` is."""
    old = model.get_submodule(path)
    model.set_submodule(path, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def versions() -> dict:
    return {}


def _weights_enum(name: str, weights: str):
    """The torchvision weights member `weights` ('IMAGENET1K_V2', 'DEFAULT', 'ResNet50_Weights.IMAGENET1K_V2')."""
    enum = get_model_weights(name)
    qualifier, _, member = weights.rpartition(".")
    valid = ", ".join(list(enum.__members__) + ["none"])
    if qualifier and qualifier.lower() != enum.__name__.lower():
        raise OptionError("{weights=}: those weights are not for {name} (expected {enum}.<name>; one of {valid})",
                          weights=weights, name=name, enum=enum.__name__, valid=valid)
    try:
        return enum[member.upper()]
    except KeyError:
        raise OptionError("{weights=}: not a weights name of {name}: expected one of {valid}, or a path to a weights "
                          "file", weights=weights, name=name, valid=valid) from None


def hub_file(url: str) -> str:
    """Where torch.hub (and so torchvision) keeps the file downloaded from `url`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def missing_file(url: str) -> str:
    """What to do when the hub cache lacks the file of `url`: which file to put where (or which package has it)."""
    folder, filename = os.path.split(hub_file(url))
    return f"put {filename} (from {url}) into {folder}/{packages_hint(filename)}"


def weights_catalog(name: str) -> dict:
    """Every torchvision weights name of `name` with its hub cache file: present (usable offline) or missing."""
    enum = get_model_weights(name)
    tags = []
    for member in enum:
        cached = os.path.isfile(hub_file(member.url))
        tags.append({"tag": member.name, "cached": cached, "path": hub_file(member.url), "source": member.url,
                     "missing": "" if cached else missing_file(member.url)})
    return {"library": "torchvision", "cache": os.path.join(torch.hub.get_dir(), "checkpoints") + "/",
            "default": enum.DEFAULT.name, "tags": tags}


def _from_package(path: str) -> bool:
    """Copy the hub cache file `path` from an installed package that ships it (checked against the hash prefix in
    its name, as torch.hub checks downloads); whether it is now in the cache."""
    found = package_file_for(os.path.basename(path))
    if found is None:
        return False
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    if match and not sha256_file(found[1]).startswith(match.group(1)):
        return False
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(found[1], tmp)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return False
    return True


def ensure_hub_file(what: str, url: str, cache: str = "torchvision's cache") -> str:
    """Path of the torch.hub cache file of `url`: taken from an installed package that ships it (see
    featx.backbones.catalog), else downloaded as torch.hub does when it is missing and we may; offline, the
    OptionError says which file to put where. `what` names the weights ('resnet50 IMAGENET1K_V2'), `cache` the
    library whose cache it is."""
    path = hub_file(url)
    if os.path.isfile(path) or _from_package(path):
        return path
    folder, filename = os.path.split(path)
    offline = OptionError("weights {what} are not in {cache} and cannot be downloaded (offline?): {missing}, or pass "
                          "{weights=}", what=what, cache=cache, missing=missing_file(url),
                          weights="path/to/weights.pth")
    if is_offline():
        raise offline
    try:
        os.makedirs(folder, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(filename)
        torch.hub.download_url_to_file(url, path, match.group(1) if match else None, progress=False)
    except Exception as err:  # URLError, timeouts, hash mismatch, read-only cache: all mean "not available"
        raise offline from err
    return path


def pretrained(name: str, weights_arg: str) -> tuple[nn.Module, str, str, TransformSpec]:
    """(model, weights id, cached file, eval transform) of torchvision weights from the hub cache."""
    weights = _weights_enum(name, weights_arg)
    path = ensure_hub_file(f"{name} {weights.name}", weights.url)
    read_weights_file(path)  # refuses a cache file with pickled code before torchvision loads it
    try:
        model = get_model(name, weights=weights)
    except RuntimeError as err:
        raise OptionError("{weights=}: the cached file {path} does not fit {name} ({reason}): delete it and download "
                          "it again", weights=weights_arg, path=path, name=name,
                          reason=str(err).splitlines()[0][:120]) from err
    preset = weights.transforms()
    spec = TransformSpec(
        resize=int(preset.resize_size[0]),
        crop=int(preset.crop_size[0]),
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation=preset.interpolation.value,
    )
    return model, weights.name, path, spec
