"""The `featx layers` table: a backbone's taps with their shapes at an image size and their row sizes.

Built on the tap analysis of `featx.taps` and the memory check of `featx.memory`, so that neither of those
needs the other's caller.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import FeatxError
from .options import OptionError
from .taps import ITEMSIZE, Graph, LayerInfo, human_bytes, probe_shapes, reference_size, usual_rows
from .memory import check_batch_memory
from .layers_options import LayersOptions
from .pooling import pooled_shape


def describe_layers(
    model: nn.Module, image_size: int = 224, pooling: str = "avg", include_all: bool = False
) -> list[LayerInfo]:
    """The taps of `model` with their output shapes at image_size x image_size and their pooled row sizes.

    By default: top-level modules, stage blocks and the usual taps; `include_all` lists every graph node.
    """
    LayersOptions(image_size=image_size, pooling=pooling, include_all=include_all)  # an OptionError for a bad value
    graph = Graph(model)
    rows, shapes, marks = usual_rows(graph, model)
    if include_all:
        rows = {name: name for name in graph.taps()}
    if include_all or image_size != reference_size(model):
        check_batch_memory(model, image_size, 1, torch.device("cpu"), every_output=True, batch_option=None)
        shapes = probe_shapes(model, list(rows.values()), image_size)
    infos = []
    for name, node in rows.items():
        if node not in shapes:
            continue
        nhwc = graph.nhwc.get(node, False) and len(shapes[node]) == 3
        dim = math.prod(pooled_shape(shapes[node], pooling, nhwc))
        infos.append(LayerInfo(name, shapes[node], dim, dim * ITEMSIZE["float32"], marks.get(node, ""), nhwc))
    return infos


def format_layers_table(infos: list[LayerInfo], n_images: int | None = None, dtype: str = "float32") -> str:
    """An aligned text table of taps; with `n_images`, the store size those rows take at `dtype`."""
    LayersOptions(n_images=n_images, dtype=dtype)  # an OptionError for a bad value
    itemsize = ITEMSIZE[dtype]
    header = ["tap", "output shape", "row dim", f"bytes/image ({dtype})"]
    if n_images:
        header.append(f"store for {n_images:,} images")
    header.append("usual")
    lines = [header]
    for info in infos:
        shape = "x".join(str(s) for s in info.shape) + (" (HWC)" if info.channels_last else "")
        row_bytes = info.pooled_dim * itemsize
        cells = [info.name, shape, str(info.pooled_dim), f"{row_bytes:,}"]
        if n_images:
            cells.append(human_bytes(row_bytes * n_images))
        lines.append(cells + [info.usual])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def layers(backbone: str | None = None, weights: str = "none", *, weights_match: str = "name", image_size: int = 224,
           pooling: str = "avg", include_all: bool = False, log=None) -> list[LayerInfo]:
    """`featx layers`: the taps of `backbone` (a torchvision name or timm/<name>) with their output shapes at
    `image_size` and their row sizes after `pooling`; the usual taps (stage outputs, the pre-logits, the output)
    are marked, and `include_all` lists every graph node. `weights` (a name, a file, or 'none') only matters for
    a file: its load report goes to `log` (a callable taking one line), and a file written by `featx finetune`
    names the backbone when `backbone` is None. Returns one LayerInfo per tap, in forward order."""
    from .backbones import LIST_BACKBONES, load_backbone
    from .backbones.weights import looks_like_path

    LayersOptions.of(locals())  # an OptionError for a value the option does not take
    if backbone is None and (str(weights).lower() == "none" or not looks_like_path(str(weights))):
        raise OptionError("featx layers: give a {backbone} name (or {weights=$file} written by featx finetune, which "
                          "records its backbone); {list} names them all", file="model.pt", list=LIST_BACKBONES)
    bb = load_backbone(backbone, weights, match=weights_match)
    if backbone is None and not bb.meta.get("backbone"):
        raise OptionError("featx layers: {weights=} records no backbone (it was not written by featx finetune): give "
                          "the {backbone} name", weights=weights)
    if bb.load_report is not None and log is not None:
        log(bb.load_report.summary())
    return describe_layers(bb.model, image_size=image_size, pooling=pooling, include_all=include_all)
