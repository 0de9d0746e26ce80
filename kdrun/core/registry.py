"""Name -> builder registries, with Hydra ``_target_`` as the escape hatch for user code."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.schema import check, parameter_hints


class Registry:
    """Maps option names to builders: ``@REG.register("name")`` adds one, ``REG.build(cfg)`` calls it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get_or_none(self, name: str) -> Callable[..., Any] | None:
        return self._builders.get(name)

    def get(self, name: str, key: str | None = None) -> Callable[..., Any]:
        if name not in self._builders:
            raise KdrunError(
                f"{key or self.kind}={name!r} is not a known {self.kind}; choose one of: {', '.join(self.names())}"
            )
        return self._builders[name]

    def build(self, cfg: Mapping | DictConfig, key: str | None = None, **extra: Any) -> Any:
        """Build from a config node: ``name`` picks a registered builder, ``_target_`` any importable callable.

        The remaining keys of the node and ``extra`` become keyword arguments.
        """
        kwargs = to_dict(cfg)
        if "_target_" in kwargs:
            kwargs.pop("name", None)
            return instantiate(kwargs, **extra)
        name = kwargs.pop("name", None)
        if name is None:
            raise KdrunError(f"{key or self.kind} needs a 'name' (one of: {', '.join(self.names())}) or a '_target_'")
        builder = self.get(name, f"{key}.name" if key else None)
        hints = {n: h for n, h in parameter_hints(builder).items() if n not in extra}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
        for option, value in kwargs.items():
            if option not in hints and not open_ended:
                raise KdrunError(
                    f"{key or self.kind}.{option} is not an option of {name}; "
                    f"its options are: {', '.join(hints) or 'none'}"
                )
            check(f"{key or self.kind}.{option}", value, hints.get(option, Any))
        return builder(**kwargs, **extra)


def to_dict(cfg: Mapping | DictConfig | None) -> dict[str, Any]:
    """A plain, resolved dict of a config node (``{}`` for None)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
