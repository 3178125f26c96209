"""Where a backbone can be tapped: its graph nodes, their output shapes, and the usual taps (stages, penultimate).

Taps are the node names of ``torchvision.models.feature_extraction``: a leaf node ('layer1.1.relu_1') or a module
name ('layer1'), which stands for the last node inside that module. Everything here is derived from the traced
eval graph and one probe forward pass, never from a table per model family. timm models are traced with timm's
own leaf modules and functions (its dynamic padding, its asserts), which timm registers as not traceable.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs, create_feature_extractor
from torchvision.ops import Permute

from .options import OptionError

REFERENCE_SIZE = 224  # usual taps are decided at the size the models were designed for, whatever --image-size says
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
NOT_TAPS = ("placeholder", "get_attr", "output")  # the input image, parameters, the return statement
CONTAINERS = (nn.Sequential, nn.ModuleList)
ITEMSIZE = {"float32": 4, "float16": 2}
MAX_LISTED = 16


@dataclass
class LayerInfo:
    """One tap: its per-image output shape, and the row it gives after pooling."""

    name: str
    shape: tuple[int, ...]
    pooled_dim: int
    bytes_per_image: int  # at float32
    usual: str = ""  # '' | 'stage' | 'penultimate' | 'output'
    channels_last: bool = False  # the shape is (H, W, C) (Swin, ConvNeXt block internals)


class Graph:
    """The model's eval-mode fx graph, with the node names taps are given by and each node's memory layout."""

    def __init__(self, model: nn.Module):
        tracer = NodePathTracer(**_set_default_tracer_kwargs(tracer_kwargs(model)))
        was_training = model.training
        try:
            graph = tracer.trace(model.eval())
        finally:
            model.train(was_training)
        self.model = model
        self.name_of: dict[fx.Node, str] = dict(tracer.node_to_qualname)
        self.node: dict[str, fx.Node] = {name: node for node, name in self.name_of.items()}
        self.names = list(self.node)
        self.graph = graph
        self.order = list(graph.nodes)
        self.output = self.order[-1]
        self.nhwc = self._layouts(graph)

    def shapes(self, size: int) -> dict[fx.Node, tuple[int, ...]]:
        """Per-image output shape of every node that gives one tensor (the input included, the return statement
        not), from one zeros image of size x size run node by node (each output freed after its last use)."""
        module = fx.GraphModule(self.model, self.graph)
        was_training = self.model.training
        try:
            with torch.inference_mode():
                ShapeProp(module.eval()).propagate(torch.zeros(1, 3, size, size))
        finally:
            self.model.train(was_training)
        metas = {node: node.meta.get("tensor_meta") for node in self.order if node.op != "output"}
        return {node: tuple(meta.shape[1:]) for node, meta in metas.items() if isinstance(meta, TensorMetadata)}

    def resolve(self, tap: str) -> str | None:
        """The node a tap stands for: the node of that name, or the last node inside the module of that name."""
        prefix = tap + "."
        return next((name for name in reversed(self.names) if name == tap or name.startswith(prefix)), None)

    def taps(self) -> list[str]:
        """Every node whose output is a layer output (not the input, a parameter, or the return)."""
        return [name for name in self.names if self.node[name].op not in NOT_TAPS]

    def is_permute(self, name: str) -> bool:
        return self._permute_dims(self.node[name]) is not None

    def _permute_dims(self, node: fx.Node) -> tuple | None:
        """The dims of a permute node (method, function or torchvision's Permute module), None for other nodes."""
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return tuple(module.dims) if isinstance(module, Permute) else None
        if (node.op, node.target) not in (("call_method", "permute"), ("call_function", torch.permute)):
            return None
        dims = node.args[1:] or (node.kwargs.get("dims"),)
        return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)

    def _layouts(self, graph: fx.Graph) -> dict[str, bool]:
        """Node name -> True when its 4-D output is (N, H, W, C): set by NCHW->NHWC permutes, undone by the reverse."""
        nhwc: dict[fx.Node, bool] = {}
        for node in graph.nodes:
            dims = self._permute_dims(node)
            if dims in (TO_NHWC, TO_NCHW):
                nhwc[node] = dims == TO_NHWC
            else:
                nhwc[node] = next((nhwc[n] for n in node.all_input_nodes if n in nhwc), False)
        return {self.name_of[node]: flag for node, flag in nhwc.items() if node in self.name_of}


def tracer_kwargs(model: nn.Module) -> dict | None:
    """fx tracer settings of a model: timm's not-traceable modules and functions for a timm model, else None."""
    if not type(model).__module__.startswith("timm."):
        return None
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def feature_extractor(model: nn.Module, return_nodes, **kwargs) -> fx.GraphModule:
    """torchvision's create_feature_extractor with the model's tracer settings (see tracer_kwargs)."""
    return create_feature_extractor(model, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs(model), **kwargs)


def model_label(model: nn.Module) -> str:
    """The backbone name load_backbone tagged the model with, else its class name."""
    return getattr(model, "featx_backbone", type(model).__name__)


