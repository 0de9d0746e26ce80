"""Hydra callbacks: the sweep summary at the end of every multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdrun.core.errors import KdrunError

log = logging.getLogger(__name__)


class SweepFailed(KdrunError):
    """Some jobs of a sweep failed; the others finished and the summary lists both."""

    exit_code = 1


# Hydra turns exceptions raised by callbacks into warnings, so the failure is handed to ``kdrun.cli.main.main``
# this way, which exits non-zero with it after Hydra returns.
_failed_sweeps: list[SweepFailed] = []


def take_sweep_failure() -> SweepFailed | None:
    """The failure of the multirun that just ended in this process, if any of its jobs failed."""
    return _failed_sweeps.pop() if _failed_sweeps else None


class SweepSummary(Callback):
    """Write summary.csv, summary.md and the heatmaps into the sweep dir when a multirun ends.

    ``heatmaps=false`` (``hydra.callbacks.sweep_summary.heatmaps``) leaves the heatmaps out: a sweep over other keys
    than T and alpha (experiment=cifar100's pairs and methods) would get a pair of one-cell plots per job.
    """

    def __init__(self, heatmaps: bool = True) -> None:
        self.heatmaps = heatmaps

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = config.hydra.sweeper.get("storage")
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun.reporting.sweep import collect_jobs, write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_summary(sweep_dir, heatmaps=self.heatmaps)
        log.info("sweep summary: %s", ", ".join(str(p) for p in written))
        failed = [job for job in collect_jobs(sweep_dir) if job.status == "failed"]
        if failed:
            first = failed[0]
            _failed_sweeps.append(
                SweepFailed(
                    f"{len(failed)} job(s) of the sweep failed, e.g. {','.join(first.overrides)}: {first.error}; "
                    f"the others finished; see {sweep_dir / 'summary.md'}"
                )
            )
