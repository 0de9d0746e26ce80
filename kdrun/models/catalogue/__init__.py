"""The model catalogue: one YAML per model option, registered as both the ``teacher`` and the ``student`` config
group, so that ``kdrun teacher=resnet18 student=small_cnn`` picks from one set of files."""

from __future__ import annotations

from importlib.resources import files

from omegaconf import OmegaConf

GROUPS = ("teacher", "student")


def names() -> list[str]:
    """The catalogue's option names."""
    return sorted(p.name[:-5] for p in files(__name__).iterdir() if p.name.endswith(".yaml"))


def load(name: str):
    """The option ``name`` as a DictConfig (unresolved: ``${T}`` and the like resolve in the composed config)."""
    return OmegaConf.load(str(files(__name__) / f"{name}.yaml"))


def register() -> None:
    """Store every option in Hydra's ConfigStore under ``teacher/`` and ``student/`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in names():
        node = load(name)
        for group in GROUPS:
            store.store(group=group, name=name, node=node, provider="kdrun")