def final_layer(model: nn.Module) -> str | None:
    """Dotted name of the model's classifier: what timm's get_classifier() returns, else the last registered
    nn.Linear, else the last Conv2d (SqueezeNet)."""
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(classifier, nn.Module):
        name = next((name for name, m in model.named_modules() if m is classifier and name), None)
        if name:
            return name
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linears or convs or [None])[-1]


def valid_taps(model: nn.Module) -> list[str]:
    """Every eval-mode graph node that can be tapped, in forward order (module names are accepted too)."""
    return Graph(model).taps()


def is_channels_last(model: nn.Module, tap: str) -> bool:
    """True when the tap's 4-D output is (N, H, W, C), as in Swin's stages, so pooling must permute it."""
    return channels_last_taps(model, [tap])[tap]


def channels_last_taps(model: nn.Module, taps) -> dict[str, bool]:
    """is_channels_last for each of `taps`, from one trace of the model."""
    graph = Graph(model)
    nodes = {tap: graph.resolve(tap) for tap in taps}
    return {tap: bool(node and graph.nhwc.get(node, False)) for tap, node in nodes.items()}


def penultimate_node(model: nn.Module) -> str:
    """The node feeding the final classifier: 'flatten' (resnet), 'classifier.5' (vgg), the class token (vit)."""
    return _penultimate(Graph(model), model)


def _penultimate(graph: Graph, model: nn.Module) -> str:
    head = final_layer(model)
    node = graph.node.get(head) if head else None
    if node is None or not node.all_input_nodes:
        raise OptionError("cannot find the classifier of {model}: name the taps with {taps}", model=model_label(model))
    return graph.name_of[node.all_input_nodes[0]]


def _output_node(graph: Graph) -> str | None:
    """The node whose value the model returns (its logits), when it returns a single tensor."""
    value = graph.output.args[0]
    return graph.name_of.get(value) if isinstance(value, fx.Node) else None


def _module_rows(model: nn.Module) -> list[str]:
    """Top-level modules, the blocks of top-level containers ('features.3', 'layer1.0'), and the blocks of a
    top-level module's only container child (ViT's 'encoder.layers.encoder_layer_3')."""
    rows = []
    for name, module in model.named_children():
        rows.append(name)
        if isinstance(module, CONTAINERS):
            rows += [f"{name}.{child}" for child, _ in module.named_children()]
            continue
        inner = [(sub, child) for sub, child in module.named_children() if isinstance(child, CONTAINERS)]
        if len(inner) == 1:
            sub, child = inner[0]
            rows += [f"{name}.{sub}.{block}" for block, _ in child.named_children()]
    return rows


def _default_rows(graph: Graph, model: nn.Module, extra: list[str]) -> dict[str, str]:
    """Tap name -> node for the module rows plus the `extra` nodes, in forward order; one name per node: an extra
    node keeps its own name, else the shallowest module name wins ('layer1' over 'layer1.1')."""
    by_node: dict[str, str] = {}
    for name in _module_rows(model):
        node = graph.resolve(name)
        if node is None or graph.node[node].op in NOT_TAPS:
            continue
        if node not in by_node or name.count(".") < by_node[node].count("."):
            by_node[node] = name
    by_node.update({node: node for node in extra})
    order = {name: i for i, name in enumerate(graph.names)}
    return {by_node[node]: node for node in sorted(by_node, key=order.__getitem__)}


def probe_shapes(model: nn.Module, nodes: list[str], size: int) -> dict[str, tuple[int, ...]]:
    """Per-image output shapes of `nodes` on one zeros image of size x size; nodes without a tensor are left out."""
    check_image_size(model, size)
    extractor = feature_extractor(model, nodes, suppress_diff_warning=True).eval()
    try:
        with torch.inference_mode():
            outputs = extractor(torch.zeros(1, 3, size, size))
    except Exception as err:  # shape asserts, too-small maps: any failure means this size does not fit the model
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:150]
        raise OptionError("{image_size=}: {model} cannot run on {size}x{size} images ({reason})", image_size=size,
                          model=model_label(model), size=size, reason=reason) from err
    return {
        name: tuple(out.shape[1:])
        for name, out in outputs.items()
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 1
    }


def check_image_size(model: nn.Module, size: int) -> None:
    """OptionError when the model is built for one input size (torchvision's ViT) and `size` is another."""
    fixed = getattr(model, "image_size", None)
    if isinstance(fixed, int) and size != fixed:
        raise OptionError("{image_size=}: {model} takes {fixed}x{fixed} images only", image_size=size,
                          model=model_label(model), fixed=fixed)


def reference_size(model: nn.Module) -> int:
    """The input size the architecture is built for (torchvision's ViT stores it, timm's pretrained config gives
    it; convnets take 224)."""
    timm_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    size = getattr(model, "image_size", timm_size[-1] if timm_size else REFERENCE_SIZE)
    return size if isinstance(size, int) else REFERENCE_SIZE


def _spatial(shape: tuple[int, ...], nhwc: bool) -> tuple[int, ...]:
    return shape[:2] if nhwc else shape[1:]


