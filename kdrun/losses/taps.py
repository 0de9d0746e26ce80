"""Taps that some methods need beyond the models' default stages and embedding (``kdrun.models.features``): the
stages' pre-activations (the input of the ReLU that ends each: AB's and ReviewKD's teacher features) and the input of
the first stage (the stem's output: FSP's first matrix). A model that names its pre-activations (the CIFAR zoo, as
RepDistiller's ``preact``) is taken at its word; for any other they are read off the traced graph.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn

from kdrun.core.modes import eval_mode
from kdrun.models.features import Taps, default_taps, extractor, layer_names

log = logging.getLogger(__name__)


def _last_node(layer: str, names: list[str]) -> str:
    """The graph node whose output a layer name taps (the module's last node, or the node itself)."""
    return layer if layer in names else [n for n in names if n.startswith(layer + ".")][-1]


def stem_output(model: nn.Module, first_stage: str) -> str | None:
    """The node just before the first node of ``first_stage`` (a ResNet's stem ``relu``), or None if it starts the
    graph."""
    names = layer_names(model)
    first = first_stage if first_stage in names else next(n for n in names if n.startswith(first_stage + "."))
    i = names.index(first)
    return names[i - 1] if i > 0 else None


def _out_of_place(model: nn.Module, node: str) -> None:
    """Make the ``nn.ReLU`` that computes ``node`` out of place (the same values): an in-place one overwrites its
    input, which a pre-activation tap returns."""
    module = re.sub(r"_\d+$", "", node)  # fx names the k-th call of module ``a.relu`` ``a.relu_k``
    try:
        relu = model.get_submodule(module)
    except AttributeError:
        return
    if isinstance(relu, nn.ReLU):
        relu.inplace = False


def stage_preactivations(model: nn.Module, example: torch.Tensor, role: str, taps: Taps | None = None) -> list[str]:
    """The pre-activation of each default stage (``taps``: the model's default taps, if already read): the model's
    own ``preact`` taps where it names them, else the node that feeds each stage's last ReLU (``preactivations``)."""
    taps = default_taps(model, example) if taps is None else taps
    return list(taps.preact) if taps.preact else preactivations(model, taps.stages, example, role)


@torch.no_grad()
def preactivations(model: nn.Module, layers: list[str], example: torch.Tensor, role: str) -> list[str]:
    """For each layer that ends in a ReLU, the node that feeds it (e.g. ``layer1.0.add`` for a CIFAR ResNet's
    ``layer1``); other layers as they are (with a warning where their output is non-negative).

    Checked on a probe batch (in eval mode, from a generator of its own): the layer's output must be the ReLU of
    that node's, which must have negative values. The ReLU is made out of place so that the tap sees its input.
    """
    names = layer_names(model)
    before = {}
    for layer in layers:
        last = _last_node(layer, names)
        if names.index(last) > 0:
            before[layer] = names[names.index(last) - 1]
            _out_of_place(model, last)
    probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
    nodes = sorted(set(layers) | set(before.values()))
    with eval_mode(model):
        out = extractor(model, {n: n for n in nodes})(probe)
    chosen = []
    for layer in layers:
        node = before.get(layer)
        ok = node is not None and out[node].shape == out[layer].shape
        ok = ok and torch.equal(out[layer], out[node].clamp_min(0)) and bool((out[node] < 0).any())
        if not ok and not bool((out[layer] < 0).any()):  # an activation that is not a ReLU fed by a node
            log.warning(
                "no pre-activation found for the %s's layer %r: its (non-negative) output is tapped", role, layer
            )
        chosen.append(node if ok and node is not None else layer)
    return chosen
