"""torchrun's command line for each rank, in-process (the real two-process runs are in tests/e2e)."""

import pytest

from kdrun.core import distributed
from kdrun.core.errors import KdrunError


def test_a_sweep_inside_torchrun_is_refused_and_every_rank_gets_one_run_dir():
    with pytest.raises(KdrunError, match=r"a sweep \(-m\) cannot run inside it"):
        distributed.hydra_overrides(["-m", "T=2,4"])
    overrides = distributed.hydra_overrides(["T=2"])  # rank 0 of a process group of one
    assert overrides[0] == "T=2" and overrides[1].startswith("hydra.run.dir=outputs/") and len(overrides) == 2
    assert distributed.hydra_overrides(["hydra.run.dir=/x"]) == ["hydra.run.dir=/x"]  # the user's own dir stays