def _stages(graph: Graph, rows: dict[str, str], shapes: dict[str, tuple[int, ...]], penultimate: str) -> list[str]:
    """Rows before the penultimate node that end a resolution stage: a spatial map whose next row (layout permutes
    skipped) is a map of another size or no map at all (global pooling); not a map followed by tokens (a ViT patch
    embedding)."""
    trunk = list(rows)[: list(rows.values()).index(penultimate) + 1]
    tensors = [name for name in trunk if rows[name] in shapes and not graph.is_permute(rows[name])]
    stages = []
    for name, following in zip(tensors, tensors[1:] + [None]):
        shape, nhwc = shapes[rows[name]], graph.nhwc.get(rows[name], False)
        if len(shape) != 3 or math.prod(_spatial(shape, nhwc)) <= 1:
            continue
        if following is None:
            stages.append(name)
            continue
        nxt, nxt_nhwc = shapes[rows[following]], graph.nhwc.get(rows[following], False)
        if len(nxt) == 1 or (len(nxt) == 3 and _spatial(nxt, nxt_nhwc) != _spatial(shape, nhwc)):
            stages.append(name)
    return stages


def usual_rows(graph: Graph, model: nn.Module):
    """(rows, shapes, node -> mark): the default rows, their shapes at the reference size, and the usual taps."""
    penultimate = _penultimate(graph, model)
    output = _output_node(graph)
    rows = _default_rows(graph, model, [penultimate] + ([output] if output else []))
    shapes = probe_shapes(model, list(rows.values()), reference_size(model))
    marks = {rows[name]: "stage" for name in _stages(graph, rows, shapes, penultimate)}
    marks[penultimate] = "penultimate"
    if output:
        marks[output] = "output"
    return rows, shapes, marks


def usual_taps(model: nn.Module) -> list[str]:
    """Stage outputs and the penultimate node, in forward order: the taps worth storing."""
    rows, _, marks = usual_rows(Graph(model), model)
    return [name for name, node in rows.items() if marks.get(node) in ("stage", "penultimate")]


def check_taps(model: nn.Module, taps, name: str = "taps") -> None:
    """OptionError about the parameter `name` unless every tap names a node (or module) of the model, and no two
    taps name the same node."""
    graph = Graph(model)
    seen: dict[str, str] = {}
    for tap in taps:
        node = graph.resolve(tap)
        if node is None:
            raise _unknown_tap(graph, model, tap, name)
        if node in seen:
            raise OptionError("{%s=} are the same node of {model} ({node}): keep one" % name,
                              **{name: [seen[node], tap]}, model=model_label(model), node=node)
        seen[node] = tap


def _unknown_tap(graph: Graph, model: nn.Module, tap: str, name: str) -> OptionError:
    """The unknown tap, the closest names (module names and graph nodes), and the usual rows."""
    label = model_label(model)
    rows = list(_default_rows(graph, model, []))
    names = [name for name, _ in model.named_modules() if name] + graph.taps()
    close = difflib.get_close_matches(tap, dict.fromkeys(names), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    shown = ", ".join(rows[:MAX_LISTED]) + (", ..." if len(rows) > MAX_LISTED else "")
    return OptionError("{%s=}: unknown tap for {label}{hint}; valid taps include {shown} ({every} lists all {n})"
                       % name, **{name: tap}, label=label, hint=hint, shown=shown, every=every_tap(label),
                       n=len(graph.taps()))


def every_tap(label: str) -> str:
    """Where every tap of the backbone `label` is listed (for a hint)."""
    return f"featx.layers({label!r}, include_all=True) / `featx layers {label} --all`"


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes of the tensors of one image's forward pass at float32, its input included: the most alive at once
    (`peak`, inference), and all of them (`total`: what a training forward keeps for the backward pass, and what
    a probe of every node returns)."""

    peak: int
    total: int


def activation_bytes(model: nn.Module, image_size: int) -> ActivationBytes:
    """The activation memory of one image_size x image_size image, from the traced graph's node shapes.

    The shapes come from one probe at the model's reference size (as `describe_layers` measures them), scaled by
    the area for maps and token sequences, so that a size too large to run is estimated without running it. A
    node's output is alive from the node until its last user has run. A model built for one input size takes no
    other (OptionError).
    """
    check_image_size(model, image_size)
    graph = Graph(model)
    reference = reference_size(model)
    area = (image_size / reference) ** 2
    size = {node: math.prod(shape) * (area if len(shape) > 1 else 1) * ITEMSIZE["float32"]
            for node, shape in graph.shapes(reference).items()}
    last_use = {node: index for index, user in enumerate(graph.order) for node in user.all_input_nodes}
    alive: dict[fx.Node, float] = {}
    live = peak = 0.0
    for index, node in enumerate(graph.order):
        alive[node] = size.get(node, 0.0)
        live += alive[node]
        peak = max(peak, live)
        for done in [n for n in alive if last_use.get(n, index) <= index]:
            live -= alive.pop(done)
    return ActivationBytes(peak=math.ceil(peak), total=math.ceil(sum(size.values())))


def human_bytes(n: float) -> str:
    """2048000 -> '2.0 MB' (decimal units, as extract's summary)."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = 0
    while n >= 1000 and power < len(units) - 1:
        n /= 1000
        power += 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"
