"""The lint rules (complexity and argument counts among them) and the type check, as CI runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "kdrun", "tests", "scripts"], ["ruff", "format", "--check", "kdrun"], ["mypy"]],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_clean(command):
    tool = shutil.which(command[0], path=str(Path(sys.executable).parent)) or shutil.which(command[0])
    if tool is None:
        pytest.fail(f"{command[0]} is not installed: pip install -e '.[test]'")
    result = subprocess.run([tool, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
