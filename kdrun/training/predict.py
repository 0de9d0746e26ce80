"""Inference over a whole split and the classification metrics of its logits."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from kdrun.core.modes import eval_mode
from kdrun.data import Data, Split
from kdrun.training.runtime import Runtime


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, data: Data, runtime: Runtime, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of a whole split, in split order, with the model in eval mode."""
    with eval_mode(model):
        forward = runtime.forward(runtime.prepare(model))
        logits, labels = [], []
        for images, y, _ in split.batches(batch_size):
            with runtime.autocast():
                logits.append(forward(runtime.inputs(data.transform(images))).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, top-1 accuracy and (with more than 5 classes) top-5 accuracy of logits against labels."""
    # Imported here, not at the top: torchmetrics imports torchvision and with it torch._dynamo, about 2.5 s of
    # CPU that a ``kdrun`` refusing its input before any training should not spend.
    from torchmetrics.functional.classification import multiclass_accuracy

    num_classes = logits.shape[1]
    out = {
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "acc": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
    }
    if num_classes > 5:
        out["top5"] = multiclass_accuracy(logits, labels, num_classes, top_k=5, average="micro").item()
    return out


def evaluate(model: nn.Module, split: Split, data: Data, runtime: Runtime, batch_size: int) -> dict[str, float]:
    """``classification_metrics`` of ``model`` on ``split``."""
    return classification_metrics(*predict(model, split, data, runtime, batch_size))


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state`` (e.g. its best-validation weights)."""
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other
