"""The runtime's process-wide settings, checked in fresh processes: the allocator, and ``deterministic=true``."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import BRIEF_TIMING, read_metrics, run_kdrun, without_timings


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_cpu_runs_keep_freed_memory_for_reuse():
    """After kdrun's allocator setting, freeing and reallocating tensors of many sizes costs no page faults.

    Run in a fresh process: the setting is process-wide. Without it (or with a trim threshold that wraps to 0,
    an earlier bug) every round faults thousands of pages back in.
    """
    churn = textwrap.dedent(
        """
        import resource, torch
        from kdrun.training.runtime import keep_freed_memory
        assert keep_freed_memory()
        def churn():
            for mb in (1, 3, 6, 12, 24, 48):
                a = torch.ones(mb << 18); b = torch.ones(mb << 17); del a; c = torch.ones(mb << 16); del b, c
        churn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            churn()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", churn], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 100  # measured 0; 120 000+ without the setting


def test_deterministic_true_runs_give_identical_numbers(tmp_path):
    args = ["cache=off", "deterministic=true", "train.teacher.epochs=2", "train.student.epochs=2"]
    args += ["train.progress=false", "report.latency_repeats=2", *BRIEF_TIMING]
    runs = []
    for name in ("a", "b"):
        result = run_kdrun([f"hydra.run.dir={tmp_path / name}", *args], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(read_metrics(tmp_path / name))
    assert runs[0]["config"]["deterministic"] is True
    assert without_timings(runs[0]) == without_timings(runs[1])  # every number but the wall-clock ones
