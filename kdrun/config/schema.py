"""The schema of the composed config: the type and range of every leaf.

Run-level keys are declared in ``RUN`` below. A group option's own keys are declared by the code that takes them:
a dataset's by ``COMMON_DATASET_KEYS`` and its loader's signature, a model's, a method's, an optimizer's, a
schedule's and a mix's by their builder's signature (``kdrun.core.schema`` types such as ``Weight``). A node
with ``_target_`` is user code: only its numbers' finiteness is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from kdrun.core.errors import KdrunError
from kdrun.core.schema import (
    Epochs,
    Fraction,
    LearningRate,
    NonEmpty,
    NonNegativeInt,
    PositiveInt,
    Range,
    Seed,
    Size,
    Temperature,
    parameter_hints,
)
from kdrun.data.augment import MIXES, MixAlpha
from kdrun.data.datasets import COMMON_DATASET_KEYS, DATASETS
from kdrun.losses import LOSSES
from kdrun.models import MODELS
from kdrun.models.checkpoint import CheckpointFormat
from kdrun.models.torchvision_models import build_torchvision
from kdrun.reporting.export import FORMATS
from kdrun.training.optim import OPTIMIZERS, SCHEDULES, WarmupEpochs
from kdrun.training.runtime import AMP_CHOICES

Switch = Literal["auto", True, False]
Format = Literal[FORMATS]  # type: ignore[valid-type]

MIX_CHOICES = ("none", *MIXES.names())
ClipNorm = Annotated[float, Range(gt=0, le=1e6)]
STAGE_AUGMENT: dict[str, Any] = {
    **COMMON_DATASET_KEYS["augment"],  # crop_pad, flip
    "mix": Literal[MIX_CHOICES],
    "mix_alpha": MixAlpha,
}
RUN: dict[str, Any] = {
    "T": Temperature,
    "alpha": Fraction,
    "seed": Seed,
    "device": str,  # its form (auto | cpu | cuda | cuda:N | mps) is checked in validate
    "amp": Literal[AMP_CHOICES],
    "channels_last": Switch,
    "compile": bool,
    "deterministic": bool,
    "baseline": bool,
    **{f"train.{stage}.epochs": Epochs for stage in ("teacher", "student")},
    **{f"train.{stage}.batch_size": Size for stage in ("teacher", "student")},
    **{f"train.{stage}.lr": LearningRate for stage in ("teacher", "student")},
    **{f"train.{stage}.max_samples": PositiveInt | None for stage in ("teacher", "student")},
    **{f"train.{stage}.augment.{k}": v for stage in ("teacher", "student") for k, v in STAGE_AUGMENT.items()},
    **{f"train.{stage}.clip_grad_norm": ClipNorm | None for stage in ("teacher", "student")},
    "train.eval_batch_size": Size,
    "train.max_nonfinite_steps": NonNegativeInt,
    "train.teacher_logits": Literal["auto", "online"],
    "train.progress": Switch,
    "report.enabled": bool,
    "report.ece_bins": Annotated[int, Range(ge=1, le=1000)],
    "report.latency_repeats": Annotated[int, Range(ge=1, le=100_000)],  # measurements at batch 1 (at least 4)
    "report.min_run_time": Annotated[float, Range(gt=0, le=3600)],  # seconds timed per model and batch size
    "report.timing_threads": Annotated[int, Range(ge=1, le=4096)] | None,
    "report.warmup": Annotated[int, Range(ge=0, le=100_000)],
    "report.throughput_batch": Annotated[int, Range(ge=1, le=65_536)],
    "export": list[Format] | Format,
    "cache.enabled": bool,
    "cache.dir": Annotated[str, NonEmpty()],
    "teacher.checkpoint": Annotated[str, NonEmpty()] | None,
    "teacher.checkpoint_format": CheckpointFormat,
    "sched.warmup_epochs": WarmupEpochs,
    "search.storage": Annotated[str, NonEmpty()] | None,
    "search.study": Annotated[str, NonEmpty()] | None,
    "search.trial": NonNegativeInt | None,
}
GROUP_ROOTS = ("dataset", "teacher", "student", "loss", "optim", "sched", "augment")


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a plain config (lists are leaves)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def hint_of(cfg: dict[Any, Any], key: str) -> Any:
    """The declared type of ``key`` in the plain, resolved config ``cfg``; a ``KdrunError`` for a key that nothing
    declares (a key the chosen option does not use)."""
    if key in RUN:
        return RUN[key]
    root, _, rest = key.partition(".")
    if root not in GROUP_ROOTS or not rest:
        raise KdrunError(f"{key} is not a kdrun setting")
    node = cfg.get(root)
    if root in ("teacher", "student"):
        return _model_hint(node, key, rest)
    if not isinstance(node, dict) or "_target_" in node:
        return Any
    options = group_options(root, node)
    first = rest.split(".")[0]
    if first not in options:
        name = node.get("name")
        raise KdrunError(
            f"{key} is not an option of {root}={name}; its options are: "
            + (", ".join(sorted(o for o in options if o != "name")) or "none")
        )
    hint = options[first]
    return hint if first == rest else _nested(hint, rest)


def group_options(root: str, node: dict[str, Any]) -> dict[str, Any]:
    """The keys (and their types) that the option ``node`` of the group ``root`` takes."""
    name = str(node.get("name"))
    builder: Callable[..., Any] | None = {
        "dataset": DATASETS,
        "loss": LOSSES,
        "optim": OPTIMIZERS,
        "sched": SCHEDULES,
        "augment": MIXES,
    }[root].get_or_none(name)
    taken = parameter_hints(builder) if builder is not None else {}
    supplied = {"loss": ("T", "alpha"), "optim": ("params", "lr"), "sched": ("total_steps",)}.get(root, ())
    for given in supplied:  # kdrun passes these, not the option
        taken.pop(given, None)
    extra = {
        "dataset": COMMON_DATASET_KEYS,
        "optim": {"lr": LearningRate},  # the default of train.<stage>.lr
        "sched": {"warmup_epochs": WarmupEpochs},
    }.get(root, {})
    return {"name": str, **taken, **extra}


def _model_hint(node: Any, key: str, rest: str) -> Any:
    if rest in ("checkpoint", "checkpoint_format"):
        return RUN[f"teacher.{rest}"] if key.startswith("teacher.") else _refuse(key, "a teacher setting only")
    if not isinstance(node, dict) or "_target_" in node:
        return Any
    name = str(node.get("name"))
    builder = MODELS.get_or_none(name) or build_torchvision
    options = {"name": str, **parameter_hints(builder)}
    for size in ("num_classes", "in_channels", "image_size"):  # from the dataset
        options.pop(size, None)
    first = rest.split(".")[0]
    if first not in options:
        raise KdrunError(f"{key} is not an option of {name}; its options are: {', '.join(sorted(options))}")
    return options[first] if first == rest else Any  # nested (ensemble members) are checked as models themselves


def _nested(hint: Any, rest: str) -> Any:
    """The type of ``a.b`` inside an option whose type is a TypedDict-like mapping of hints (``augment`` of a
    dataset); ``Any`` for other nested values."""
    _, _, inner = rest.partition(".")
    return hint.get(inner, Any) if isinstance(hint, dict) else Any


def _refuse(key: str, why: str) -> Any:
    raise KdrunError(f"{key} is invalid: {why}")
