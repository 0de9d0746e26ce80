"""kdrun's Optuna sweeper (``hydra/sweeper=kdrun_optuna``): current Optuna through ask and tell, with pruning.

Hydra instantiates ``hydra_plugins.kdrun_optuna_sweeper.KdrunOptunaSweeper``, which hands everything to
``OptunaSearch`` here. Per batch of ``n_jobs`` trials it asks the study for each trial's values (the search space is
``hydra.sweeper.params`` with the command line's sweep overrides, in Hydra's syntax: ``interval``, ``range``,
``choice``), launches one job per trial through the configured launcher, and tells each trial its outcome: the value
the job returned (the distilled student's best validation accuracy), PRUNED when the job's pruner stopped it (see
``kdrun.pipeline.trial``), FAIL for a failed job. The study is stored, so the same command again adds ``n_trials``.
Checked against Hydra's hydra_optuna_sweeper (plugins/hydra_optuna_sweeper/_impl.py) and Optuna's ask-and-tell
and pruning docs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.registry import to_dict
from kdrun.pipeline.trial import PRUNED_ATTR, PRUNER_ATTR, open_storage, pruner_config, storage_url

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
RESULTS_FILE = "optimization_results.yaml"  # in the sweep dir: the best trial so far and the study's counts


@dataclass(frozen=True)
class Settings:
    """The keys of ``hydra.sweeper`` (conf/hydra/sweeper/kdrun_optuna.yaml documents them)."""

    study_name: str
    storage: str  # an RDB URL (sqlite:///...) or a journal file's path
    n_trials: int  # trials this run adds to the study
    n_jobs: int = 1  # trials launched at once; -1: every CPU, -2: all but one (as joblib reads it)
    direction: str = "maximize"
    sampler: Any = None  # a ``_target_`` node; None: Optuna's default (TPE)
    pruner: Any = None  # a ``_target_`` node; None: no pruning
    params: Any = None  # key -> a sweep in Hydra's syntax

    @classmethod
    def of(cls, given: Mapping[str, Any]) -> Settings:
        """Checked settings from the sweeper's config; a one-line ``KdrunError`` names a bad or unknown key."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise KdrunError(
                f"hydra.sweeper.{unknown[0]} is not a setting of kdrun_optuna; its settings: {', '.join(known)}"
            )
        missing = [k for k in ("study_name", "storage", "n_trials") if given.get(k) is None]
        if missing:
            raise KdrunError(f"hydra.sweeper.{missing[0]} is required but not set")
        settings = cls(**given)
        if settings.direction not in DIRECTIONS:
            raise KdrunError(
                f"hydra.sweeper.direction={settings.direction!r} is invalid; choose one of: {', '.join(DIRECTIONS)}"
            )
        return replace(
            settings,
            study_name=_text("study_name", settings.study_name),
            storage=_text("storage", settings.storage),
            n_trials=_count("n_trials", settings.n_trials, low=0),
            n_jobs=_jobs(settings.n_jobs),
            sampler=to_dict(settings.sampler) or None,
            pruner=pruner_config(settings.pruner),
            params=to_dict(settings.params),
        )


