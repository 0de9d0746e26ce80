"""Hydra config tree of kdrun (YAML only); a package so that it ships inside the wheel."""
