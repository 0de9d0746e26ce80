"""A run that is one trial of an Optuna search: the distilled student reports its validation accuracy after every
epoch to that trial, and the study's pruner may stop it early.

The ``kdrun_optuna`` sweeper (``kdrun.cli.search``) gives each job the trial's identity as config keys
(``search.storage``, ``search.study``, ``search.trial``: the trial's number); the job opens the trial from that storage,
so it works in any process the launcher picks. The pruner's settings live with the study (a study user attribute the
sweeper writes), the pruning decision is the job's, and the sweeper tells the trial's final state after the job.
Optuna is imported only here and in the sweeper: kdrun runs without it outside a search.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.registry import to_dict
from kdrun.training.loop import EpochHook

log = logging.getLogger(__name__)

PRUNER_ATTR = "kdrun.pruner"  # study user attribute: the pruner's config (a ``_target_`` node), or None
PRUNED_ATTR = "kdrun.pruned_epoch"  # trial user attribute, set by the job that its pruner stopped
RUN_DIR_ATTR = "kdrun.run_dir"  # trial user attribute: the job's run dir


def storage_url(storage: str) -> str:
    """``storage`` with its file made absolute (a job may run in another folder), and the file's folder created:
    an RDB URL (``sqlite:///outputs/optuna/kd.db``, ``postgresql://...``) or the path of a journal file."""
    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///")).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def open_storage(storage: str) -> Any:
    """The Optuna storage named by ``storage``: an RDB URL, or a journal file (``JournalStorage``, safe for
    processes on one machine or on a shared filesystem) for a plain path."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    url = storage_url(storage)
    if "://" in url:
        return RDBStorage(url)
    return JournalStorage(JournalFileBackend(url))


def trial_hook(search: DictConfig | None, run_dir: Path) -> EpochHook | None:
    """The distilled student's epoch-end hook of a run that is a search trial (``search.trial`` set), else None.

    Rank 0 reports and asks the pruner; every rank gets its decision, so a distributed run stops as one.
    """
    if search is None or search.get("trial") is None:
        return None
    reporter = open_trial(search, run_dir) if distributed.is_main() else None

    def end_of_epoch(epoch: int, row: dict[str, float]) -> bool:
        stop = reporter(epoch, row) if reporter is not None else False
        return bool(distributed.broadcast(stop))

    return end_of_epoch


def open_trial(search: DictConfig, run_dir: Path) -> EpochHook | None:
    """The trial ``search.trial`` of the study ``search.study`` in ``search.storage``, as a reporter of each epoch's
    validation accuracy that returns whether the study's pruner stops the trial. None for a finished trial (a run of
    it resumed after its sweep told its result): it reports nowhere."""
    import optuna

    storage = open_storage(str(search.storage))
    try:
        study = optuna.load_study(study_name=str(search.study), storage=storage)
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), int(search.trial)
        )
    except KeyError as e:
        raise KdrunError(
            f"search.trial={search.trial} is not a trial of study search.study={search.study} in "
            f"search.storage={search.storage} (these keys are set by the kdrun_optuna sweeper)"
        ) from e
    if storage.get_trial(trial_id).state.is_finished():
        log.warning("trial %s of study %s is finished already: this run reports nothing to it", search.trial, study)
        return None
    trial = optuna.trial.Trial(study, trial_id)
    trial.set_user_attr(RUN_DIR_ATTR, os.path.abspath(run_dir))
    pruner_cfg = study.user_attrs.get(PRUNER_ATTR)
    if pruner_cfg:
        study.pruner = instantiate(pruner_cfg)
    return _Reporter(trial, prunes=bool(pruner_cfg))


class _Reporter:
    """Reports the student's validation accuracy at step ``epoch``; on a pruner's word, marks the trial."""

    def __init__(self, trial: Any, prunes: bool):
        self.trial, self.prunes = trial, prunes

    def __call__(self, epoch: int, row: dict[str, float]) -> bool:
        acc = float(row["val/acc"])
        self.trial.report(acc, step=epoch)
        if not (self.prunes and self.trial.should_prune()):
            return False
        self.trial.set_user_attr(PRUNED_ATTR, epoch)
        log.info("Optuna trial %d pruned after epoch %d (val acc %.4f)", self.trial.number, epoch, acc)
        return True


def pruner_config(pruner: Any) -> dict[str, Any] | None:
    """The pruner's ``_target_`` node as a plain dict (stored with the study), or None: no pruning."""
    if pruner is None:
        return None
    cfg = to_dict(pruner)
    if "_target_" not in cfg:
        raise KdrunError(f"hydra.sweeper.pruner={cfg!r} needs a _target_, e.g. optuna.pruners.MedianPruner, or null")
    instantiate(cfg)  # a wrong class or setting fails now, not in every job
    return cfg
