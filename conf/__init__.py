"""Hydra config tree of kdrun (YAML only); a package so that it ships inside the wheel.

Importing it (Hydra does, to read config.yaml) registers the model catalogue as the ``teacher`` and ``student``
groups and the ``${kdrun_keys:...}`` resolver."""

from kdrun.core.keys import register_resolvers
from kdrun.models.catalogue import register

register()
register_resolvers()
