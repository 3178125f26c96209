"""The backbone cut at one or several taps, with a decoder whose logits are upsampled to the input size.

`build_segmenter` traces the backbone up to its taps (layers.feature_extractor, with the model's tracer settings)
and adds the decoder as module `decoder` to that graph, so parameter names stay the backbone's own
('layer2.0.conv1.weight'): every --freeze strategy and partial weight loading work as in classification.

    --decoder conv:W   one tap: 3x3 conv to W channels, ReLU, 1x1 conv to the classes, bilinear upsample to the input
    --decoder linear   one tap: 1x1 conv to the classes (a dense linear probe), bilinear upsample
    --decoder fpn:W    two or more taps (default: the stage maps of stride 4, 8, 16 and 32), fused as a feature
                       pyramid: a 1x1 lateral conv per tap to W channels; from the coarsest map down, each sum is
                       upsampled (bilinear) to the next finer map and added to its lateral; a 3x3 conv-ReLU smooths
                       the finest sum, a 1x1 conv gives the classes, bilinear upsample to the input

The 1x1 class conv runs before the upsampling: both are linear (bilinear weights sum to one, so the bias commutes
too), so this equals upsampling first, at a fraction of the memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..choices import DECODER_HELP
from ..options import OptionError
from ..layer_table import describe_layers
from ..taps import (Graph, channels_last_taps, check_taps, every_tap, feature_extractor, model_label, reference_size,
                    usual_rows)

HEAD_NAME = "decoder"
PYRAMID_STRIDES = (4, 8, 16, 32)  # the default taps of an fpn decoder: the last stage map of each of these strides


@dataclass(frozen=True)
class DecoderSpec:
    kind: str  # 'conv' | 'linear' | 'fpn'
    width: int | None = None

    def __str__(self) -> str:
        return "linear" if self.kind == "linear" else f"{self.kind}:{self.width}"

    @property
    def fuses(self) -> bool:
        """Whether the decoder reads several taps (fpn) rather than exactly one."""
        return self.kind == "fpn"


def parse_decoder(text) -> DecoderSpec:
    """'conv:256' -> DecoderSpec('conv', 256); 'fpn:128' -> DecoderSpec('fpn', 128); 'linear'."""
    text = str(text).strip()
    if text == "linear":
        return DecoderSpec("linear")
    match = re.fullmatch(r"(conv|fpn):(\d+)", text)
    if not match or int(match.group(2)) < 1:
        raise OptionError("{decoder=}: expected {help}", decoder=text, help=DECODER_HELP)
    return DecoderSpec(match.group(1), int(match.group(2)))


class Decoder(nn.Module):
    """Features (B, C, h, w) and the input image -> logits (B, n_out, H, W) at the image's size."""

    def __init__(self, in_channels: int, n_out: int, spec: DecoderSpec):
        super().__init__()
        width = in_channels
        if spec.kind == "conv":
            self.conv = nn.Conv2d(in_channels, spec.width, 3, padding=1)
            width = spec.width
        self.classify = nn.Conv2d(width, n_out, 1)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(features)) if hasattr(self, "conv") else features
        return F.interpolate(self.classify(x), size=image.shape[-2:], mode="bilinear", align_corners=False)


class PyramidDecoder(nn.Module):
    """Maps (B, C_i, h_i, w_i), finest first, and the input image -> logits (B, n_out, H, W) at the image's size."""

    def __init__(self, in_channels: list[int], n_out: int, spec: DecoderSpec):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, spec.width, 1) for c in in_channels)
        self.smooth = nn.Conv2d(spec.width, spec.width, 3, padding=1)
        self.classify = nn.Conv2d(spec.width, n_out, 1)

    def forward(self, maps: tuple[torch.Tensor, ...], image: torch.Tensor) -> torch.Tensor:
        x = self.lateral[-1](maps[-1])
        for lateral, features in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            x = lateral(features) + F.interpolate(x, size=features.shape[-2:], mode="bilinear", align_corners=False)
        x = self.classify(F.relu(self.smooth(x)))
        return F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)


def default_tap(model: nn.Module) -> str:
    """layer4 for ResNets; else the deepest usual stage tap that still is a spatial map (before the pooling)."""
    if "layer4" in dict(model.named_modules()):
        return "layer4"
    maps = [info.name for info in describe_layers(model) if info.usual == "stage" and len(info.shape) == 3
            and not info.channels_last and min(info.shape[1:]) > 1]
    if not maps:
        raise OptionError("this backbone has no stage output that is a spatial map: choose one with {tap} ({every} "
                          "lists them)", every=every_tap(model_label(model)))
    return maps[-1]


def pyramid_taps(model: nn.Module) -> list[str]:
    """The last usual stage map of each stride in PYRAMID_STRIDES (at the model's reference size), in forward order:
    layer1-layer4 for ResNets, blocks.1, blocks.2, blocks.4 and bn2 for timm's EfficientNets."""
    graph = Graph(model)
    rows, shapes, marks = usual_rows(graph, model)
    reference = reference_size(model)
    by_stride = {}
    for name, node in rows.items():
        shape = shapes.get(node, ())
        if marks.get(node) == "stage" and len(shape) == 3 and not graph.nhwc.get(node, False):
            by_stride[round(reference / shape[-1])] = name
    taps = [by_stride[s] for s in PYRAMID_STRIDES if s in by_stride]
    if len(taps) < 2:
        strides = "/".join(map(str, PYRAMID_STRIDES))
        raise OptionError("{decoder=fpn}: found {n} stage map(s) of stride {strides} in this backbone; name two or "
                          "more with {tap} ({every} lists them)", n=len(taps), strides=strides,
                          every=every_tap(model_label(model)))
    return taps


