"""The report's figures: a reliability diagram and a confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdrun.core.io import atomic_write  # noqa: E402


def reliability_diagram(bins: dict[str, list[float]], ece: float, title: str) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration; bar width = bin width."""
    n = len(bins["count"])
    width = 1.0 / n
    left = [i * width for i in range(n)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    filled = [c > 0 for c in bins["count"]]
    ax.bar(
        [x for x, f in zip(left, filled, strict=True) if f],
        [a for a, f in zip(bins["accuracy"], filled, strict=True) if f],
        width=width,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: torch.Tensor, title: str) -> Figure:
    """Rows: true class, columns: predicted class, coloured by the row's fraction; counts written in small grids."""
    counts = matrix.float()
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = matrix.shape[0]
    size = min(12.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 20:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    color = "white" if fractions[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def close(fig: Figure) -> None:
    plt.close(fig)
