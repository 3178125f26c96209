"""The backbone cut at a tap, with a decoder whose logits are upsampled to the input size.

`build_segmenter` traces the backbone up to the tap (layers.feature_extractor, with the model's tracer settings)
and adds the decoder as module `decoder` to that graph, so parameter names stay the backbone's own
('layer2.0.conv1.weight'): every --freeze strategy and partial weight loading work as in classification.

    --decoder conv:W   3x3 conv to W channels, ReLU, 1x1 conv to the classes, bilinear upsample to the input
    --decoder linear   1x1 conv to the classes (a dense linear probe), bilinear upsample

The 1x1 conv runs before the upsampling: both are linear (bilinear weights sum to one, so the bias commutes too),
so this equals upsampling first, at a fraction of the memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import DECODER_HELP
from ..errors import FeatxError
from ..layer_table import describe_layers
from ..layers import channels_last_taps, check_taps, feature_extractor

HEAD_NAME = "decoder"


@dataclass(frozen=True)
class DecoderSpec:
    kind: str  # 'conv' | 'linear'
    width: int | None = None

    def __str__(self) -> str:
        return f"conv:{self.width}" if self.kind == "conv" else "linear"


def parse_decoder(text) -> DecoderSpec:
    """'conv:256' -> DecoderSpec('conv', 256); 'linear' -> DecoderSpec('linear')."""
    text = str(text).strip()
    if text == "linear":
        return DecoderSpec("linear")
    match = re.fullmatch(r"conv:(\d+)", text)
    if not match or int(match.group(1)) < 1:
        raise FeatxError(f"--decoder {text!r}: expected {DECODER_HELP}")
    return DecoderSpec("conv", int(match.group(1)))


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


def default_tap(model: nn.Module) -> str:
    """layer4 for ResNets; else the deepest usual stage tap that still is a spatial map (before the pooling)."""
    if "layer4" in dict(model.named_modules()):
        return "layer4"
    maps = [info.name for info in describe_layers(model) if info.usual == "stage" and len(info.shape) == 3
            and not info.channels_last and min(info.shape[1:]) > 1]
    if not maps:
        raise FeatxError("this backbone has no stage output that is a spatial map: choose one with --tap "
                         "(featx layers BACKBONE --all)")
    return maps[-1]


def build_segmenter(model: nn.Module, tap: str, spec: DecoderSpec, n_out: int, crop: int, name: str) -> nn.Module:
    """`model` up to `tap` plus a Decoder named 'decoder', as one fx GraphModule returning (B, n_out, H, W)."""
    try:
        check_taps(model, [tap])
    except FeatxError as err:  # the same message, naming this command's option
        raise FeatxError(str(err).replace(f"-l {tap}:", f"--tap {tap}:", 1)) from None
    if channels_last_taps(model, [tap])[tap]:
        raise FeatxError(f"--tap {tap}: its output is (N, H, W, C); the decoder needs an (N, C, H, W) map")
    trunk = feature_extractor(model, {tap: "map"})
    if not any(True for _ in trunk.parameters()):
        raise FeatxError(f"--tap {tap}: too shallow for the decoder, no layer of {name} runs before it; choose a "
                         f"deeper tap such as {default_tap(model)}")
    try:
        with torch.no_grad():
            shape = tuple(trunk.eval()(torch.zeros(1, 3, crop, crop))["map"].shape)
    except Exception as err:  # noqa: BLE001 - shape errors, traced asserts (ViT), too-small maps: all say the size
        raise FeatxError(f"backbone {name} cannot run on {crop}x{crop} inputs "
                         f"({str(err).splitlines()[0][:150]}): check --image-size") from err
    if len(shape) != 4:
        raise FeatxError(f"--tap {tap}: gives {shape[1:]} per image, not a spatial map the decoder can upsample; "
                         f"choose a tap before the pooling such as {default_tap(model)}")
    if min(shape[2:]) < 2:
        raise FeatxError(f"--tap {tap}: its map is {shape[2]}x{shape[3]} at {crop}x{crop} inputs, too coarse to "
                         f"segment: use a larger --image-size or a shallower tap")
    trunk.add_submodule(HEAD_NAME, Decoder(shape[1], n_out, spec))
    for graph in {id(g): g for g in (trunk.graph, getattr(trunk, "train_graph", trunk.graph),
                                     getattr(trunk, "eval_graph", trunk.graph))}.values():
        _append_decoder(graph)
    trunk.recompile()
    return trunk


def _append_decoder(graph) -> None:
    """Make the graph return decoder(features at the tap, input image) instead of {'map': features}."""
    output = next(node for node in graph.nodes if node.op == "output")
    image = next(node for node in graph.nodes if node.op == "placeholder")
    features = output.args[0]["map"]
    with graph.inserting_before(output):
        logits = graph.call_module(HEAD_NAME, (features, image))
    output.args = (logits,)
    graph.lint()