def check_tap_count(taps: list[str], spec: DecoderSpec) -> None:
    """OptionError when `taps` (the names given, maybe none) do not suit `spec`: fpn fuses two or more, the other
    decoders read one; no tap twice."""
    twice = next((tap for i, tap in enumerate(taps) if tap in taps[:i]), None)
    if twice:
        raise OptionError("{tap=} given twice: keep one", tap=twice)
    if spec.fuses and len(taps) == 1:
        raise OptionError("{decoder=} with one {tap=$one}: a pyramid fuses two or more taps; give {tap} once per map, "
                          "or leave {tap} out for the stride 4/8/16/32 stages", decoder=str(spec), one=taps[0])
    if not spec.fuses and len(taps) > 1:
        raise OptionError("{decoder=$given} reads one tap, got {tap=}: keep one, or use {decoder=$fpn} to fuse them",
                          given=str(spec), tap=list(taps), fpn="fpn:WIDTH")


def segment_taps(model: nn.Module, taps, spec: DecoderSpec) -> list[str]:
    """The taps a decoder reads: `taps` (None, a name, or a list of names) checked against what `spec` takes, or
    the default (pyramid_taps for fpn, default_tap for the others)."""
    taps = [taps] if isinstance(taps, str) else list(taps or [])
    check_tap_count(taps, spec)
    if not taps:
        return pyramid_taps(model) if spec.fuses else [default_tap(model)]
    return taps


def build_segmenter(model: nn.Module, taps, spec: DecoderSpec, n_out: int, crop: int, name: str) -> nn.Module:
    """`model` up to `taps` (a name or a list of them, see segment_taps) plus a decoder named 'decoder', as one fx
    GraphModule returning (B, n_out, H, W)."""
    taps = segment_taps(model, taps, spec)
    check_taps(model, taps, name="tap")
    for tap, nhwc in channels_last_taps(model, taps).items():
        if nhwc:
            raise OptionError("{tap=}: its output is (N, H, W, C); the decoder needs an (N, C, H, W) map", tap=tap)
    keys = {tap: f"map{i}" for i, tap in enumerate(taps)}
    trunk = feature_extractor(model, keys)
    returned = next(node for node in trunk.graph.nodes if node.op == "output").args[0]
    for tap in taps:
        if not _after_a_layer(trunk, returned[keys[tap]]):
            raise OptionError("{tap=}: too shallow for the decoder, no layer of {name} runs before it; choose a deeper "
                              "tap such as {deeper}", tap=tap, name=name, deeper=default_tap(model))
    try:
        with torch.no_grad():
            out = trunk.eval()(torch.zeros(1, 3, crop, crop))
    except Exception as err:  # noqa: BLE001 - shape errors, traced asserts (ViT), too-small maps: all say the size
        raise OptionError("backbone {name} cannot run on {crop}x{crop} inputs ({reason}): check {image_size}",
                          name=name, crop=crop, reason=str(err).splitlines()[0][:150]) from err
    shapes = {tap: tuple(out[keys[tap]].shape) for tap in taps}
    for tap, shape in shapes.items():
        if len(shape) != 4:
            raise OptionError("{tap=}: gives {shape} per image, not a spatial map the decoder can upsample; choose a "
                              "tap before the pooling such as {before}", tap=tap, shape=shape[1:],
                              before=default_tap(model))
        if min(shape[2:]) < 2:
            raise OptionError("{tap=}: its map is {h}x{w} at {crop}x{crop} inputs, too coarse to segment: use a larger "
                              "{image_size} or a shallower tap", tap=tap, h=shape[2], w=shape[3], crop=crop)
    if spec.fuses:
        order = sorted(taps, key=lambda tap: -shapes[tap][2] * shapes[tap][3])  # finest first (stable: forward order)
        decoder = PyramidDecoder([shapes[tap][1] for tap in order], n_out, spec)
        inputs = tuple(keys[tap] for tap in order)
    else:
        decoder = Decoder(shapes[taps[0]][1], n_out, spec)
        inputs = keys[taps[0]]
    trunk.add_submodule(HEAD_NAME, decoder)
    for graph in {id(g): g for g in (trunk.graph, getattr(trunk, "train_graph", trunk.graph),
                                     getattr(trunk, "eval_graph", trunk.graph))}.values():
        _append_decoder(graph, inputs)
    trunk.recompile()
    return trunk


def _after_a_layer(trunk: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a parameter or a module with parameters runs before `node` (the input image itself: no)."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" or (current.op == "call_module" and
                                        any(True for _ in trunk.get_submodule(current.target).parameters())):
            return True
        todo.extend(current.all_input_nodes)
    return False


def _append_decoder(graph, keys) -> None:
    """Make the graph return decoder(features, input image) instead of {'map0': ..., ...}: the features are the
    map of key `keys` (a str), or the tuple of maps of `keys` (a tuple, fpn)."""
    output = next(node for node in graph.nodes if node.op == "output")
    image = next(node for node in graph.nodes if node.op == "placeholder")
    returned = output.args[0]
    features = returned[keys] if isinstance(keys, str) else tuple(returned[key] for key in keys)
    with graph.inserting_before(output):
        logits = graph.call_module(HEAD_NAME, (features, image))
    output.args = (logits,)
    graph.lint()
