"""Pictures of a run: the confusion matrix and the training curves, as PNG files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from tlcli.data import images
from tlcli.store import files


def confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Draw the confusion matrix (rows true, columns predicted) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    k = len(classes)
    side = min(4 + 0.35 * k, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=8 if k > 10 else 10)
    ax.set_yticks(range(k), classes, fontsize=8 if k > 10 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 20:
        top = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > top / 2 else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    files.write_bytes(path, images.figure_png(fig))


def curves_png(history: dict[str, list[float]], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch (train, val, refit) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, values in history.items():
        if not values or not isinstance(values, list):
            continue
        ax = acc_ax if "accuracy" in key else loss_ax
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, label=key.replace("_", " "))
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    files.write_bytes(path, images.figure_png(fig))


def reliability_png(bins: dict, before: dict | None, path: str | os.PathLike, title: str = "") -> None:
    """A reliability diagram (``calibrate.reliability``'s bins: accuracy against confidence, with the diagonal a
    calibrated model follows), after temperature scaling and, given ``before``, before it, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, b, colour in (("before scaling", before, "tab:orange"), ("as saved", bins, "tab:blue")):
        if b is None:
            continue
        used = np.asarray(b["count"]) > 0
        conf, acc = np.asarray(b["confidence"])[used], np.asarray(b["accuracy"])[used]
        ax.plot(conf, acc, marker="o", color=colour, label=f"{name}: ECE {b['ece']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    files.write_bytes(path, images.figure_png(fig))
