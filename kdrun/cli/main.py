"""The ``kdrun`` command: compose the Hydra config, validate it, run the pipeline, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
import yaml
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import kdrun.conf  # noqa: F401 - registers the teacher/student groups before Hydra lists them (shell completion)
from kdrun.cli.callbacks import take_sweep_failure
from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.signals import Interrupted


@hydra.main(config_path="pkg://kdrun.conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kdrun.config.validate import validate
    from kdrun.pipeline.run import run
    from kdrun.reporting.report import write_failure

    try:
        validate(cfg)
        return run(cfg)
    except Interrupted as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # stop the whole sweep, not just this job
            raise Interrupted(f"{e}; re-run the sweep with hydra.sweep.dir=<its dir> to resume it", e.signum) from None
        _fail(Interrupted(f"{e}; resume with: kdrun resume={HydraConfig.get().runtime.output_dir}", e.signum))
    except Exception as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # One failed job must not stop the sweep: record it for the summary, which lists it and makes
            # the sweep exit non-zero; the objective of a failed job is NaN (Optuna marks the trial failed).
            logging.getLogger("kdrun").exception("this job failed: %s", _one_line(e))
            write_failure(HydraConfig.get().runtime.output_dir, _one_line(e), e)
            return float("nan")
        if isinstance(e, KdrunError):
            _fail(e)
        raise


def _fail(e: BaseException) -> NoReturn:
    print(f"kdrun: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))


def _one_line(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option!r} is not a known option; choose one of: {', '.join(sorted(e.options))}"
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


def expand_resume(argv: list[str]) -> list[str]:
    """``resume=<run dir>`` -> the overrides that run was started with, and ``hydra.run.dir=<run dir>``."""
    asked = [a for a in argv if a.startswith("resume=")]
    if not asked:
        return argv
    if len(argv) != 1:
        raise KdrunError(
            "resume=<run dir> takes no other arguments: the run continues with the settings it was started with"
        )
    run_dir = Path(asked[0].partition("=")[2]).expanduser().resolve()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise KdrunError(f"resume={run_dir} is not a kdrun run dir: it has no .hydra/overrides.yaml")
    overrides = [str(o) for o in OmegaConf.load(saved) if not str(o).startswith("hydra.run.dir=")]
    return [*overrides, f"hydra.run.dir={run_dir}"]


def register_plugins() -> None:
    """Register kdrun's Hydra plugin (the kdrun_optuna sweeper) with Hydra.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package, which an editable install (PEP 660, as
    ``pip install -e .`` makes) hides from the listing while the module stays importable; registering it here works
    for every kind of install (registering a plugin Hydra found already changes nothing).
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.kdrun_optuna_sweeper.kdrun_optuna_sweeper import KdrunOptunaSweeper

    Plugins.instance().register(KdrunOptunaSweeper)


def main() -> None:
    """Console entry point. Errors in the user's input become one line on stderr and exit code 2."""
    full_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's errors reach us instead of printing them itself
    try:
        sys.argv[1:] = expand_resume(sys.argv[1:])
        register_plugins()
        if distributed.init_from_env().world > 1:  # started by torchrun: one run, several processes
            sys.argv[1:] = distributed.hydra_overrides(sys.argv[1:])
        hydra_main()
    except (KdrunError, HydraException, OmegaConfBaseException) as e:
        if full_traceback:
            raise
        _fail(e)
    except OSError as e:  # e.g. Hydra creating a run dir where a file is, or without permission
        if full_traceback or not e.filename:
            raise
        _fail(KdrunError(f"cannot use {e.filename}: {e.strerror}"))
    except yaml.MarkedYAMLError as e:  # a config file (--config-dir) that is not valid YAML
        if full_traceback:
            raise
        mark = e.problem_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
        _fail(KdrunError(f"{where} is not valid YAML: {e.problem or e.context}"))
    finally:
        distributed.shutdown()
    failure = take_sweep_failure()
    if failure is not None:
        _fail(failure)


if __name__ == "__main__":
    main()
