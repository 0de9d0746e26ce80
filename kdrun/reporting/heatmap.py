"""Accuracy over a sweep's T x alpha plane: a heatmap of the grid, or a scatter plot of a continuous search."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import PercentFormatter

from kdrun.core.io import atomic_write

Point = tuple[float, float]  # (T, alpha)
MAX_GRID = 12  # more distinct values than this on either axis: a scatter plot instead of a heatmap
CMAP = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
MISSING = "grey"
HATCH = "///"  # over a cell whose runs include a flagged (collapsed or diverged) student
NOISE = "within noise"  # after a gain whose 95% interval contains 0


@dataclass(frozen=True)
class Marks:
    """What the colours do not say: points whose jobs failed, points with a flagged student (-> its note), points
    whose only jobs a search's pruner stopped early, and points whose KD gain is within noise."""

    failed: Collection[Point] = ()
    flagged: Mapping[Point, str] = field(default_factory=dict)
    pruned: Collection[Point] = ()
    noise: Collection[Point] = ()


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
    marks: Marks,
    center: float,
    title: str,
    path: Path,
    label: str = "accuracy",
) -> Path:
    """Plot ``grid_figure`` into a PNG at ``path``, replaced atomically."""
    fig = grid_figure(values, marks, center, title, label)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return path


def grid_figure(
    values: Mapping[Point, float | None], marks: Marks, center: float, title: str, label: str = "accuracy"
) -> Figure:
    """The accuracy of each (T, alpha) point (None: no result), failed and flagged points marked.

    Colours diverge from ``center`` (the baseline's accuracy); a flagged point is hatched and its note annotated;
    a point whose gain is within noise says so under its gain (heatmap) or gets a grey ring (scatter).
    """
    norm = centred_norm([v for v in values.values() if v is not None], center)
    if plot_kind(values) == "scatter":
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.add_subplot()
        _scatter(ax, values, marks, norm)
    else:
        Ts, alphas = sorted({t for t, _ in values}), sorted({a for _, a in values})
        fig = Figure(figsize=(2 + 1.1 * len(Ts), 1.6 + 0.7 * len(alphas)), layout="constrained")
        ax = fig.add_subplot()
        _heatmap(ax, values, marks, norm, Ts, alphas)
    ax.set_xlabel("T")
    ax.set_ylabel("alpha")
    ax.set_title(title, fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=ax, format=PercentFormatter(1.0), label=label)
    return fig


def _heatmap(ax, values, marks: Marks, norm, Ts: list[float], alphas: list[float]) -> None:
    grid = np.full((len(alphas), len(Ts)), np.nan)
    for (t, a), value in values.items():
        if value is not None:
            grid[alphas.index(a), Ts.index(t)] = value
    ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, norm=norm, origin="lower", aspect="auto")
    for i, a in enumerate(alphas):
        for j, t in enumerate(Ts):
            value = values.get((t, a))
            if value is None:
                text, color = _no_result(marks, (t, a)), "black"
            else:
                text = f"{100 * value:.2f}%\n{100 * (value - norm.vcenter):+.2f}"
                text += f" {NOISE}" if (t, a) in marks.noise else ""
                color = "white" if abs(norm(value) - 0.5) > 0.4 else "black"
            note = marks.flagged.get((t, a))
            if note:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch=HATCH, edgecolor="black", lw=0))
                text, color = f"{text}\n{note}", "black"
            box = {"facecolor": "white", "alpha": 0.75, "linewidth": 0} if note else None  # legible over the hatch
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color, bbox=box)
    ax.set_xticks(range(len(Ts)), [f"{t:g}" for t in Ts])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])


def _scatter(ax, values, marks: Marks, norm) -> None:
    done = [(t, a, v) for (t, a), v in values.items() if v is not None]
    if done:
        T, alpha, acc = zip(*done, strict=True)
        ax.scatter(T, alpha, c=acc, cmap=CMAP, norm=norm, s=60, edgecolors="black", linewidths=0.5)
    missing = [p for p, v in values.items() if v is None]
    for marker, name, why in (
        ("x", "failed", "failed"),
        ("v", "pruned (stopped early)", "pruned"),
        ("o", "no result", "—"),
    ):
        points = [p for p in missing if _no_result(marks, p) == why]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, s=50, label=name, color=MISSING)
    if marks.flagged:
        flagged = list(marks.flagged)
        ax.scatter(*zip(*flagged, strict=True), marker="s", s=160, facecolors="none", edgecolors="black",
                   hatch=HATCH, label="flagged student (collapsed or diverged)")  # fmt: skip
    noise = [p for p in marks.noise if values.get(p) is not None]
    if noise:
        ax.scatter(*zip(*noise, strict=True), marker="o", s=150, facecolors="none", edgecolors=MISSING,
                   linewidths=1.5, label=f"KD gain {NOISE}")  # fmt: skip
    if len(done) < len(values) or marks.flagged or noise:
        ax.legend(fontsize=8)


def _no_result(marks: Marks, point: Point) -> str:
    """Why a point has no value: ``failed``, ``pruned`` or ``—`` (not run yet, or unfinished)."""
    if point in marks.failed:
        return "failed"
    return "pruned" if point in marks.pruned else "—"
