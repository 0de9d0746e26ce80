"""The Hydra sweeper class, in the ``hydra_plugins`` namespace where Hydra looks for plugins.

Hydra imports every module here at each start, so this one stays small and imports kdrun (and Optuna) only
when the sweeper is used. ``kdrun.cli.main`` also registers the class itself: an editable install (PEP 660) hides
this folder from Hydra's scan of the namespace.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class KdrunOptunaSweeper(Sweeper):
    """An Optuna search (Optuna >= 4, ask and tell) whose trials can be pruned; see ``kdrun.cli.search``."""

    def __init__(self, **settings: Any) -> None:
        from kdrun.cli.search import OptunaSearch

        self.search = OptunaSearch(settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
