"""Every leaf of the composed config, for every group option, against hostile values.

The leaves are enumerated from the composed configs themselves (not a hand list). Each gets NaN, +-inf, a negative
number, zero, a huge number, a wrong type and an empty list, plus values hypothesis draws. For each, validation
either accepts the value and the run's pre-training checks pass with it (a value that is valid), or refuses it with
one ``KdrunError`` line naming the key. Never another exception, and validation writes nothing.
"""

from __future__ import annotations

import math
from functools import cache
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from kdrun.config.validate import validate
from kdrun.core.errors import KdrunError
from kdrun.models import catalogue
from kdrun.pipeline.preflight import preflight
from tests.conftest import SHARED_DATA

HOSTILE = [math.nan, -math.inf, math.inf, -1, 0, 1e30, "abc", []]
CONF = Path(str(files("kdrun.conf")))
QUICK = ["train.progress=false", "cache.enabled=false"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def group_configs() -> list[tuple[str, list[str]]]:
    """The default config and one config per option of every group (each option with the others' defaults)."""
    needs = {
        "imagefolder": ["dataset.root=/nonexistent-but-unchecked"],
        "ensemble": [],
    }
    out = [("default", [])]
    for group in ("dataset", "loss", "optim", "sched", "augment", "cache", "experiment"):
        out += [(f"{group}={o}", [f"{group}={o}", *needs.get(o, [])]) for o in options(group)]
    for role in ("teacher", "student"):
        out += [(f"{role}={m}", [f"{role}={m}"]) for m in catalogue.names() if (role, m) != ("student", "ensemble")]
    return out


@cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=[*overrides, *QUICK])


def leaves(cfg: DictConfig) -> list[str]:
    plain = OmegaConf.to_container(cfg, resolve=False)
    out = []

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out.append(prefix.rstrip("."))

    walk(plain, "")
    return out


def own_leaves(name: str, cfg: DictConfig) -> list[str]:
    """All leaves of the default config; for a group option, the leaves of its group (the rest is the default's)."""
    group = name.partition("=")[0]
    keys = leaves(cfg)
    if name == "default" or group in ("cache", "experiment"):
        return keys
    return [k for k in keys if k.split(".")[0] == group]


# One test per composed config, its leaves looped over inside: composing is the costly part, and parametrizing by
# leaf would compose all of them at collection, in every xdist worker.
CONFIGS = [(name, tuple(o)) for name, o in group_configs()]


def test_the_enumeration_covers_every_leaf_of_every_group_option():
    cases = [key for name, o in CONFIGS for key in own_leaves(name, composed(o))]
    print(f"{len(cases)} leaves in {len(CONFIGS)} composed configs ({len(set(cases))} distinct keys)")
    assert len(CONFIGS) > 40 and len(set(cases)) > 60 and len(cases) > 800


def with_values(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with each dotted key of ``values`` set, in order (one copy: copying is costly)."""
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def judge(cfg: DictConfig, key: str, value, tmp_path: Path) -> str:
    """'refused' (one line naming ``key``) or 'accepted' (and the pre-training checks pass); anything else fails."""
    cfg = with_values(cfg, {"cache.dir": str(tmp_path / "cache"), key: value})  # key=cache.dir: the value wins
    try:
        validate(cfg)
    except KdrunError as e:
        message = str(e)
        assert "\n" not in message, f"{key}={value!r}: the error spans lines: {message!r}"
        named = key in message or key.split(".")[0] in message
        assert named, f"{key}={value!r}: the error names another key: {message}"
        return "refused"
    assert not (tmp_path / "cache").exists() or key == "cache.dir", "validation wrote to the cache"
    if cfg.dataset.name in ("digits", "fake") and cfg.teacher.get("name") != "ensemble":  # cheap to build
        try:
            preflight(cfg)
        except KdrunError as e:
            assert "\n" not in str(e)
            return "refused"
    return "accepted"


@pytest.mark.parametrize(("config", "overrides"), CONFIGS, ids=[c for c, _ in CONFIGS])
def test_hostile_values(config, overrides, tmp_path):
    cfg = composed(overrides)
    keys = own_leaves(config, cfg)
    if cfg.dataset.name == "mnist":  # the root is where the files are: test_a_real_mnist_root_is_accepted
        keys = [k for k in keys if k != "dataset.root"]
    assert keys, f"{config}: no leaf to try"
    for i, key in enumerate(keys):
        outcomes = {}
        for j, value in enumerate(HOSTILE):
            folder = tmp_path / f"{i}-{j}"  # a fresh folder per try, as the cache-writing check needs
            folder.mkdir()
            outcomes[repr(value)] = judge(cfg, key, value, folder)
        assert outcomes[repr(math.nan)] == "refused" or key in NAN_ALLOWED, f"{config}: {key}=nan accepted"


# Keys whose value is a name, a path or free text: NaN is refused by type there as well, so nothing is exempt.
NAN_ALLOWED: set[str] = set()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.deferred(lambda: st.sampled_from(own_leaves("default", composed(())))),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.text(max_size=4),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_drawn_values_on_the_default_config(key, value, tmp_path):
    judge(composed(()), key, value, tmp_path)


def test_a_real_mnist_root_is_accepted(tmp_path):
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST files under {SHARED_DATA}")
    cfg = composed(("dataset=mnist", f"dataset.root={SHARED_DATA}", "dataset.download=false"))
    validate(cfg)


@pytest.mark.parametrize("key", ["T", "dataset.batch_size", "student.channels"])
def test_a_missing_value_is_named_even_where_others_interpolate_it(key):
    value = [16, "???"] if key == "student.channels" else "???"
    with pytest.raises(KdrunError) as e:
        validate(with_values(composed(()), {key: value}))
    named = f"{key}[1]" if key == "student.channels" else key
    assert str(e.value) == f"{named} is required but not set; add {named}=<value> to the command"
