"""kdrun's Optuna sweeper in-process: the search space, the settings, the configs, the trial a job opens from storage
and reports to, the pruner's stop through the loop's epoch-end hook, and how job outcomes become trial states."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.cli.main import register_plugins
from kdrun.cli.search import Settings, open_study, quoted, search_space, tell, trial_overrides
from kdrun.config.validate import validate
from kdrun.core.errors import KdrunError
from kdrun.core.keys import not_resumed, run_name_excluded
from kdrun.data import build_data
from kdrun.losses import CrossEntropy
from kdrun.models import build_model
from kdrun.pipeline.stages import artefact_fields
from kdrun.pipeline.trial import PRUNED_ATTR, RUN_DIR_ATTR, open_storage, trial_hook
from kdrun.reporting.report import assemble, summary_table
from kdrun.training.loop import Stage, fit
from kdrun.training.runtime import resolve_runtime
from kdrun.training.teacher import TeacherSource

optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed: pip install -e '.[optuna]'")
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

SWEEPER = "hydra_plugins.kdrun_optuna_sweeper.kdrun_optuna_sweeper.KdrunOptunaSweeper"
PRUNERS = Path(__file__).resolve().parents[2] / "conf" / "hydra" / "sweeper" / "pruner"


def composed(*overrides: str, hydra: bool = True):
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def settings(tmp_path: Path, **changes) -> Settings:
    given = {"study_name": "s", "storage": f"sqlite:///{tmp_path / 'studies' / 'kd.db'}", "n_trials": 2, **changes}
    return Settings.of(given)


def test_search_space_reads_hydra_sweeps_as_optuna_distributions():
    space, fixed = search_space(
        [
            "T=interval(1.0, 10.0)",
            "lr=tag(log, interval(0.001, 0.1))",
            "epochs=range(2, 9)",
            "width=range(16, 80, 16)",  # Python's range: 16, 32, 48, 64
            "alpha=range(0.0, 1.0, 0.25)",
            "loss=choice(kd, dkd)",
            "seed=shuffle(range(3))",
            "teacher=shuffle(resnet20, lenet5)",
            "train.progress=false",
        ]
    )
    assert space == {
        "T": FloatDistribution(1.0, 10.0),
        "lr": FloatDistribution(0.001, 0.1, log=True),
        "epochs": IntDistribution(2, 8),
        "width": IntDistribution(16, 64, step=16),
        "alpha": FloatDistribution(0.0, 0.75, step=0.25),
        "loss": CategoricalDistribution(["kd", "dkd"]),
        "seed": CategoricalDistribution([0, 1, 2]),
        "teacher": CategoricalDistribution(["resnet20", "lenet5"]),
    }
    assert fixed == ["train.progress=false"]


def test_the_command_line_overrides_the_search_params():
    params = ["T=interval(1.0, 10.0)", "alpha=interval(0.0, 1.0)"]
    space, fixed = search_space([*params, "T=2.5", "alpha=interval(0.0, 0.5)", "hparams_search=optuna_T_alpha"])
    assert space == {"alpha": FloatDistribution(0.0, 0.5)}
    assert fixed == ["T=2.5", "hparams_search=optuna_T_alpha"]


@pytest.mark.parametrize(
    "line", ["T=interval(10.0, 1.0)", "width=range(5, 5)", "T=tag(log, interval(0.0, 1.0))", "loss=glob(*)"]
)
def test_an_invalid_search_space_is_one_line_naming_the_key(line):
    with pytest.raises(KdrunError, match=rf"hydra.sweeper.params: {line.split('=')[0]}=") as e:
        search_space([line])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["sqlite:////tmp/a b/kd.db", "/tmp/it's,here=\\x\\", "plain"])
def test_quoted_override_values_parse_back_to_themselves(text):
    (override,) = OverridesParser.create().parse_overrides([f"search.storage={quoted(text)}"])
    assert override.value() == text


def test_settings_refuse_unknown_and_bad_values_in_one_line(tmp_path):
    with pytest.raises(KdrunError, match=r"hydra.sweeper.n_trial is not a setting of kdrun_optuna"):
        settings(tmp_path, n_trial=3)
    with pytest.raises(KdrunError, match=r"hydra.sweeper.direction='up' is invalid; choose one of: maximize"):
        settings(tmp_path, direction="up")
    with pytest.raises(KdrunError, match=r"hydra.sweeper.n_jobs=0 is invalid"):
        settings(tmp_path, n_jobs=0)
    with pytest.raises(KdrunError, match=r"hydra.sweeper.pruner=.* needs a _target_"):
        settings(tmp_path, pruner={"n_warmup_steps": 3})
    assert settings(tmp_path, n_jobs=-1).n_jobs >= 1  # as joblib: every CPU


def test_the_search_config_selects_kdruns_sweeper_with_a_median_pruner():
    sweeper = composed("hparams_search=optuna_T_alpha").hydra.sweeper
    assert sweeper._target_ == SWEEPER
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert dict(sweeper.params) == {"T": "interval(1.0, 10.0)", "alpha": "interval(0.0, 1.0)"}
    assert (
        composed(
            "hparams_search=optuna_T_alpha", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
        ).hydra.sweeper.n_jobs
        == 2
    )
    assert composed("hydra/sweeper=kdrun_optuna").hydra.sweeper.n_jobs == 1


@pytest.mark.parametrize("option", sorted(p.stem for p in PRUNERS.glob("*.yaml")))
def test_each_pruner_option_builds_an_optuna_pruner(option, tmp_path):
    sweeper = composed("hparams_search=optuna_T_alpha", f"hydra/sweeper/pruner={option}").hydra.sweeper
    given = {k: v for k, v in OmegaConf.to_container(sweeper, resolve=True).items() if not k.startswith("_")}
    built = Settings.of({**given, "storage": str(tmp_path / "j.log")})  # as Hydra's instantiate hands them over
    study = open_study(built)
    assert study.user_attrs["kdrun.pruner"] == built.pruner
    assert isinstance(instantiate(built.pruner), optuna.pruners.BasePruner)


def test_kdrun_registers_its_sweeper_so_hydra_instantiates_it(tmp_path):
    register_plugins()
    assert SWEEPER in Plugins.instance().class_name_to_class
    sweeper_cfg = composed("hparams_search=optuna_T_alpha", f"hydra.sweeper.storage={tmp_path / 'j.log'}").hydra.sweeper
    sweeper = Plugins.instance()._instantiate(sweeper_cfg)
    assert type(sweeper).__name__ == "KdrunOptunaSweeper"
    assert sweeper.search.settings.sampler == {
        "_target_": "optuna.samplers.TPESampler",
        "seed": 0,
        "n_startup_trials": 8,
    }


def search_cfg(storage: str, study: str, trial: int):
    return OmegaConf.create({"storage": storage, "study": study, "trial": trial})


@pytest.mark.parametrize("kind", ["sqlite", "journal file"])
def test_a_trial_job_reports_every_epoch_and_stops_when_its_pruner_says(tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'kd.db'}" if kind == "sqlite" else str(tmp_path / "studies" / "kd.log")
    pruner = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5, "n_warmup_steps": 2}
    study = open_study(settings(tmp_path, storage=storage, pruner=pruner))
    trial = study.ask({"T": FloatDistribution(1, 10)})
    hook = trial_hook(search_cfg(storage, study.study_name, trial.number), tmp_path / "run")
    assert hook is not None
    assert hook(1, {"val/acc": 0.1}) is False  # warm-up: not judged
    assert hook(2, {"val/acc": 0.6}) is False
    assert hook(3, {"val/acc": 0.4}) is True
    (stored,) = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials()
    assert stored.intermediate_values == {1: 0.1, 2: 0.6, 3: 0.4}
    assert stored.user_attrs[PRUNED_ATTR] == 3 and stored.user_attrs[RUN_DIR_ATTR] == str(tmp_path / "run")
    assert stored.state == TrialState.RUNNING  # the sweeper tells it, after the job


def test_a_finished_or_unknown_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'kd.db'}"
    study = open_study(settings(tmp_path, storage=storage))
    trial = study.ask({"T": FloatDistribution(1, 10)})
    study.tell(trial, 0.9)
    assert trial_hook(search_cfg(storage, "s", trial.number), tmp_path)(1, {"val/acc": 0.5}) is False  # reports nowhere
    assert study.trials[0].intermediate_values == {}
    with pytest.raises(KdrunError, match=r"search.trial=7 is not a trial of study search.study=s"):
        trial_hook(search_cfg(storage, "s", 7), tmp_path)
    assert trial_hook(OmegaConf.create({"storage": None, "study": None, "trial": None}), tmp_path) is None


def test_job_outcomes_become_trial_states(tmp_path):
    study = open_study(settings(tmp_path))
    trials = [study.ask({"T": FloatDistribution(1, 10)}) for _ in range(4)]
    trials[2].set_user_attr(PRUNED_ATTR, 2)
    outcomes = [
        JobReturn(status=JobStatus.COMPLETED, _return_value=0.93),
        JobReturn(status=JobStatus.COMPLETED, _return_value=math.nan),  # kdrun's failed job
        JobReturn(status=JobStatus.COMPLETED, _return_value=0.41),
        JobReturn(status=JobStatus.FAILED, _return_value=KeyboardInterrupt()),
    ]
    for trial, ret in zip(trials, outcomes, strict=True):
        tell(study, trial, ret)
    states = [(t.state, t.value) for t in study.trials]
    assert states == [
        (TrialState.COMPLETE, 0.93),
        (TrialState.FAIL, None),
        (TrialState.PRUNED, None),
        (TrialState.FAIL, None),
    ]


def test_each_trial_gets_its_own_folder_and_identity(tmp_path):
    study = open_study(settings(tmp_path))
    trial = study.ask({"T": FloatDistribution(1, 10), "loss": CategoricalDistribution(["kd", "dkd"])})
    overrides = trial_overrides(trial, ["hparams_search=optuna_T_alpha"], "sqlite:////x/kd.db", "s")
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["T"] == pytest.approx(trial.params["T"]) and parsed["loss"] == trial.params["loss"]
    assert parsed["search.trial"] == trial.number and parsed["search.storage"] == "sqlite:////x/kd.db"
    assert parsed["hydra.sweep.subdir"] == f"trial_{trial.number},${{hydra.job.override_dirname}}"


def test_a_resumed_seeded_search_draws_new_points_reproducibly(tmp_path):
    space = {"T": FloatDistribution(1, 10)}
    sampler = {"_target_": "optuna.samplers.TPESampler", "seed": 0}

    def first_then_resumed(folder: Path) -> tuple[list[float], float]:
        first = open_study(settings(folder, sampler=sampler))
        drawn = [first.ask(space) for _ in range(2)]
        for trial in drawn:
            first.tell(trial, 0.5)
        resumed = open_study(settings(folder, sampler=sampler)).ask(space)  # the same command again
        return [t.params["T"] for t in drawn], resumed.params["T"]

    drawn, resumed = first_then_resumed(tmp_path / "a")
    assert resumed not in drawn  # its sampler is seeded with 0 + 2 trials, not 0 again
    assert first_then_resumed(tmp_path / "b") == (drawn, resumed)


def test_fit_stops_after_the_epoch_its_hook_says():
    data = build_data({"name": "digits", "val_fraction": 0.2})
    seen = []

    def hook(epoch, row):
        seen.append((epoch, row["val/acc"]))
        return epoch == 2

    stage = Stage("student", 5, 64, 0.05, {"name": "sgd"}, {"name": "none"}, seed=0, on_epoch_end=hook)
    model = build_model({"name": "mlp", "hidden": [16]}, data.spec)
    result = fit(stage, model, CrossEntropy(), data, TeacherSource(), resolve_runtime("cpu", "off", False))
    assert result.stopped_epoch == 2 and [row["epoch"] for row in result.history] == [1, 2]
    assert seen == [(row["epoch"], row["val/acc"]) for row in result.history]


def test_search_keys_name_no_folder_and_change_no_cache_key_or_resume_check():
    keys = ("search.storage", "search.study", "search.trial")
    assert set(keys) <= set(run_name_excluded()) and set(keys) <= set(not_resumed())
    plain = composed()
    trial = composed("search.storage=sqlite:////x.db", "search.study=s", "search.trial=3")
    for stage in ("teacher", "baseline"):
        assert artefact_fields(trial, stage, "off") == artefact_fields(plain, stage, "off")


def test_search_keys_come_together_or_not_at_all():
    validate(composed("search.storage=sqlite:////x.db", "search.study=s", "search.trial=3", hydra=False))
    with pytest.raises(KdrunError, match=r"search.storage, search.study not set while the other search keys are"):
        validate(composed("search.trial=3", hydra=False))


def test_a_student_stopped_early_marks_the_run_pruned():
    trained = {"source": "trained", "params": 1, "test_acc": 0.9, "test_acc_best": 0.9, "val_acc_best": 0.91}
    trained.update(epochs=60, train_time_s=1.0)
    metrics = assemble({"test_images": 360}, {"teacher": trained, "student": {**trained, "stopped_epoch": 12}})
    assert metrics["pruned"] is True and metrics["pruned_epoch"] == 12 and metrics["objective"] == 0.91
    assert "after epoch 12 of 60" in summary_table({**metrics, "config": {"teacher": "t", "student": "s"}})
    assert "pruned" not in assemble({}, {"teacher": trained, "student": trained})
