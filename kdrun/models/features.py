"""Intermediate features of a model, tapped by layer name with ``torchvision.models.feature_extraction``.

A layer name is a node of the model's traced graph (``get_graph_node_names``) or a module that contains nodes
(e.g. ``layer2``: the output of its last node). Default taps come from the graph itself, so every model of the
catalogue, every torchvision model and any traceable user model has them (a model may define its own with a
``default_taps(example)`` method):

- ``stages``: where each spatial resolution ends, before the global pooling (a ResNet's ``layer1..3``);
- ``embedding``: the input of the classifier, the penultimate representation (a ResNet's ``flatten``);
- ``preact``: the stage outputs before their last ReLU (RepDistiller's ``preact``, which OFD and AB distil),
  known only for the models that name them in their own ``default_taps`` (the CIFAR zoo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from kdrun.core.errors import KdrunError
from kdrun.core.modes import eval_mode

TAP_KINDS = ("stages", "middle", "embedding", "preact")


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


def layer_names(model: nn.Module, role: str = "model") -> list[str]:
    """The tappable node names of ``model``'s training graph, in forward order (without the input)."""
    try:
        names = get_graph_node_names(model)[0]
    except Exception as e:  # noqa: BLE001 - FX raises many kinds for untraceable Python control flow
        raise KdrunError(
            f"the {role} cannot be traced for feature taps ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "feature losses need a model that torch.fx can trace"
        ) from e
    return names[1:]


def check_layers(model: nn.Module, layers: list[str], role: str, key: str) -> None:
    """Raise a one-line ``KdrunError`` naming every valid layer if one of ``layers`` is not in ``model``."""
    names = layer_names(model, role)
    for layer in layers:
        if not any(n == layer or n.startswith(layer + ".") for n in names):
            raise KdrunError(f"{key}: {role} has no layer {layer!r}; its layers are: {', '.join(names)}")


@torch.no_grad()
def feature_shapes(model: nn.Module, example: torch.Tensor, layers: list[str] | None = None) -> dict[str, tuple]:
    """The output shape of every node (or of ``layers``) for ``example``, with the model in eval mode."""
    names = layers if layers is not None else layer_names(model)
    with eval_mode(model):
        out = create_feature_extractor(model, return_nodes={n: n for n in names})(example)
    return {n: tuple(v.shape) for n, v in out.items() if isinstance(v, torch.Tensor)}


def default_taps(model: nn.Module, example: torch.Tensor) -> Taps:
    """Stage outputs and embedding of ``model``, read off its graph and the shapes of a probe pass.

    A model may choose its own by defining ``default_taps(example)``.
    """
    own = getattr(model, "default_taps", None)
    if callable(own):
        return own(example)
    names = layer_names(model)
    shapes = feature_shapes(model, example, names)
    output = names[-1]
    flat = [n for n in names[:-1] if len(shapes.get(n, ())) == 2]
    maps = [n for n in names if len(shapes.get(n, ())) == 4]
    if maps and shapes[maps[-1]][2:] == (1, 1) and len(maps) > 1:
        maps = maps[:-1]  # the global pooling: its output is the embedding, not a stage
    by_size: dict[tuple, list[str]] = {}  # nodes per spatial resolution, resolutions in forward order
    for name in maps:
        by_size.setdefault(shapes[name][2:], []).append(name)
    # A resolution's stage output: its last node among those that end the shallowest modules, so that a block
    # which starts at this resolution and downsamples inside (MobileNet's expansion conv) is not taken for one.
    stages = []
    for nodes in by_size.values():
        modules = [_module_name(n, names) for n in nodes]
        shallowest = min(m.count(".") for m in modules)
        stages.append([m for m in modules if m.count(".") == shallowest][-1])
    if not flat:
        raise KdrunError(f"{type(model).__name__} has no 2-d layer before its output {output!r} to use as embedding")
    return Taps(stages, _module_name(flat[-1], names))


def _module_name(node: str, names: list[str]) -> str:
    """The shortest enclosing module whose last node is ``node`` (``layer1`` for ``layer1.2.relu_1``)."""
    parts = node.split(".")
    for k in range(1, len(parts)):
        prefix = ".".join(parts[:k])
        inside = [n for n in names if n.startswith(prefix + ".")]
        if inside and inside[-1] == node and prefix not in names:
            return prefix
    return node


class FeatureTap(nn.Module):
    """``model``'s logits and the outputs of ``layers``, in one forward pass: ``(logits, [features])``.

    Shares every parameter with ``model``; it follows ``model``'s train/eval mode.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        output = layer_names(model)[-1]
        nodes = {layer: f"feature_{i}" for i, layer in enumerate(self.layers)}
        nodes[output] = "logits"  # a layer may be the output itself: its feature is then the logits
        self.extractor = create_feature_extractor(model, return_nodes=nodes)
        self.keys = [nodes[layer] for layer in self.layers]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.extractor.training != self.model.training:
            self.extractor.train(self.model.training)  # the traced graphs differ where the model checks its mode
        out = self.extractor(x)
        return out["logits"], [out[k] for k in self.keys]
