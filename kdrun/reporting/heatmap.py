"""Accuracy over a sweep's T x alpha plane: a heatmap of the grid, or a scatter plot of a continuous search."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from kdrun.core.io import atomic_write

Point = tuple[float, float]  # (T, alpha)
MAX_GRID = 12  # more distinct values than this on either axis: a scatter plot instead of a heatmap
CMAP = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
MISSING = "grey"


def plot_kind(values: Mapping[Point, float | None]) -> str:
    """``heatmap`` for a grid, ``scatter`` when T or alpha takes more than MAX_GRID values (e.g. an Optuna search)."""
    n_T, n_alpha = (len({point[i] for point in values}) for i in (0, 1))
    return "scatter" if max(n_T, n_alpha) > MAX_GRID else "heatmap"


def centred_norm(values: Iterable[float], center: float) -> TwoSlopeNorm:
    """A colour scale with ``center`` in the middle, widened symmetrically so that vmin < center < vmax."""
    half = max([abs(v - center) for v in values] + [0.001])
    return TwoSlopeNorm(vcenter=center, vmin=center - half, vmax=center + half)


def plot_grid(
    values: Mapping[Point, float | None],
    failed: Collection[Point],
    center: float,
    title: str,
    path: Path,
    label: str = "accuracy",
) -> Path:
    """Plot the accuracy of each (T, alpha) point (None: no result; in ``failed``: its jobs failed) into a PNG.

    Colours diverge from ``center`` (the baseline's accuracy); the file is replaced atomically.
    """
    norm = centred_norm([v for v in values.values() if v is not None], center)
    if plot_kind(values) == "scatter":
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.add_subplot()
        _scatter(ax, values, failed, norm)
    else:
        Ts, alphas = sorted({t for t, _ in values}), sorted({a for _, a in values})
        fig = Figure(figsize=(2 + 1.1 * len(Ts), 1.6 + 0.7 * len(alphas)), layout="constrained")
        ax = fig.add_subplot()
        _heatmap(ax, values, failed, norm, Ts, alphas)
    ax.set_xlabel("T")
    ax.set_ylabel("alpha")
    ax.set_title(title, fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=ax, format=PercentFormatter(1.0), label=label)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return path


def _heatmap(ax, values, failed, norm, Ts: list[float], alphas: list[float]) -> None:
    grid = np.full((len(alphas), len(Ts)), np.nan)
    for (t, a), value in values.items():
        if value is not None:
            grid[alphas.index(a), Ts.index(t)] = value
    ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, norm=norm, origin="lower", aspect="auto")
    for i, a in enumerate(alphas):
        for j, t in enumerate(Ts):
            value = values.get((t, a))
            if value is None:
                text, color = ("failed" if (t, a) in failed else "—"), "black"
            else:
                text = f"{100 * value:.2f}%\n{100 * (value - norm.vcenter):+.2f}"
                color = "white" if abs(norm(value) - 0.5) > 0.4 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(Ts)), [f"{t:g}" for t in Ts])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])


def _scatter(ax, values, failed, norm) -> None:
    done = [(t, a, v) for (t, a), v in values.items() if v is not None]
    if done:
        T, alpha, acc = zip(*done, strict=True)
        ax.scatter(T, alpha, c=acc, cmap=CMAP, norm=norm, s=60, edgecolors="black", linewidths=0.5)
    for marker, name, points in (
        ("x", "failed", [p for p, v in values.items() if v is None and p in failed]),
        ("o", "no result", [p for p, v in values.items() if v is None and p not in failed]),
    ):
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, s=50, label=name, color=MISSING)
    if len(done) < len(values):
        ax.legend(fontsize=8)
