"""Packaging: the ``optuna`` extra installs into an environment that already has SQLAlchemy 2 without downgrading it.

Until kdrun had its own sweeper the extra pinned ``sqlalchemy<2`` and ``alembic<1.14`` (hydra-optuna-sweeper's last
release needs Optuna 2.x). pip resolves the extra's requirements, as pyproject.toml lists them, against a fresh
virtual environment holding SQLAlchemy 2 (a dry run: nothing is installed); the report must leave it as it is.
Needs a package registry: without one the test is skipped, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

PIP_TIMEOUT = 300


def extra(name: str) -> list[str]:
    """The requirements of the extra ``name`` in pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    """This interpreter's pip working on the environment of ``python`` (which has no pip of its own)."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip took over {PIP_TIMEOUT} s: the package registry is too slow or unreachable")


def test_the_optuna_extra_keeps_sqlalchemy_2(tmp_path):
    requirements = extra("optuna")
    assert not [r for r in requirements if r.lower().startswith(("sqlalchemy", "alembic", "hydra-optuna-sweeper"))]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    have = pip(python, "install", "--quiet", "--no-deps", "sqlalchemy>=2")
    if have.returncode != 0:
        reason = have.stderr.strip()[-300:]
        pytest.skip(f"no package registry reachable: pip could not install sqlalchemy>=2 ({reason})")
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('sqlalchemy'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert int(version.split(".")[0]) >= 2

    report = tmp_path / "report.json"
    resolved = pip(python, "install", "--dry-run", "--quiet", "--report", str(report), *requirements)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    items = json.loads(report.read_text())["install"]
    install = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}
    assert "sqlalchemy" not in install, f"the extra would replace SQLAlchemy {version} by {install.get('sqlalchemy')}"
    assert int(install["optuna"].split(".")[0]) >= 4
    assert "hydra-optuna-sweeper" not in install
