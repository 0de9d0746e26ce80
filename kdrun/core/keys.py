"""One table of what each config key is for: what identifies a cached artefact, what must match to resume a
run, and what names a multirun job's folder. Every place that needs to know reads it from here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdrun.core.registry import to_dict


@dataclass(frozen=True)
class Role:
    """The parts a key plays; a key missing from ``ROLES`` plays all three."""

    identifies: bool = True  # part of the identity of the data (and so of a cached model or logits)
    resumes: bool = True  # a resumed run must have the same value
    names_run: bool = True  # shown in a multirun job's folder name (hydra.job.override_dirname)


WHERE = Role(identifies=False, resumes=False, names_run=False)  # where things live, how progress shows
RECIPE = Role(identifies=False)  # a default of the train.<stage> recipes, which carry it into each stage's identity

ROLES: dict[str, Role] = {
    "dataset.root": WHERE,  # except for datasets whose root *is* the data (``ROOT_IS_THE_DATA``)
    "dataset.download": WHERE,
    "dataset.num_workers": WHERE,
    "cache.dir": WHERE,
    "train.progress": WHERE,
    "dataset.epochs": RECIPE,
    "dataset.batch_size": RECIPE,
    "dataset.student_max_samples": RECIPE,
    "dataset.augment": RECIPE,  # the teacher's augmentation identifies the teacher only, not the data
    "device": Role(identifies=False, names_run=False),
    # Which kernels compute the same training, not what is trained (as the device): a model trained without it is
    # as good a teacher; the artefact cache shares models across it (a deterministic run reusing one stays so).
    "deterministic": Role(identifies=False),
    "teacher.checkpoint": Role(identifies=False, names_run=False),  # identified by the file's hash instead
    "teacher.checkpoint_format": Role(identifies=False, names_run=False),  # how the hashed file is read
    "cache": Role(names_run=False),
    "hparams_search": Role(names_run=False),
    # An Optuna trial's identity, set per job by the kdrun_optuna sweeper: where the job reports, not what it trains
    # (the sweeper names the job's folder after the trial number itself).
    "search.storage": WHERE,
    "search.study": WHERE,
    "search.trial": WHERE,
}
ROOT_IS_THE_DATA = {"imagefolder"}
# How kdrun.data estimates a folder dataset's normalisation; models trained under another estimate are other models.
FOLDER_STATS = "seeded-sample-512"

# What makes two runs' stage models the same model, in the metrics of a stage, in this order.
MODEL_IDENTITY_KEYS = ("cache_key", "checkpoint_sha256", "ensemble_key")


def role(key: str) -> Role:
    return ROLES.get(key, Role())


def run_name_excluded() -> list[str]:
    """The keys left out of a multirun job's folder name (Hydra's ``override_dirname.exclude_keys``)."""
    return [k for k, r in ROLES.items() if not r.names_run]


def not_resumed() -> list[str]:
    """The keys that may change between a run and its resumption."""
    return [k for k, r in ROLES.items() if not r.resumes]


def dataset_identity(cfg: Any) -> dict[str, Any]:
    """The dataset config reduced to what determines the images and splits a model is trained and tested on."""
    options = to_dict(cfg)
    identity = {k: v for k, v in options.items() if role(f"dataset.{k}").identifies}
    if options.get("name") in ROOT_IS_THE_DATA and options.get("root"):
        identity["root"] = os.path.abspath(os.path.expanduser(str(options["root"])))
    if options.get("name") in ROOT_IS_THE_DATA:
        identity["stats"] = FOLDER_STATS
    return identity


def model_identity(metrics: Mapping[str, Any], prefix: str = "") -> str | None:
    """What makes two runs' stage models the same: the cache key, the checkpoint's hash or the ensemble's key
    (``prefix`` for flattened metrics, e.g. ``"teacher."``); None for a model trained outside the cache."""
    return next((metrics[prefix + k] for k in MODEL_IDENTITY_KEYS if metrics.get(prefix + k)), None)


def pick(key: Any, table: Any, default: Any) -> Any:
    """``table[key]`` where ``key`` is a string that ``table`` (a mapping) holds, else ``default``; never raises."""
    if isinstance(key, str) and isinstance(table, Mapping) and key in table:
        return table[key]
    return default


def register_resolvers() -> None:
    """The YAML's resolvers (idempotent): ``${kdrun_keys:run_name_excluded}`` reads this table, and
    ``${kdrun_pick:<key>,{<key>: <value>, ...},<default>}`` looks a value up by name (e.g. a learning rate by model,
    conf/experiment/cifar100.yaml)."""
    from omegaconf import OmegaConf

    tables = {"run_name_excluded": run_name_excluded, "not_resumed": not_resumed}
    if not OmegaConf.has_resolver("kdrun_keys"):
        OmegaConf.register_new_resolver("kdrun_keys", lambda name: tables[name]())
    if not OmegaConf.has_resolver("kdrun_pick"):
        OmegaConf.register_new_resolver("kdrun_pick", pick)
