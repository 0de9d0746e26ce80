"""The report's figures: a reliability diagram (matplotlib) and a confusion matrix (scikit-learn), no display needed."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

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


VALUES_UP_TO = 20  # classes up to which each cell's value is written; beyond, colours and every n-th tick only


def confusion_figure(matrix: torch.Tensor, title: str) -> Figure:
    """scikit-learn's ``ConfusionMatrixDisplay`` of ``matrix`` (counts, [true class, predicted class]), each cell the
    fraction of its true class (so that rare classes read as well as common ones); empty cells left blank."""
    counts = matrix.double()
    fractions = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    k = matrix.shape[0]
    size = min(12.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    display = ConfusionMatrixDisplay(fractions, display_labels=list(range(k)))
    display.plot(
        ax=ax,
        cmap="Blues",
        include_values=k <= VALUES_UP_TO,
        values_format=".2f",
        colorbar=False,  # drawn below, as tall as the matrix
        im_kw={"vmin": 0, "vmax": 1},
        text_kw={"fontsize": 8 if k <= 10 else 7},
    )
    if display.text_ is not None:
        for text, count in zip(display.text_.flat, counts.flatten().tolist(), strict=True):
            text.set_visible(count > 0)
    if k > VALUES_UP_TO:
        ticks = list(range(0, k, math.ceil(k / VALUES_UP_TO)))
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_yticks(ticks, labels=[str(t) for t in ticks])
    fig.colorbar(display.im_, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def close(fig: Figure) -> None:
    plt.close(fig)
