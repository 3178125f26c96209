"""The timm model source (`-b timm/<name>`): timm's registry (`timm.list_models`), models from
`timm.create_model`, pretrained tags (`-w DEFAULT`, `-w in1k`, ...) through timm's own caches (the Hugging Face hub
cache, or torch.hub's for url weights), and the eval transform of the model's pretrained config.

timm is an optional extra: it is imported only when a timm backbone is asked for, and a missing timm is one line
naming `pip install featx[timm]`. Same functions as `featx.backbones.torchvision`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import socket
from urllib.parse import urlparse

from torch import nn

from ..options import OptionError
from ..preprocess import INTERPOLATIONS, TransformSpec
from .weights import is_offline, read_weights_file

PREFIX = "timm/"
INSTALL = "pip install featx[timm]"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in its order


def _timm():
    try:
        import timm
    except ImportError:
        raise OptionError("timm backbones ({backbone=}) need timm, which is not installed: {install}",
                          backbone=PREFIX + "...", install=INSTALL) from None
    return timm


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Every timm architecture name (without the timm/ prefix), sorted."""
    return tuple(sorted(_timm().list_models()))


def build(name: str) -> nn.Module:
    """The architecture with timm's own initialisation and its default pretrained config (the factory seeds it)."""
    return _timm().create_model(name, pretrained=False)


def transform(model: nn.Module) -> TransformSpec:
    """The eval transform of the model's pretrained config: crop = input size, resize = floor(crop / crop_pct)
    as timm's eval transform does, its interpolation, mean and std."""
    cfg = _timm().data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    interpolation = cfg["interpolation"] if cfg["interpolation"] in INTERPOLATIONS else "bicubic"
    return TransformSpec(
        resize=int(math.floor(crop / cfg["crop_pct"])),
        crop=crop,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=interpolation,
    )


def set_classes(model: nn.Module, path: str, num_classes: int) -> None:
    """A new classifier with `num_classes` outputs through timm's own reset_classifier."""
    model.reset_classifier(num_classes)


def versions() -> dict:
    return {"timm": _timm().__version__}


def _pretrained_cfg(name: str, weights: str):
    """timm's pretrained config of tag `weights` ('DEFAULT' is the architecture's default tag)."""
    from timm.models import get_arch_pretrained_cfgs

    cfgs = {key.partition(".")[2]: cfg for key, cfg in get_arch_pretrained_cfgs(name).items()}
    tags = [tag for tag in cfgs if tag]
    if not tags or not any(_has_source(cfgs[tag]) for tag in tags):
        raise OptionError("{weights=}: timm has no pretrained weights for {name}: pass {weights=FILE} or "
                          "{weights=none}", weights=weights, name=PREFIX + name)
    tag = tags[0] if weights.upper() == "DEFAULT" else weights.removeprefix(f"{name}.")
    if tag not in cfgs or not _has_source(cfgs[tag]):
        shown = ", ".join(["DEFAULT", *(t for t in tags if _has_source(cfgs[t]))][:12])
        raise OptionError("{weights=}: not a pretrained tag of {name}: expected one of {shown}, none, or a path to a "
                          "weights file", weights=weights, name=PREFIX + name, shown=shown)
    return tag, cfgs[tag]


def _has_source(cfg) -> bool:
    return bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _cached_hf_file(cfg) -> str | None:
    """Path of the weights of a hub config in the Hugging Face hub cache, None when not there."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES:
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _hf_missing(cfg) -> str:
    """What to do when the Hugging Face cache lacks the weights of a hub config: copy its cache folder, or download
    its file (to pass as the weights)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = cfg.hf_hub_id.partition("@")[0]
    folder = f"{HF_HUB_CACHE}/models--{repo.replace('/', '--')}"
    return (f"copy the hub cache folder {folder}/ from a machine that has it (huggingface-cli download {repo}), or "
            f"download {_hf_filename(cfg)} from https://huggingface.co/{repo}")


def _hf_filename(cfg) -> str:
    return cfg.hf_hub_filename or HF_FILES[0]


def _offline_hf(what: str, cfg) -> OptionError:
    return OptionError("weights {what} are not in timm's Hugging Face cache and cannot be downloaded (offline?): "
                       "{missing} and pass {weights=$file}", what=what, missing=_hf_missing(cfg),
                       file=f"path/to/{_hf_filename(cfg)}")


def weights_catalog(name: str) -> dict:
    """Every pretrained tag of `name` with the file it loads from: present in timm's caches (usable offline) or
    missing, and what to do then."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import get_arch_pretrained_cfgs

    from .torchvision import hub_file, missing_file

    tags = []
    for key, cfg in get_arch_pretrained_cfgs(name).items():
        tag = key.partition(".")[2]
        if not tag or not _has_source(cfg):
            continue
        if cfg.hf_hub_id:
            path, source, missing = _cached_hf_file(cfg), f"https://huggingface.co/{cfg.hf_hub_id}", _hf_missing(cfg)
        elif cfg.url:
            path, source, missing = hub_file(cfg.url), cfg.url, missing_file(cfg.url)
        else:
            path, source, missing = cfg.file, cfg.file, f"put the file at {cfg.file}"
        cached = bool(path) and os.path.isfile(path)
        tags.append({"tag": tag, "cached": cached, "path": path if cached else None, "source": source,
                     "missing": "" if cached else missing})
    return {"library": "timm", "cache": HF_HUB_CACHE + "/", "default": tags[0]["tag"] if tags else None,
            "tags": tags}


def _hub_reachable() -> bool:
    """False when downloads from the hub are off (FEATX_OFFLINE, HF_HUB_OFFLINE) or its host does not resolve."""
    from huggingface_hub import constants

    if is_offline() or constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _download(what: str, cfg, timm) -> None:
    """Let timm fetch the weights into its cache, its hub client's retry messages silenced: a failure is one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        timm.create_model(f"{cfg.architecture}.{cfg.tag}", pretrained=True)
    except Exception as err:  # network, hub or hash errors: all mean "not available"
        raise _offline_hf(what, cfg) from err
    finally:
        logger.setLevel(level)


def _cached_file(what: str, cfg, timm) -> str:
    """The weights file of a pretrained config in timm's caches, downloaded by timm when missing and allowed."""
    if cfg.hf_hub_id:
        path = _cached_hf_file(cfg)
        if path is None and _hub_reachable():
            _download(what, cfg, timm)
            path = _cached_hf_file(cfg)
        if path is None:
            raise _offline_hf(what, cfg)
        return path
    if cfg.url:
        from .torchvision import ensure_hub_file

        return ensure_hub_file(what, cfg.url, cache="timm's torch hub cache")
    return cfg.file


def pretrained(name: str, weights: str) -> tuple[nn.Module, str, str, TransformSpec]:
    """(model, tag, cached file, eval transform) of timm's pretrained weights `weights` (a tag or DEFAULT)."""
    timm = _timm()
    tag, cfg = _pretrained_cfg(name, weights)
    what = f"{PREFIX}{name} {tag}"
    path = _cached_file(what, cfg, timm)
    if not path.endswith(".safetensors"):
        read_weights_file(path)  # refuses a cache file with pickled code before timm loads it
    try:
        model = timm.create_model(f"{name}.{tag}", pretrained=True, pretrained_cfg_overlay={"file": path})
    except RuntimeError as err:
        raise OptionError("{weights=}: the cached file {path} does not fit {name} ({reason}): delete it and download "
                          "it again", weights=weights, path=path, name=PREFIX + name,
                          reason=str(err).splitlines()[0][:120]) from err
    return model, tag, path, transform(model)
