"""Intermediate features of a model, tapped by layer name, for any model.

Two ways to tap, chosen per model automatically (``tap_mode``):

- ``graph``: a model that ``torch.fx`` can trace is tapped with ``torchvision.models.feature_extraction``. A layer
  name is a node of its traced graph (``get_graph_node_names``) or a module that contains nodes (e.g. ``layer2``:
  the output of its last node).
- ``hooks``: a model that cannot be traced (Python control flow on tensor values, such as ``if x.sum() > 0:``) is
  tapped with forward hooks on its named modules (``model.named_modules()``). A layer name is a module; its output
  is what the module returned at its last call in the forward pass.

Default taps come from the model itself (from its graph, or from its modules' output shapes in a probe pass), so
every model of the catalogue, every torchvision model and any user model has them (a model may define its own with
a ``default_taps(example)`` method):

- ``stages``: where each spatial resolution ends, before the global pooling (a ResNet's ``layer1..3``);
- ``embedding``: the input of the classifier, the penultimate representation (a ResNet's ``flatten``; with hooks,
  the last module output before the classifier: a 2-d one, else the globally pooled map);
- ``preact``: the stage outputs before their last ReLU (RepDistiller's ``preact``, which OFD and AB distil),
  known only for the models that name them in their own ``default_taps`` (the CIFAR zoo).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.core.modes import eval_mode

log = logging.getLogger(__name__)


def feature_extraction():
    """``torchvision.models.feature_extraction``, imported on first use: importing torchvision imports
    torch._dynamo (through torchvision.ops), which costs every ``kdrun`` process about 1.5 s of start-up that a
    run without feature taps or torchvision models never needs."""
    from torchvision.models import feature_extraction as module

    return module


TAP_KINDS = ("stages", "middle", "embedding", "preact")
TapMode = Literal["graph", "hooks"]


@dataclass(frozen=True)
class Taps:
    """A model's default layers: ``stages`` (spatial stage outputs, in order), ``embedding`` and, where the model
    names them, ``preact`` (the same stages before their last ReLU)."""

    stages: list[str]
    embedding: str
    preact: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[str]:
        """The default layers for a method: all ``stages``, the ``middle`` stage (FitNet's hint), ``embedding``, or
        the ``preact`` stages (a one-line ``KdrunError`` for a model that does not name them)."""
        if kind == "preact":
            if not self.preact:
                raise KdrunError(
                    "this model names no pre-activation taps (see kdrun.models.features): give the layers by name "
                    "with loss.student_layers / loss.teacher_layers"
                )
            return list(self.preact)
        if kind == "embedding" or not self.stages:
            return [self.embedding]
        if kind == "middle":
            return [self.stages[(len(self.stages) - 1) // 2]]
        return list(self.stages)


# --- which way: the graph where torch.fx traces the model, hooks on its modules where it does not -----------------


# What tracing a model gave (its node names, its feature extractors), kept per model until its module tree changes:
# binding a method asks several times, a method's bind reads the shapes of the very nodes its training tap returns,
# and a deep net's trace takes a fraction of a second. The tree is of module objects, so that a replaced module never
# runs through an old graph; an extractor holds the model's modules, not the model.
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def _traces(model: nn.Module) -> dict:
    tree = tuple((name, type(module), id(module)) for name, module in model.named_modules())
    hit = _TRACES.get(model)
    if hit is None or hit[0] != tree:
        hit = _TRACES[model] = (tree, {})
    return hit[1]


def extractor(model: nn.Module, return_nodes: dict[str, str]) -> nn.Module:
    """torchvision's ``create_feature_extractor(model, return_nodes)``, built once per model, module tree and nodes,
    in ``model``'s train/eval mode (as a new one would be). It shares every module and parameter with ``model``."""
    traces, key = _traces(model), tuple(return_nodes.items())
    graph = traces.get(key)
    if graph is None:
        graph = traces[key] = feature_extraction().create_feature_extractor(model, return_nodes=dict(return_nodes))
    elif graph.training != model.training:
        graph.train(model.training)  # what create_feature_extractor does to a new one
    return graph


def tap_nodes(layers: list[str], names: list[str]) -> dict[str, str]:
    """The extractor's ``return_nodes`` for ``layers`` of a graph with nodes ``names``: ``feature_<i>`` for the
    i-th layer and ``logits`` for the output (a layer may be the output itself: its feature is then the logits)."""
    nodes = {layer: f"feature_{i}" for i, layer in enumerate(layers)}
    nodes[names[-1]] = "logits"
    return nodes


def graph_node_names(model: nn.Module) -> tuple[list[str] | None, str]:
    """The tappable node names of ``model``'s training graph in forward order (without the input), or ``None`` and
    why when torch.fx cannot trace it."""
    traces = _traces(model)
    if "names" not in traces:
        try:
            traces["names"] = (feature_extraction().get_graph_node_names(model)[0][1:], "")
        except Exception as e:  # noqa: BLE001 - FX raises many kinds for untraceable Python control flow
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            traces["names"] = (None, why)
    names, why = traces["names"]
    return (None if names is None else list(names)), why


def tap_mode(model: nn.Module) -> TapMode:
    """``graph`` for a model that torch.fx traces, else ``hooks``."""
    return "graph" if graph_node_names(model)[0] is not None else "hooks"


# --- names ---------------------------------------------------------------------------------------------------------


def layer_names(model: nn.Module, role: str = "model") -> list[str]:
    """The tappable layers of ``model``: its graph's nodes in forward order, or (untraceable) its named modules."""
    names, _ = graph_node_names(model)
    if names is not None:
        return names
    modules = [name for name, _ in model.named_modules() if name]
    if not modules:
        raise KdrunError(f"the {role} cannot be traced by torch.fx and has no submodules to tap with forward hooks")
    return modules


def check_layers(model: nn.Module, layers: list[str], role: str, key: str) -> None:
    """Raise a one-line ``KdrunError`` naming every valid layer if one of ``layers`` is not in ``model``."""
    names = layer_names(model, role)
    for layer in layers:
        if not any(n == layer or n.startswith(layer + ".") for n in names):
            raise KdrunError(f"{key}: {role} has no layer {layer!r}; its layers are: {', '.join(names)}")


# --- shapes --------------------------------------------------------------------------------------------------------


def module_outputs(model: nn.Module, x: torch.Tensor, layers: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """``model(x)`` and the output of every named module (or of ``layers``) at its last call, by forward hooks.

    The dict is in the order the modules last finished, so a module comes after everything it contains."""
    outputs: dict[str, Any] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs.pop(name, None)  # a module called again moves to its latest place
            outputs[name] = output

        return hook

    modules = dict(model.named_modules())
    wanted = list(dict.fromkeys(layers)) if layers is not None else [n for n in modules if n]
    unknown = [n for n in wanted if n not in modules]
    if unknown:
        valid = ", ".join(n for n in modules if n)
        raise KdrunError(f"{type(model).__name__} has no module {unknown[0]!r}; its modules are: {valid}")
    handles = [modules[name].register_forward_hook(keep(name)) for name in wanted]
    try:
        result = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return result, outputs


@torch.no_grad()
def feature_shapes(model: nn.Module, example: torch.Tensor, layers: list[str] | None = None) -> dict[str, tuple]:
    """The output shape of every layer (or of ``layers``) for ``example``, with the model in eval mode."""
    names, _ = graph_node_names(model)
    with eval_mode(model):
        if names is not None:
            nodes = tap_nodes(layers if layers is not None else names, names)  # as FeatureTap's: one trace for both
            found = extractor(model, nodes)(example)
            out = {layer: found[node] for layer, node in nodes.items()}
        else:
            _, out = module_outputs(model, example, layers)
            _check_tensors(model, layers or (), out)  # a module may not run at all, or return a tuple
    return {n: tuple(v.shape) for n, v in out.items() if isinstance(v, torch.Tensor)}


def _check_tensors(model: nn.Module, layers: Any, outputs: dict[str, Any]) -> None:
    for layer in layers:
        if not isinstance(outputs.get(layer), torch.Tensor):
            raise KdrunError(
                f"layer {layer!r} of {type(model).__name__} gave no tensor in the forward pass "
                f"({'it did not run' if layer not in outputs else type(outputs[layer]).__name__}): tap another module"
            )


# --- default taps --------------------------------------------------------------------------------------------------


def default_taps(model: nn.Module, example: torch.Tensor) -> Taps:
    """Stage outputs and embedding of ``model``, read off its graph (or its modules) and the shapes of a probe pass.

    A model may choose its own by defining ``default_taps(example)``.
    """
    own = getattr(model, "default_taps", None)
    if callable(own):
        return own(example)
    names, _ = graph_node_names(model)
    if names is not None:
        return _graph_taps(model, example, names)
    return _hook_taps(model, example)


def _graph_taps(model: nn.Module, example: torch.Tensor, names: list[str]) -> Taps:
    shapes = feature_shapes(model, example, names)
    output = names[-1]
    flat = [n for n in names[:-1] if len(shapes.get(n, ())) == 2]
    maps = [n for n in names if len(shapes.get(n, ())) == 4]
    if maps and shapes[maps[-1]][2:] == (1, 1) and len(maps) > 1:
        maps = maps[:-1]  # the global pooling: its output is the embedding, not a stage
    stages = _stages(maps, shapes, lambda n: _module_name(n, names))
    if not flat:
        raise KdrunError(f"{type(model).__name__} has no 2-d layer before its output {output!r} to use as embedding")
    return Taps(stages, _module_name(flat[-1], names))


POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


@torch.no_grad()
def _hook_taps(model: nn.Module, example: torch.Tensor) -> Taps:
    """Default taps from a probe pass with hooks. The classifier: the modules whose output is the model's output
    (the last module to finish when none is). The embedding: the last 2-d or globally pooled output before it. The
    stages: as with the graph, among the 4-d outputs other than a pooling to 1x1."""
    with eval_mode(model):
        logits, outputs = module_outputs(model, example)
    modules = dict(model.named_modules())
    order: list[str] = []
    for name, value in outputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        while order and outputs[order[-1]] is value and order[-1].startswith(name + "."):
            order.pop()  # a container that returns its last child's output stands for it (as with the graph)
        order.append(name)
    head = {n for n in order if outputs[n] is logits} or set(order[-1:])
    body = [n for n in order if n not in head]
    shapes = {n: tuple(outputs[n].shape) for n in body}
    vectors = [n for n in body if len(shapes[n]) == 2 or (len(shapes[n]) == 4 and shapes[n][2:] == (1, 1))]
    if not vectors:
        raise KdrunError(
            f"{type(model).__name__} has no module before its classifier whose output (2-d, or a map pooled to 1x1) "
            "can be the embedding"
        )
    pooled = {n for n in body if isinstance(modules[n], POOLING) and shapes[n][2:] == (1, 1)}
    maps = [n for n in body if len(shapes[n]) == 4 and n not in pooled]
    stages = sorted(_stages(maps, shapes, lambda n: n), key=body.index)  # a resolution may first occur inside a block
    return Taps(stages, vectors[-1])


def _stages(maps: list[str], shapes: dict[str, tuple], module_of: Callable[[str], str]) -> list[str]:
    """Where each spatial resolution ends among the feature ``maps`` (in forward order), as module names."""
    by_size: dict[tuple, list[str]] = {}  # nodes per spatial resolution, resolutions in forward order
    for name in maps:
        by_size.setdefault(shapes[name][2:], []).append(name)
    # A resolution's stage output: its last node among those that end the shallowest modules, so that a block
    # which starts at this resolution and downsamples inside (MobileNet's expansion conv) is not taken for one.
    stages = []
    for nodes in by_size.values():
        modules = [module_of(n) for n in nodes]
        shallowest = min(m.count(".") for m in modules)
        stages.append([m for m in modules if m.count(".") == shallowest][-1])
    return stages


def _module_name(node: str, names: list[str]) -> str:
    """The shortest enclosing module whose last node is ``node`` (``layer1`` for ``layer1.2.relu_1``)."""
    parts = node.split(".")
    for k in range(1, len(parts)):
        prefix = ".".join(parts[:k])
        inside = [n for n in names if n.startswith(prefix + ".")]
        if inside and inside[-1] == node and prefix not in names:
            return prefix
    return node


# --- the tapped forward pass ---------------------------------------------------------------------------------------


class FeatureTap(nn.Module):
    """``model``'s logits and the outputs of ``layers``, in one forward pass: ``(logits, [features])``.

    Through torchvision's FX feature extractor where the model traces, through forward hooks on the named modules
    (registered for the pass only) where it does not. Shares every parameter with ``model``; it follows ``model``'s
    train/eval mode.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        names, why = graph_node_names(model)
        self.mode: TapMode = "graph" if names is not None else "hooks"
        self.extractor: nn.Module | None = None
        self.keys = list(self.layers)
        if names is not None:
            nodes = tap_nodes(self.layers, names)
            self.extractor = extractor(model, nodes)
            self.keys = [nodes[layer] for layer in self.layers]
        else:
            log.info("%s cannot be traced by torch.fx (%s): tapping %s with forward hooks", type(model).__name__, why,
                     ", ".join(self.layers))  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.extractor is None:
            return self._hooked(x)
        if self.extractor.training != self.model.training:
            self.extractor.train(self.model.training)  # the traced graphs differ where the model checks its mode
        out = self.extractor(x)
        return out["logits"], [out[k] for k in self.keys]

    def _hooked(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, outputs = module_outputs(self.model, x, self.layers)
        _check_tensors(self.model, self.layers, outputs)
        return logits, [outputs[layer] for layer in self.layers]