class OptunaSearch:
    """The sweeper: its ``setup`` and ``sweep``."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = Settings.of(settings)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run ``n_trials`` more trials of the study, ``n_jobs`` at a time; write the best one into the sweep dir."""
        assert self.config is not None and self.launcher is not None
        settings = self.settings
        space, fixed = search_space([f"{k}={v}" for k, v in settings.params.items()] + list(arguments))
        if not space:
            raise KdrunError(
                "hydra.sweeper.params has nothing to search: give a key an interval(...), range(...) or choice(...)"
            )
        study = open_study(settings)
        url = storage_url(settings.storage)
        log.info(
            "Optuna study %s in %s: %d trial(s) so far, %d more, %d at a time; sampler %s, pruner %s",
            *(study.study_name, url, len(study.get_trials(deepcopy=False)), settings.n_trials, settings.n_jobs),
            type(study.sampler).__name__,
            (settings.pruner or {}).get("_target_", "none"),
        )
        left = settings.n_trials
        while left > 0:
            trials = [study.ask(space) for _ in range(min(settings.n_jobs, left))]
            overrides = [trial_overrides(trial, fixed, url, study.study_name) for trial in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                tell(study, trial, ret)
            left -= len(trials)
            for ret in returns:  # kdrun's jobs catch their errors; what escapes (an interruption) stops the search
                if ret.status == JobStatus.FAILED:
                    ret.return_value  # noqa: B018 - raises the job's exception
        write_results(study, os.path.join(str(self.config.hydra.sweep.dir), RESULTS_FILE))


def open_study(settings: Settings) -> Any:
    """The study, created or loaded, with this sweep's sampler and its pruner's settings stored for the jobs.

    A seeded sampler of a study that has trials already is seeded with ``seed + trials``: a resumed search does
    not repeat the points of its first run, and the same command on the same study still draws the same.
    """
    import optuna

    name, direction = settings.study_name, settings.direction
    typed_direction: Any = direction
    study = optuna.create_study(
        study_name=name, storage=open_storage(settings.storage), direction=typed_direction, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise KdrunError(
            f"hydra.sweeper.direction={direction}: study {name} in {settings.storage} was created to "
            f"{study.direction.name.lower()}; choose another hydra.sweeper.study_name"
        )
    done = len(study.get_trials(deepcopy=False))
    sampler = dict(settings.sampler or {"_target_": "optuna.samplers.TPESampler"})
    if done and isinstance(sampler.get("seed"), int):
        sampler["seed"] += done
    study.sampler = instantiate(sampler)
    study.set_user_attr(PRUNER_ATTR, settings.pruner)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        log.warning(
            "study %s has %d trial(s) still RUNNING (a search killed earlier, or one running now): %s",
            *(name, len(running), ", ".join(str(t.number) for t in running)),
        )
    return study


def search_space(lines: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The Optuna distribution of each sweep override among ``lines`` and the other lines, which every job gets as
    they are. A later line on the same key wins: the command line over ``hydra.sweeper.params``."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = str(override.input_line)
    return space, list(fixed.values())


def distribution(override: Override) -> Any:
    """``interval(a, b)`` (floats; ``tag(log, interval(a, b))`` on a log scale), ``range(start, stop, step)``
    (Python's: ``stop`` excluded; integers stay integers), ``choice(...)`` and ``shuffle(...)`` (categorical) as
    Optuna's distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    try:
        if isinstance(value, IntervalSweep):
            return FloatDistribution(float(value.start or 0), float(value.end or 0), log="log" in value.tags)
        if isinstance(value, RangeSweep):
            points = sorted(p for p in override.sweep_iterator() if isinstance(p, (int, float)))  # un-shuffled
            if not points:
                raise ValueError("the range is empty")
            if value.shuffle:
                return CategoricalDistribution(points)
            low, high, step = points[0], points[-1], abs(value.step or 1)
            if all(isinstance(p, int) for p in points):
                return IntDistribution(int(low), int(high), step=int(step))
            return FloatDistribution(float(low), float(high), step=float(step))
        if isinstance(value, ChoiceSweep):
            choices: Any = [Transformer.encode(x) for x in value.list]  # in the order given, shuffled or not
            return CategoricalDistribution(choices)
        raise ValueError(f"{type(value).__name__} is not supported: use interval, range or choice")
    except (ValueError, TypeError, HydraException) as e:
        line = override.input_line or key
        raise KdrunError(f"hydra.sweeper.params: {line} is invalid: {str(e).strip().splitlines()[0]}") from e


def trial_overrides(trial: Any, fixed: list[str], storage: str, study: str) -> list[str]:
    """One trial's job: the fixed overrides, the trial's values, its identity (``search.*``) and its folder,
    ``trial_<number>,<the overrides that name a run>``, unique even where two trials drew the same values."""
    values = [f"{key}={_override_value(v)}" for key, v in trial.params.items()]
    identity = [f"search.storage={quoted(storage)}", f"search.study={quoted(study)}", f"search.trial={trial.number}"]
    folder = quoted(f"trial_{trial.number},${{hydra.job.override_dirname}}")
    return [*fixed, *values, *identity, f"hydra.sweep.subdir={folder}"]


def tell(study: Any, trial: Any, ret: JobReturn) -> None:
    """Tell the study how the trial's job ended: COMPLETE with its value, PRUNED, or FAIL (an error, or NaN)."""
    from optuna.trial import TrialState

    stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    value = ret.return_value if ret.status == JobStatus.COMPLETED else None
    if PRUNED_ATTR in stored.user_attrs:
        study.tell(trial, state=TrialState.PRUNED)
    elif isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(trial, float(value))
    else:
        log.warning("trial %d failed (its job returned %r): see its failure.json", trial.number, value)
        study.tell(trial, state=TrialState.FAIL)


def write_results(study: Any, path: str) -> None:
    """``optimization_results.yaml``: the best trial of the study so far, and how many trials ended how."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    results: dict[str, Any] = {"name": "optuna", "study": study.study_name, "trials": counts}
    if counts["complete"]:
        best = study.best_trial
        results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
        log.info("best trial %d: value %.4f, %s", best.number, best.value, best.params)
    else:
        log.warning("no trial of study %s has completed yet: no best trial", study.study_name)
    OmegaConf.save(OmegaConf.create(results), path)


def quoted(text: str) -> str:
    """``text`` as a quoted Hydra override value (backslashes before a quote doubled, quotes escaped)."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def _override_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise KdrunError(f"hydra.sweeper.{key}={value!r} is invalid: must be a non-empty name")
    return value


def _count(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KdrunError(f"hydra.sweeper.{key}={value!r} is invalid: must be an integer >= {low}")
    return value


def _jobs(n_jobs: Any) -> int:
    """Trials launched at once; as joblib reads it, -1 is every CPU, -2 all but one."""
    if isinstance(n_jobs, int) and not isinstance(n_jobs, bool) and n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return _count("n_jobs", n_jobs, low=1)
